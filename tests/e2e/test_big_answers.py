"""An answer larger than gRPC's default 4 MiB reaches `kubectl-runs`: the chaos soak's 48,000
runs listed as 9.5 MB were refused RESOURCE_EXHAUSTED by a client with the default limit (a list
costs ~200 bytes a run, so the default stops near 20,000 runs). Real gRPC over loopback: a
server answering 6 MB, the client channel of `kubectl-runs` and a default one."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from jobtree.cli.runs.credentials import Credentials

BIG = 6 * 1024 * 1024


@pytest.fixture
def server() -> Iterator[str]:
    def answer(request: bytes, context: object) -> bytes:
        return b"x" * BIG

    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(answer, request_deserializer=None, response_serializer=None)
    srv.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("big.Big", {"List": handler}),))
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield f"127.0.0.1:{port}"
    srv.stop(0)


def test_kubectl_runs_reads_answers_over_4_mib(server: str) -> None:
    with grpc.insecure_channel(server) as default:
        with pytest.raises(grpc.RpcError) as info:
            default.unary_unary("/big.Big/List")(b"", timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    channel = Credentials(server).channel()
    try:
        assert len(channel.unary_unary("/big.Big/List")(b"", timeout=10)) == BIG
    finally:
        channel.close()

"""A federation on loopback for the tests: a hub nats-server, member clusters each with its own
nats-server (JetStream, its own domain) joined to the hub as a leaf node *through a TCP proxy*
the test can cut (a partition), real services per cluster, and the federation service on the hub.

`World.start(tmp, clusters, caps)`; `world.cut(c)` / `world.heal(c)` partition and heal a
cluster; `world.kill_federation()` (SIGKILL) / `world.start_federation()`; `world.restart_nats(c)`.
`funded_timeline(world, cap)` replays every cluster's ledger and merges, by instant, the GPUs
funded under a cap in each cluster: what the §9 property is checked against.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
import yaml
from test_gateway import send_commands, setup_cluster, wait_healthy

from jobtree.api.jobtree.v1 import service_pb2 as svc
from jobtree.bus import subjects
from jobtree.bus.hub import FEDERATION, HUB, hub_user_names, hub_users, leaf_user
from jobtree.bus.ledger import Ledger, Record
from jobtree.bus.natsserver import LeafRemote, NatsServer
from jobtree.bus.security import Secrets
from jobtree.bus.supervisor import Supervisor
from jobtree.core import facts as F
from jobtree.core.engine import Cluster
from jobtree.core.invariants import check_all
from jobtree.core.model import ClusterConfig, Node, labels_of

FLAVOR = "H100-80GB"
SERVICES = ("binder", "admission", "budget")


class TcpProxy:
    """Forwards 127.0.0.1:port to a target; `cut()` drops every connection and refuses new
    ones (the port stays reserved), `heal()` accepts again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.open = True
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"nats-leaf://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data or not self.open:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def cut(self) -> None:
        self.open = False
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def heal(self) -> None:
        self.open = True

    def stop(self) -> None:
        self._stopped = True
        self.cut()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (close alone does not)
        self._listener.close()


@dataclass
class Member:
    name: str
    server: NatsServer
    proxy: TcpProxy
    sup: Supervisor
    config_path: Path


@dataclass
class World:
    tmp: Path
    hub: NatsServer
    secrets: Secrets
    members: dict[str, Member]
    fed_sup: Supervisor
    fed_config: Path
    twin_sup: Supervisor = field(init=False)

    def __post_init__(self) -> None:
        self.twin_sup = Supervisor(self.tmp / "fed-twin", HUB, self.hub.url)

    @staticmethod
    def start(tmp: Path, clusters: Sequence[str], caps: list[dict[str, Any]], *,
              allowances: dict[str, dict[str, int]], nodes_per_cluster: int = 4, every: str = "1s",
              gateways: Sequence[str] = ()) -> World:
        """... `gateways`: clusters that also run a gateway (plain loopback gRPC)."""
        secrets = Secrets.load_or_create(tmp / "hub-secrets.json", HUB, hub_user_names(clusters))
        hub = NatsServer(tmp / "hub", name="hub", domain="hub", leaf_port=-1, users=hub_users(clusters, secrets)).start()
        members: dict[str, Member] = {}
        fed_config = tmp / "federation.yaml"
        fed_config.write_text(yaml.safe_dump({"apiVersion": "rq.davidlangworthy.io/v1", "kind": "Federation",
                                              "clusters": list(clusters), "every": every, "caps": caps}))
        world = World(tmp, hub, secrets, members, Supervisor(tmp / "fed", HUB, hub.url), fed_config)
        try:
            for c in clusters:
                proxy = TcpProxy(("127.0.0.1", hub.leaf_port or 0))
                server = NatsServer(tmp / c / "nats", name=f"jobtree-{c}", domain=c,
                                    leaf_remotes=(LeafRemote(proxy.url, secrets.seeds[leaf_user(c)]),)).start()
                config_path = tmp / c / "config.yaml"
                config_path.write_text(yaml.safe_dump({"cluster": c, "capAllowances": allowances.get(c, {})}))
                sup = Supervisor(tmp / c, c, server.url)
                members[c] = Member(c, server, proxy, sup, config_path)
                setup_cluster(server.url, c)
                for name in SERVICES:
                    sup.start(name, args=("--config", str(config_path)))
                if c in gateways:
                    sup.start("gateway", env={"JOBTREE_GRPC_INSECURE": "1"},
                              args=("--config", str(config_path), "--grpc-port", "0"))
                wait_healthy(server.url, c, (*SERVICES, *(("gateway",) if c in gateways else ())))
                world.send(c, [F.AddNode(n) for n in nodes(c, nodes_per_cluster)])
            world.start_federation()
        except BaseException:
            world.stop()
            raise
        return world

    def grpc_address(self, cluster: str) -> str:
        from test_gateway import wait_for_port

        m = self.members[cluster]
        return f"127.0.0.1:{wait_for_port(m.sup.data_dir, m.sup)}"

    def start_federation(self, twin: bool = False) -> None:
        """Start the federation (`twin`: a second instance beside it, as a mistake or a restart
        racing the old process would)."""
        sup = self.twin_sup if twin else self.fed_sup
        sup.start(FEDERATION, env=self.secrets.env(FEDERATION), args=("--config", str(self.fed_config)))

    def kill_federation(self, twin: bool = False) -> None:
        (self.twin_sup if twin else self.fed_sup).kill(FEDERATION)

    def cut(self, cluster: str) -> None:
        self.members[cluster].proxy.cut()

    def heal(self, cluster: str) -> None:
        self.members[cluster].proxy.heal()

    def restart_nats(self, cluster: str) -> None:
        """Stop the cluster's nats-server and start it again on the same port (its services
        reconnect; JetStream resumes from disk)."""
        server = self.members[cluster].server
        from urllib.parse import urlsplit

        server.port = urlsplit(server.url).port or -1
        server.stop()
        server.start()

    def restart_hub(self) -> None:
        """Stop the hub's nats-server and start it again on the same client port (the leaf port
        is kept by the server; the federation reconnects; its books are on disk)."""
        from urllib.parse import urlsplit

        self.hub.port = urlsplit(self.hub.url).port or -1
        self.hub.stop()
        self.hub.start()

    def set_caps(self, caps: list[dict[str, Any]]) -> None:
        doc = yaml.safe_load(self.fed_config.read_text())
        doc["caps"] = caps
        tmp = self.fed_config.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc))
        tmp.replace(self.fed_config)

    def logs(self) -> str:
        out = []
        for sup in [self.fed_sup, self.twin_sup, *(m.sup for m in self.members.values())]:
            for name, sp in sup.processes.items():
                out.append(f"--- {sup.cluster}/{name}\n{sp.log_tail(30)}")
        return "\n".join(out)

    def stop(self) -> None:
        self.fed_sup.stop(timeout=5)
        self.twin_sup.stop(timeout=5)
        for m in self.members.values():
            m.sup.stop(timeout=5)
            m.proxy.stop()
            m.server.stop()
        self.hub.stop()

    # -- asking --------------------------------------------------------------------------

    def send(self, cluster: str, cmds: Sequence[F.Command]) -> list[int]:
        """Send commands to the cluster's admission (ids of their own), retrying while nobody
        answers; the ledger sequences."""
        return send_commands(self.members[cluster].server.url, cluster, cmds, prefix=str(uuid.uuid4()))

    def usage(self, cluster: str | None = None) -> svc.GlobalUsageResponse:
        """GlobalUsage as a member cluster's gateway would ask it (over the leaf connection),
        or on the hub."""
        async def go() -> svc.GlobalUsageResponse:
            url = self.hub.url if cluster is None else self.members[cluster].server.url
            # from a cluster, answers cross the leaf connection only to its gateway's inbox
            opts: dict[str, Any] = (self.secrets.connect_options("admin") if cluster is None else
                                    {"inbox_prefix": subjects.inbox_prefix(cluster, "gateway").encode()})
            nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False, **opts)
            try:
                raw = await nc.request(subjects.request(cluster or HUB, FEDERATION, "usage"),
                                       svc.GlobalUsageRequest().SerializeToString(), timeout=3)
                return svc.GlobalUsageResponse.FromString(raw.data)
            finally:
                await nc.close()

        return asyncio.run(go())

    def caps(self, cluster: str) -> svc.ClusterCapsResponse:
        async def go() -> svc.ClusterCapsResponse:
            nc = await nats.connect(self.members[cluster].server.url, connect_timeout=2, allow_reconnect=False)
            try:
                raw = await nc.request(subjects.request(cluster, "budget", "caps"),
                                       svc.ClusterCapsRequest().SerializeToString(), timeout=3)
                return svc.ClusterCapsResponse.FromString(raw.data)
            finally:
                await nc.close()

        return asyncio.run(go())

    def allowance(self, cluster: str, cap: str) -> int | None:
        """The allowance the cluster's own ledger holds now (via its budget service)."""
        for u in self.caps(cluster).caps:
            if u.cap == cap:
                return u.allowance if u.HasField("allowance") else None
        return None

    def records(self, cluster: str) -> list[Record]:
        async def go() -> list[Record]:
            nc = await nats.connect(self.members[cluster].server.url, connect_timeout=2, allow_reconnect=False)
            try:
                return await Ledger(nc.jetstream(), cluster).replay()
            finally:
                await nc.close()

        return asyncio.run(go())


def until(what: str, ok: Callable[[], bool], timeout: float = 30.0, world: World | None = None) -> None:
    deadline = time.monotonic() + timeout

    def ok_now() -> bool:
        try:
            return ok()
        except (nats.errors.Error, OSError, AssertionError):
            return False

    while not ok_now():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}" + (f"\n{world.logs()}" if world else ""))
        time.sleep(0.2)


def nodes(cluster: str, count: int) -> list[Node]:
    return [Node(f"{cluster}-n{i}", 8, labels_of({"region": "local", "cluster": cluster, "fabric.domain": "A", "gpu.flavor": FLAVOR}))
            for i in range(count)]


def capped_budget(cluster: str, name: str, owner: str, cap: str, envelope_gpus: int, cap_gpus: int,
                  hours: float | None = None) -> F.ApplyBudget:
    """A budget whose one envelope (in `cluster`) is under the aggregate cap `cap` (`name/cap`)."""
    from jobtree.core.manifest import parse_budget

    caps: dict[str, Any] = {"name": cap, "flavor": FLAVOR, "envelopes": ["main"], "maxConcurrency": cap_gpus}
    if hours is not None:
        caps["maxGPUHours"] = hours
    doc = {"apiVersion": "rq.davidlangworthy.io/v1", "kind": "Budget", "metadata": {"name": name},
           "spec": {"owner": owner, "envelopes": [
               {"name": "main", "flavor": FLAVOR, "selector": {"cluster": cluster}, "concurrency": envelope_gpus}],
               "aggregateCaps": [caps]}}
    return F.ApplyBudget(parse_budget(doc, "budget"))


def run(name: str, owner: str, gpus: int) -> F.ApplyRun:
    from jobtree.core.manifest import parse_run

    doc = {"apiVersion": "rq.davidlangworthy.io/v1", "kind": "Run", "metadata": {"name": name},
           "spec": {"owner": owner, "resources": {"gpuType": FLAVOR, "totalGPUs": gpus}}}
    return F.ApplyRun(parse_run(doc, "run"))


def funded_series(records: Sequence[Record], cluster: str, cap: tuple[str, str],
                  allowances: dict[str, int]) -> list[tuple[int, int, int | None]]:
    """(instant, GPUs funded under `cap`, allowance in force) after every ledger batch of one
    cluster, replaying it as every follower does."""
    from jobtree.bus.follower import apply_batch

    cl = Cluster(ClusterConfig(cluster=cluster, cap_allowances=tuple(sorted(allowances.items()))))
    key = f"{cap[0]}/{cap[1]}"
    out = []
    for r in records:
        apply_batch(cl, r.batch)
        check_all(cl)  # §10 in this cluster: nothing funded above its allowance or any other bound
        out.append((cl.now, cl.funding.used_now(("cap", *cap)), cl.allowances.get(key)))
    return out


def merged_peaks(series: dict[str, list[tuple[int, int, int | None]]]) -> list[tuple[int, int, dict[str, int]]]:
    """At the end of every instant any cluster decided: (instant, the sum over clusters of the GPUs
    funded under the cap, per cluster). Clusters share this machine's clock."""
    instants = sorted({t for s in series.values() for t, _, _ in s})
    out = []
    for t in instants:
        per = {c: next((f for tt, f, _ in reversed(s) if tt <= t), 0) for c, s in series.items()}
        out.append((t, sum(per.values()), per))
    return out

"""`python -m kube_standin --kubeconfig FILE [--port N]` (with `tools/` on PYTHONPATH): serve the
stand-in API server on 127.0.0.1 and write a kubeconfig that points kubectl and the kube-bridge
at it; runs until SIGTERM/SIGINT. Prints `ready <url>` once it answers."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import signal
import sys
from pathlib import Path

import kmock
import yaml

from kube_standin.server import StandIn


def kubeconfig(url: str) -> str:
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "standin",
        "clusters": [{"name": "standin", "cluster": {"server": url}}],
        "users": [{"name": "standin", "user": {"token": "standin"}}],
        "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin",
                                                     "namespace": "default"}}],
    })


async def serve(port: int, config: Path) -> None:
    handler = StandIn()
    async with handler, kmock.Server(handler, port=port or None) as server:
        url = f"http://127.0.0.1:{server.port}"
        config.write_text(kubeconfig(url))
        print(f"ready {url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: where is it stuck?
    p = argparse.ArgumentParser(prog="kube_standin", description=__doc__)
    p.add_argument("--kubeconfig", type=Path, required=True, help="where to write the kubeconfig")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    args = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, args.kubeconfig))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`jobtree up --clusters A,B[,C]`: a federation on this machine (CALCULUS §9).

Contract: `jobtree up --clusters A,B[,C] [--data-dir D] [--no-demo] [--insecure | --client-certs]
[--grpc-port P] [--clock K] [--admission-replicas N] [--config FILE]`
1. refuses at once, with one line (status 2): fewer than two clusters, a name that is not a DNS
   label or is given twice, `--clusters` with `--cluster`, `--kubeconfig`, `--notify`,
   `--metrics-port-base` or `--dashboard-port` (each cluster's are chosen free), a gRPC port of
   P, P+1, ... taken, or another `jobtree up` on D;
2. starts the hub: a nats-server in `D/hub/nats` with JetStream (domain `hub`) and a leaf-node
   listener on loopback, its users those of `jobtree.bus.hub` (nkey seeds in `D/hub/secrets.json`,
   mode 0600); its client and leaf ports are kept in `D/hub/nats/{client,leaf}.port` so every
   restart keeps the clusters' and the federation's URLs valid;
3. writes the federation's config `D/federation.yaml` on the first start (the member clusters and,
   unless `--no-demo`, the demo cap `vision/all` of `DEMO_CAP` GPUs) and keeps it after: edit it to
   change caps (the federation re-reads it within a round);
4. starts every cluster C as a child `jobtree up --cluster C --data-dir D/C --no-demo --join LEAF
   --grpc-port P+i --dashboard-port 0` (plus the trust, clock, replica and config options given;
   its log `D/logs/up-C.log`): its own nats-server (JetStream domain C, a leaf of the hub as the
   user `leaf-C`, whose seed it gets in its environment) and every service. Each cluster's config
   starts the demo cap's allowance at an even share (its `capAllowances`), so the clusters never
   hold more than the cap together, even before the federation has spoken. On a fresh ledger,
   unless `--no-demo`, it loads the demo: `DEMO_NODES` nodes of 8 GPUs and the budgets of
   `demo_budgets` (a `vision` envelope under the cap, an `nlp` envelope of its own);
5. starts the federation service (`jobtree serve federation`, `D/logs/federation.log`) on the hub;
6. prints `nats hub: URL`, then per cluster `grpc C: HOST:PORT` and `use C: export
   JOBTREE_CONFIG=D/C/client.yaml` (unless --insecure), then `federation: D/federation.yaml`, and
   writes `D/up.json`; runs until SIGINT or SIGTERM, restarting what dies (the hub, a cluster's
   `up`, the federation) as `jobtree up` does;
7. then stops the federation, every cluster (each stops its services and nats-server) and the hub;
   exits 0 (1 if starting failed).
Not: clusters on other machines (see docs/operator-guide/federation.md for joining those).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jobtree.cli.sim_cmd import CliError
from jobtree.cli.up_cmd import DEFAULT_CLUSTER, LEAF_SEED_ENV, _load_demo, data_dir_lock
from jobtree.cli.up_processes import (
    HOST,
    UpError,
    _finish,
    _keep_nats_port,
    _Keeper,
    _kept_nats_port,
    _say,
    _until,
    port_in_use,
)

DEMO_CAP = 32
"""GPUs the demo's `vision/all` cap allows across every cluster together."""
DEMO_NODES = 8
STOP_TIMEOUT = 30.0
"""Seconds a cluster's `up` gets to stop its services and nats-server."""
READY_TIMEOUT = 90.0
FEDERATION = "federation"


def demo_budgets(cluster: str) -> list[dict[str, Any]]:
    """The demo's budgets in one cluster: vision's envelope there is under the cap that spans
    the clusters (each envelope alone could take the whole cap); nlp's is local."""
    def envelope(gpus: int) -> dict[str, Any]:
        return {"name": "main", "flavor": "H100-80GB", "selector": {"cluster": cluster}, "concurrency": gpus}

    return [
        {"apiVersion": "rq.davidlangworthy.io/v1", "kind": "Budget", "metadata": {"name": "vision"},
         "spec": {"owner": "org:ml:vision", "envelopes": [envelope(DEMO_CAP)],
                  "aggregateCaps": [{"name": "all", "flavor": "H100-80GB", "envelopes": ["main"],
                                     "maxConcurrency": DEMO_CAP}]}},
        {"apiVersion": "rq.davidlangworthy.io/v1", "kind": "Budget", "metadata": {"name": "nlp"},
         "spec": {"owner": "org:ml:nlp", "envelopes": [envelope(16)]}},
    ]


def demo_commands(cluster: str) -> list[tuple[str, Any]]:
    from jobtree.core import facts
    from jobtree.core.manifest import generate_nodes, parse_budget

    labels = {"region": "local", "cluster": cluster, "fabric.domain": "A", "gpu.flavor": "H100-80GB"}
    nodes = generate_nodes({"generate": {"prefix": f"{cluster}-", "count": DEMO_NODES, "gpus": 8, "labels": labels}})
    out: list[tuple[str, Any]] = [(f"demo-node-{n.name}", facts.AddNode(n)) for n in nodes]
    for i, doc in enumerate(demo_budgets(cluster)):
        out.append((f"demo-budget-{doc['metadata']['name']}", facts.ApplyBudget(parse_budget(doc, f"budgets[{i}]"))))
    return out


def even_shares(total: int, clusters: list[str]) -> dict[str, int]:
    """`total` split evenly (the first ones get the remainder): the clusters' starting allowances."""
    n = len(clusters)
    return {c: total // n + (1 if i < total % n else 0) for i, c in enumerate(clusters)}


def parse_clusters(text: str) -> list[str]:
    from jobtree.bus.subjects import check_cluster

    names = [c.strip() for c in text.split(",") if c.strip()]
    if len(names) < 2:
        raise CliError(f"--clusters: a federation needs at least two clusters, got {text!r}")
    for c in names:
        try:
            check_cluster(c)
        except ValueError as e:
            raise CliError(f"--clusters: {e}") from None
    if len(set(names)) != len(names):
        raise CliError(f"--clusters: a cluster is named twice in {text!r}")
    from jobtree.bus.hub import HUB

    if HUB in names:
        raise CliError(f"--clusters: {HUB!r} is the federation hub's own name; pick another")
    return names


def cmd_up_clusters(args: argparse.Namespace) -> int:
    clusters = parse_clusters(args.clusters)
    for flag, given in (("--cluster", args.cluster != DEFAULT_CLUSTER), ("--kubeconfig", args.kubeconfig),
                        ("--notify", args.notify), ("--metrics-port-base", args.metrics_port_base),
                        ("--dashboard-port", args.dashboard_port is not None), ("--join", args.join)):
        if given:
            raise CliError(f"--clusters: {flag} is per cluster; it cannot be given with --clusters")
    if args.insecure and args.client_certs:
        raise CliError("--client-certs needs TLS: leave out --insecure")
    if args.admission_replicas < 1:
        raise CliError(f"--admission-replicas: must be at least 1, got {args.admission_replicas}")
    base = args.grpc_port
    if not 0 <= base <= 65535 - len(clusters):
        raise CliError(f"--grpc-port: must be a port number (0 for free ones), got {base}")
    ports = {c: (base + i if base else 0) for i, c in enumerate(clusters)}
    for c, port in ports.items():
        if port and port_in_use(port):
            raise CliError(f"--grpc-port: {HOST}:{port} (for cluster {c}) is in use; pick another base or 0")
    config_args: tuple[str, ...] = ()
    if args.config:
        from jobtree.cli.serve_cmd import read_config

        read_config(Path(args.config), clusters[0])
        config_args = ("--config", str(Path(args.config).resolve()))
    data_dir = Path(args.data_dir).resolve()
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(data_dir, 0o700)
    except OSError as e:
        raise CliError(f"--data-dir {data_dir}: {e.strerror or e}") from None
    child_args = [*(("--insecure",) if args.insecure else ()), *(("--client-certs",) if args.client_certs else ()),
                  "--clock", args.clock, "--admission-replicas", str(args.admission_replicas)]
    with data_dir_lock(data_dir):
        try:
            return asyncio.run(_up_clusters(data_dir, clusters, ports, child_args, config_args, not args.no_demo))
        except UpError as e:
            print(f"jobtree: up: {' '.join(str(e).split())}", file=sys.stderr)
            return 1


def _cluster_config(path: Path, cluster: str, shares: dict[str, int], config_file: tuple[str, ...]) -> Path:
    """A cluster's config: the one given (if any) with the demo cap's starting allowance added."""
    import yaml

    doc: dict[str, Any] = {}
    if config_file:
        doc = yaml.safe_load(Path(config_file[1]).read_text()) or {}
    doc["cluster"] = cluster
    if shares:
        doc["capAllowances"] = {**(doc.get("capAllowances") or {}), "vision/all": shares[cluster]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def _federation_config(path: Path, clusters: list[str], demo: bool) -> None:
    import yaml

    if path.exists():
        return
    doc = {"apiVersion": "rq.davidlangworthy.io/v1", "kind": "Federation", "clusters": clusters, "every": "1s",
           "caps": [{"cap": "vision/all", "maxConcurrency": DEMO_CAP}] if demo else []}
    path.write_text("# The federation's member clusters and the aggregate caps that span them.\n"
                    "# Edit caps here: the federation re-reads this file within a round.\n" + yaml.safe_dump(doc))


def _fed_supervisor(data_dir: Path, hub_url: str, clock: str) -> Any:
    from jobtree.bus.hub import HUB
    from jobtree.bus.supervisor import Supervisor

    class FedSupervisor(Supervisor):
        def argv(self, name: str, args: Iterable[str] = ()) -> list[str]:
            if name.startswith("up-"):
                return [self.python, "-m", "jobtree.cli.main", "up", *args]
            return super().argv(name, args)

    return FedSupervisor(data_dir, HUB, hub_url, clock=clock)


async def _up_clusters(data_dir: Path, clusters: list[str], ports: dict[str, int], child_args: list[str],
                       config_args: tuple[str, ...], demo: bool) -> int:
    import nats

    from jobtree.bus.hub import HUB, hub_user_names, hub_users, leaf_user
    from jobtree.bus.natsserver import NatsServer, NatsServerError
    from jobtree.bus.security import Secrets
    from jobtree.bus.supervisor import SupervisorError

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    hub_dir = data_dir / "hub"
    hub_dir.mkdir(parents=True, exist_ok=True)
    try:
        secrets = Secrets.load_or_create(hub_dir / "secrets.json", HUB, hub_user_names(clusters))
    except ValueError as e:
        raise UpError(f"{e}; use another --data-dir") from None
    leaf_file = hub_dir / "nats" / "leaf.port"
    kept_leaf = -1
    with contextlib.suppress(OSError, ValueError):
        kept_leaf = int(leaf_file.read_text())
    hub = NatsServer(hub_dir / "nats", name="jobtree-hub", domain="hub", users=hub_users(clusters, secrets),
                     port=_kept_nats_port(hub_dir / "nats"), leaf_port=kept_leaf)
    fed_config = data_dir / "federation.yaml"
    _federation_config(fed_config, clusters, demo)
    shares = even_shares(DEMO_CAP, clusters) if demo else {}
    sup: Any = None
    ready = False
    state_path = data_dir / "up.json"
    try:
        try:
            hub.start()
        except NatsServerError as e:
            raise UpError(f"hub nats-server: {e}") from None
        _keep_nats_port(hub)
        leaf_file.write_text(f"{hub.leaf_port}\n")
        _say(f"jobtree up: hub nats-server {hub.url} (leaf nodes at {hub.leaf_url}), clusters {', '.join(clusters)}")
        sup = _fed_supervisor(data_dir, hub.url, "system")

        def start(name: str) -> None:
            try:
                if name == FEDERATION:
                    sup.start(name, env=secrets.env(FEDERATION), args=("--config", str(fed_config)))
                    return
                c = name.removeprefix("up-")
                config = _cluster_config(data_dir / c / "config.yaml", c, shares, config_args)
                sup.start(name, env={LEAF_SEED_ENV: secrets.seeds[leaf_user(c)]},
                          args=("--cluster", c, "--data-dir", str(data_dir / c), "--no-demo", "--join", hub.leaf_url,
                                "--grpc-port", str(ports[c]), "--dashboard-port", "0", "--config", str(config),
                                *child_args))
            except SupervisorError as e:
                raise UpError(str(e)) from None

        for c in clusters:
            start(f"up-{c}")
        states = await _wait_clusters(stop, data_dir, clusters, sup)
        if states is None:
            return 130
        if demo:
            for c in clusters:
                url, opts = states[c]["nats"], Secrets.load(data_dir / c / "secrets.json").connect_options("admin")
                nc = await nats.connect(url, **opts, name="jobtree-up-clusters")
                try:
                    if await _fresh(nc, c) and not await _until(stop, _load_demo(nc, c, demo_commands(c))):
                        return 130
                finally:
                    await nc.close()
        start(FEDERATION)
        if not await _until(stop, _wait_federation(hub, secrets, sup)):
            return 130
        ready = True
        _write(state_path, hub, clusters, states, sup, fed_config)
        _say(f"jobtree up: federation of {', '.join(clusters)} running; logs in {sup.logs_dir}; Ctrl-C to stop")
        _say(f"nats hub: {hub.url}", sys.stdout)
        for c in clusters:
            _say(f"grpc {c}: {states[c]['grpc']}", sys.stdout)
        for c in clusters:
            if states[c].get("tls"):
                _say(f"use {c}: export JOBTREE_CONFIG={states[c]['client_config']}", sys.stdout)
        _say(f"federation: {fed_config}", sys.stdout)
        return await _Keeper(hub, sup, start, lambda: _write(state_path, hub, clusters, states, sup, fed_config)).run(stop)
    finally:
        if sup is not None:
            sup.stop([FEDERATION], timeout=10)
            sup.stop(timeout=STOP_TIMEOUT)
        _finish(hub, state_path, loop, ready)


async def _wait_clusters(stop: asyncio.Event, data_dir: Path, clusters: list[str], sup: Any) -> dict[str, Any] | None:
    """Every cluster's `up.json` once it says ready (None if stopped first)."""
    deadline = time.monotonic() + READY_TIMEOUT
    states: dict[str, Any] = {}
    while len(states) < len(clusters):
        if stop.is_set():
            return None
        for c in clusters:
            if c in states:
                continue
            with contextlib.suppress(OSError, ValueError):
                doc = json.loads((data_dir / c / "up.json").read_text())
                if doc.get("ready"):
                    states[c] = doc
                    continue
            sp = sup.processes[f"up-{c}"]
            if not sp.running:
                raise UpError(f"cluster {c} did not start (status {sp.proc.returncode}); see {sp.log_path}")
        if time.monotonic() > deadline:
            late = [c for c in clusters if c not in states]
            raise UpError(f"cluster(s) {', '.join(late)} not ready within {READY_TIMEOUT:.0f} s; see {sup.logs_dir}")
        await asyncio.sleep(0.2)
    return states


async def _fresh(nc: Any, cluster: str) -> bool:
    from jobtree.bus.ledger import Ledger

    return await Ledger(nc.jetstream(), cluster).last_sequence() == 0


async def _wait_federation(hub: Any, secrets: Any, sup: Any) -> None:
    import nats
    import nats.errors

    from jobtree.bus import subjects
    from jobtree.bus.hub import HUB

    nc = await nats.connect(hub.url, **secrets.connect_options("admin"), name="jobtree-up-clusters")
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            with contextlib.suppress(nats.errors.TimeoutError, nats.errors.NoRespondersError):
                if (await nc.request(subjects.request(HUB, FEDERATION, "health"), b"", timeout=0.5)).data == b"ok":
                    return
            sp = sup.processes[FEDERATION]
            if not sp.running:
                raise UpError(f"the federation service exited with status {sp.proc.returncode}; see {sp.log_path}")
            if time.monotonic() > deadline:
                raise UpError(f"the federation service did not answer health within {READY_TIMEOUT:.0f} s")
            await asyncio.sleep(0.1)
    finally:
        await nc.close()


def _write(path: Path, hub: Any, clusters: list[str], states: dict[str, Any], sup: Any, fed_config: Path) -> None:
    doc = {"pid": os.getpid(), "ready": True, "hub": hub.url, "leaf": hub.leaf_url, "federation_config": str(fed_config),
           "clusters": {c: {"grpc": states[c]["grpc"], "nats": states[c]["nats"], "data_dir": str(path.parent / c),
                            "client_config": states[c].get("client_config")} for c in clusters},
           "processes": sup.pids()}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)

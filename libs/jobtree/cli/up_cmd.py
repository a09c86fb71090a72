"""`jobtree up`: the whole system on this machine — nats-server, every service, a demo cluster.

Contract: `jobtree up [--data-dir D] [--no-demo] [--insecure | --client-certs] [--cluster C] [--grpc-port P] [--clock K]
[--admission-replicas N] [--metrics-port-base M] [--config FILE] [--dashboard-port P]
[--kubeconfig FILE [--node-grace S] [--pod-grace S]] [--notify FILE]`
With `--notify FILE` (the notifier's receivers and routes, checked first: one line, status 2)
the notifier runs too.
`--config FILE` (a YAML mapping of a scenario's `config:` keys: period, reservationLead, ...)
is checked at once (one line, status 2) and handed to every service.
With `--kubeconfig`, the kube-bridge runs too (against that API server, as every other process
here: supervised, its own NATS user, a metrics port), and there is no demo: nodes come from the
cluster's Nodes, budgets and runs from its objects (an unreadable file: one line, status 2).
1. refuses at once, with one line, when a service cannot be served yet, the data directory
   belongs to another cluster or another `jobtree up` runs on it, the gRPC port is taken,
   N < 1, or a metrics port of the block M.. is taken, out of range or the gRPC port;
2. starts a nats-server with JetStream (`D/nats`, fsync before ack) and one NATS user per
   service with the permissions of `jobtree.bus.security` (known by nkeys: the seeds in
   `D/secrets.json`, mode 0600, reused on every start; the server's config holds only public keys). Its client port is chosen by the server on the first
   start and kept in `D/nats/client.port`: every later start and every restart uses it, so the
   services' URL stays valid;
3. as `admin`, creates the ledger stream and the KV buckets (leader: TTL 2 s, history 1);
4. starts every service as its own process (`jobtree serve NAME`, logs in `D/logs/NAME.log`),
   each with Prometheus `/metrics` on its own 127.0.0.1 port (M, M+1, ... in start order; free
   ports when M is 0), and waits until each answers `health` over NATS, serves its metrics port
   and the gateway's gRPC port accepts connections. With N > 1, once the first admission holds
   the leader lock, starts the N-1 standby admissions (processes `admission-2`..`admission-N`,
   each `jobtree serve admission`, logs `D/logs/admission-K.log`), which wait for the lock and
   take over when it lapses, and waits until they serve their metrics ports;
5. on a fresh ledger, unless `--no-demo`, loads the demo cluster by sending `bus.Command`s to
   `jobtree.C.admission.command`: 3 fabric domains of 4 nodes with 8 `H100-80GB` GPUs, and an
   organisation `org:ml` funding a pool its two teams (vision, nlp) share. A ledger that
   already holds messages is resumed as it is (nothing loaded twice);
6. prints `nats: URL`, `grpc: 127.0.0.1:PORT`, `auth: ...` and `use: export JOBTREE_CONFIG=D/client.yaml`
   (the gateway serves TLS with an access policy: the local CA, the admin token and the policy
   of `up_trust`, made on the first start; `--insecure` serves plain loopback gRPC instead, and
   `--client-certs` requires client certificates too), `dashboard: http://127.0.0.1:PORT/` (the web
   dashboard: `--dashboard-port`, default 8080, or a free port when 8080 is taken and no port was
   asked for; 0 picks a free one) and then `metrics: NAME=127.0.0.1:PORT ...` (every process, in
   start order) on stdout, writes `D/up.json` (addresses, process ids, metrics
   ports, restarts), and runs until SIGINT (Ctrl-C) or SIGTERM, supervising: a process that
   dies (the nats-server included) is restarted with the same port, environment and arguments
   after a backoff (`RestartPolicy`: 0.25 s, doubling with each restart in the last 60 s, at most
   8 s), with one line on stderr when it dies and one when it is back; a process restarted 5
   times within 60 s is crash-looping and is left stopped (said in one line) — for the
   nats-server that ends `up` (status 1), since nothing works without it;
7. then stops every service (SIGTERM, SIGKILL after 10 s) and the nats-server, removes
   `D/up.json` and exits 0 (130 if interrupted before it was ready, 1 if starting failed).
Not: the services (see `services/`), not the simulator demo (`jobtree demo`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobtree.bus import ports
from jobtree.cli.serve_cmd import CLOCKS, ENV_GRPC_PORT, missing_services
from jobtree.cli.sim_cmd import CliError
from jobtree.cli.up_processes import (  # noqa: F401 - part of this module's interface
    HOST,
    NATS,
    READY_TIMEOUT,
    SUPERVISE_EVERY,
    UpError,
    _finish,
    _keep_nats_port,
    _Keeper,
    _kept_nats_port,
    _poll,
    _say,
    _status_text,
    _until,
    accepts,
    check_metrics_base,
    port_in_use,
)

DEFAULT_DATA_DIR = Path(".jobtree")
DEFAULT_CLUSTER = "demo"
DEFAULT_GRPC_PORT = 50051
DEFAULT_DASHBOARD_PORT = 8080
DEFAULT_ADMISSION_REPLICAS = 2
"""One leader and one standby."""
STOP_TIMEOUT = 10.0

START_ORDER = ("binder", "admission", "budget", "packer", "resolver", "gateway")
"""The writer first, the public entry last (its port opens when the pipeline is there)."""

DEMO_FLAVOR = "H100-80GB"
DEMO_DOMAINS = ("A", "B", "C")
DEMO_NODES_PER_DOMAIN = 4
DEMO_GPUS_PER_NODE = 8


def add_up_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "up",
        help="start jobtree on this machine: nats-server and every service, with a demo cluster",
        description="Start a nats-server with JetStream and every jobtree service on loopback, load a "
        "demo topology and budgets (unless --no-demo or the data directory already holds a ledger), "
        "print the gRPC address and run until Ctrl-C. Starting again on the same data directory resumes.",
    )
    p.add_argument("--data-dir", metavar="D", default=str(DEFAULT_DATA_DIR),
                   help=f"where the ledger, secrets and logs live (default {DEFAULT_DATA_DIR})")
    p.add_argument("--no-demo", action="store_true", help="start empty: no demo nodes or budgets")
    p.add_argument("--insecure", action="store_true",
                   help="serve gRPC without TLS or identities (loopback only: every caller may do everything)")
    p.add_argument("--client-certs", action="store_true",
                   help="callers must also present a client certificate of the local CA (mutual TLS)")
    p.add_argument("--cluster", default=DEFAULT_CLUSTER, help=f"cluster name (default {DEFAULT_CLUSTER})")
    p.add_argument("--grpc-port", metavar="P", type=int, default=DEFAULT_GRPC_PORT,
                   help=f"the gateway's gRPC port on {HOST} (default {DEFAULT_GRPC_PORT}; 0 = a free port)")
    p.add_argument("--dashboard-port", metavar="P", type=int,
                   help=f"the web dashboard's port on {HOST} (default {DEFAULT_DASHBOARD_PORT}, or a free port "
                        "when that is taken; 0 = a free port)")
    p.add_argument("--clock", choices=CLOCKS, default="system",
                   help="system (default) or virtual (instants come from commands; the resolver idles)")
    p.add_argument("--admission-replicas", metavar="N", type=int, default=DEFAULT_ADMISSION_REPLICAS,
                   help=f"admission processes: one leader, N-1 standbys that take over when it dies "
                        f"(default {DEFAULT_ADMISSION_REPLICAS})")
    p.add_argument("--metrics-port-base", metavar="M", type=int, default=0,
                   help=f"Prometheus /metrics of every process on {HOST}:M, M+1, ... in start order "
                        "(default 0: free ports; the `metrics:` line and up.json say which)")
    p.add_argument("--config", metavar="FILE",
                   help="YAML mapping of cluster config keys (period, reservationLead, preemptionHoldDown, ...) "
                        "for every service")
    p.add_argument("--notify", metavar="FILE",
                   help="also run the notifier with these receivers and routes (docs/user-guide/notifications.md)")
    p.add_argument("--kubeconfig", metavar="FILE",
                   help="also run the kube-bridge against this API server; nodes come from its Nodes "
                        "(no demo)")
    p.add_argument("--node-grace", metavar="S", type=float, default=40.0,
                   help="with --kubeconfig: seconds a node may be NotReady before it is fenced (default 40)")
    p.add_argument("--pod-grace", metavar="S", type=int, default=30,
                   help="with --kubeconfig: seconds a workload pod gets to stop when its lease closes (default 30)")
    p.add_argument("--clusters", metavar="A,B[,C]",
                   help="a federation: one nats-server and every service per cluster, joined as leaf nodes to a "
                        "hub that runs the federation service, with a demo cap spanning the clusters "
                        "(docs/operator-guide/federation.md)")
    p.add_argument("--join", metavar="URL", help=argparse.SUPPRESS)
    """Join a federation hub as a leaf node (the leaf user's nkey seed in $JOBTREE_LEAF_NKEY_SEED):
    how `up --clusters` starts each cluster."""
    p.set_defaults(handler=cmd_up)


# --- the demo cluster ----------------------------------------------------------------------


def demo_budgets(cluster: str) -> list[dict[str, Any]]:
    """Budget manifests of the demo: an org pool, shared by two teams with their own envelopes."""
    def envelope(name: str, gpus: int, **extra: Any) -> dict[str, Any]:
        return {"name": name, "flavor": DEMO_FLAVOR, "selector": {"cluster": cluster}, "concurrency": gpus, **extra}

    def budget(name: str, owner: str, envelopes: list[dict[str, Any]], parents: list[str] | None = None
               ) -> dict[str, Any]:
        spec: dict[str, Any] = {"owner": owner, "envelopes": envelopes}
        if parents:
            spec["parents"] = parents
        return {"apiVersion": "rq.davidlangworthy.io/v1", "kind": "Budget", "metadata": {"name": name}, "spec": spec}

    return [
        budget("ml", "org:ml", [envelope("pool", 48)]),
        budget("ml-vision", "org:ml:vision", [envelope("main", 16)], ["org:ml"]),
        budget("ml-nlp", "org:ml:nlp", [envelope("main", 16, maxGPUHours=400)], ["org:ml"]),
    ]


def demo_commands(cluster: str) -> list[tuple[str, Any]]:
    """(command id, core command) of the demo: every node, then every budget."""
    from jobtree.core import facts
    from jobtree.core.manifest import generate_nodes, parse_budget

    out: list[tuple[str, Any]] = []
    for domain in DEMO_DOMAINS:
        labels = {"region": "local", "cluster": cluster, "fabric.domain": domain, "gpu.flavor": DEMO_FLAVOR}
        gen = {"generate": {"prefix": f"{domain.lower()}-", "count": DEMO_NODES_PER_DOMAIN,
                            "gpus": DEMO_GPUS_PER_NODE, "labels": labels}}
        out += [(f"demo-node-{n.name}", facts.AddNode(n)) for n in generate_nodes(gen)]
    for i, doc in enumerate(demo_budgets(cluster)):
        out.append((f"demo-budget-{doc['metadata']['name']}", facts.ApplyBudget(parse_budget(doc, f"budgets[{i}]"))))
    return out


# --- processes -----------------------------------------------------------------------------


def standby_names(replicas: int) -> list[str]:
    """The processes of the standby admissions: `admission-2` .. `admission-N`."""
    return [f"admission-{k}" for k in range(2, replicas + 1)]


def service_of(process: str) -> str:
    """The service a process runs (`admission-K` runs admission; any other is its service)."""
    base, _, k = process.rpartition("-")
    return base if base == "admission" and k.isdigit() else process


KUBE_BRIDGE = "kube-bridge"
NOTIFIER = "notifier"
DASHBOARD = "dashboard"


def dashboard_url(opts: Options) -> str:
    return f"http://{HOST}:{opts.dashboard_port}/"


def process_names(replicas: int, kube: bool = False, notify: bool = False) -> list[str]:
    """Every process `up` starts, in start order (the order of the metrics ports); the
    kube-bridge only with a kubeconfig, the notifier only with a notifier config."""
    from jobtree.bus.security import SERVICES

    wanted = {KUBE_BRIDGE: kube, NOTIFIER: notify}
    rest = [s for s in SERVICES if s not in START_ORDER and wanted.get(s, True)]
    return [*START_ORDER, *rest, *standby_names(replicas)]


def _supervisor(data_dir: Path, cluster: str, nats_url: str, clock: str) -> Any:
    """A `Supervisor` that runs process `admission-K` as `jobtree serve admission` (its own
    data directory and log, named after the process)."""
    from jobtree.bus.supervisor import Supervisor

    class UpSupervisor(Supervisor):
        def argv(self, name: str, args: Iterable[str] = ()) -> list[str]:
            argv = super().argv(service_of(name), args)
            argv[argv.index("--data-dir") + 1] = str(self.data_dir / "services" / name)
            return argv

    return UpSupervisor(data_dir, cluster, nats_url, clock=clock)


@contextlib.contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[None]:
    """Only one `jobtree up` per data directory."""
    with (data_dir / "up.lock").open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CliError(f"another `jobtree up` is running on {data_dir}") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class Options:
    data_dir: Path
    cluster: str
    grpc_port: int
    clock: str
    demo: bool
    admission_replicas: int = DEFAULT_ADMISSION_REPLICAS
    metrics_base: int = 0
    metrics: dict[str, int] = field(default_factory=dict)
    """Process name -> its metrics port (assigned once the nats-server runs)."""
    kubeconfig: Path | None = None
    bridge_args: tuple[str, ...] = ()
    config_args: tuple[str, ...] = ()
    notify: Path | None = None
    dashboard_port: int = DEFAULT_DASHBOARD_PORT
    join: str | None = None
    """A federation hub's leaf URL this cluster's nats-server joins (`up --clusters`)."""
    trust: Any = None
    """`up_trust.Trust`: the gateway's TLS, policy and admin token (or --insecure)."""


def dashboard_port(asked: int | None, avoid: int) -> int:
    """The dashboard's port: the one asked for (CliError when taken), else the default, else 0
    when the default is taken (a second `up`, or another program, holds it): the dashboard then
    takes a free one while binding and says which in its port file."""
    if asked is not None:
        if not 0 <= asked <= 65535:
            raise CliError(f"--dashboard-port: must be a port number (0 for a free one), got {asked}")
        if asked and (asked == avoid or port_in_use(asked)):
            raise CliError(f"--dashboard-port: {HOST}:{asked} is in use; pick another port or 0 for a free one")
        return asked
    if avoid != DEFAULT_DASHBOARD_PORT and not port_in_use(DEFAULT_DASHBOARD_PORT):
        return DEFAULT_DASHBOARD_PORT
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from jobtree.bus import subjects
    from jobtree.bus.security import SERVICES

    if args.clusters is not None:
        from jobtree.cli.up_federation import cmd_up_clusters

        return cmd_up_clusters(args)
    try:
        subjects.check_cluster(args.cluster)
    except ValueError as e:
        raise CliError(f"--cluster: {e}") from None
    kubeconfig = Path(args.kubeconfig).resolve() if args.kubeconfig else None
    if kubeconfig is not None and not kubeconfig.is_file():
        raise CliError(f"--kubeconfig: {args.kubeconfig}: no such file")
    if not 0 <= args.node_grace <= 86400 or not 0 <= args.pod_grace <= 86400:
        raise CliError("--node-grace and --pod-grace: must be 0..86400 seconds")
    config_args: tuple[str, ...] = ()
    if args.config:
        from jobtree.cli.serve_cmd import read_config

        read_config(Path(args.config), args.cluster)  # CliError (one line) if it is not valid
        config_args = ("--config", str(Path(args.config).resolve()))
    notify = Path(args.notify).resolve() if args.notify else None
    if notify is not None:
        from jobtree.services.notifier.config import ConfigError, load

        try:
            load(notify)
        except ConfigError as e:
            raise CliError(f"--notify {args.notify}: {e}") from None
    missing = missing_services(list(SERVICES))
    if missing:
        raise CliError(
            f"cannot start: service(s) not available yet: {', '.join(missing)} "
            "(no `main` in jobtree.services.<name>); `jobtree demo` plays the demo on the simulator")
    port = args.grpc_port
    if not 0 <= port <= 65535:
        raise CliError(f"--grpc-port: must be a port number (0 for a free one), got {port}")
    if port and port_in_use(port):
        raise CliError(f"--grpc-port: {HOST}:{port} is in use; pick another port or 0 for a free one")
    board = dashboard_port(args.dashboard_port, port)
    replicas = args.admission_replicas
    if replicas < 1:
        raise CliError(f"--admission-replicas: must be at least 1 (one leader, the rest standbys), got {replicas}")
    count = len(process_names(replicas, kubeconfig is not None, args.notify is not None))
    check_metrics_base(args.metrics_port_base, count, port)
    if args.metrics_port_base and args.metrics_port_base <= board < args.metrics_port_base + count:
        if args.dashboard_port is not None:
            raise CliError(f"--metrics-port-base: ports {args.metrics_port_base}-{args.metrics_port_base + count - 1} "
                           f"include the --dashboard-port {board}")
        board = 0
    data_dir = Path(args.data_dir).resolve()
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(data_dir, 0o700)  # it holds the NATS seeds, the CA key and the admin token
    except OSError as e:
        raise CliError(f"--data-dir {data_dir}: {e.strerror or e}") from None
    if args.insecure and args.client_certs:
        raise CliError("--client-certs needs TLS: leave out --insecure")
    from jobtree.cli.up_trust import prepare

    try:
        trust = prepare(data_dir, insecure=args.insecure, client_certs=args.client_certs)
    except (ValueError, OSError) as e:
        raise CliError(f"--data-dir {data_dir}: {e}") from None
    opts = Options(data_dir, args.cluster, port, args.clock, not args.no_demo and kubeconfig is None, replicas,
                   args.metrics_port_base, kubeconfig=kubeconfig,
                   bridge_args=("--kubeconfig", str(kubeconfig), "--node-grace", f"{args.node_grace:g}",
                                "--pod-grace", str(args.pod_grace)) if kubeconfig else (),
                   config_args=config_args, notify=notify, dashboard_port=board, join=args.join, trust=trust)
    with data_dir_lock(data_dir):
        try:
            return asyncio.run(_up(opts))
        except UpError as e:
            print(f"jobtree: up: {' '.join(str(e).split())}", file=sys.stderr)
            return 1


async def _up(opts: Options) -> int:
    import nats

    from jobtree.bus.natsserver import NatsServer, NatsServerError
    from jobtree.bus.security import Secrets, server_users
    from jobtree.bus.supervisor import Supervisor, SupervisorError

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    ready = False
    try:
        secrets = Secrets.load_or_create(opts.data_dir / "secrets.json", opts.cluster)
    except ValueError as e:
        raise UpError(f"{e}; pass the cluster it was made for, or another --data-dir") from None
    server = NatsServer(opts.data_dir / "nats", users=server_users(opts.cluster, secrets),
                        port=_kept_nats_port(opts.data_dir / "nats"))
    if opts.join:  # a member of a federation: its own JetStream domain, a leaf of the hub
        from jobtree.bus.natsserver import LeafRemote

        server.name, server.domain = f"jobtree-{opts.cluster}", opts.cluster
        server.leaf_remotes = (LeafRemote(opts.join, os.environ.get(LEAF_SEED_ENV) or None),)
    supervisor: Supervisor | None = None
    nc: Any = None
    state_path = opts.data_dir / "up.json"
    try:
        try:
            server.start()
        except NatsServerError as e:
            raise UpError(f"nats-server: {e}") from None
        _keep_nats_port(server)
        _say(f"jobtree up: nats-server {server.url} (JetStream in {server.store_dir}), cluster {opts.cluster}")

        async def quiet(_: Exception) -> None:
            pass

        nc = await nats.connect(server.url, **secrets.connect_options("admin"),
                                error_cb=quiet, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                                name="jobtree-up")
        sequence = await _prepare_streams(nc, opts.cluster)
        supervisor = _supervisor(opts.data_dir, opts.cluster, server.url, opts.clock)
        names = process_names(opts.admission_replicas, opts.kubeconfig is not None, opts.notify is not None)
        # without a base each service binds a free metrics port itself and says which (no race
        # with another process for a port picked beforehand); a restart asks for the same one
        metrics = range(opts.metrics_base, opts.metrics_base + len(names)) if opts.metrics_base else [0] * len(names)
        opts.metrics = dict(zip(names, metrics, strict=True))
        standbys = standby_names(opts.admission_replicas)

        def start(name: str) -> None:
            env = secrets.env(service_of(name))
            if name == "gateway":
                env[ENV_GRPC_PORT] = str(opts.grpc_port)  # once bound: the port it first took
                env.update(opts.trust.gateway_env())
            extra = opts.bridge_args if name == KUBE_BRIDGE else ()
            if name == DASHBOARD:
                extra = ("--http-port", str(opts.dashboard_port))
            for file in (ports.METRICS_FILE, ports.GATEWAY_FILE, ports.DASHBOARD_FILE):  # left by an earlier start
                _port_file(supervisor, name, file).unlink(missing_ok=True)
            config = ("--config", str(opts.notify)) if name == NOTIFIER else opts.config_args
            try:
                supervisor.start(name, env=env, args=("--metrics-port", str(opts.metrics[name] or "auto"), *config, *extra))
            except SupervisorError as e:
                raise UpError(str(e)) from None

        for name in names:
            if name not in standbys:
                start(name)
        _write_state(state_path, opts, server, supervisor, ready=False)
        if not await _until(stop, _wait_healthy(nc, opts, supervisor, [n for n in names if n not in standbys])):
            return 130
        if standbys:  # after the first admission leads: it stays the leader until it stops
            if not await _until(stop, _wait_leader(nc, opts, supervisor)):
                return 130
            for name in standbys:
                start(name)
            if not await _until(stop, _wait_healthy(nc, opts, supervisor, standbys)):
                return 130
        _write_state(state_path, opts, server, supervisor, ready=False)
        if opts.demo and sequence == 0:
            if not await _until(stop, _load_demo(nc, opts.cluster)):
                return 130
            note = f"demo loaded ({len(DEMO_DOMAINS) * DEMO_NODES_PER_DOMAIN} nodes, {len(demo_budgets(opts.cluster))} budgets)"
        elif sequence:
            note = f"resumed at ledger sequence {sequence}"
        elif opts.kubeconfig is not None:
            note = f"bridging the Kubernetes API server of {opts.kubeconfig}"
        else:
            note = "started empty (--no-demo)"
        _write_state(state_path, opts, server, supervisor, ready=True)
        _say(f"jobtree up: {note}; logs in {supervisor.logs_dir}; Ctrl-C to stop")
        _say(f"nats: {server.url}", sys.stdout)
        _say(f"grpc: {HOST}:{opts.grpc_port}", sys.stdout)
        opts.trust.client_config(f"{HOST}:{opts.grpc_port}")
        for line in opts.trust.lines(f"{HOST}:{opts.grpc_port}"):
            _say(line, sys.stdout)
        _say(f"dashboard: {dashboard_url(opts)}", sys.stdout)
        _say("metrics: " + " ".join(f"{name}={HOST}:{port}" for name, port in opts.metrics.items()), sys.stdout)
        ready = True
        keeper = _Keeper(server, supervisor, start, lambda: _write_state(state_path, opts, server, supervisor,
                                                                          ready=True, restarts=keeper.restarts))
        return await keeper.run(stop)
    finally:
        if supervisor is not None:
            statuses = supervisor.stop(timeout=STOP_TIMEOUT)
            failed = {n: c for n, c in statuses.items() if c not in (0, -signal.SIGTERM)}
            if failed and ready:
                _say("jobtree up: services stopped with status " + ", ".join(f"{n}={c}" for n, c in failed.items()))
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        _finish(server, state_path, loop, ready)


LEAF_SEED_ENV = "JOBTREE_LEAF_NKEY_SEED"
"""The nkey seed of the hub's leaf user a `--join`ing cluster authenticates as (never on argv)."""
async def _prepare_streams(nc: Any, cluster: str) -> int:
    """Create (or find) the ledger stream and the KV buckets; the ledger's last sequence."""
    import nats.js.errors

    from jobtree.bus import subjects
    from jobtree.bus.leader import LEADER_TTL
    from jobtree.bus.ledger import Ledger, LedgerError

    js = nc.jetstream()
    ledger = Ledger(js, cluster)
    try:
        await ledger.create()
    except LedgerError as e:
        raise UpError(str(e)) from None
    for name in subjects.BUCKETS:
        if name in subjects.HUB_BUCKETS:
            continue
        bucket = subjects.bucket(cluster, name)
        try:
            await js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            if name == "leader":
                await js.create_key_value(bucket=bucket, ttl=LEADER_TTL, history=1)
            else:
                await js.create_key_value(bucket=bucket, history=1)
    return await ledger.last_sequence()


async def _wait_healthy(nc: Any, opts: Options, supervisor: Any, names: list[str]) -> None:
    """Processes `names` are up: each serves its metrics port, a service of its own name answers
    `health` over NATS (a standby admission shares the subject, so its port is what tells), and
    the gateway's gRPC port accepts connections."""
    import nats.errors

    from jobtree.bus import subjects

    deadline = time.monotonic() + READY_TIMEOUT

    async def until(name: str, ok: Any, what: str) -> None:
        await _poll(supervisor.processes[name], name, ok, what, deadline)

    async def one(name: str) -> None:
        if service_of(name) == name:
            subject = subjects.request(opts.cluster, name, "health")

            async def healthy() -> bool:
                try:
                    return bool((await nc.request(subject, b"", timeout=0.5)).data == b"ok")
                except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                    return False

            await until(name, healthy, "answer health")
        if name == "gateway":
            async def grpc_open() -> bool:
                opts.grpc_port = _bound(_port_file(supervisor, name, ports.GATEWAY_FILE), opts.grpc_port)
                return opts.grpc_port > 0

            await until(name, grpc_open, f"accept gRPC connections on {HOST}")
        if name == DASHBOARD:
            async def http_open() -> bool:
                opts.dashboard_port = _bound(_port_file(supervisor, name, ports.DASHBOARD_FILE), opts.dashboard_port)
                return opts.dashboard_port > 0

            await until(name, http_open, f"serve the dashboard on {HOST}")

        async def metrics_open() -> bool:
            opts.metrics[name] = _bound(_port_file(supervisor, name, ports.METRICS_FILE), opts.metrics[name])
            return opts.metrics[name] > 0

        await until(name, metrics_open, f"serve metrics on {HOST}")

    await asyncio.gather(*(one(name) for name in names))


async def _wait_leader(nc: Any, opts: Options, supervisor: Any) -> None:
    """The admission leader lock is held (by the only admission running yet)."""
    import nats.js.errors

    from jobtree.bus import subjects

    kv = await nc.jetstream().key_value(subjects.bucket(opts.cluster, "leader"))

    async def locked() -> bool:
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            await kv.get(subjects.kv_key("admission"))
            return True
        return False

    await _poll(supervisor.processes["admission"], "admission", locked, "take the leader lock",
                time.monotonic() + READY_TIMEOUT)


async def _load_demo(nc: Any, cluster: str, commands: list[tuple[str, Any]] | None = None) -> None:
    """Send the demo's commands (or `commands`: (command id, core command)) to admission, one
    decision each, in order."""
    import nats.errors

    from jobtree.api import convert
    from jobtree.api.jobtree.v1 import bus_pb2 as bus
    from jobtree.bus import subjects

    subject = subjects.request(cluster, "admission", "command")
    now = int(time.time())
    for command_id, cmd in demo_commands(cluster) if commands is None else commands:
        msg = convert.command_to_proto(cmd, command_id=command_id, instant=now)
        msg.identity = "service:jobtree-up"
        deadline = time.monotonic() + READY_TIMEOUT
        while True:  # admission answers once it holds the leader lock: retry the same command id
            try:
                raw = await nc.request(subject, msg.SerializeToString(), timeout=5.0)
                reply = bus.CommandReply.FromString(raw.data)
                if reply.error.code != bus.ERROR_CODE_UNAVAILABLE:
                    break
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                pass
            if time.monotonic() > deadline:
                raise UpError(f"admission did not accept the demo command {command_id} within {READY_TIMEOUT:.0f} s")
            await asyncio.sleep(0.2)
        if reply.error.code != bus.ERROR_CODE_UNSPECIFIED:
            where = f"{reply.error.field_path}: " if reply.error.field_path else ""
            raise UpError(f"the demo command {command_id} was refused "
                          f"({bus.ErrorCode.Name(reply.error.code)}): {where}{reply.error.problem}")


def _port_file(supervisor: Any, process: str, file: str) -> Path:
    """Where process `process` writes a port it listens on (`<its data dir>/<file>`)."""
    return Path(supervisor.data_dir) / "services" / process / file


def _bound(port_file: Path, asked: int) -> int:
    """The port a service says it listens on, once it accepts connections there (0 until then);
    when `asked` is a port, only that one (a file left by an earlier start says another)."""
    port = ports.read(port_file)
    return port if port and (not asked or port == asked) and accepts(port) else 0


def _write_state(path: Path, opts: Options, server: Any, supervisor: Any, *, ready: bool,
                 restarts: dict[str, int] | None = None) -> None:
    doc = {
        "pid": os.getpid(),
        "ready": ready,
        "cluster": opts.cluster,
        "clock": opts.clock,
        "nats": server.url,
        "grpc": f"{HOST}:{opts.grpc_port}",
        "tls": not opts.trust.insecure,
        "client_config": str(opts.trust.client_file),
        "dashboard": dashboard_url(opts),
        "nats_pid": server.pid,
        "services": supervisor.pids(),
        "admission_replicas": ["admission", *standby_names(opts.admission_replicas)],
        "metrics": {name: f"{HOST}:{port}" for name, port in opts.metrics.items() if port},
        "logs": str(supervisor.logs_dir),
        "restarts": dict(restarts or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)

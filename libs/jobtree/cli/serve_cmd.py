"""`jobtree serve NAME`: run one service (`jobtree.services.<NAME>.main`) under the bus runtime.

Contract: `jobtree serve NAME [--cluster C] [--nats URL] [--user U --password P] [--data-dir D]
[--metrics-port N|auto] [--clock system|virtual] [--config FILE] [--grpc-port P] [--http-port P
--http-host H]` imports
`jobtree.services.<NAME>` (a `-` in NAME is `_` in the package) and runs its `main(ctx)` with
`jobtree.bus.runtime.run` until SIGINT/SIGTERM; the exit status is the runtime's (0 on a clean
stop, 1 when the service failed). Credentials come from JOBTREE_NATS_NKEY_SEED (an nkey seed:
what `jobtree up` gives each service), else `--user/--password` or, preferably (argv is visible
to every local user), JOBTREE_NATS_USER / JOBTREE_NATS_PASSWORD; the URL
from `--nats` or JOBTREE_NATS_URL. `--config FILE` is a YAML mapping with the keys of a
scenario's `config:` (cluster, period, reservationLead, preemptionHoldDown, capAllowances).
`--grpc-port` is handed to the gateway as JOBTREE_GRPC_PORT; `--http-port`/`--http-host` to the
dashboard as JOBTREE_HTTP_PORT/JOBTREE_HTTP_HOST. `--metrics-port auto` serves metrics on a
port the kernel picks while binding; like every metrics port, it is written to
`<data-dir>/metrics.port`. For the notifier, `--config FILE` is
its receivers and routes (checked first: exit 2 with one line naming the field); for the
federation, its member clusters and caps (the same; its cluster name defaults to `fed`). An unknown NAME, or one whose
package has no `main` yet, exits 2 with one line listing the services that can be served.
Not: the services themselves, not process supervision (see `jobtree.bus.supervisor`).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

from jobtree.cli.sim_cmd import CliError
from jobtree.core.model import ClusterConfig

CLOCKS = ("system", "virtual")
ENV_URL = "JOBTREE_NATS_URL"
ENV_USER = "JOBTREE_NATS_USER"
ENV_PASSWORD = "JOBTREE_NATS_PASSWORD"
ENV_NKEY_SEED = "JOBTREE_NATS_NKEY_SEED"
"""The user's nkey seed (what `jobtree up` gives each service): never a flag, argv is public."""
ENV_GRPC_PORT = "JOBTREE_GRPC_PORT"
ENV_HTTP_PORT = "JOBTREE_HTTP_PORT"
ENV_HTTP_HOST = "JOBTREE_HTTP_HOST"
ENV_KUBECONFIG = "JOBTREE_KUBECONFIG"
ENV_NOTIFIER_CONFIG = "JOBTREE_NOTIFIER_CONFIG"
ENV_FEDERATION_CONFIG = "JOBTREE_FEDERATION_CONFIG"
ENV_NODE_GRACE = "JOBTREE_NODE_GRACE"
ENV_POD_GRACE = "JOBTREE_POD_GRACE"
DEFAULT_URL = "nats://127.0.0.1:4222"
DEFAULT_CLUSTER = "default"

def _metrics_port(text: str) -> int:
    from jobtree.bus import ports

    if text == "auto":
        return ports.ANY
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise CliError(f"--metrics-port: must be a port number or auto, got {text!r}")
    return port


ServiceMain = Callable[[Any], Awaitable[None]]

OWN_CONFIG: dict[str, tuple[str, str, str, str]] = {
    "notifier": ("receivers and routes", ENV_NOTIFIER_CONFIG, "jobtree.services.notifier.config", DEFAULT_CLUSTER),
    "federation": ("member clusters and caps", ENV_FEDERATION_CONFIG, "jobtree.services.federation.config", "fed"),
}
"""Services whose `--config FILE` is their own (what it holds, the variable it is handed in, the
module whose `load` checks it and raises `ConfigError`, the default cluster name)."""


def services_dir() -> Path:
    """The directory of the service packages (`libs/jobtree/services` -> `services/`)."""
    import jobtree.services

    return Path(next(iter(jobtree.services.__path__)))


def module_name(name: str) -> str:
    return f"jobtree.services.{name.replace('-', '_')}"


def available_services() -> list[str]:
    """Services whose package exists (a folder with `__init__.py`), by service name."""
    root = services_dir()
    return sorted({p.name.replace("_", "-") for p in root.iterdir()
                   if p.is_dir() and (p / "__init__.py").is_file()})


def load_service(name: str) -> ServiceMain:
    """`main` of service NAME; CliError (one line listing the services) if there is none."""
    available = available_services()
    listing = ", ".join(available) if available else "none yet"
    if name not in available:
        raise CliError(f"unknown service {name!r}; services: {listing}")
    module = importlib.import_module(module_name(name))
    main = getattr(module, "main", None)
    if not callable(main):
        raise CliError(f"service {name!r} has no `async def main(ctx)` in {module_name(name)}; services: {listing}")
    return cast(ServiceMain, main)


def missing_services(names: list[str] | tuple[str, ...]) -> list[str]:
    """The names among `names` that cannot be served yet (no package or no `main`)."""
    out = []
    for name in names:
        try:
            load_service(name)
        except CliError:
            out.append(name)
    return out


def read_config(path: Path, cluster: str | None) -> ClusterConfig:
    """A ClusterConfig from a YAML file of `config:` keys (cluster from `--cluster` if absent)."""
    from jobtree.sim.scenario import ScenarioError, _parse_config, load_yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CliError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"{path}: cannot read: {e}") from None
    try:
        doc = load_yaml(text)
        if isinstance(doc, dict) and "cluster" not in doc and cluster:
            doc = {**doc, "cluster": cluster}
        config = _parse_config(doc if doc is not None else {})
    except ScenarioError as e:
        raise CliError(f"{path}: {e}") from None
    if cluster and config.cluster != cluster:
        raise CliError(f"{path}: config.cluster is {config.cluster!r} but --cluster is {cluster!r}")
    return config


def add_serve_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run one service (admission, binder, budget, gateway, packer, resolver, ...)",
        description="Run one jobtree service as this process, connected to NATS, until SIGINT/SIGTERM.",
    )
    p.add_argument("name", metavar="NAME", help="the service (a package under services/)")
    p.add_argument("--cluster", help=f"cluster name, a DNS label (default: the config's, else {DEFAULT_CLUSTER})")
    p.add_argument("--nats", metavar="URL", help=f"NATS URL (default ${ENV_URL} or {DEFAULT_URL})")
    p.add_argument("--user", help=f"NATS user (default ${ENV_USER})")
    p.add_argument("--password", help=f"NATS password (default ${ENV_PASSWORD}; prefer the variable)")
    p.add_argument("--data-dir", metavar="D", default=".", help="the service's own files (default .)")
    p.add_argument("--metrics-port", metavar="N", default="0",
                   help="serve Prometheus /metrics on 127.0.0.1:N (auto: a free one; default 0: off); "
                        "the port is written to <data-dir>/metrics.port")
    p.add_argument("--clock", choices=CLOCKS, default="system",
                   help="system (wall clock, default) or virtual (instants come from commands)")
    p.add_argument("--config", metavar="FILE", help="YAML mapping of cluster config keys (period, ...)")
    p.add_argument("--grpc-port", metavar="P", type=int,
                   help=f"gateway only: the gRPC port (passed as ${ENV_GRPC_PORT})")
    p.add_argument("--http-port", metavar="P", type=int,
                   help=f"dashboard only: the HTTP port (0: a free one; passed as ${ENV_HTTP_PORT}; default 8080)")
    p.add_argument("--http-host", metavar="H",
                   help=f"dashboard only: the address to listen on (passed as ${ENV_HTTP_HOST}; default 127.0.0.1)")
    p.add_argument("--kubeconfig", metavar="FILE",
                   help=f"kube-bridge only: the API server's kubeconfig (default: in-cluster; ${ENV_KUBECONFIG})")
    p.add_argument("--node-grace", metavar="S", type=float,
                   help=f"kube-bridge only: seconds a node may be NotReady before it is fenced (default 40; ${ENV_NODE_GRACE})")
    p.add_argument("--pod-grace", metavar="S", type=int,
                   help=f"kube-bridge only: seconds a workload pod gets to stop when its lease closes (default 30; ${ENV_POD_GRACE})")
    p.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from jobtree.bus.runtime import time_gc_pauses

    time_gc_pauses()  # before the service's imports: their collections are pauses too
    main = load_service(args.name)
    from jobtree.bus import subjects
    from jobtree.bus.runtime import ServiceSettings, run

    cluster = args.cluster
    if cluster is not None:
        try:
            subjects.check_cluster(cluster)
        except ValueError as e:
            raise CliError(f"--cluster: {e}") from None
    if args.name == "admission":  # the snapshot writer's settings: refused before anything starts
        from jobtree.bus.snapshot import settings_from_env

        try:
            settings_from_env()
        except ValueError as e:
            raise CliError(str(e)) from None
    if args.name == "gateway":  # TLS and the access policy, or an explicit plain loopback
        from jobtree.auth.transport import transport_from_env
        from jobtree.services.gateway import grpc_address

        try:
            transport_from_env(grpc_address()[0])
        except ValueError as e:
            raise CliError(str(e)) from None
    if args.name in OWN_CONFIG:  # its --config is its own file, not the cluster's
        what, env, module, default_cluster = OWN_CONFIG[args.name]
        if not args.config:
            raise CliError(f"{args.name}: --config FILE ({what}) is required")
        loader = importlib.import_module(module)
        try:
            loader.load(args.config)
        except loader.ConfigError as e:
            raise CliError(f"--config {args.config}: {e}") from None
        os.environ[env] = str(Path(args.config).resolve())
        config = ClusterConfig(cluster=cluster or default_cluster)
    else:
        config = read_config(Path(args.config), cluster) if args.config else ClusterConfig(
            cluster=cluster or DEFAULT_CLUSTER)
    cluster = config.cluster
    user = args.user if args.user is not None else os.environ.get(ENV_USER) or None
    password = args.password if args.password is not None else os.environ.get(ENV_PASSWORD)
    if password and not user:
        raise CliError(f"a password needs a user (--user or ${ENV_USER})")
    metrics_port = _metrics_port(args.metrics_port)
    if args.grpc_port is not None:
        if not 0 <= args.grpc_port <= 65535:
            raise CliError(f"--grpc-port: must be a port number, got {args.grpc_port}")
        os.environ[ENV_GRPC_PORT] = str(args.grpc_port)
    if args.http_port is not None:
        if not 0 <= args.http_port <= 65535:
            raise CliError(f"--http-port: must be a port number, got {args.http_port}")
        os.environ[ENV_HTTP_PORT] = str(args.http_port)
    if args.http_host is not None:
        os.environ[ENV_HTTP_HOST] = args.http_host
    if args.kubeconfig is not None:
        if not Path(args.kubeconfig).is_file():
            raise CliError(f"--kubeconfig: {args.kubeconfig}: no such file")
        os.environ[ENV_KUBECONFIG] = str(Path(args.kubeconfig).resolve())
    if args.node_grace is not None:
        if not 0 <= args.node_grace <= 86400:
            raise CliError(f"--node-grace: must be 0..86400 seconds, got {args.node_grace:g}")
        os.environ[ENV_NODE_GRACE] = str(args.node_grace)
    if args.pod_grace is not None:
        if not 0 <= args.pod_grace <= 86400:
            raise CliError(f"--pod-grace: must be 0..86400 seconds, got {args.pod_grace}")
        os.environ[ENV_POD_GRACE] = str(args.pod_grace)
    settings = ServiceSettings(
        name=args.name,
        cluster=cluster,
        nats_url=args.nats or os.environ.get(ENV_URL) or DEFAULT_URL,
        user=user,
        password=password,
        nkey_seed=os.environ.get(ENV_NKEY_SEED) or None,
        data_dir=Path(args.data_dir),
        metrics_port=metrics_port,
        clock=args.clock,
        config=config,
    )
    try:
        if os.environ.get("JOBTREE_EVENT_LOOP", "uvloop") == "uvloop":
            import uvloop

            uvloop.install()
        return asyncio.run(run(main, settings))
    except (OSError, TimeoutError) as e:
        print(f"jobtree: serve {args.name}: cannot reach NATS at {settings.nats_url}: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # nats.errors.Error and friends: one line, the log has the rest
        if type(e).__module__.startswith("nats"):
            print(f"jobtree: serve {args.name}: NATS at {settings.nats_url}: {' '.join(str(e).split())}",
                  file=sys.stderr)
            return 1
        raise

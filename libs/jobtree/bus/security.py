"""Who may say what on the bus: the NATS users of one cluster and their subject permissions.

Contract: `GRANTS` is the permission table, as data, in one place: for each service the
things it may do besides answering its own requests. `permissions(cluster, service)` expands
a service's grants into NATS subject permissions, every subject taken from
`jobtree.bus.subjects` (and the JetStream API subjects of the streams and buckets it names);
`server_users(cluster, secrets)` gives the users for `NatsServer(users=...)`: one per service
plus `admin` (full access: `jobtree up` creates streams and buckets with it, tests use it).
`Secrets.load_or_create(path)` keeps one random nkey seed per user in a JSON file of mode 0600,
reused on every start (a seed is added for a user that is new): the server's config lists only
the public keys, each service gets its seed in its environment (JOBTREE_NATS_NKEY_SEED) and
proves it by signing the server's nonce. The Kubernetes config (`server_config_users`) keeps
passwords, read from the environment of the nats-server container (a Secret), never written in
the file.

Every service user may:
- subscribe to its own request subjects `jobtree.C.<svc>.*` and its own reply inbox
  `_INBOX.jobtree.C.<svc>.>` (the runtime connects with that inbox prefix; JetStream deliver
  subjects and API replies arrive there too), and publish replies to `_INBOX.>`;
- nothing else unless `GRANTS` says so. Grants:
  - `call S.V` / `call S.*`: publish requests to one verb / every verb of service S;
  - `follow ledger`: read the ledger stream through consumers (create, info, delete, pull
    next, acks, flow control) and single messages by sequence — what `Follower`,
    `Ledger.replay` and `Ledger.batch_at` need;
  - `write ledger`: publish to `jobtree.C.ledger.>`, create the ledger stream and read single
    messages (what `Ledger.create` and `Ledger.append` need). Only the binder has it, and
    every other user is also explicitly denied the ledger subjects;
  - `write events`: publish to `jobtree.C.evt.>`, create the events stream and read its
    messages (the budget service, which derives the events from the ledger);
  - `follow events`: read the events stream through consumers, durable ones included;
  - `kv B`: read, write and create the cluster's KV bucket B (get, put, create, update,
    delete, watch);
  - `read snapshots`: read the snapshot object store (`bus.snapshot`): every follower;
  - `write snapshots`: also create it, put objects and purge replaced chunks (the admission
    leader, the one writer).
The JetStream API subjects were found by running the services' own code (Follower, Ledger,
LeaderLock, KV put/get) as each user against nats-server 2.15 and recording what they publish
(tests/e2e/test_security.py runs it again). A follower without `$JS.FC.<stream>.>` stalls
after about 2 MB: the server waits for the flow-control reply the user may not send.

Known limit: a user allowed to create consumers on a stream could give a push consumer a
deliver subject of its choosing, which the server publishes to on the user's behalf. Ledger
batches would then land on that subject; they are not commands, and every receiver checks the
payload type (`Jobtree-Type`), but a hardened deployment puts each service in its own account
with explicit exports. Not: the server (see `natsserver`), not TLS (loopback only for now).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from jobtree.bus import subjects
from jobtree.bus.natsserver import Permissions, User

__all__ = [
    "ADMIN",
    "GRANTS",
    "SERVICES",
    "Secrets",
    "expand",
    "password_env",
    "permission_table",
    "permissions",
    "server_config_users",
    "server_users",
]

ADMIN = "admin"
"""The user with full access (stream and bucket setup by `jobtree up`, tests)."""

GRANTS: dict[str, tuple[str, ...]] = {
    "gateway": ("follow ledger", "read snapshots", "call admission.command", "call budget.*", "call packer.*",
                "follow events", "call federation.usage"),
    "admission": ("follow ledger", "write snapshots", "call binder.commit", "kv leader"),
    # The binder mirrors the specs of committed batches into the runs/budgets/nodes buckets.
    "binder": ("follow ledger", "write ledger", "kv runs", "kv budgets", "kv nodes"),
    # The budget service derives the domain events from the ledger and publishes them.
    "budget": ("follow ledger", "read snapshots", "write events"),
    "packer": ("follow ledger", "read snapshots"),
    # The resolver sends Tick commands when timers fall due (services.md, "read path").
    "resolver": ("follow ledger", "read snapshots", "call admission.command"),
    # The kube-bridge sends the Kubernetes objects' commands and mirrors decisions back.
    "kube-bridge": ("follow ledger", "read snapshots", "call admission.command", "follow events"),
    # The notifier delivers events (a durable consumer) and records what it delivered.
    "notifier": ("follow events", "kv notified"),
    # The dashboard draws a follower's view; it decides and writes nothing.
    "dashboard": ("follow ledger", "read snapshots"),
}
"""The permission table: what each service may do besides answering its own requests."""

SERVICES: tuple[str, ...] = tuple(GRANTS)
"""The services, each its own NATS user (named like the service); `jobtree up` runs the
kube-bridge only with `--kubeconfig`."""

JS_API = "$JS.API"


def _stream_read(stream: str) -> list[str]:
    """JetStream API subjects to read a stream through consumers (ordered push or pull)."""
    return [
        f"{JS_API}.INFO",
        f"{JS_API}.STREAM.INFO.{stream}",
        f"{JS_API}.CONSUMER.CREATE.{stream}",
        f"{JS_API}.CONSUMER.CREATE.{stream}.>",
        f"{JS_API}.CONSUMER.INFO.{stream}.*",
        f"{JS_API}.CONSUMER.DELETE.{stream}.*",
        f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.*",
        f"$JS.ACK.{stream}.>",
        f"$JS.FC.{stream}.>",
    ]


def _stream_get(stream: str) -> list[str]:
    """JetStream API subjects to read single messages of a stream (by sequence or subject)."""
    return [
        f"{JS_API}.STREAM.MSG.GET.{stream}",
        f"{JS_API}.DIRECT.GET.{stream}",
        f"{JS_API}.DIRECT.GET.{stream}.>",
    ]


def _kv_stream(cluster: str, name: str) -> tuple[str, str]:
    bucket = subjects.bucket(cluster, name)
    return bucket, f"KV_{bucket}"


def expand(cluster: str, grant: str) -> list[str]:
    """The subjects a grant allows publishing to (ValueError for a grant not in the vocabulary)."""
    kind, _, what = grant.partition(" ")
    if kind == "call":
        service, _, verb = what.partition(".")
        if verb == "*":
            return [subjects.service_filter(cluster, service)]
        return [subjects.request(cluster, service, verb)]
    if kind == "follow" and what == "ledger":
        stream = subjects.ledger_stream(cluster)
        return [*_stream_read(stream), *_stream_get(stream)]
    if kind == "write" and what == "ledger":
        stream = subjects.ledger_stream(cluster)
        return [subjects.ledger_filter(cluster), f"{JS_API}.STREAM.CREATE.{stream}",
                f"{JS_API}.STREAM.INFO.{stream}", *_stream_get(stream)]
    if kind == "write" and what == "events":
        stream = subjects.events_stream(cluster)
        return [subjects.events_filter(cluster), f"{JS_API}.STREAM.CREATE.{stream}", f"{JS_API}.STREAM.INFO.{stream}",
                *_stream_get(stream)]
    if kind == "follow" and what == "events":
        stream = subjects.events_stream(cluster)
        return [*_stream_read(stream), *_stream_get(stream), f"{JS_API}.CONSUMER.DURABLE.CREATE.{stream}.*"]
    if what == "snapshots" and kind in ("read", "write"):
        bucket = subjects.object_bucket(cluster, "snapshots")
        stream = f"OBJ_{bucket}"
        # STREAM.NAMES: the object store's reader subscribes to the chunks by subject alone
        out = [*_stream_read(stream), *_stream_get(stream), f"{JS_API}.STREAM.NAMES"]
        if kind == "write":
            out += [f"$O.{bucket}.>", f"{JS_API}.STREAM.CREATE.{stream}", f"{JS_API}.STREAM.PURGE.{stream}"]
        return out
    if kind == "kv":
        bucket, stream = _kv_stream(cluster, what)
        return [*_stream_read(stream), *_stream_get(stream), f"$KV.{bucket}.>", f"{JS_API}.STREAM.CREATE.{stream}"]
    raise ValueError(f"unknown grant {grant!r}; grants are: call S.V, call S.*, follow ledger, write ledger, "
                     "follow events, write events, kv B, read snapshots, write snapshots")


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def permissions(cluster: str, service: str) -> Permissions:
    """The NATS permissions of a service's user."""
    grants = GRANTS.get(service)
    if grants is None:
        raise ValueError(f"unknown service {service!r}; services: {', '.join(SERVICES)}")
    publish = ["_INBOX.>"]
    for grant in grants:
        publish += expand(cluster, grant)
    ledger = subjects.ledger_filter(cluster)
    deny = () if "write ledger" in grants else (ledger,)
    subscribe = (subjects.service_filter(cluster, service), subjects.inbox_prefix(cluster, service) + ".>")
    return Permissions(publish=_unique(publish), subscribe=subscribe, publish_deny=deny)


PASSWORD_ENV = "JOBTREE_NATS_PASSWORD_{user}"
"""In a NATS config written for Kubernetes (`server_config_users`), each user's password is this
environment variable of the nats-server container (user upper-cased, `-` as `_`)."""


def password_env(user: str) -> str:
    return PASSWORD_ENV.format(user=user.upper().replace("-", "_"))


def server_config_users(cluster: str) -> str:
    """The `authorization { users: [...] }` block of a nats-server config for cluster `cluster`:
    `admin` and one user per service with the permissions of `permissions`, every password a
    reference to the environment variable `password_env(user)` (the NATS config language
    substitutes `$NAME`), so the file holds no secret and the passwords come from a Secret."""
    users = [User(u, "$" + password_env(u), None if u == ADMIN else permissions(cluster, u))
             for u in (ADMIN, *SERVICES)]
    text = json.dumps([u.config() for u in users], indent=2)
    for user in (ADMIN, *SERVICES):  # unquoted, so that the config language substitutes it
        text = text.replace(f'"password": "${password_env(user)}"', f'"password": ${password_env(user)}')
    return "authorization {\n  users: " + text.replace("\n", "\n  ") + "\n}\n"


def server_users(cluster: str, secrets_: Secrets | Mapping[str, str]) -> tuple[User, ...]:
    """The nats-server users of a cluster: `admin` (full access) and one per service; known by
    their nkeys' public keys (`Secrets`), or by passwords (a mapping user -> password)."""
    if isinstance(secrets_, Secrets):
        return (User(ADMIN, nkey=secrets_.public_key(ADMIN)),
                *(User(s, None, permissions(cluster, s), nkey=secrets_.public_key(s)) for s in SERVICES))
    missing = [u for u in (ADMIN, *SERVICES) if u not in secrets_]
    if missing:
        raise ValueError(f"no password for user(s) {', '.join(missing)}")
    return (User(ADMIN, secrets_[ADMIN]),
            *(User(s, secrets_[s], permissions(cluster, s)) for s in SERVICES))


def permission_table(cluster: str, *, expanded: bool = False) -> str:
    """GRANTS as a Markdown table (docs, review); `expanded` lists every subject instead of the grants."""
    def code(items: Iterable[str]) -> str:
        return ", ".join(f"`{s}`" for s in items)

    rows = ["| user | subscribe | may publish (besides replies to `_INBOX.>`) | denied |", "|---|---|---|---|"]
    for service in SERVICES:
        perms = permissions(cluster, service)
        allowed = [s for s in perms.publish if s != "_INBOX.>"] if expanded else GRANTS[service]
        rows.append(f"| {service} | {code(perms.subscribe)} | {code(allowed)} | {code(perms.publish_deny)} |")
    rows.append(f"| {ADMIN} | everything | everything | |")
    return "\n".join(rows)


def new_seed() -> str:
    """A fresh NATS user nkey seed (`SU...`): its public key (`U...`) goes in the server's config."""
    import nkeys

    return bytes(nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)).decode()


@dataclass
class Secrets:
    """The nkey seeds of a cluster's NATS users, kept in a JSON file of mode 0600. The server's
    config lists only their public keys; a service proves it holds its seed by signing the
    server's nonce, so nothing secret is in any config file or on any command line."""

    cluster: str
    seeds: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def generate(cluster: str, users: Iterable[str] = (ADMIN, *SERVICES)) -> Secrets:
        return Secrets(subjects.check_cluster(cluster), {u: new_seed() for u in users})

    @staticmethod
    def load(path: Path) -> Secrets:
        """The secrets `jobtree up` keeps in `path` (tests and benchmarks connect with them)."""
        doc = json.loads(Path(path).read_text())
        return Secrets(str(doc["cluster"]), {str(k): str(v) for k, v in doc["nkeys"].items()})

    @staticmethod
    def load_or_create(path: Path, cluster: str, users: Iterable[str] = (ADMIN, *SERVICES)) -> Secrets:
        """The secrets in `path` (adding seeds for new users), or new ones written there. A file
        of an older jobtree (passwords under `users`) is replaced by seeds for every user.
        `users`: a cluster's (admin and every service) unless told (the federation's hub)."""
        users = tuple(users)
        path = Path(path)
        if path.exists():
            try:
                doc = json.loads(path.read_text())
                found = Secrets(str(doc["cluster"]), {str(k): str(v) for k, v in doc.get("nkeys", {}).items()})
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"{path}: not a jobtree secrets file ({exc})") from None
            if found.cluster != cluster:
                raise ValueError(f"{path} holds the users of cluster {found.cluster!r}, not {cluster!r}")
            fresh = {u: new_seed() for u in users if u not in found.seeds}
            if fresh or "users" in doc:
                found.seeds.update(fresh)
                found.save(path)
            else:
                os.chmod(path, 0o600)
            return found
        made = Secrets.generate(cluster, users)
        made.save(path)
        return made

    def save(self, path: Path) -> None:
        """Write atomically, readable by the owner only."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({"cluster": self.cluster, "nkeys": self.seeds}, out, indent=2, sort_keys=True)
            out.write("\n")
        os.replace(tmp, path)

    def env(self, user: str) -> dict[str, str]:
        """The environment that gives a `jobtree serve` process this user's credentials."""
        return {"JOBTREE_NATS_USER": user, "JOBTREE_NATS_NKEY_SEED": self.seeds[user]}

    def connect_options(self, user: str) -> dict[str, str]:
        """`nats.connect(**options)` as this user."""
        return {"nkeys_seed_str": self.seeds[user]}

    def public_key(self, user: str) -> str:
        import nkeys

        return bytes(nkeys.from_seed(bytearray(self.seeds[user].encode())).public_key).decode()

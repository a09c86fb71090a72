"""Every NATS subject, JetStream stream and KV bucket name of jobtree: the one module that builds them.

Nothing else in jobtree writes a subject string; add a verb, event kind or bucket here first.
Everything is namespaced by cluster `C` (a DNS label such as `gpu-a`), so several clusters can
share one NATS system (leaf nodes, gateways) without their subjects meeting.

| what                 | subject or name                      | payload (proto/jobtree/v1)   | publisher -> receiver             |
|----------------------|--------------------------------------|------------------------------|-----------------------------------|
| request / reply      | `jobtree.C.<service>.<verb>`         | per verb (bus.Command, ...)  | any client -> `<service>` (queue group `<service>`) |
| events               | `jobtree.C.evt.<kind>.<token>...`    | bus.LedgerEntry              | the writer of a fact -> watchers  |
| ledger (stream input)| `jobtree.C.ledger.facts`             | bus.LedgerBatch              | binder only -> the ledger stream  |
| ledger stream        | `jobtree_C_ledger`                   | captures `jobtree.C.ledger.>`| file storage, no delete/purge     |
| events stream        | `jobtree_C_events`                   | captures `jobtree.C.evt.>`   | bus.Event; the budget service publishes |
| KV bucket            | `jobtree_C_<bucket>`, keys `kv_key`  | one message per key          | see BUCKETS                       |
| object store         | `jobtree_C_<bucket>` (OBJECT_BUCKETS)| objects (`bus.snapshot`)     | see OBJECT_BUCKETS                |
| reply inboxes        | `_INBOX.jobtree.C.<service>.>`       | replies                      | per-service inbox prefix (permissions) |

Services and verbs (SERVICE_VERBS) and event kinds (EVENT_KINDS) are closed lists: asking for
a subject that is not listed raises ValueError, so a typo cannot silently create a new subject.
Every service answers `health`. Tokens that come from names (namespaces, run, node and budget
names) go through `token`, which escapes `.`, wildcards, whitespace and `%` (`train.v2` ->
`train%2Ev2`), so a name is always exactly one subject token.

Not: connections, streams or KV setup (see `ledger` and the services), not payload encoding
(see `codec`).
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = [
    "BUCKETS",
    "EVENT_KINDS",
    "HUB_BUCKETS",
    "OBJECT_BUCKETS",
    "PREFIX",
    "SERVICE_VERBS",
    "Subject",
    "bucket",
    "catalogue",
    "check_cluster",
    "event",
    "events_filter",
    "events_stream",
    "inbox_prefix",
    "kv_key",
    "ledger_filter",
    "ledger_stream",
    "ledger_subject",
    "object_bucket",
    "queue_group",
    "request",
    "service_filter",
    "token",
    "untoken",
    "well_formed",
]

PREFIX = "jobtree"

SERVICE_VERBS: dict[str, tuple[str, ...]] = {
    "gateway": ("health",),
    # The per-cluster decision loop: bus.Command in, bus.CommandReply out.
    "admission": ("health", "command"),
    # The derived funding view: the STATE object, usage/headroom, sponsors.
    "budget": ("health", "state", "usage", "sponsors", "caps"),
    # Topology and what-if placement for forecasts.
    "packer": ("health", "nodes", "plan"),
    # The single writer of the ledger: a decision's facts in, the committed sequence out.
    "binder": ("health", "commit"),
    # Timers: sends Tick commands when reservations activate, deadlines and windows fall due.
    "resolver": ("health",),
    "notifier": ("health",),
    # Per-cluster allowances of aggregate caps that span clusters (on the hub; it answers `usage`
    # on the subject of every member cluster, so a cluster's gateway asks under its own name).
    "federation": ("health", "usage"),
    "kube-bridge": ("health",),
    # The web dashboard (its pages are HTTP; on the bus it only follows the ledger).
    "dashboard": ("health",),
}
"""Each service and the request/reply verbs it answers."""

EVENT_KINDS: dict[str, tuple[str, ...]] = {
    "run": ("namespace", "name"),  # spec and status changes of one run
    "lease": ("namespace", "run"),  # lease minted / closed, by run
    "reservation": ("namespace", "run"),
    "node": ("node",),  # node state changes
    "budget": ("budget",),  # budget applied, an envelope's GPU-hours and window
}
"""Each event kind and the name tokens that follow it."""

BUCKETS: dict[str, str] = {
    "runs": "run specs (objects.Run), key kv_key(namespace, name)",
    "budgets": "budget specs (objects.Budget), key kv_key(name)",
    "nodes": "nodes, topology and state (objects.Node), key kv_key(name)",
    "leader": "the decision-loop lock: holder and fencing epoch per loop",
    "notified": "the notifier's deliveries: key kv_key(receiver, event id), value delivered or dead (TTL)",
    "grants": "the federation's books (on its hub, cluster name `fed`): per aggregate cap, the allowances "
              "confirmed and the grants sent, key kv_key(budget, capName); written before a grant is sent",
}
"""KV buckets per cluster and what they hold."""

HUB_BUCKETS = ("grants",)
"""Buckets only the federation's hub has (`jobtree up` does not create them in a cluster)."""

OBJECT_BUCKETS: dict[str, str] = {
    "snapshots": "the view at a ledger sequence (object `view`, bus.snapshot), written by the admission leader",
}
"""JetStream object stores per cluster and what they hold."""

_CLUSTER = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_SAFE = re.compile(r"[A-Za-z0-9_:@=+~-]")
_WELL_FORMED = re.compile(r"[^\s.*>]+(\.[^\s.*>]+)*")


def check_cluster(cluster: str) -> str:
    """`cluster` if it is a DNS label (at most 63 characters), else ValueError."""
    if len(cluster) > 63 or not _CLUSTER.fullmatch(cluster):
        raise ValueError(
            f"cluster must be a DNS label (lowercase letters, digits, '-'; at most 63), got {cluster!r}"
        )
    return cluster


def token(name: str) -> str:
    """`name` as exactly one subject token: characters other than [A-Za-z0-9_:@=+~-] as %XX."""
    if not name:
        raise ValueError("a subject token cannot be empty")
    return "".join(c if _SAFE.fullmatch(c) else "".join(f"%{b:02X}" for b in c.encode()) for c in name)


def untoken(tok: str) -> str:
    """The name a token was made from (the inverse of `token`)."""
    raw = re.sub(rb"%([0-9A-F]{2})", lambda m: bytes([int(m.group(1), 16)]), tok.encode())
    return raw.decode()


def _base(cluster: str) -> str:
    return f"{PREFIX}.{check_cluster(cluster)}"


def request(cluster: str, service: str, verb: str) -> str:
    """`jobtree.C.<service>.<verb>`: the request/reply subject a service answers."""
    verbs = SERVICE_VERBS.get(service)
    if verbs is None:
        raise ValueError(f"unknown service {service!r}; services: {', '.join(SERVICE_VERBS)}")
    if verb not in verbs:
        raise ValueError(f"service {service!r} has no verb {verb!r}; verbs: {', '.join(verbs)}")
    return f"{_base(cluster)}.{service}.{verb}"


def service_filter(cluster: str, service: str) -> str:
    """`jobtree.C.<service>.*`: every verb of a service (for permissions)."""
    if service not in SERVICE_VERBS:
        raise ValueError(f"unknown service {service!r}; services: {', '.join(SERVICE_VERBS)}")
    return f"{_base(cluster)}.{service}.*"


def queue_group(service: str) -> str:
    """The queue group in which replicas of `service` share its requests."""
    if service not in SERVICE_VERBS:
        raise ValueError(f"unknown service {service!r}; services: {', '.join(SERVICE_VERBS)}")
    return f"{PREFIX}-{service}"


def inbox_prefix(cluster: str, service: str) -> str:
    """The reply-inbox prefix of `service` (so permissions can scope replies per service)."""
    if service not in SERVICE_VERBS:
        raise ValueError(f"unknown service {service!r}; services: {', '.join(SERVICE_VERBS)}")
    return f"_INBOX.{_base(cluster)}.{service}"


def event(cluster: str, kind: str, *names: str) -> str:
    """`jobtree.C.evt.<kind>.<token>...`: the subject of one event, names escaped by `token`."""
    fields = EVENT_KINDS.get(kind)
    if fields is None:
        raise ValueError(f"unknown event kind {kind!r}; kinds: {', '.join(EVENT_KINDS)}")
    if len(names) != len(fields):
        raise ValueError(f"event {kind!r} takes {len(fields)} names ({', '.join(fields)}), got {len(names)}")
    return ".".join((_base(cluster), "evt", kind, *(token(n) for n in names)))


def events_filter(cluster: str, kind: str | None = None) -> str:
    """A subscription filter: every event of the cluster, or every event of one kind."""
    if kind is None:
        return f"{_base(cluster)}.evt.>"
    if kind not in EVENT_KINDS:
        raise ValueError(f"unknown event kind {kind!r}; kinds: {', '.join(EVENT_KINDS)}")
    return f"{_base(cluster)}.evt.{kind}.>"


def ledger_subject(cluster: str) -> str:
    """`jobtree.C.ledger.facts`: where the binder publishes LedgerBatch messages."""
    return f"{_base(cluster)}.ledger.facts"


def ledger_filter(cluster: str) -> str:
    """`jobtree.C.ledger.>`: the subjects the ledger stream captures (only the binder may publish)."""
    return f"{_base(cluster)}.ledger.>"


def ledger_stream(cluster: str) -> str:
    """`jobtree_C_ledger`: the JetStream stream holding the cluster's lease ledger."""
    return f"{PREFIX}_{check_cluster(cluster)}_ledger"


def events_stream(cluster: str) -> str:
    """`jobtree_C_events`: the stream of domain events (bus.Event, CloudEvents) of the cluster."""
    return f"{PREFIX}_{check_cluster(cluster)}_events"


def bucket(cluster: str, name: str) -> str:
    """`jobtree_C_<name>`: a KV bucket of the cluster (names in BUCKETS)."""
    if name not in BUCKETS:
        raise ValueError(f"unknown KV bucket {name!r}; buckets: {', '.join(BUCKETS)}")
    return f"{PREFIX}_{check_cluster(cluster)}_{name}"


def object_bucket(cluster: str, name: str) -> str:
    """`jobtree_C_<name>`: an object store of the cluster (names in OBJECT_BUCKETS)."""
    if name not in OBJECT_BUCKETS:
        raise ValueError(f"unknown object store {name!r}; object stores: {', '.join(OBJECT_BUCKETS)}")
    return f"{PREFIX}_{check_cluster(cluster)}_{name}"


def kv_key(*names: str) -> str:
    """A KV key made of names, each escaped by `token` and joined by `.`."""
    if not names:
        raise ValueError("a KV key needs at least one name")
    return ".".join(token(n) for n in names)


class Subject(NamedTuple):
    kind: str
    """request | event-filter | ledger | ledger-filter | stream | bucket | object-store | inbox"""
    name: str
    value: str


def catalogue(cluster: str) -> list[Subject]:
    """Every subject, filter and name of one cluster (for docs, permissions and tests)."""
    out = [
        Subject("request", f"{service}.{verb}", request(cluster, service, verb))
        for service, verbs in SERVICE_VERBS.items()
        for verb in verbs
    ]
    out += [Subject("event-filter", kind, events_filter(cluster, kind)) for kind in EVENT_KINDS]
    out.append(Subject("event-filter", "*", events_filter(cluster)))
    out.append(Subject("ledger", "facts", ledger_subject(cluster)))
    out.append(Subject("ledger-filter", "ledger", ledger_filter(cluster)))
    out.append(Subject("stream", "ledger", ledger_stream(cluster)))
    out.append(Subject("stream", "events", events_stream(cluster)))
    out += [Subject("bucket", name, bucket(cluster, name)) for name in BUCKETS]
    out += [Subject("object-store", name, object_bucket(cluster, name)) for name in OBJECT_BUCKETS]
    out += [Subject("inbox", service, inbox_prefix(cluster, service)) for service in SERVICE_VERBS]
    return out


def well_formed(subject: str) -> bool:
    """True for a literal subject: dot-separated non-empty tokens, no wildcards or whitespace."""
    return bool(_WELL_FORMED.fullmatch(subject))

"""The federation's hub: the NATS users of the server member clusters join as leaf nodes.

Contract: `hub_users(clusters, secrets)` gives the users of the hub's nats-server
(`NatsServer(users=..., leaf_port=...)`), each known by the public key of its nkey seed in
`secrets` (`Secrets.load_or_create(path, HUB, hub_user_names(clusters))`):
- `admin`: everything (`jobtree up` and tests);
- `federation` (the service): asks every member cluster's budget service for its caps and sends
  grants to its admission (`jobtree.<c>.budget.caps`, `jobtree.<c>.admission.command`); answers
  `jobtree.<c>.federation.*` for every member and `jobtree.fed.federation.*`; hears the members'
  run events (`jobtree.<c>.evt.run.>`: a demand shift starts a round at once); keeps its books in
  the KV bucket `jobtree_fed_grants`;
- `leaf-<c>`: the leaf-node connection of member cluster `c` (its nats-server's remote holds
  the seed). On a leaf connection, the user's `publish` is what the cluster may send into the hub
  and `subscribe` what the hub forwards to the cluster: cluster `c` receives only the
  federation's questions and grants for `c` and the answers to its own gateway; it may send only
  answers to the federation and its gateway's `GlobalUsage` questions. One cluster cannot see,
  or speak for, another.
Not: the member clusters' own users (`security`), not the federation's logic.
"""

from __future__ import annotations

from collections.abc import Iterable

from jobtree.bus import subjects
from jobtree.bus.natsserver import Permissions, User
from jobtree.bus.security import ADMIN, Secrets, expand

__all__ = ["FEDERATION", "HUB", "federation_permissions", "hub_user_names", "hub_users", "leaf_permissions", "leaf_user"]

HUB = "fed"
"""The hub's own cluster name (the federation's subjects and bucket)."""
FEDERATION = "federation"


def leaf_user(cluster: str) -> str:
    return f"leaf-{subjects.check_cluster(cluster)}"


def hub_user_names(clusters: Iterable[str]) -> tuple[str, ...]:
    return (ADMIN, FEDERATION, *(leaf_user(c) for c in clusters))


def federation_permissions(clusters: Iterable[str]) -> Permissions:
    clusters = tuple(clusters)
    publish = ["_INBOX.>", *expand(HUB, "kv grants")]
    subscribe = [subjects.service_filter(HUB, FEDERATION), subjects.inbox_prefix(HUB, FEDERATION) + ".>"]
    for c in clusters:
        publish += [subjects.request(c, "budget", "caps"), subjects.request(c, "admission", "command")]
        subscribe += [subjects.service_filter(c, FEDERATION), subjects.events_filter(c, "run")]
    return Permissions(publish=tuple(publish), subscribe=tuple(subscribe))


def leaf_permissions(cluster: str) -> Permissions:
    return Permissions(
        publish=(subjects.inbox_prefix(HUB, FEDERATION) + ".>", subjects.request(cluster, FEDERATION, "usage"),
                 subjects.events_filter(cluster, "run")),
        subscribe=(subjects.request(cluster, "budget", "caps"), subjects.request(cluster, "admission", "command"),
                   subjects.inbox_prefix(cluster, "gateway") + ".>"),
    )


def hub_users(clusters: Iterable[str], secrets: Secrets) -> tuple[User, ...]:
    clusters = tuple(clusters)
    return (User(ADMIN, nkey=secrets.public_key(ADMIN)),
            User(FEDERATION, permissions=federation_permissions(clusters), nkey=secrets.public_key(FEDERATION)),
            *(User(leaf_user(c), permissions=leaf_permissions(c), nkey=secrets.public_key(leaf_user(c)))
              for c in clusters))

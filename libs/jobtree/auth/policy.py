"""Who may do what through the gateway: identities, their credentials, roles and owners.

Contract: `load(path)` reads a policy file and returns a `Policy`, or raises `ValidationError`
naming the field path, what was wrong and what is allowed. The file is YAML, either the policy
itself or a Kubernetes ConfigMap carrying it under `data."policy.yaml"` (so the same text is
mounted into the gateway's pod from a ConfigMap):

    apiVersion: rq.davidlangworthy.io/v1
    kind: AccessPolicy
    metadata: {name: jobtree}
    spec:
      identities:
      - name: alice                  # what the ledger records as the writer
        tokenSHA256: [9f86d0...]     # SHA-256 (hex) of each bearer token that is alice; optional
        grants:
        - role: researcher           # submit, apply, cancel, shrink, complete, fail runs
          owners: [org:ml:vision, "org:ml:vision:*"]
        - role: budget-owner         # apply budgets, add sponsors
          owners: ["org:ml:*"]
      - name: ops
        tokenSHA256: [...]
        grants: [{role: operator}]   # everything, every owner

Owner patterns are an owner id, or a prefix ending in `*` (as a budget's `lending.to`). A client
certificate identifies the identity whose `name` is its subject common name; a token, the
identity listing the token's SHA-256 (tokens themselves are never stored). Every identity the
policy names may read (runs, leases, budgets, usage, events: the ledger is auditable by anyone
the cluster knows); writes need a grant:
- `researcher`: SubmitRun/Apply of a run, DeleteRun, ShrinkRun, CompleteRun, FailRun of runs
  whose `spec.owner` a pattern matches;
- `budget-owner`: ApplyBudget/Apply of a budget whose `spec.owner` a pattern matches, and
  AddSponsor naming a sponsor a pattern matches (a sponsor's budget owner agrees to lend);
- `operator`: everything (no `owners`).
`Policy.check(identity, action, owner)` returns None when allowed, else the one-line reason
naming what is missing. `token_digest(token)` is the SHA-256 hex the policy lists.
Not: transport security (TLS, `pki`), not where the identity comes from (the gateway).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from jobtree.core.errors import ValidationError, field_path, item_path, show_value

__all__ = ["API_VERSION", "KIND", "NOBODY", "OPEN", "Action", "Grant", "Identity", "Policy", "Role", "load", "parse",
           "token_digest"]

API_VERSION = "rq.davidlangworthy.io/v1"
KIND = "AccessPolicy"
CONFIGMAP_KEY = "policy.yaml"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}")
_DIGEST = re.compile(r"[0-9a-f]{64}")


class Role(Enum):
    RESEARCHER = "researcher"
    BUDGET_OWNER = "budget-owner"
    OPERATOR = "operator"


class Action(Enum):
    """A write, and the role that may make it."""

    SUBMIT = ("submit runs of", Role.RESEARCHER)
    CANCEL = ("cancel runs of", Role.RESEARCHER)
    SHRINK = ("shrink runs of", Role.RESEARCHER)
    REPORT = ("report the end of runs of", Role.RESEARCHER)
    APPLY_BUDGET = ("apply budgets of", Role.BUDGET_OWNER)
    SPONSOR = ("add sponsor", Role.BUDGET_OWNER)

    @property
    def verb(self) -> str:
        return self.value[0]

    @property
    def role(self) -> Role:
        return self.value[1]


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _covers(pattern: str, owner: str) -> bool:
    return owner.startswith(pattern[:-1]) if pattern.endswith("*") else owner == pattern


@dataclass(frozen=True)
class Grant:
    role: Role
    owners: tuple[str, ...] = ()

    def covers(self, owner: str) -> bool:
        return self.role is Role.OPERATOR or any(_covers(p, owner) for p in self.owners)


@dataclass(frozen=True)
class Identity:
    name: str
    grants: tuple[Grant, ...] = ()
    token_digests: tuple[str, ...] = ()

    @property
    def operator(self) -> bool:
        return any(g.role is Role.OPERATOR for g in self.grants)

    def check(self, action: Action, owner: str) -> str | None:
        """None when this identity may take `action` on `owner`, else why not (one line)."""
        if any(g.role is Role.OPERATOR or (g.role is action.role and g.covers(owner)) for g in self.grants):
            return None
        mine = [p for g in self.grants if g.role is action.role for p in g.owners]
        has = f"its {action.role.value} grants cover {', '.join(mine)}" if mine else f"it has no {action.role.value} grant"
        return f"identity {self.name!r} may not {action.verb} {owner!r}: {has}"


OPEN = Identity("anonymous", (Grant(Role.OPERATOR),))
"""The caller of a gateway serving without a policy (plain loopback, an explicit choice)."""

NOBODY = Identity("unidentified")
"""Who a call is before it is identified: no grant, so a path that skipped identification
fails closed (PERMISSION_DENIED) instead of open."""


@dataclass(frozen=True)
class Policy:
    identities: tuple[Identity, ...]
    _by_name: dict[str, Identity] = field(default_factory=dict, compare=False, repr=False)
    _by_token: dict[str, Identity] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for ident in self.identities:
            self._by_name[ident.name] = ident
            for digest in ident.token_digests:
                self._by_token[digest] = ident

    def by_token(self, token: str) -> Identity | None:
        return self._by_token.get(token_digest(token))

    def by_name(self, name: str) -> Identity | None:
        return self._by_name.get(name)


# --- parsing ------------------------------------------------------------------------------


def _mapping(value: object, path: str, required: tuple[str, ...], optional: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValidationError(path, f"must be a mapping, got {show_value(value)}")
    for key in value:
        if key not in required and key not in optional:
            allowed = ", ".join((*required, *optional))
            raise ValidationError(field_path(path, str(key)), f"unknown field; allowed: {allowed}")
    for key in required:
        if key not in value:
            raise ValidationError(field_path(path, key), "is required")
    return value


def _list(value: object, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValidationError(path, f"must be a list, got {show_value(value)}")
    return value


def _grant(value: object, path: str) -> Grant:
    fields = _mapping(value, path, ("role",), ("owners",))
    roles = ", ".join(r.value for r in Role)
    try:
        role = Role(fields["role"])
    except (ValueError, TypeError):
        raise ValidationError(field_path(path, "role"), f"must be one of {roles}, got {show_value(fields['role'])}") from None
    owners = _list(fields.get("owners", []), field_path(path, "owners"))
    for i, pattern in enumerate(owners):
        where = item_path(field_path(path, "owners"), i)
        if not isinstance(pattern, str) or not pattern or any(c.isspace() for c in pattern) or "*" in pattern[:-1]:
            raise ValidationError(where, "must be an owner id, or a prefix ending in '*' such as org:ml:*; "
                                         f"got {show_value(pattern)}")
    if role is Role.OPERATOR and owners:
        raise ValidationError(field_path(path, "owners"), "an operator covers every owner: leave owners out")
    if role is not Role.OPERATOR and not owners:
        raise ValidationError(field_path(path, "owners"), f"a {role.value} grant needs at least one owner pattern")
    return Grant(role, tuple(owners))


def _identity(value: object, path: str) -> Identity:
    fields = _mapping(value, path, ("name",), ("tokenSHA256", "grants"))
    name = fields["name"]
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValidationError(field_path(path, "name"), "must be 1-128 letters, digits or ._@:- starting with a "
                                                        f"letter or digit, got {show_value(name)}")
    digests = fields.get("tokenSHA256", [])
    digests = [digests] if isinstance(digests, str) else _list(digests, field_path(path, "tokenSHA256"))
    for i, digest in enumerate(digests):
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise ValidationError(item_path(field_path(path, "tokenSHA256"), i),
                                  "must be the SHA-256 of a token as 64 lowercase hex digits "
                                  f"(`jobtree auth token` prints one), got {show_value(digest)}")
    grants = _list(fields.get("grants", []), field_path(path, "grants"))
    return Identity(name, tuple(_grant(g, item_path(field_path(path, "grants"), i)) for i, g in enumerate(grants)),
                    tuple(digests))


def parse(doc: object) -> Policy:
    """The policy of a parsed YAML document (an AccessPolicy or a ConfigMap holding one)."""
    if isinstance(doc, Mapping) and doc.get("kind") == "ConfigMap":
        data = _mapping(doc.get("data"), "data", (CONFIGMAP_KEY,), ())
        text = data[CONFIGMAP_KEY]
        if not isinstance(text, str):
            raise ValidationError(f'data."{CONFIGMAP_KEY}"', f"must be the policy's YAML text, got {show_value(text)}")
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValidationError(f'data."{CONFIGMAP_KEY}"', f"is not YAML: {' '.join(str(err).split())}") from None
    top = _mapping(doc, "", ("apiVersion", "kind", "spec"), ("metadata",))
    if top["apiVersion"] != API_VERSION:
        raise ValidationError("apiVersion", f"must be {API_VERSION}, got {show_value(top['apiVersion'])}")
    if top["kind"] != KIND:
        raise ValidationError("kind", f"must be {KIND} (or a ConfigMap with data.\"{CONFIGMAP_KEY}\"), "
                                      f"got {show_value(top['kind'])}")
    spec = _mapping(top["spec"], "spec", ("identities",), ())
    identities = tuple(_identity(v, item_path("spec.identities", i))
                       for i, v in enumerate(_list(spec["identities"], "spec.identities")))
    seen: dict[str, str] = {}
    for i, ident in enumerate(identities):
        if ident.name in seen:
            raise ValidationError(field_path(item_path("spec.identities", i), "name"),
                                  f"{ident.name!r} is already {seen[ident.name]}")
        seen[ident.name] = f"spec.identities[{i}]"
    owners_of: dict[str, str] = {}
    for i, ident in enumerate(identities):
        for digest in ident.token_digests:
            if digest in owners_of and owners_of[digest] != ident.name:
                raise ValidationError(field_path(item_path("spec.identities", i), "tokenSHA256"),
                                      f"a token of {owners_of[digest]!r} too: one token is one identity")
            owners_of[digest] = ident.name
    return Policy(identities)


def load(path: Path) -> Policy:
    """The policy in the file `path` (errors name the file)."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValidationError(str(path), f"cannot be read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ValidationError(str(path), f"is not YAML: {' '.join(str(err).split())}") from None
    try:
        return parse(doc)
    except ValidationError as err:
        raise ValidationError(f"{path}: {err.path}" if err.path else str(path), err.problem) from None

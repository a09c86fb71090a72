"""The notifier's configuration: receivers and routes, read from YAML and checked whole.

Part of the notifier (see its package docstring). `load(path)` / `parse(doc)` give a `Config`
or raise `ConfigError` naming the field (`routes[1].groupWait: must be a duration ...`), so
`jobtree serve notifier --config FILE` and `jobtree up --notify FILE` exit 2 with one line.
Secrets (webhook URLs, SMTP credentials) come from files (`...File`) or the environment
(`...Env`), or inline for the webhook URLs of tests; never from run specs.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobtree.api.events import KINDS
from jobtree.core.errors import ValidationError
from jobtree.core.timefmt import parse_duration

GROUP_KEYS = ("owner", "namespace", "run", "kind", "budget", "node")
KNOWN_RECEIVER_KEYS = ("name", "slack", "email", "webhook", "maxPerMinute")


class ConfigError(ValueError):
    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path, self.problem = path, problem


@dataclass(frozen=True)
class Retry:
    initial: float = 1.0
    maximum: float = 300.0
    attempts: int = 8
    """Attempts before an event is dead-lettered for a receiver."""


@dataclass(frozen=True)
class Receiver:
    name: str
    kind: str
    """slack | email | webhook"""
    url: str = ""
    smarthost: str = ""
    sender: str = ""
    to: tuple[str, ...] = ()
    starttls: bool = False
    username: str = ""
    password: str = ""
    max_per_minute: int = 60


@dataclass(frozen=True)
class Route:
    receiver: str
    owner: str = "*"
    namespace: str = "*"
    kinds: frozenset[str] = frozenset()
    group_by: tuple[str, ...] = ()
    group_wait: float = 30.0
    repeat_interval: float = 0.0
    cont: bool = False

    def matches(self, owner: str, namespace: str, kind: str) -> bool:
        return (fnmatch.fnmatchcase(owner or "", self.owner) and fnmatch.fnmatchcase(namespace or "", self.namespace)
                and (not self.kinds or kind in self.kinds))


@dataclass(frozen=True)
class RunRequests:
    """What a Run may ask for with its notify annotations: these receivers, these kinds."""

    receivers: frozenset[str] = frozenset()
    kinds: frozenset[str] = frozenset()
    group_wait: float = 0.0

    def route(self, receiver: str, kind: str) -> Route | None:
        if receiver not in self.receivers or (self.kinds and kind not in self.kinds):
            return None
        return Route(receiver, group_by=("run",), group_wait=self.group_wait)


@dataclass(frozen=True)
class Config:
    receivers: dict[str, Receiver]
    routes: tuple[Route, ...]
    retry: Retry = field(default_factory=Retry)
    run_requests: RunRequests = field(default_factory=RunRequests)

    def routes_for(self, owner: str, namespace: str, kind: str) -> list[Route]:
        """The routes an event takes: the first match, and after it every match while the
        matched routes say `continue: true`."""
        out = []
        for route in self.routes:
            if route.matches(owner, namespace, kind):
                out.append(route)
                if not route.cont:
                    break
        return out


def _map(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(path, f"must be a mapping, got {type(value).__name__}")
    return value


def _only(m: dict[str, Any], allowed: tuple[str, ...], path: str) -> None:
    for key in m:
        if key not in allowed:
            raise ConfigError(f"{path}.{key}" if path else str(key), f"unknown field; allowed: {', '.join(allowed)}")


def _text(m: dict[str, Any], key: str, path: str, *, required: bool = True) -> str:
    value = m.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{path}.{key}", "required: a non-empty string")
    return value.strip()


def _secret(m: dict[str, Any], key: str, path: str, *, required: bool) -> str:
    """`key` inline, `keyFile` (a file's first line) or `keyEnv` (an environment variable)."""
    if f"{key}File" in m:
        name = _text(m, f"{key}File", path)
        try:
            return Path(name).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{path}.{key}File", f"cannot read {name}: {exc.strerror or exc}") from None
    if f"{key}Env" in m:
        var = _text(m, f"{key}Env", path)
        if var not in os.environ:
            raise ConfigError(f"{path}.{key}Env", f"the environment has no {var}")
        return os.environ[var]
    return _text(m, key, path, required=required)


def _duration(m: dict[str, Any], key: str, path: str, default: float) -> float:
    if key not in m:
        return default
    try:
        return float(parse_duration(m[key], f"{path}.{key}"))
    except ValidationError as err:
        raise ConfigError(err.path, err.problem) from None


def _positive(m: dict[str, Any], key: str, path: str, default: int) -> int:
    value = m.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{path}.{key}", f"must be a whole number of at least 1, got {value!r}")
    return value


def _receiver(raw: Any, path: str) -> Receiver:
    m = _map(raw, path)
    _only(m, KNOWN_RECEIVER_KEYS, path)
    name = _text(m, "name", path)
    kinds = [k for k in ("slack", "email", "webhook") if k in m]
    if len(kinds) != 1:
        raise ConfigError(path, "exactly one of slack, email or webhook is required")
    kind = kinds[0]
    body = _map(m[kind], f"{path}.{kind}")
    where = f"{path}.{kind}"
    per_minute = _positive(m, "maxPerMinute", path, 60)
    if kind == "slack":
        _only(body, ("webhookURL", "webhookURLFile", "webhookURLEnv"), where)
        url = _secret(body, "webhookURL", where, required=True)
        return Receiver(name, kind, url=_url(url, f"{where}.webhookURL"), max_per_minute=per_minute)
    if kind == "webhook":
        _only(body, ("url", "urlFile", "urlEnv"), where)
        return Receiver(name, kind, url=_url(_secret(body, "url", where, required=True), f"{where}.url"),
                        max_per_minute=per_minute)
    _only(body, ("smarthost", "from", "to", "starttls", "username", "usernameFile", "usernameEnv", "password",
                 "passwordFile", "passwordEnv"), where)
    host = _text(body, "smarthost", where)
    if ":" not in host or not host.rsplit(":", 1)[1].isdigit():
        raise ConfigError(f"{where}.smarthost", f"must be host:port, got {host!r}")
    to = body.get("to")
    if not isinstance(to, list) or not to or not all(isinstance(a, str) and "@" in a for a in to):
        raise ConfigError(f"{where}.to", "required: a list of e-mail addresses")
    sender = _text(body, "from", where)
    if "@" not in sender:
        raise ConfigError(f"{where}.from", f"must be an e-mail address, got {sender!r}")
    starttls = body.get("starttls", False)
    if not isinstance(starttls, bool):
        raise ConfigError(f"{where}.starttls", "must be true or false")
    return Receiver(name, kind, smarthost=host, sender=sender, to=tuple(to), starttls=starttls,
                    username=_secret(body, "username", where, required=False),
                    password=_secret(body, "password", where, required=False), max_per_minute=per_minute)


def _url(url: str, path: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ConfigError(path, "must be an http:// or https:// URL")
    return url


def _route(raw: Any, path: str, receivers: dict[str, Receiver]) -> Route:
    m = _map(raw, path)
    _only(m, ("match", "receiver", "groupBy", "groupWait", "repeatInterval", "continue"), path)
    receiver = _text(m, "receiver", path)
    if receiver not in receivers:
        raise ConfigError(f"{path}.receiver", f"no receiver named {receiver!r}; receivers: {', '.join(receivers)}")
    match = _map(m.get("match", {}), f"{path}.match")
    _only(match, ("owner", "namespace", "kinds"), f"{path}.match")
    kinds = match.get("kinds", [])
    if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
        raise ConfigError(f"{path}.match.kinds", "must be a list of event kinds")
    for i, k in enumerate(kinds):
        if k not in KINDS:
            raise ConfigError(f"{path}.match.kinds[{i}]", f"unknown kind {k!r}; kinds: {', '.join(KINDS)}")
    group_by = m.get("groupBy", [])
    if not isinstance(group_by, list) or not all(g in GROUP_KEYS for g in group_by):
        raise ConfigError(f"{path}.groupBy", f"must be a list of {', '.join(GROUP_KEYS)}")
    cont = m.get("continue", False)
    if not isinstance(cont, bool):
        raise ConfigError(f"{path}.continue", "must be true or false")
    return Route(receiver, owner=str(match.get("owner", "*")), namespace=str(match.get("namespace", "*")),
                 kinds=frozenset(kinds), group_by=tuple(group_by),
                 group_wait=_duration(m, "groupWait", path, 30.0),
                 repeat_interval=_duration(m, "repeatInterval", path, 0.0), cont=cont)


def parse(doc: Any) -> Config:
    m = _map(doc, "")
    _only(m, ("receivers", "routes", "retry", "runRequests"), "")
    raw_receivers = m.get("receivers")
    if not isinstance(raw_receivers, list) or not raw_receivers:
        raise ConfigError("receivers", "required: a list of at least one receiver")
    receivers: dict[str, Receiver] = {}
    for i, raw in enumerate(raw_receivers):
        r = _receiver(raw, f"receivers[{i}]")
        if r.name in receivers:
            raise ConfigError(f"receivers[{i}].name", f"{r.name!r} is used twice")
        receivers[r.name] = r
    raw_routes = m.get("routes")
    if not isinstance(raw_routes, list) or not raw_routes:
        raise ConfigError("routes", "required: a list of at least one route")
    routes = tuple(_route(raw, f"routes[{i}]", receivers) for i, raw in enumerate(raw_routes))
    retry_raw = _map(m.get("retry", {}), "retry")
    _only(retry_raw, ("initial", "max", "attempts"), "retry")
    retry = Retry(_duration(retry_raw, "initial", "retry", 1.0) or 0.1, _duration(retry_raw, "max", "retry", 300.0),
                  _positive(retry_raw, "attempts", "retry", 8))
    rr = _map(m.get("runRequests", {}), "runRequests")
    _only(rr, ("receivers", "kinds", "groupWait"), "runRequests")
    allowed = rr.get("receivers", [])
    if not isinstance(allowed, list) or not all(isinstance(a, str) for a in allowed):
        raise ConfigError("runRequests.receivers", "must be a list of receiver names")
    for i, name in enumerate(allowed):
        if name not in receivers:
            raise ConfigError(f"runRequests.receivers[{i}]", f"no receiver named {name!r}")
    kinds = rr.get("kinds", [])
    if not isinstance(kinds, list) or not all(k in KINDS for k in kinds):
        raise ConfigError("runRequests.kinds", f"must be a list of event kinds: {', '.join(KINDS)}")
    requests = RunRequests(frozenset(allowed), frozenset(kinds), _duration(rr, "groupWait", "runRequests", 0.0))
    return Config(receivers, routes, retry, requests)


def load(path: str | Path) -> Config:
    from jobtree.sim.scenario import ScenarioError, load_yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        doc = load_yaml(text)
    except ScenarioError as exc:
        raise ConfigError("", f"{path}: {exc}") from None
    return parse(doc)

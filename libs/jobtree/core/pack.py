"""Pack: where a request's GPUs go, all or nothing (CALCULUS §4).

Contract: given a view of free slots and a request (groups, each a list of pieces that must sit
on nodes matching the piece's payer selector), answer a placement of every GPU or None.
Domains the run already uses come first, then domains by free GPUs (descending) then name;
nodes inside a domain by free GPUs (descending) then name; slots by ordinal. Each group
(with its spares) goes whole into the first domain that can hold it; a spanning (ungrouped)
group fills one domain before the next; `one_domain` puts every group in one domain.
Deterministic: the same inputs give the same placement. The view is left as it was found.
Not: a funding decision (see `cover`), not a commit (the engine mints leases).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Protocol

from jobtree.core.model import Labels, NodeState, Role, Slot, labels_match
from jobtree.core.topology import Topology

_TENTATIVE = "\x00pack"


@dataclass(frozen=True, slots=True)
class Piece:
    """GPUs of one role and one payer within a group; `tag` is returned with the slots."""

    role: Role
    count: int
    selector: Labels = ()
    tag: object = None


@dataclass(frozen=True, slots=True)
class GroupRequest:
    index: int
    pieces: tuple[Piece, ...]

    @property
    def size(self) -> int:
        return sum(p.count for p in self.pieces)


@dataclass(frozen=True, slots=True)
class PackRequest:
    flavor: str
    groups: tuple[GroupRequest, ...]
    selector: Labels = ()
    spanning: bool = False
    one_domain: bool = False
    used_domains: tuple[str, ...] = ()
    fixed_domains: tuple[tuple[int, tuple[str, ...]], ...] = ()
    """Per group index, the only domains it may use (a reservation's intended slice)."""


@dataclass(frozen=True, slots=True)
class PlacedPiece:
    piece: Piece
    slots: tuple[Slot, ...]


@dataclass(frozen=True, slots=True)
class PlacedGroup:
    index: int
    pieces: tuple[PlacedPiece, ...]

    def domain_gpus(self, domain_of: dict[str, str] | Topology) -> dict[str, int]:
        out: dict[str, int] = {}
        for pp in self.pieces:
            for node, _ in pp.slots:
                d = domain_of.domain_of(node) if isinstance(domain_of, Topology) else domain_of[node]
                out[d] = out.get(d, 0) + 1
        return out


class FreeView(Protocol):
    def domains_in_order(self) -> Iterator[str]: ...
    def total_free(self) -> int: ...
    def domain_free(self, domain: str) -> int: ...
    def nodes_in_order(self, domain: str, need: int) -> list[str]: ...
    def free_ordinals(self, node: str) -> list[int]: ...
    def labels_ok(self, node: str, selector: Labels) -> bool: ...
    def domain_of(self, node: str) -> str: ...
    def take(self, slots: list[Slot]) -> None: ...
    def untake(self, slots: list[Slot]) -> None: ...


class _NodeReads:
    """What every view reads of a node straight from the topology: its labels and domain."""

    topo: Topology

    def labels_ok(self, node: str, selector: Labels) -> bool:
        return not selector or labels_match(selector, self.topo.nodes[node].labels)

    def domain_of(self, node: str) -> str:
        return self.topo.domain_of(node)


class IndexedView(_NodeReads):
    """The live topology's free slots (fast path: run selector matches every node of the flavor)."""

    def __init__(self, topo: Topology, flavor: str) -> None:
        self.topo, self.flavor = topo, flavor

    def domains_in_order(self) -> Iterator[str]:
        # Positional and lazy: callers roll back a failed attempt before reading the next one.
        i = 0
        while (d := self.topo.domain_at(self.flavor, i)) is not None:
            yield d
            i += 1

    def total_free(self) -> int:
        return self.topo.flavor_free(self.flavor)

    def domain_free(self, domain: str) -> int:
        return self.topo.domain_free(self.flavor, domain)

    def nodes_in_order(self, domain: str, need: int) -> list[str]:
        out: list[str] = []
        have = 0
        for name in self.topo.nodes_by_free(self.flavor, domain):
            out.append(name)
            have += self.topo.free(name)
            if need and have >= need:
                break
        return out

    def free_ordinals(self, node: str) -> list[int]:
        return self.topo.free_ordinals(node)

    def take(self, slots: list[Slot]) -> None:
        self.topo.take(slots, _TENTATIVE)

    def untake(self, slots: list[Slot]) -> None:
        self.topo.release(slots, _TENTATIVE)


class VirtualView(_NodeReads):
    """Free slots as a caller counts them: live free slots plus `extra` (slots cuts could free),
    restricted to Ready nodes of the flavor matching `selector`."""

    def __init__(self, topo: Topology, flavor: str, selector: Labels = (),
                 extra: dict[str, set[int]] | None = None) -> None:
        self.topo = topo
        self._free: dict[str, set[int]] = {}
        self._by_domain: dict[str, list[str]] = {}
        extra = extra or {}
        extra_by_domain: dict[str, list[str]] = {}
        for name in extra:
            extra_by_domain.setdefault(topo.domain_of(name), []).append(name)
        nodes, ready = topo.nodes, NodeState.READY
        for domain in topo.domains(flavor):
            names = []
            with_free = set(topo.nodes_by_free(flavor, domain))  # Ready, of the flavor, a slot free
            for name in sorted(with_free.union(extra_by_domain.get(domain, ()))):
                if name not in with_free and (topo.flavor_of(name) != flavor or nodes[name].state is not ready):
                    continue
                if selector and not labels_match(selector, nodes[name].labels):
                    continue
                free = set(topo.free_ordinals(name)) if name in with_free else set()
                if name in extra:
                    free |= extra[name]
                if free:
                    self._free[name] = free
                    names.append(name)
            if names:
                self._by_domain[domain] = names

    def domains_in_order(self) -> Iterator[str]:
        return iter(sorted(self._by_domain, key=lambda d: (-self.domain_free(d), d)))

    def total_free(self) -> int:
        return sum(len(f) for f in self._free.values())

    def domain_free(self, domain: str) -> int:
        return sum(len(self._free[n]) for n in self._by_domain.get(domain, ()))

    def nodes_in_order(self, domain: str, need: int) -> list[str]:
        names = [n for n in self._by_domain.get(domain, ()) if self._free[n]]
        return sorted(names, key=lambda n: (-len(self._free[n]), n))

    def free_ordinals(self, node: str) -> list[int]:
        return sorted(self._free.get(node, ()))

    def take(self, slots: list[Slot]) -> None:
        for node, i in slots:
            self._free[node].remove(i)

    def untake(self, slots: list[Slot]) -> None:
        for node, i in slots:
            self._free[node].add(i)


class HeldLayer:
    """Held slots that views starting from it count as free (`OverlayView(base=...)`), kept up
    to date by its owner a lease at a time: per node the slots of each lease, and the counts per
    node, per domain and in all. The owner puts only leases on Ready nodes of one flavor."""

    def __init__(self) -> None:
        self.chunks: dict[str, dict[str, tuple[Slot, ...]]] = {}
        """Node -> lease name -> its slots."""
        self.n: dict[str, int] = {}
        self.dom: dict[str, int] = {}
        self.dom_nodes: dict[str, set[str]] = {}
        self.total = 0

    def put(self, name: str, slots: tuple[Slot, ...], domain: str) -> None:
        node = slots[0][0]
        chunks = self.chunks.get(node)
        if chunks is None:
            chunks = self.chunks[node] = {}
            self.dom_nodes.setdefault(domain, set()).add(node)
        chunks[name] = slots
        k = len(slots)
        self.n[node] = self.n.get(node, 0) + k
        self.dom[domain] = self.dom.get(domain, 0) + k
        self.total += k

    def drop(self, name: str, node: str, domain: str) -> None:
        chunks = self.chunks.get(node)
        slots = chunks.pop(name, None) if chunks is not None else None
        if chunks is None or slots is None:
            return
        k = len(slots)
        self.total -= k
        self.dom[domain] -= k
        if not chunks:
            del self.chunks[node], self.n[node]
            nodes = self.dom_nodes[domain]
            nodes.discard(node)
            if not nodes:
                del self.dom_nodes[domain]
        else:
            self.n[node] -= k
        if not self.dom[domain]:
            del self.dom[domain]


class OverlayView(_NodeReads):
    """The live free slots plus slots held in the topology that cuts could free, for a run
    whose selector matches every node of the flavor: those of maintained layers (`bases`, less
    the leases `hide` names) and those `add`ed, a level's leases at a time. Counts and orders
    as a `VirtualView` with those slots as extras would, but lazily: building it costs nothing
    per node of the fleet, adding and hiding cost per lease, and a pack pays only for the
    domains and nodes it visits. It reads the live topology and the layer, so it is used at
    once and kept only while neither changes."""

    def __init__(self, topo: Topology, flavor: str, bases: Iterable[HeldLayer] = ()) -> None:
        self.topo, self.flavor = topo, flavor
        self._bases = tuple(bases)
        self._extra: dict[str, list[tuple[Slot, ...]]] = {}  # node -> held slots counted free
        self._extra_n: dict[str, int] = {}
        self._extra_dom: dict[str, int] = {}
        self._extra_nodes: dict[str, set[str]] = {}  # domain -> nodes with extras
        self._extra_total = 0
        self._hidden: dict[str, set[int]] = {}  # node -> ordinals of the base not counted
        self._hidden_names: set[str] = set()
        self._hidden_dom: dict[str, int] = {}
        self._hidden_total = 0
        self._taken: dict[str, set[int]] = {}
        self._taken_dom: dict[str, int] = {}
        self._taken_total = 0

    def add(self, held: Iterable[tuple[Slot, ...]]) -> None:
        """Count each of `held` (the slots of one lease: held, on one node, none counted
        already) as free; slots on a node that is not Ready or not of the flavor are left out,
        as a virtual view leaves them."""
        topo, flavor, ready = self.topo, self.flavor, NodeState.READY
        nodes, flavor_of, domain_of = topo.nodes, topo.flavor_of, topo.domain_of
        extra, extra_n, extra_dom, extra_nodes = self._extra, self._extra_n, self._extra_dom, self._extra_nodes
        total = 0
        for slots in held:
            if not slots:
                continue
            node = slots[0][0]
            if flavor_of(node) != flavor or nodes[node].state is not ready:
                continue
            n, d = len(slots), domain_of(node)
            chunks = extra.get(node)
            if chunks is None:
                extra[node] = [slots]
                extra_n[node] = n
                extra_nodes.setdefault(d, set()).add(node)
            else:
                chunks.append(slots)
                extra_n[node] += n
            extra_dom[d] = extra_dom.get(d, 0) + n
            total += n
        self._extra_total += total

    def hide(self, names: Iterable[tuple[str, str]]) -> None:
        """Stop counting the base's slots of each (node, lease name) (one not in it, or hidden
        already: nothing)."""
        domain_of = self.topo.domain_of
        for node, name in names:
            slots = next((got for base in self._bases if (got := base.chunks.get(node, {}).get(name)) is not None), None)
            if slots is None or name in self._hidden_names:
                continue
            self._hidden_names.add(name)
            self._hidden.setdefault(node, set()).update(i for _, i in slots)
            d = domain_of(node)
            self._hidden_dom[d] = self._hidden_dom.get(d, 0) + len(slots)
            self._hidden_total += len(slots)

    def _node_free(self, node: str) -> int:
        free = self.topo.free(node) + self._extra_n.get(node, 0)
        for base in self._bases:
            free += base.n.get(node, 0)
        hidden, taken = self._hidden.get(node), self._taken.get(node)
        return free - (len(hidden) if hidden else 0) - (len(taken) if taken else 0)

    def _held_dom(self, domain: str) -> int:
        return (sum(base.dom.get(domain, 0) for base in self._bases) - self._hidden_dom.get(domain, 0)
                + self._extra_dom.get(domain, 0))

    def domains_in_order(self) -> Iterator[str]:
        # The domains with a free slot before anything was taken, by what is free now.
        held: dict[str, int] = dict(self._extra_dom)
        for base in self._bases:
            for d, n in base.dom.items():
                held[d] = held.get(d, 0) + n
        for d, n in self._hidden_dom.items():
            held[d] -= n
        topo, flavor, taken = self.topo, self.flavor, self._taken_dom
        order = []
        for d in topo.domains_by_free(flavor):
            free = topo.domain_free(flavor, d) + held.get(d, 0)
            if free > 0:
                order.append((taken.get(d, 0) - free, d))
        order.sort()
        return iter([d for _, d in order])

    def total_free(self) -> int:
        return (self.topo.flavor_free(self.flavor) + sum(base.total for base in self._bases) - self._hidden_total
                + self._extra_total - self._taken_total)

    def domain_free(self, domain: str) -> int:
        return self.topo.domain_free(self.flavor, domain) + self._held_dom(domain) - self._taken_dom.get(domain, 0)

    def nodes_in_order(self, domain: str, need: int) -> list[str]:
        names = set(self.topo.nodes_by_free(self.flavor, domain))
        for base in self._bases:
            names.update(base.dom_nodes.get(domain, ()))
        names.update(self._extra_nodes.get(domain, ()))
        order = [(-free, n) for n in names if (free := self._node_free(n)) > 0]
        order.sort()
        return [n for _, n in order]

    def free_ordinals(self, node: str) -> list[int]:
        free = set(self.topo.free_ordinals(node))
        for base in self._bases:
            for chunk in base.chunks.get(node, {}).values():
                free.update(i for _, i in chunk)
        free -= self._hidden.get(node, set())
        for chunk in self._extra.get(node, ()):
            free.update(i for _, i in chunk)
        return sorted(free - self._taken.get(node, set()))

    def take(self, slots: list[Slot]) -> None:
        for node, i in slots:
            self._taken.setdefault(node, set()).add(i)
            d = self.topo.domain_of(node)
            self._taken_dom[d] = self._taken_dom.get(d, 0) + 1
        self._taken_total += len(slots)

    def untake(self, slots: list[Slot]) -> None:
        for node, i in slots:
            self._taken[node].remove(i)
            d = self.topo.domain_of(node)
            self._taken_dom[d] -= 1
        self._taken_total -= len(slots)


def view_for(topo: Topology, flavor: str, selector: Labels = (),
             extra: dict[str, set[int]] | None = None) -> FreeView:
    """The fast indexed view when it is exact, else a virtual one."""
    if not extra and topo.selector_matches_all(flavor, selector):
        return IndexedView(topo, flavor)
    return VirtualView(topo, flavor, selector, extra)


def pack(view: FreeView, req: PackRequest) -> list[PlacedGroup] | None:
    """Place every GPU of `req` or answer None. The view is unchanged afterwards."""
    taken: list[Slot] = []
    try:
        if req.one_domain:
            return _pack_one_domain(view, req, taken)
        return _pack_groups(view, req, list(req.used_domains), taken)
    finally:
        view.untake(taken)


def _ordered_domains(view: FreeView, used: list[str]) -> Iterator[str]:
    """Domains the run already uses (in order of first use), then the rest by free GPUs."""
    yield from used
    for d in view.domains_in_order():
        if d not in used:
            yield d


def _pack_groups(view: FreeView, req: PackRequest, used: list[str], taken: list[Slot]) -> list[PlacedGroup] | None:
    fixed = dict(req.fixed_domains)
    placed: list[PlacedGroup] = []
    for g in req.groups:
        if g.index in fixed:
            doms: Iterable[str] = fixed[g.index]
            pg = _place_spanning(view, g, doms, taken) if req.spanning else _place_in_first(view, g, doms, taken)
        else:
            doms = _ordered_domains(view, used)
            pg = (_place_spanning(view, g, doms, taken) if req.spanning
                  else _place_in_first(view, g, doms, taken, sorted_after=len(used)))
        if pg is None:
            return None
        placed.append(pg)
        for pp in pg.pieces:
            for node, _ in pp.slots:
                d = view.domain_of(node)
                if d not in used:
                    used.append(d)
    return placed


def _pack_one_domain(view: FreeView, req: PackRequest, taken: list[Slot]) -> list[PlacedGroup] | None:
    candidates = list(req.used_domains[:1]) if req.used_domains else list(view.domains_in_order())
    need = sum(g.size for g in req.groups)
    for d in candidates:
        if view.domain_free(d) < need:
            continue
        attempt: list[Slot] = []
        sub = PackRequest(req.flavor, req.groups, req.selector, False, False, (d,),
                          tuple((g.index, (d,)) for g in req.groups))
        got = _pack_groups(view, sub, [d], attempt)
        if got is not None:
            taken.extend(attempt)
            return got
        view.untake(attempt)
    return None


def _place_in_first(view: FreeView, g: GroupRequest, doms: Iterable[str], taken: list[Slot],
                    sorted_after: int | None = None) -> PlacedGroup | None:
    """The group whole in the first domain that holds it. Past the first `sorted_after` domains
    the order is by free GPUs, so the search stops at the first one that is too small."""
    size = g.size
    for i, d in enumerate(doms):
        if view.domain_free(d) < size:
            if sorted_after is not None and i >= sorted_after:
                break
            continue
        attempt: list[Slot] = []
        pieces = _fill(view, g, [d], attempt)
        if pieces is not None:
            taken.extend(attempt)
            return PlacedGroup(g.index, pieces)
        view.untake(attempt)
    return None


def _place_spanning(view: FreeView, g: GroupRequest, doms: Iterable[str], taken: list[Slot]) -> PlacedGroup | None:
    """A group that may span domains, filling one before the next. The domain order is read
    before anything is taken, as far as the domains' free GPUs cover the group."""
    if view.total_free() < g.size:
        return None
    prefix: list[str] = []
    have = 0
    rest = iter(doms)
    for d in rest:
        prefix.append(d)
        have += view.domain_free(d)
        if have >= g.size:
            break
    attempt: list[Slot] = []
    pieces = _fill(view, g, prefix, attempt)
    if pieces is None:  # payer selectors left the prefix short: try every domain
        view.untake(attempt)
        attempt = []
        pieces = _fill(view, g, [*prefix, *rest], attempt)
    if pieces is None:
        view.untake(attempt)
        return None
    taken.extend(attempt)
    return PlacedGroup(g.index, pieces)


def _fill(view: FreeView, g: GroupRequest, doms: Iterable[str], attempt: list[Slot]) -> tuple[PlacedPiece, ...] | None:
    """Fill each piece from the domains in order, nodes in order; None if any piece is short.
    Node orders are taken once per domain, when the fill first reaches it."""
    cutoff = 0 if any(p.selector for p in g.pieces) else g.size
    seen: list[str] = []
    node_lists: dict[str, list[str]] = {}
    source = iter(doms)

    def domains() -> Iterator[str]:
        yield from seen
        for d in source:
            seen.append(d)
            node_lists[d] = view.nodes_in_order(d, cutoff)
            yield d

    out: list[PlacedPiece] = []
    for piece in g.pieces:
        need = piece.count
        got: list[Slot] = []
        for d in domains():
            for node in node_lists[d]:
                if need == 0:
                    break
                if not view.labels_ok(node, piece.selector):
                    continue
                ords = list(islice(view.free_ordinals(node), need))
                if ords:
                    slots = [(node, i) for i in ords]
                    view.take(slots)
                    attempt.extend(slots)
                    got.extend(slots)
                    need -= len(slots)
            if need == 0:
                break
        if need:
            return None
        out.append(PlacedPiece(piece, tuple(got)))
    return tuple(out)

"""Nodes, domains and slot occupancy, indexed for packing (CALCULUS §1 nodes and slots, §4).

Contract: knows every node, its state, which lease holds each slot, and keeps per
(flavor, domain) orderings of Ready nodes by free GPUs (descending) then name, and of domains
by free GPUs then name, updated in O(log n) as slots are taken and released. Occupancy is
exclusive: taking a held slot raises (the exclusivity property of §10).
Not: a placement policy (see `pack`), not a funding view.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from sortedcontainers import SortedList

from jobtree.core.model import Labels, Node, NodeState, Slot, labels_match


class SlotConflict(RuntimeError):
    """Two leases claimed one slot: a bug, never a user error."""


class Topology:
    def __init__(self, nodes: Iterable[Node] = ()) -> None:
        self.nodes: dict[str, Node] = {}
        self._holder: dict[str, list[str | None]] = {}
        self._free: dict[str, int] = {}
        self._domain: dict[str, str] = {}
        self._flavor: dict[str, str] = {}
        self._dom_nodes: dict[tuple[str, str], SortedList] = {}  # (flavor, domain) -> (-free, name), Ready
        self._dom_free: dict[tuple[str, str], int] = {}  # Ready free GPUs
        self._dom_order: dict[str, SortedList] = {}  # flavor -> (-free, domain)
        self._flavor_free: dict[str, int] = {}  # Ready free GPUs per flavor
        self._all_nodes_of: dict[tuple[str, str], list[str]] = {}  # (flavor, domain) -> names, any state
        self._selector_all: dict[tuple[str, Labels], bool] = {}
        self._selector_any: dict[tuple[str, Labels], bool] = {}
        for n in nodes:
            self.add_node(n)

    # --- structure -------------------------------------------------------------------------

    def add_node(self, node: Node) -> None:
        if node.name in self.nodes:
            raise ValueError(f"node {node.name} already exists")
        self.nodes[node.name] = node
        self._holder[node.name] = [None] * node.gpus
        self._free[node.name] = node.gpus
        self._domain[node.name] = node.domain
        self._flavor[node.name] = node.flavor
        key = (node.flavor, node.domain)
        self._all_nodes_of.setdefault(key, []).append(node.name)
        self._all_nodes_of[key].sort()
        if key not in self._dom_free:
            self._dom_free[key] = 0
            self._dom_nodes[key] = SortedList()
            self._dom_order.setdefault(node.flavor, SortedList()).add((0, node.domain))
        if node.state is NodeState.READY:
            self._index_add(node.name)
        self._selector_all.clear()
        self._selector_any.clear()

    def set_state(self, name: str, state: NodeState) -> None:
        node = self.nodes[name]
        if node.state is state:
            return
        if node.state is NodeState.READY:
            self._index_remove(name)
        self.nodes[name] = Node(node.name, node.gpus, node.labels, state)
        if state is NodeState.READY:
            self._index_add(name)

    def domain_of(self, node: str) -> str:
        return self._domain[node]

    def flavor_of(self, node: str) -> str:
        return self._flavor[node]

    def flavors(self) -> list[str]:
        return sorted(self._dom_order)

    def domains(self, flavor: str) -> list[str]:
        return sorted(d for f, d in self._dom_free if f == flavor)

    def nodes_of(self, flavor: str, domain: str) -> list[str]:
        """Every node of the flavor in the domain, any state, by name."""
        return self._all_nodes_of.get((flavor, domain), [])

    def selector_matches_all(self, flavor: str, selector: Labels) -> bool:
        """True when every node of `flavor` carries the selector's labels (a fast path for pack)."""
        if not selector:
            return True
        key = (flavor, selector)
        got = self._selector_all.get(key)
        if got is None:
            got = all(labels_match(selector, n.labels) for n in self.nodes.values() if n.flavor == flavor)
            self._selector_all[key] = got
        return got

    def selector_matches_any(self, flavor: str, selector: Labels) -> bool:
        """True when some node of `flavor` carries the selector's labels."""
        key = (flavor, selector)
        got = self._selector_any.get(key)
        if got is None:
            got = any(labels_match(selector, n.labels) for n in self.nodes.values() if n.flavor == flavor)
            self._selector_any[key] = got
        return got

    # --- occupancy -------------------------------------------------------------------------

    def holder(self, slot: Slot) -> str | None:
        return self._holder[slot[0]][slot[1]]

    def free(self, node: str) -> int:
        return self._free[node]

    def free_ordinals(self, node: str) -> list[int]:
        return [i for i, h in enumerate(self._holder[node]) if h is None]

    def held_slots(self, node: str) -> Iterator[tuple[int, str]]:
        for i, h in enumerate(self._holder[node]):
            if h is not None:
                yield i, h

    def take(self, slots: Iterable[Slot], holder: str) -> None:
        """Hold every slot for `holder`, all or nothing."""
        slots = list(slots)
        if len(set(slots)) != len(slots):
            raise SlotConflict(f"{holder} names a slot twice")
        for node, i in slots:
            if self._holder[node][i] is not None:
                raise SlotConflict(f"slot {node}#{i} is held by {self._holder[node][i]}, wanted by {holder}")
        per_node: dict[str, int] = {}
        for node, i in slots:
            self._holder[node][i] = holder
            per_node[node] = per_node.get(node, 0) + 1
        for node, n in per_node.items():
            self._shift(node, -n)

    def release(self, slots: Iterable[Slot], holder: str) -> None:
        """Free every slot held by `holder`, all or nothing."""
        slots = list(slots)
        if len(set(slots)) != len(slots):
            raise SlotConflict(f"{holder} names a slot twice")
        for node, i in slots:
            if self._holder[node][i] != holder:
                raise SlotConflict(f"slot {node}#{i} is held by {self._holder[node][i]}, not {holder}")
        per_node: dict[str, int] = {}
        for node, i in slots:
            self._holder[node][i] = None
            per_node[node] = per_node.get(node, 0) + 1
        for node, n in per_node.items():
            self._shift(node, n)

    # --- ordered views for pack -------------------------------------------------------------

    def domain_free(self, flavor: str, domain: str) -> int:
        return self._dom_free.get((flavor, domain), 0)

    def domains_by_free(self, flavor: str) -> Iterator[str]:
        """Domains of the flavor by Ready free GPUs (descending), then name."""
        for _, d in self._dom_order.get(flavor, ()):
            yield d

    def domain_at(self, flavor: str, i: int) -> str | None:
        """The i-th domain of the flavor in free order (O(log n)), or None past the end."""
        order = self._dom_order.get(flavor)
        if order is None or i >= len(order):
            return None
        return str(order[i][1])

    def nodes_by_free(self, flavor: str, domain: str) -> Iterator[str]:
        """Ready nodes of the flavor in the domain with a free slot, by free (descending), then name."""
        for neg, name in self._dom_nodes.get((flavor, domain), ()):
            if neg == 0:
                break
            yield name

    # --- index maintenance ------------------------------------------------------------------

    def _index_add(self, name: str) -> None:
        n = self.nodes[name]
        key = (n.flavor, self._domain[name])
        self._dom_nodes[key].add((-self._free[name], name))
        self._set_dom_free(key, self._dom_free[key] + self._free[name])

    def _index_remove(self, name: str) -> None:
        n = self.nodes[name]
        key = (n.flavor, self._domain[name])
        self._dom_nodes[key].remove((-self._free[name], name))
        self._set_dom_free(key, self._dom_free[key] - self._free[name])

    def _shift(self, name: str, delta: int) -> None:
        """The node's free count moves by `delta`: its place among its domain's nodes, and its
        domain's free count once (what `_index_remove` then `_index_add` would leave)."""
        n = self.nodes[name]
        old = self._free[name]
        self._free[name] = old + delta
        if n.state is NodeState.READY:
            key = (n.flavor, self._domain[name])
            nodes = self._dom_nodes[key]
            nodes.remove((-old, name))
            nodes.add((-(old + delta), name))
            self._set_dom_free(key, self._dom_free[key] + delta)

    def flavor_free(self, flavor: str) -> int:
        """Free GPUs of the flavor on Ready nodes."""
        return self._flavor_free.get(flavor, 0)

    def max_domain_free(self, flavor: str) -> int:
        order = self._dom_order.get(flavor)
        return -order[0][0] if order else 0

    def _set_dom_free(self, key: tuple[str, str], value: int) -> None:
        flavor, domain = key
        self._flavor_free[flavor] = self._flavor_free.get(flavor, 0) + value - self._dom_free[key]
        order = self._dom_order[flavor]
        order.remove((-self._dom_free[key], domain))
        self._dom_free[key] = value
        order.add((-value, domain))

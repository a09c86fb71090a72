"""What cut step 1 could free, kept up to date instead of gathered per attempt (CALCULUS §7;
docs/design/cut-worlds.md).

Contract: `ReclaimIndex` holds, for every run holding an unfunded lease, the leases step 1
could take from it as the funding view classes them now (`cuts.reclaim_capacity`), and per
flavor a `pack.HeldLayer` of those leases' slots on Ready nodes: the layer an intended slice's
first level packs on. Its owner re-derives a run (`put`) whenever something step 1 reads of it
may have changed — its leases opened or closed, one of its claims changed class, its spec or
status — and `reset`s it whole when nodes or budgets change (a node's state or domain moves
slots in or out of every layer). Deciding against it for a run being placed adjusts only the
runs whose classes differ once that run's claims are ranked in, and hides the runs that cannot
be cut then (`Cutting._reclaim_view`). Pure data: no clock, no I/O.
Not: the cut order (`cuts.plan` still takes the units in order), not the funding view.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from jobtree.core.model import Lease, NodeState
from jobtree.core.pack import HeldLayer
from jobtree.core.topology import Topology


class ReclaimIndex:
    def __init__(self) -> None:
        self.units: dict[str, tuple[Lease, ...]] = {}
        """Run -> the leases step 1 could free of it, by the view's classes (runs with none absent)."""
        self.names: dict[str, frozenset[str]] = {}
        """Run -> the names of `units[run]`."""
        self.layers: dict[str, HeldLayer] = {}
        """Flavor -> the slots of the units of runs not bound at `at`, on Ready nodes of it."""
        self.recent_layers: dict[str, HeldLayer] = {}
        """Flavor -> the same for the runs bound at `at` (no cut may touch them then, but a
        reservation planning a later activation counts them)."""
        self.recent: set[str] = set()
        """The runs whose units are in `recent_layers`."""
        self.unlayered: set[str] = set()
        """The runs with a unit on a node that is not Ready (in no layer)."""
        self.at: int | None = None
        self.epoch = -1
        """The nodes-and-budgets epoch the index was built for (-1: never built)."""

    def reset(self, epoch: int) -> None:
        self.units.clear()
        self.names.clear()
        self.layers.clear()
        self.recent_layers.clear()
        self.recent.clear()
        self.unlayered.clear()
        self.epoch = epoch

    def move_to(self, now: int, topo: Topology) -> None:
        """The clock moved on: the runs bound at the last instant join the others."""
        if now == self.at:
            return
        self.at = now
        for run in sorted(self.recent):
            self.put(run, self.units.get(run, ()), topo, recent=False)

    def put(self, run: str, leases: Iterable[Lease], topo: Topology, recent: bool = False) -> None:
        """Make `leases` the run's units (none: drop it); `recent`: the run was bound at `at`."""
        layers = self.recent_layers if run in self.recent else self.layers
        for x in self.units.pop(run, ()):
            layer = layers.get(topo.flavor_of(x.node))
            if layer is not None:
                layer.drop(x.name, x.node, topo.domain_of(x.node))
        self.names.pop(run, None)
        self.recent.discard(run)
        self.unlayered.discard(run)
        got = tuple(leases)
        if not got:
            return
        self.units[run] = got
        self.names[run] = frozenset(x.name for x in got)
        layers = self.layers
        if recent:
            self.recent.add(run)
            layers = self.recent_layers
        for x in got:
            if x.slots and topo.nodes[x.node].state is NodeState.READY:
                flavor = topo.flavor_of(x.node)
                layer = layers.get(flavor)
                if layer is None:
                    layer = layers[flavor] = HeldLayer()
                layer.put(x.name, x.slots, topo.domain_of(x.node))
            else:
                self.unlayered.add(run)

    def runs_in(self, domains: Iterable[str], run_of: Mapping[str, Lease]) -> set[str]:
        """Every run with a unit in one of `domains` (and those with a unit on a node that is
        not Ready, wherever it is): a superset of the runs step 1 can take from there."""
        runs = set(self.unlayered)
        for layers in (self.layers, self.recent_layers):
            for layer in layers.values():
                for d in domains:
                    for node in layer.dom_nodes.get(d, ()):
                        runs.update(run_of[name].run for name in layer.chunks[node])
        return runs

    def bases(self, flavor: str, planning: bool) -> list[HeldLayer]:
        """The layers a view for `flavor` starts from: the runs bound now only when planning."""
        got = [self.layers.get(flavor), self.recent_layers.get(flavor) if planning else None]
        return [layer for layer in got if layer is not None]


class Reclaimed:
    """The names of the leases one world's step 1 counted: every run's indexed units but those
    of `hidden` runs (and of the runs bound now, `without_recent`), and `own` units for the runs
    re-derived for that world (a run both hidden and re-derived counts its own)."""

    def __init__(self, index: ReclaimIndex, run_of: dict[str, Lease], hidden: set[str],
                 own: dict[str, frozenset[str]], without_recent: bool = False) -> None:
        self.index, self.run_of, self.hidden, self.own = index, run_of, hidden, own
        self.without_recent = without_recent
        """The runs bound now (`index.recent`) are hidden too."""

    def __contains__(self, name: object) -> bool:
        lease = self.run_of.get(name) if isinstance(name, str) else None
        if lease is None:
            return False
        run = lease.run
        if run in self.own:
            return name in self.own[run]
        if run in self.hidden or (self.without_recent and run in self.index.recent):
            return False
        return name in self.index.names.get(run, ())

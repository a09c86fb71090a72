"""Making room (CALCULUS §5.3, §7): the cut world of open leases and their classes, the
gentlest intended slice, reclaiming unfunded work, the cut order's plan applied, and a run's
gang re-established after it lost leases. A layer of `engine.Cluster`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from jobtree.core import cuts as cutorder
from jobtree.core.cover import Cover, Payment
from jobtree.core.facts import (
    ReservationPut,
)
from jobtree.core.funding import ClassesWith
from jobtree.core.funding_rules import Claim
from jobtree.core.model import (
    FundingClass,
    Lease,
    MintReason,
    NodeState,
    Phase,
    Reservation,
    Slot,
)
from jobtree.core.pack import OverlayView, PlacedGroup, pack, view_for
from jobtree.core.placement import Placement
from jobtree.core.reclaims import Reclaimed, ReclaimIndex
from jobtree.core.state import (
    R_PREEMPTED,
)


class Cutting(Placement):
    def _class_changes(self, key: str, cov: Cover) -> tuple[dict[str, FundingClass], dict[str, int]]:
        """The classes that differ once the cover's funded claims are ranked in (on the side:
        `changes_with`), and the unfunded counts that differ."""
        hypothetical = [Claim(f"\x00claim.{g.index}.{i}", key, self.runs[key].spec.owner, g.index, p.role, p.count,
                              pay.payer)
                        for g in cov.groups for i, p in enumerate(g.pieces)
                        if isinstance(pay := p.tag, Payment) and pay.funded and pay.payer is not None]
        return self.funding.changes_with(hypothetical)

    def _cut_world(self, key: str, cov: Cover, max_step: int = cutorder.LOTTERY, planning: bool = False,
                   changes: tuple[dict[str, FundingClass], dict[str, int]] | None = None) -> cutorder.CutWorld:
        """Open leases and their classes with the new claim's funded part ranked in (`changes`,
        read over the view's classes), for the runs the allowed cut steps could touch. Built
        from indexes the view keeps: each run's leases by name and by domain
        (`_refresh_sorted`, `_domains_of`) and the runs holding an unfunded claim; nothing is
        classified or sorted per open lease."""
        over, counts = changes if changes is not None else self._class_changes(key, cov)
        classes = ClassesWith(over, self.funding.classes())
        unfunded_counts = self.funding.unfunded_with(counts)
        # Every claim of another run is one of its open leases; the placing run's hypothetical
        # claims are not leases: count its open ones only.
        own = self.open_by_run.get(key, {})
        unfunded_counts.pop(key, None)
        if n_own := sum(classes[n] is FundingClass.UNFUNDED for n in own):
            unfunded_counts[key] = n_own
        unfunded_claims = unfunded_counts.keys()
        self._refresh_sorted()
        if max_step >= cutorder.LOTTERY:
            by_run: dict[str, Sequence[Lease]] = dict(self._open_sorted)
        else:
            # Steps 1-3 touch only runs with an unfunded lease, a spare or room to shrink; a
            # reclaim world is built from the runs with an unfunded lease alone.
            holders = unfunded_claims if max_step == cutorder.RECLAIM else self._open_sorted
            by_run = {k: self._open_sorted[k] for k in holders
                      if k in self._open_sorted and self._cuttable_by(k, k in unfunded_claims, max_step)}
        topo = self.topo
        usable = self._usable(self.runs[key].spec.gpu_type)
        index = self._reclaim_index()
        changed = self._runs_of(over)

        def reclaim_runs_in(domains: set[str]) -> set[str]:
            return index.runs_in(domains, self.leases) | changed  # the index's units, or these runs' own
        runs = self._cut_runs  # every run, live: only those of `by_run` are looked up
        in_world = unfunded_claims & by_run.keys()
        return cutorder.CutWorld(self.leases, classes, runs, topo.domain_of, usable, key, self.now,
                                 protect_bound_now=not planning, by_run=by_run, unfunded_runs=in_world,
                                 domains_of=self._domains_of, derive=False, spare_runs=self._spare_holders.keys(),
                                 shrinkable=self._malleable_running, widths=self._width, reclaim_runs_in=reclaim_runs_in,
                                 wholly_unfunded={k for k in in_world if unfunded_counts[k] == len(by_run[k])})

    def _usable(self, flavor: str) -> Callable[[Slot], bool]:
        topo = self.topo

        def usable(s: Slot) -> bool:
            return topo.nodes[s[0]].state is NodeState.READY and topo.flavor_of(s[0]) == flavor

        return usable

    def _step_one(self, key: str, unfunded: int, cls: Callable[[str], FundingClass | None]) -> list[Lease]:
        """The leases cut step 1 could free of a run holding `unfunded` unfunded claims, with
        these classes (none for a run without one, or without leases or a spec)."""
        leases = self._open_sorted.get(key)
        if not unfunded or not leases or key not in self._cut_runs:
            return []
        run = cutorder.RunHolding(key, leases, self._domains_of(key), self._cut_runs[key][0], unfunded == len(leases))
        return cutorder.reclaim_capacity(run, cls, self.topo.domain_of)

    def _reclaim_index(self) -> ReclaimIndex:
        """The reclaim index brought up to date: the runs whose classes, leases, spec or status
        changed are derived again (all of them when nodes or budgets changed)."""
        index, funding = self._reclaims, self.funding
        funding.refresh()
        if index.epoch != self._spec_epoch or funding.reclassified is None:
            index.reset(self._spec_epoch)
            dirty: set[str] | dict[str, int] = funding.unfunded_claims
        else:
            dirty = funding.reclassified | self._reclaim_dirty
        self._refresh_sorted()  # what `_step_one` reads, here and for the world's own runs
        index.move_to(self.now, self.topo)
        if dirty:
            cls, unfunded = funding.classes().get, funding.unfunded_claims
            for k in list(dirty):
                index.put(k, self._step_one(k, unfunded.get(k, 0), cls), self.topo, recent=self._bound_now(k))
        funding.reclassified = set()
        self._reclaim_dirty.clear()
        return index

    def _runs_of(self, names: Iterable[str]) -> set[str]:
        """The runs holding these open leases (names that are no lease, such as a run's
        hypothetical claims, are left out)."""
        return {x.run for n in names if (x := self.leases.get(n)) is not None}

    def _bound_now(self, key: str) -> bool:
        st = self._cut_runs.get(key)
        return st is not None and st[1].bound_at == self.now

    def _reclaim_view(self, key: str, changes: tuple[dict[str, FundingClass], dict[str, int]],
                      planning: bool) -> tuple[OverlayView, Reclaimed]:
        """The free slots plus what step 1 could free for `key` (an `OverlayView` on the
        index's layers), and the names of the leases counted: the index as it is, except the
        runs whose classes differ with `key`'s claims ranked in (derived again here, with those
        classes) and the runs no cut may touch (`key` itself and, unless planning a later
        activation, the runs bound now)."""
        index = self._reclaim_index()
        over, counts = changes
        flavor = self.runs[key].spec.gpu_type
        view = OverlayView(self.topo, flavor, index.bases(flavor, planning))
        changed = self._runs_of(over) - {key}
        # The runs bound now are in a layer of their own, left out unless planning (those that
        # hold nothing step 1 could free are not in it: a changed one of them is looked up).
        protected = {key} if planning else {key, *(k for k in changed if self._bound_now(k))}
        view.hide((x.node, x.name) for x in index.units.get(key, ()))
        own: dict[str, frozenset[str]] = {}
        cls = ClassesWith(over, self.funding.classes()).get
        unfunded = self.funding.unfunded_claims
        for k in sorted(changed - protected):
            got = self._step_one(k, counts.get(k, unfunded.get(k, 0)), cls)
            names = own[k] = frozenset(x.name for x in got)
            had = index.names.get(k, frozenset())
            # Ranked in, classes only lose funding: mostly units are added, rarely any is lost.
            view.hide((x.node, x.name) for x in index.units.get(k, ()) if x.name not in names)
            view.add(x.slots for x in got if x.name not in had)
        return view, Reclaimed(index, self.leases, changed | protected, own, without_recent=not planning)

    def _refresh_sorted(self) -> None:
        """Bring `_open_sorted` (each holder's open leases by name) up to date."""
        for k in self._stale_runs:
            leases = self.open_by_run.get(k)
            if leases:
                self._open_sorted[k] = tuple(sorted(leases.values(), key=lambda x: x.name))
            else:
                self._open_sorted.pop(k, None)
        self._stale_runs.clear()

    def _domains_of(self, key: str) -> cutorder.RunDomains:
        """A run's open leases by domain (for a world just built: `_open_sorted` is current)."""
        got = self._run_domains.get(key)
        if got is None:
            got = self._run_domains[key] = cutorder.run_domains(self._open_sorted[key], self.topo.domain_of)
        return got

    def _cuttable_by(self, key: str, has_unfunded: bool, max_step: int) -> bool:
        if has_unfunded:
            return True
        if max_step >= cutorder.DROP_SPARE and key in self._spare_holders:
            return True
        run = self.runs.get(key)
        return max_step >= cutorder.SHRINK and run is not None and run.spec.malleable is not None

    def _intended_slice(self, key: str, cov: Cover, max_level: int = 4, world: Callable[[], cutorder.CutWorld] | None = None,
                        free_tried: bool = False, planning: bool = True,
                        changes: tuple[dict[str, FundingClass], dict[str, int]] | None = None) -> list[PlacedGroup] | None:
        """The placement needing the gentlest cuts (§7): free slots, then what each cut step could
        free, then every slot; None when even that does not fit. `free_tried`: the caller has
        just packed this cover on the free slots alone, and it did not fit. `world`: the cut
        world the caller will plan on (made only when a level past step 1 is looked at);
        `planning`: for a reservation's later activation (runs bound now count)."""
        if not free_tried:
            placed = self._pack(key, cov.groups)
            if placed is not None:
                return placed
        changes = changes if changes is not None else self._class_changes(key, cov)
        world = world or functools.cache(lambda: self._cut_world(key, cov, max_level, planning, changes))
        spec = self.runs[key].spec
        if self.topo.selector_matches_all(spec.gpu_type, spec.locality.selector):
            # One lazy view for every level: step 1 from the maintained index, then each level
            # adds its leases' slots; nothing is rebuilt.
            view, reclaimed = self._reclaim_view(key, changes, planning)
            request = self._pack_request(key, cov.groups)
            if view.total_free() > self.topo.flavor_free(spec.gpu_type):  # else the pack that just failed
                placed = pack(view, request)
                if placed is not None:
                    return placed
            if max_level <= cutorder.RECLAIM:
                return None
            for added in cutorder.capacity_leases(world(), max_level, reclaimed):
                if not added:
                    continue  # the same slots as the pack that just failed
                view.add(lease.slots for lease in added)
                placed = pack(view, request)
                if placed is not None:
                    return placed
            return None
        extra: dict[str, set[int]] = {}
        for added in cutorder.capacity_leases(world(), max_level):
            if not added:
                continue  # the same slots as the pack that just failed
            for lease in added:  # a lease's slots are on one node
                extra.setdefault(lease.node, set()).update(i for _, i in lease.slots)
            placed = self._pack(key, cov.groups, extra)
            if placed is not None:
                return placed
        return None

    def _slice_of(self, key: str, placed: list[PlacedGroup]) -> tuple[list[tuple[str, int]], dict[str, int]]:
        """(domain, GPUs) of a placement in order, and per domain the GPUs it needs there that are
        not free (§7: counted per domain, not per slot the placement happened to pick)."""
        slice_: dict[str, int] = {}
        for pg in placed:
            for pp in pg.pieces:
                for s in pp.slots:
                    d = self.topo.domain_of(s[0])
                    slice_[d] = slice_.get(d, 0) + 1
        spec = self.runs[key].spec
        free = view_for(self.topo, spec.gpu_type, spec.locality.selector)
        deficit = {d: n - free.domain_free(d) for d, n in slice_.items() if n > free.domain_free(d)}
        return list(slice_.items()), deficit

    def _group_domains(self, placed: list[PlacedGroup]) -> tuple[tuple[int, tuple[str, ...]], ...]:
        return tuple((pg.index, tuple(dict.fromkeys(self.topo.domain_of(s[0]) for pp in pg.pieces for s in pp.slots)))
                     for pg in placed)

    def _reclaim_then_bind(self, key: str, cov: Cover) -> bool:
        """§5.3: end unfunded work in the way (cut step 1 only) if that alone restores a fit."""
        if not self._reclaim_could_fit(key):
            return False
        return self._cut_and_bind(key, cov, key, cutorder.RECLAIM, None)  # caller: cov did not fit free slots

    def _reclaim_could_fit(self, key: str) -> bool:
        """A necessary condition for reclaim to restore a fit, in O(log n): step 1 frees only
        unfunded GPUs, and with the new claim ranked in those are at most today's unfunded,
        shared and borrowed GPUs plus owned GPUs of runs admitted no earlier than this one."""
        spec = self.runs[key].spec
        self.funding.refresh()
        by_class = self.funding.class_gpus
        could = (by_class[FundingClass.UNFUNDED] + by_class[FundingClass.SHARED]
                 + by_class[FundingClass.BORROWED])
        admitted = self.terms(key).admitted
        could += sum(self._gpus_by_admitted[t] for t in self._gpus_by_admitted.irange(minimum=admitted))
        need = spec.min_width + self._spares_for(spec.min_width, key)
        return bool(self.topo.flavor_free(spec.gpu_type) + could >= need)

    def _cut_and_bind(self, key: str, cov: Cover, source: str, max_step: int, res: Reservation | None) -> bool:
        """Choose the slice, plan the cuts that clear its deficit, apply them and bind into it.
        Callers have just found that `cov` does not fit the free slots."""
        changes = self._class_changes(key, cov)
        world = functools.cache(lambda: self._cut_world(key, cov, max_step, changes=changes))
        intended = self._intended_slice(key, cov, max_step, world, free_tried=True, planning=False, changes=changes)
        if intended is None:
            return False
        _, deficit = self._slice_of(key, intended)
        planned = cutorder.plan(world(), deficit, source, max_step)
        if res is not None and (res.seed, res.conflict_set) != (planned.seed, planned.conflict_set):
            # §7: whenever the cut order runs, its seed and conflict set are published.
            res = replace(res, seed=planned.seed, conflict_set=planned.conflict_set)
            self.apply(ReservationPut(res))
        if not planned.cleared:
            return False
        self._apply_cuts(planned)
        cov = self._cover(key, self._needs(key, 0, self.runs[key].spec.min_width))
        placed = self._pack(key, cov.groups, fixed=self._group_domains(intended)) or self._pack(key, cov.groups)
        if placed is None:  # only when payer selectors split a domain; the run keeps waiting
            return True
        self._bind(key, placed, MintReason.START)
        return True

    def _apply_cuts(self, planned: cutorder.CutPlan) -> None:
        closure = {cutorder.RECLAIM: f"ReclaimUnfunded({planned.seed})", cutorder.DROP_SPARE: "DropSpare",
                   cutorder.SHRINK: "Shrink"}
        touched: list[str] = []
        for cut in planned.cuts:
            if cut.step == cutorder.LOTTERY:
                continue
            for name in cut.leases:
                if self.leases[name].open:
                    self._close(name, closure[cut.step])
            touched.append(cut.run)
        for cut in planned.cuts:
            if cut.step == cutorder.LOTTERY:
                self._close_run(cut.run, f"RandomPreempt({planned.seed})")
                self._preempted(cut.run)
        for key in dict.fromkeys(touched):
            self._after_loss(key, "Requeued", f"ReclaimUnfunded({planned.seed})", preempted=True)

    def _after_loss(self, key: str, requeue_closure: str, group_closure: str, preempted: bool) -> None:
        """Re-establish the gang after some leases closed: drop broken groups of a malleable run,
        or requeue a run below its runnable width."""
        spec = self.runs[key].spec
        groups = self._groups(key)
        if not groups:
            if preempted:
                self._preempted(key)
            return
        broken = [g for g, ls in groups.items() if self._group_broken(key, g, ls)]
        width = sum(self._active(ls) for g, ls in groups.items() if g not in broken)
        if width >= spec.min_width and (broken == [] or spec.malleable is not None):
            for g in broken:
                for lease in groups[g]:
                    self._close(lease.name, group_closure)
            return
        self._close_run(key, requeue_closure)
        if preempted:
            self._preempted(key)

    def _group_broken(self, key: str, g: int, leases: list[Lease]) -> bool:
        return self._active(leases) < self._group_size(key, g)

    def _group_size(self, key: str, g: int) -> int:
        """The active width group `g` was laid out with: the groups of the runnable width first
        (the last may be smaller), then one group per growth step."""
        spec = self.runs[key].spec
        gg = spec.locality.group_gpus
        step = spec.malleable.step if spec.malleable else 0
        if gg is None:
            return spec.min_width if g == 0 else step
        first = -(-spec.min_width // gg)
        if g == first - 1:
            return spec.min_width - gg * (first - 1)
        return gg

    def _preempted(self, key: str) -> None:
        self._fail_reservation(key)
        self._set_status(key, phase=Phase.PENDING, reason=R_PREEMPTED, reservation=None,
                         hold_down_until=self.now + self.config.preemption_hold_down,
                         message="lost its GPUs to a cut; may bind on idle capacity, reserves after the hold-down")

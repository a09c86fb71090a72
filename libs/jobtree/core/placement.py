"""Where a run would go and who would pay (CALCULUS §2, §5.1-§5.2): its needs, its cover by
envelopes, packing it on free slots, binding it (minting leases) or parking it. A layer of
`engine.Cluster` over `state.ClusterState`.
"""

from __future__ import annotations

from dataclasses import replace

from jobtree.core.cover import Candidate, Cover, GroupNeed, Payment, candidates, cover, eligible_at
from jobtree.core.facts import (
    LeaseMinted,
    ReservationPut,
)
from jobtree.core.model import (
    Lease,
    MintReason,
    Phase,
    ReservationState,
    Role,
    Slot,
)
from jobtree.core.pack import GroupRequest, PackRequest, PlacedGroup, pack, view_for
from jobtree.core.state import (
    R_CHECKPOINT,
    R_PREEMPTED,
    R_RUNNING,
    R_UNSCHEDULABLE,
    ClusterState,
)


class Placement(ClusterState):
    def _needs(self, key: str, lo: int, hi: int) -> list[GroupNeed]:
        """Groups covering widths [lo, hi) of the run, numbered after its existing groups."""
        spec = self.runs[key].spec
        existing = self._groups(key)
        index = max(existing) + 1 if existing else 0
        out: list[GroupNeed] = []
        g = spec.locality.group_gpus
        if g is None:
            return [GroupNeed(index, hi - lo)] if hi > lo else []
        left = hi - lo
        while left > 0:
            n = min(g, left)
            out.append(GroupNeed(index, n, spec.spares_per_group))
            index += 1
            left -= n
        return out

    def _cover(self, key: str, needs: list[GroupNeed], t: int | None = None, *, headroom_only: bool = False,
               reserve: bool = False) -> Cover:
        run = self.runs[key]
        at = self.now if t is None else t
        terms = self.terms(key)
        static, windowless = self._candidates(key)
        cands = static if windowless else [c for c in static if eligible_at(c.envelope, at, reserve)]
        return cover(self.rules, self.funding, self.meter, run, terms, needs, at, self._period_of,
                     cands, headroom_only=headroom_only)

    def _static_candidates(self, key: str) -> list[Candidate]:
        """The envelopes that may ever pay for the run under today's budgets and nodes (cached
        per owner, flavor, selector and funding terms until a budget or node changes)."""
        return self._candidates(key)[0]

    def _candidates(self, key: str) -> tuple[list[Candidate], bool]:
        """`_static_candidates`, and whether none of them has a window (then every one is
        eligible at every instant)."""
        run = self.runs[key]
        terms = self.terms(key)
        spec = run.spec
        ck = (spec.owner, spec.gpu_type, spec.locality.selector, terms.allow_borrow, spec.funding.sponsors)
        self._check_spec_caches()
        got = self._cand_cache.get(ck)
        if got is None:
            static = candidates(self.rules, self.topo, run, terms)
            got = self._cand_cache[ck] = static, all(c.envelope.start is None and c.envelope.end is None
                                                     for c in static)
        return got

    def _check_spec_caches(self) -> None:
        """Forget what was cached under earlier budgets and nodes."""
        if self._cand_epoch != self._spec_epoch:
            self._cand_cache.clear()
            self._empty_fit_cache.clear()
            self._cand_epoch = self._spec_epoch

    def admission_cover(self, key: str) -> Cover:
        """Who would pay for the run's runnable width if it were admitted now (a read: what
        `explain` and the dashboard say a queued run can be funded by; decides nothing)."""
        spec = self.runs[key].spec
        return self._cover(key, self._needs(key, 0, spec.min_width))

    def _period_of(self, ref: tuple[str, str]) -> int:
        """The admission look-ahead P of an envelope: its budget's `spec.period`, else the cluster's."""
        period = self.budgets[ref[0]].period
        return period if period is not None else self.config.period

    def _pack_request(self, key: str, groups: tuple[GroupRequest, ...],
                      fixed: tuple[tuple[int, tuple[str, ...]], ...] = ()) -> PackRequest:
        spec = self.runs[key].spec
        return PackRequest(
            flavor=spec.gpu_type,
            groups=groups,
            selector=spec.locality.selector,
            spanning=spec.locality.group_gpus is None,
            one_domain=not spec.locality.allow_cross_group_spread,
            used_domains=tuple(self._used_domains(key)),
            fixed_domains=fixed,
        )

    def _pack(self, key: str, groups: tuple[GroupRequest, ...], extra: dict[str, set[int]] | None = None,
              fixed: tuple[tuple[int, tuple[str, ...]], ...] = ()) -> list[PlacedGroup] | None:
        spec = self.runs[key].spec
        view = view_for(self.topo, spec.gpu_type, spec.locality.selector, extra)
        return pack(view, self._pack_request(key, groups, fixed))

    def _park(self, key: str) -> bool:
        """§5.5: no fit and nothing fundable (or in hold-down): stay Pending, cut nobody."""
        st = self.status[key]
        if st.reason == R_CHECKPOINT and st.checkpoint_deadline is not None:
            return False
        if self._in_hold_down(key):
            return self._set_status(key, reason=R_PREEMPTED, message=(
                "lost its GPUs to a cut; may bind on idle capacity, reserves again after the hold-down"))
        return self._set_status(key, reason=R_UNSCHEDULABLE, message="no fit and nothing fundable: waits for idle capacity")

    def _could_fit(self, key: str) -> bool:
        """A cheap necessary condition for a plain bind: enough free GPUs, and a domain that can
        hold the largest group."""
        spec = self.runs[key].spec
        if self.topo.flavor_free(spec.gpu_type) < spec.min_width + self._spares_for(spec.min_width, key):
            return False
        g = spec.locality.group_gpus
        return g is None or self.topo.max_domain_free(spec.gpu_type) >= min(g, spec.min_width) + spec.spares_per_group

    def _bind(self, key: str, placed: list[PlacedGroup], reason: MintReason) -> None:
        self._mint(key, placed, reason)
        st = self.status[key]
        if st.reservation is not None:
            res = self.reservations[st.reservation]
            if res.state is ReservationState.PENDING:
                self.apply(ReservationPut(replace(res, state=ReservationState.RELEASED)))
        if reason is MintReason.START:
            self._set_status(key, phase=Phase.RUNNING, reason=R_RUNNING, message="running",
                             bound_at=self.now, reservation=None, checkpoint_deadline=None)

    def _mint(self, key: str, placed: list[PlacedGroup], reason: MintReason) -> None:
        run = self.runs[key]
        for pg in placed:
            for role in (Role.ACTIVE, Role.SPARE):
                for pp in pg.pieces:
                    if pp.piece.role is not role:
                        continue
                    pay = pp.piece.tag
                    payer = pay.payer if isinstance(pay, Payment) else None
                    by_node: dict[str, list[Slot]] = {}
                    for s in pp.slots:
                        by_node.setdefault(s[0], []).append(s)
                    for slots in by_node.values():
                        self.apply(LeaseMinted(Lease(
                            name=self._next_lease_name(run), run=key, owner=run.spec.owner, group=pg.index,
                            role=role, slots=tuple(sorted(slots, key=lambda s: s[1])), paid_by=payer,
                            start=self.now, mint_reason=reason)))

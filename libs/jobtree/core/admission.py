"""Admitting from the queue (CALCULUS §5, docs/design/requeue.md): one pass over the queue in
admission order, retrying only runs whose outcome may have changed, and a run's attempt:
bind, reclaim, reserve, or park (asleep when only capacity can change it). A layer of
`engine.Cluster`.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from jobtree.core.cover import GroupNeed, eligible_at, hour_bounds
from jobtree.core.elasticity import Elasticity
from jobtree.core.model import (
    MintReason,
    Phase,
)
from jobtree.core.queue import Position


class Admission(Elasticity):
    def queue_order(self) -> list[str]:
        """The queued runs (Pending, Reserved) in the order admission considers them."""
        return self._queue_index.order()

    def _queue_pass(self) -> Iterator[str]:
        """The queued runs one admission pass considers, in order: those awake when it starts,
        and each sleeper whose condition stops holding before its turn (capacity freed by a cut
        earlier in the pass), at its turn — what a pass over the whole queue would retry. A run
        that joins the queue during the pass waits for the next one, as before."""
        index = self._queue_index
        if self._queue_epoch != self._spec_epoch:  # budgets or nodes changed: any run may now be payable
            index.wake_all()
            self._queue_epoch = self._spec_epoch
        free, domain_free, touched = self.topo.flavor_free, self.topo.max_domain_free, self.funding.touched
        index.wake_due(self.now, free, domain_free, touched)
        order = index.awake_positions()
        woken: list[Position] = []
        i = 0
        cur: Position | None = None
        while True:
            for pos in index.wake_due(self.now, free, domain_free, touched):
                if cur is None or pos > cur:
                    heapq.heappush(woken, pos)
            if i < len(order) and (not woken or order[i] < woken[0]):
                cur, i = order[i], i + 1
            elif woken:
                cur = heapq.heappop(woken)
            else:
                return
            assert cur is not None
            yield cur[1]

    def _admit_pending(self) -> bool:
        changed = False
        for key in self._queue_pass():
            if self._tried.get(key) == self._world():
                continue  # nothing that could change its outcome happened since it last failed
            st = self.status[key]
            if st.phase is Phase.PENDING:
                changed = self._try_admit(key) or changed
            elif st.reservation is not None:
                res = self.reservations[st.reservation]
                if not res.window_only and self.now < res.earliest_start:
                    changed = self._bind_plain(key, res) or changed
            if self.status[key].phase is not Phase.RUNNING:
                self._tried[key] = self._world()
        return changed

    def _try_admit(self, key: str) -> bool:
        if (self._in_hold_down(key) or not self._static_candidates(key)) and not self._could_fit(key):
            # In hold-down, or with no envelope that could ever pay for it (nothing funds it
            # now or when a window opens), only a plain fit on idle GPUs can admit it — no
            # reserving, no reclaiming — and `_could_fit` is necessary for one: park it
            # without computing its cover, and let it sleep until that may change.
            parked = self._park(key)
            self._doze(key)
            return parked
        spec = self.runs[key].spec
        needs = self._needs(key, 0, spec.min_width)
        cov = self._cover(key, needs)
        if cov.funded_gpus == 0 and not self._in_hold_down(key):  # no thrash: no reserving in hold-down
            opens = self._window_opening(key, needs)
            if opens is not None:
                return self._reserve(key, needs, opens, window_only=True)
        # Nothing funded: only a plain fit admits it, and `_could_fit` is necessary for one.
        placed = self._pack(key, cov.groups) if cov.funded_gpus > 0 or self._could_fit(key) else None
        if placed is not None:
            self._bind(key, placed, MintReason.START)
            return True
        if cov.funded_gpus > 0 and not self._in_hold_down(key):
            if self._reclaim_then_bind(key, cov):
                return True
            return self._reserve(key, needs, None, free_tried=True)
        parked = self._park(key)
        if cov.funded_gpus == 0 and not self._in_hold_down(key) and not self._could_fit(key):
            self._doze_unfunded(key)
        return parked

    def _window_opening(self, key: str, needs: list[GroupNeed]) -> int | None:
        """The earliest future window start of an envelope that may reserve for the run and would
        fund it then, when nothing funds it now and no envelope admits it early."""
        if any(c.envelope.pre_activation.allow_admission and not c.envelope.window_open(self.now)
               for c in self._static_candidates(key) if eligible_at(c.envelope, self.now)):
            return None
        starts = sorted({e.start for e in self.rules.envelopes.values()
                         if e.start is not None and e.start > self.now and e.pre_activation.allow_reservations})
        for t in starts:
            if self._cover(key, needs, t, reserve=True).funded_gpus > 0:
                return t
        return None

    def _doze_unfunded(self, key: str) -> None:
        """Set asleep a run parked because nothing funds it now or when a window opens, and it
        does not fit the idle GPUs. Trying it again parks it again until one of these moves:
        its flavor's free GPUs (`_could_fit`), the funding of an envelope that could pay for it
        (its component is `touched`: a claim added or removed, a re-ranking, its window opening
        or closing), budgets or nodes, or its own status. An envelope with a GPU-hour bound
        gives room that changes with the clock alone: such a run stays awake
        (docs/design/requeue.md)."""
        cands = self._static_candidates(key)
        if any(b in self.rules.hour_caps for c in cands for b in hour_bounds(self.rules, c)):
            return
        self._doze(key, watch=tuple(sorted({self.funding.component_of(c.ref) for c in cands})))

    def _doze(self, key: str, watch: tuple[str, ...] = ()) -> None:
        """Set a run parked by the shortcut asleep in the queue: trying it again parks it again,
        changing nothing, until its flavor has what `_could_fit` needs free, its hold-down
        ends, or budgets or nodes change (docs/design/requeue.md)."""
        spec = self.runs[key].spec
        g = spec.locality.group_gpus
        need = spec.min_width + self._spares_for(spec.min_width, key)
        group_need = 0 if g is None else min(g, spec.min_width) + spec.spares_per_group
        hold = self.status[key].hold_down_until
        until = hold if hold is not None and self.now < hold else None
        self._queue_index.sleep(key, spec.gpu_type, need, group_need, until, watch)

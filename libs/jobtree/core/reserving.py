"""Reservations (CALCULUS §5.4, §7): reserving an intended slice with an earliest start,
forecasting it from reported ETAs, and activating reservations that fall due (binding, or
cutting in the calculus's order). A layer of `engine.Cluster`.
"""

from __future__ import annotations

from dataclasses import replace

from jobtree.core import cuts as cutorder
from jobtree.core.cover import Cover, GroupNeed
from jobtree.core.cutting import Cutting
from jobtree.core.facts import (
    ReservationPut,
)
from jobtree.core.model import (
    MintReason,
    Phase,
    Reservation,
    ReservationState,
    Role,
)
from jobtree.core.pack import GroupRequest, Piece, pack, view_for
from jobtree.core.state import (
    R_RESERVED,
    R_UNSCHEDULABLE,
    R_WINDOW,
)


class Reserving(Cutting):
    def _bind_plain(self, key: str, res: Reservation) -> bool:
        if not self._could_fit(key):
            return False
        spec = self.runs[key].spec
        cov = self._cover(key, self._needs(key, 0, spec.min_width))
        placed = self._pack(key, cov.groups)
        if placed is None:
            return False
        self._bind(key, placed, MintReason.START)
        return True

    def _reserve(self, key: str, needs: list[GroupNeed], opens: int | None, window_only: bool = False,
                 free_tried: bool = False) -> bool:
        """`free_tried`: the caller has just found that the cover of `needs` now does not fit the
        free slots (and changed nothing since)."""
        st = self.status[key]
        if st.reservation is not None and self.reservations[st.reservation].state is ReservationState.PENDING:
            return False
        cov = self._cover(key, needs, opens, reserve=opens is not None)
        placed = self._intended_slice(key, cov, free_tried=free_tried and opens is None)
        if placed is None:
            return self._park(key)
        slice_, deficit = self._slice_of(key, placed)
        if window_only and opens is not None:
            earliest = opens
        else:
            earliest = self.now + self.config.reservation_lead
            eta = self._eta_forecast(key, deficit)
            if eta is not None:
                earliest = min(earliest, eta)
        run = self.runs[key]
        prefix = f"{run.namespace}.{run.name}"
        name = f"{prefix}.r{self._res_seq.get(prefix, 0):03d}"
        res = Reservation(name=name, run=key, intended_slice=tuple(slice_), paying_envelope=cov.first_funded_payer,
                          earliest_start=earliest, deficit_gpus=sum(deficit.values()), window_only=window_only)
        self.apply(ReservationPut(res))
        self._set_status(key, phase=Phase.RESERVED, reason=R_WINDOW if window_only else R_RESERVED,
                         message=("reserved for an envelope window that opens later" if window_only
                                  else "reserved: will cut in the calculus's order if still short at its earliest start"),
                         reservation=name)
        return True

    def _eta_forecast(self, key: str, deficit: dict[str, int]) -> int | None:
        """When reported ETAs of running work free the deficit in every domain of the slice."""
        if not deficit:
            return self.now
        etas = ((self.status[k].eta, k) for k in self._eta_running if k != key)
        freeing: list[tuple[int, str]] = sorted((eta, k) for eta, k in etas if eta is not None and eta >= self.now)
        short = dict(deficit)
        for eta, k in freeing:
            for lease in self.open_by_run.get(k, {}).values():
                d = self.topo.domain_of(lease.node)
                if d in short:
                    short[d] -= lease.gpus
            if all(v <= 0 for v in short.values()):
                return eta
        return None

    def _activate_reservations(self) -> bool:
        changed = False
        due = sorted((self.reservations[n] for n in self._pending_res
                      if self.reservations[n].earliest_start <= self.now),
                     key=lambda r: (r.earliest_start, r.name))
        for res in due:
            if self._act_tried.get(res.name) == self._world():
                continue
            if self._activate(res):
                changed = True
            else:
                self._act_tried[res.name] = self._world()
        return changed

    def _activate(self, res: Reservation) -> bool:
        key = res.run
        st = self.status.get(key)
        if key not in self.runs or st is None or st.phase is not Phase.RESERVED or st.reservation != res.name:
            self.apply(ReservationPut(replace(res, state=ReservationState.FAILED)))
            return True
        spec = self.runs[key].spec
        needs = self._needs(key, 0, spec.min_width)
        cov = self._cover(key, needs)
        placed = self._pack(key, cov.groups)
        if placed is not None:  # no deficit, or a budget shortfall only: bind anyway
            self._bind(key, placed, MintReason.START)
            return True
        if cov.funded_gpus == 0:
            return self._fail_reservation_and_park(
                key, res, "its reservation failed: GPUs are short and the demand is no longer fundable")
        if not self._fits_empty(key, cov):
            return self._fail_reservation_and_park(
                key, res, "its reservation failed: the run can never fit the Ready nodes of its flavor")
        return self._cut_and_bind(key, cov, res.name, cutorder.LOTTERY, res)

    def _fits_empty(self, key: str, cov: Cover) -> bool:
        """Whether the request fits the Ready nodes of its flavor if every slot were free
        (remembered per request until budgets or nodes change: it reads no occupancy)."""
        # Tags (who pays) and roles ride along with the slots and place nothing, and a piece
        # continues where the one before it stopped: the key leaves tags and roles out and
        # merges neighbouring pieces of one selector (the same slots, found as one piece).
        request = self._pack_request(key, tuple(GroupRequest(g.index, _merged(g.pieces)) for g in cov.groups))
        self._check_spec_caches()
        got = self._empty_fit_cache.get(request)
        if got is None:
            spec = self.runs[key].spec
            everything = {n: set(range(self.topo.nodes[n].gpus)) for n in self.topo.nodes}
            view = view_for(self.topo, spec.gpu_type, spec.locality.selector, everything)
            got = self._empty_fit_cache[request] = pack(view, request) is not None
        return got

    def _fail_reservation_and_park(self, key: str, res: Reservation, message: str) -> bool:
        self.apply(ReservationPut(replace(res, state=ReservationState.FAILED)))
        self._set_status(key, phase=Phase.PENDING, reason=R_UNSCHEDULABLE, reservation=None, message=message)
        return True


def _merged(pieces: tuple[Piece, ...]) -> tuple[Piece, ...]:
    """Pieces as packing sees them: neighbours with one selector as one piece, no role, no tag."""
    out: list[Piece] = []
    for p in pieces:
        if out and out[-1].selector == p.selector:
            out[-1] = Piece(Role.ACTIVE, out[-1].count + p.count, p.selector)
        else:
            out.append(Piece(Role.ACTIVE, p.count, p.selector))
    return tuple(out)

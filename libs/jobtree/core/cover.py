"""Cover: who pays for each GPU of a request (CALCULUS §3).

Contract: visits the envelopes a claim is eligible for in proximity order (owner, ancestors
nearest first, siblings, cousins, then — only with `funding.allowBorrow` — sponsors in the run's
`sponsors` order); within a tier, envelopes whose selector is a subset of the run's locality
selector first, then budget name, then envelope name. From each it takes what is still
fundable at the rank the new claim would have (or, for growth, only headroom no open lease
uses), group by group, active GPUs before spares; the GPU-hour look-ahead `min(P, rest of W)`
applies. GPUs nothing can fund are given the first eligible envelope as payer (unfunded), or
no payer. Cover classifies; it does not gate. Not: placement (see `pack`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from jobtree.core.family import SPONSOR
from jobtree.core.funding import FundingView
from jobtree.core.funding_rules import Bound, FundingRules, RunTerms, env_bound, lend_bound
from jobtree.core.meter import Meter
from jobtree.core.model import Envelope, EnvelopeRef, Labels, Role, Run, selector_subset
from jobtree.core.pack import GroupRequest, Piece
from jobtree.core.topology import Topology


@dataclass(frozen=True, slots=True)
class GroupNeed:
    index: int
    active: int
    spares: int = 0


@dataclass(frozen=True, slots=True)
class Payment:
    """Who pays for a piece of a group: `payer` (or None) and whether it is fundable now."""

    payer: EnvelopeRef | None
    funded: bool


@dataclass(frozen=True, slots=True)
class Cover:
    groups: tuple[GroupRequest, ...]
    funded_gpus: int
    total_gpus: int

    @property
    def first_funded_payer(self) -> EnvelopeRef | None:
        for g in self.groups:
            for p in g.pieces:
                pay = p.tag
                if isinstance(pay, Payment) and pay.funded:
                    return pay.payer
        return None


@dataclass(frozen=True, slots=True)
class Candidate:
    tier: int
    ref: EnvelopeRef
    envelope: Envelope


def eligible_at(e: Envelope, t: int, reserve: bool = False) -> bool:
    """Whether an envelope may pay at instant `t`: its window is open, or it opens later and
    `preActivation` allows binding (`allowAdmission`) or reserving (`allowReservations`) now."""
    if e.window_open(t):
        return True
    pre = e.pre_activation
    before_window = e.start is not None and t < e.start
    return before_window and (pre.allow_reservations if reserve else pre.allow_admission)


def candidates(rules: FundingRules, topo: Topology, run: Run, terms: RunTerms,
               t: int | None = None, reserve: bool = False) -> list[Candidate]:
    """Envelopes that may pay for the run, in cover order; with `t`, only those eligible at `t`
    (see `eligible_at`). Everything but the window is independent of time, so callers may
    cache the list without `t` and filter it per instant."""
    spec = run.spec
    found: list[tuple[tuple[int, int, int, str, str], Candidate]] = []
    for ref, e in rules.envelopes.items():
        if e.flavor != spec.gpu_type:
            continue
        tier = rules.tier(spec.owner, ref, terms.allow_borrow)
        if tier is None:
            continue
        if t is not None and not eligible_at(e, t, reserve):
            continue
        sponsor_rank = 0
        if tier == SPONSOR and spec.funding.sponsors:
            owner = rules.owner_of[ref]
            if owner not in spec.funding.sponsors:
                continue
            sponsor_rank = spec.funding.sponsors.index(owner)
        merged: Labels = tuple(sorted(set(e.selector) | set(spec.locality.selector)))
        if not topo.selector_matches_any(spec.gpu_type, merged):
            continue
        local = 0 if selector_subset(e.selector, spec.locality.selector) else 1
        found.append(((tier, sponsor_rank, local, ref[0], ref[1]), Candidate(tier, ref, e)))
    found.sort(key=lambda kc: kc[0])
    return [c for _, c in found]


def hour_bounds(rules: FundingRules, c: Candidate) -> list[Bound]:
    """The bounds whose GPU-hour caps limit what candidate `c` can fund."""
    out = [env_bound(c.ref)]
    if c.tier == SPONSOR:
        out.append(lend_bound(c.ref))
    out.extend(key for key, _ in rules.caps_of[c.ref])
    return out


class _Room:
    """What each candidate envelope can still fund for this request.

    Nothing it reads changes while one cover is chosen, so per candidate it works out once
    what does not depend on the group: whether the window is open, the bounds, GPU-hours left,
    and the funded usage ranked before the run (the group index in the rank only orders the
    run's own claims: without any, the usage before it is the same for every group)."""

    def __init__(self, rules: FundingRules, view: FundingView, meter: Meter, run: Run,
                 terms: RunTerms, t: int, period: Callable[[EnvelopeRef], int], headroom_only: bool) -> None:
        self.rules, self.view, self.meter, self.run = rules, view, meter, run
        self.terms, self.t, self.period, self.headroom_only = terms, t, period, headroom_only
        self.taken: dict[Bound, int] = {}
        self._own_claims = view.has_claims(run.key)
        self._static: dict[tuple[EnvelopeRef, int], tuple[bool, list[tuple[Bound, int]], list[Bound]]] = {}
        self._used: dict[tuple[Bound, int], int] = {}
        self._used_now: dict[Bound, int] = {}

    def _terms_of(self, c: Candidate) -> tuple[bool, list[tuple[Bound, int]], list[Bound]]:
        key = (c.ref, c.tier)
        got = self._static.get(key)
        if got is None:
            got = self._static[key] = (c.envelope.window_open(self.t),
                                       self.rules.bounds(c.ref, c.tier, self.run.key, self.terms),
                                       self._hour_bounds(c))
        return got

    def _used_before(self, b: Bound, tier: int, group: int) -> int:
        if self.headroom_only:
            return self._now(b)
        rank = (tier, self.terms.admitted, self.run.key, group, "")
        if self._own_claims:
            return self.view.used_before(b, rank)
        got = self._used.get((b, tier))
        if got is None:
            got = self._used[(b, tier)] = self.view.used_before(b, rank)
        return got

    def _now(self, b: Bound) -> int:
        got = self._used_now.get(b)
        if got is None:
            got = self._used_now[b] = self.view.used_now(b)
        return got

    def room(self, c: Candidate, group: int) -> int:
        is_open, bounds, hour_bounds = self._terms_of(c)
        if not is_open:
            return 0
        best = 1 << 60
        spent, taken = self.view.spent, self.taken
        for b, cap in bounds:
            if b in spent:
                return 0
            best = min(best, cap - self._used_before(b, c.tier, group) - taken.get(b, 0))
        for b in hour_bounds:
            left = self.meter.remaining(b, self.rules.hour_caps)
            if left is None:
                continue
            horizon = self._lookahead(c)
            width_now = self._now(b) + taken.get(b, 0)
            best = min(best, left // horizon - width_now if horizon > 0 else best)
        return max(0, best)

    def take(self, c: Candidate, n: int) -> None:
        for b, _ in self._terms_of(c)[1]:
            self.taken[b] = self.taken.get(b, 0) + n

    def _hour_bounds(self, c: Candidate) -> list[Bound]:
        return hour_bounds(self.rules, c)

    def _lookahead(self, c: Candidate) -> int:
        """min(P, rest of W), P being the payer budget's period."""
        p = self.period(c.ref)
        e = c.envelope
        return min(p, e.end - self.t) if e.end is not None else p


def cover(rules: FundingRules, view: FundingView, meter: Meter, run: Run, terms: RunTerms,
          needs: list[GroupNeed], t: int, period: Callable[[EnvelopeRef], int], cands: list[Candidate],
          headroom_only: bool = False) -> Cover:
    """Choose a payer for every GPU of `needs` (groups in index order) among `cands` (see
    `candidates`)."""
    room = _Room(rules, view, meter, run, terms, t, period, headroom_only)
    fallback = cands[0] if cands else None
    groups: list[GroupRequest] = []
    funded = total = 0
    # A candidate's room never grows within one cover (groups come in index order, the usage
    # ranked before a later group is no less, and what the cover takes only adds up): once it
    # has none, it is not asked again.
    live = list(cands)
    for need in needs:
        pieces: list[Piece] = []
        for role, count in ((Role.ACTIVE, need.active), (Role.SPARE, need.spares)):
            left = count
            kept: list[Candidate] = []
            for i, c in enumerate(live):
                if left == 0:
                    kept.extend(live[i:])
                    break
                n = min(left, room.room(c, need.index))
                if n > 0:
                    room.take(c, n)
                    pieces.append(Piece(role, n, c.envelope.selector, Payment(c.ref, True)))
                    left -= n
                    kept.append(c)
            live = kept
            funded += count - left
            total += count
            if left:
                payer = fallback.ref if fallback else None
                sel = fallback.envelope.selector if fallback else ()
                pieces.append(Piece(role, left, sel, Payment(payer, False)))
        groups.append(GroupRequest(need.index, tuple(pieces)))
    return Cover(tuple(groups), funded, total)

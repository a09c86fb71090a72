"""Funding classes: derived, never stored (CALCULUS §2).

Contract: `FundingView`, given `funding_rules.FundingRules` (tiers and bounds), keeps the open
claims and derives each one's class by ranking the claims with a payer by (tier, admission time, run key, group, lease name) and filling greedily under every
bound (window, concurrency, GPU-hours spent, lending caps, `maxBorrowGPUs`, aggregate caps).
The result is a pure function of (rules, claims, clock, spent bounds): the view only caches it
per component of envelopes linked by aggregate caps, recomputing a component when it changes,
and appending in O(bounds) when a new claim ranks after every claim of its component.
Not: a store of classes (nothing here is persisted), not the meter (see `meter`).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import accumulate

from jobtree.core.funding_rules import (
    Bound,
    Claim,
    FundingRules,
    Rank,
    RunTerms,
    class_for_tier,
)
from jobtree.core.model import (
    EnvelopeRef,
    FundingClass,
    labels_match,
)


@dataclass(eq=False)
class _Component:
    claims: dict[str, Claim] = field(default_factory=dict)
    _dirty: bool = True
    registry: set[_Component] | None = None
    """The view's set of dirty components, kept in step with `dirty`."""

    @property
    def dirty(self) -> bool:
        return self._dirty

    @dirty.setter
    def dirty(self, value: bool) -> None:
        self._dirty = value
        if self.registry is not None:
            if value:
                self.registry.add(self)
            else:
                self.registry.discard(self)
        if value:
            self.since = None  # a change of unknown reach: re-rank everything
            if self.touched is not None:
                self.touched.add(self.cid)
    since: Rank | None = None
    """While dirty: re-rank only the claims ranked at or after this (None: all of them). Set by
    `FundingView._dirty_from` for a claim added or removed mid-ranking: claims ranked before it
    were decided without it, and their classes and usage stand."""
    cid: str = ""
    touched: set[str] | None = None
    """The view's set of components whose classes or usage may have changed (`touched`)."""
    max_rank: Rank | None = None
    bounds: set[Bound] = field(default_factory=set)
    starved: int = 0
    """Ranked claims decided unfunded: while none, removing a funded claim changes no other class."""


class ClassesWith(Mapping[str, FundingClass]):
    """Classes read through a few changes (`FundingView.changes_with`) over the view's own
    mapping, copying neither: valid while the view does not change."""

    __slots__ = ("base", "over")

    def __init__(self, over: dict[str, FundingClass], base: Mapping[str, FundingClass]) -> None:
        self.over, self.base = over, base

    def get(self, name: str, default: FundingClass | None = None) -> FundingClass | None:  # type: ignore[override]
        got = self.over.get(name)
        return got if got is not None else self.base.get(name, default)

    def __getitem__(self, name: str) -> FundingClass:
        got = self.over.get(name)
        return got if got is not None else self.base[name]

    def __iter__(self) -> Iterator[str]:
        return iter({**self.base, **self.over})

    def __len__(self) -> int:
        return len(self.base.keys() | self.over.keys())


def _changed(counts: dict[str, int], base: dict[str, int]) -> dict[str, int]:
    """The counts that differ from `base` (a run's count may have moved and come back)."""
    return {r: n for r, n in counts.items() if n != base.get(r, 0)}


class FundingView:
    """The open claims and their derived classes, recomputed lazily per component."""

    def __init__(self, rules: FundingRules, terms: Callable[[str], RunTerms]) -> None:
        self._terms = terms
        self.rules = rules
        self.now = 0
        self.spent: frozenset[Bound] = frozenset()
        self._claims: dict[str, Claim] = {}
        self._cls: dict[str, FundingClass] = {}
        self._tier_of: dict[str, int] = {}
        self.used: dict[Bound, int] = {}
        self._funded: dict[Bound, list[tuple[Rank, int]]] = {}
        self._prefix: dict[Bound, list[int]] = {}
        """Bound -> running sums of `_funded[b]`'s GPUs (dropped whenever that list changes)."""
        self._components: dict[str, _Component] = {}
        self._comp_of_env: dict[EnvelopeRef, str] = {}
        self._unpaid = _Component(_dirty=False)
        self._dirty: set[_Component] = set()
        self._static: dict[str, tuple[Rank | None, list[tuple[Bound, int]]]] = {}
        self._by_run: dict[str, set[str]] = {}
        self.class_gpus: dict[FundingClass, int] = dict.fromkeys(FundingClass, 0)
        """Open GPUs per class, kept in step with the classes (read after `refresh`)."""
        self.unfunded_claims: dict[str, int] = {}
        """Run -> how many of its claims are unfunded, kept in step with the classes (read after
        `refresh`): the runs a reclaim may touch, without classifying every open claim."""
        self.disturbances = 0
        """Counts adds and removes that may have changed other claims' classes (not appends)."""
        self.reclassified: set[str] | None = None
        """Runs a claim of which changed class (or came or went) since the set was last emptied —
        by whoever keeps something derived from the classes (the engine's reclaim index, which
        sets it); None while nobody watches (a copy starts so)."""
        self.touched: set[str] = set()
        """Ids of the components (`component_of`) whose classes or usage may have changed since
        the set was last emptied — by whoever watches them (the admission queue's sleepers)."""
        self._build_components()

    # --- structure ------------------------------------------------------------------------

    def _build_components(self) -> None:
        parent: dict[EnvelopeRef, EnvelopeRef] = {r: r for r in self.rules.envelopes}

        def find(r: EnvelopeRef) -> EnvelopeRef:
            while parent[r] != r:
                parent[r] = parent[parent[r]]
                r = parent[r]
            return r

        for members in self.rules.component_links():
            for m in members[1:]:
                parent[find(m)] = find(members[0])
        self._comp_of_env = {r: "/".join(find(r)) for r in self.rules.envelopes}
        self._dirty = set()
        self._components = {cid: _Component(registry=self._dirty, cid=cid, touched=self.touched)
                            for cid in {*self._comp_of_env.values(), "\x00orphans"}}
        self._dirty.update(self._components.values())
        self._unpaid = _Component(_dirty=False)
        for c in self._claims.values():
            self._component_for(c).claims[c.name] = c

    def __getstate__(self) -> dict[str, object]:
        """A copy watches no classes (`reclassified`): whoever watches starts afresh."""
        return {**self.__dict__, "reclassified": None}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("reclassified", None)

    def component_of(self, ref: EnvelopeRef) -> str:
        """The id of the component an envelope's claims are ranked in."""
        return self._comp_of_env.get(ref, "\x00orphans")

    def _component_for(self, c: Claim) -> _Component:
        if c.payer is None:
            return self._unpaid
        cid = self._comp_of_env.get(c.payer)
        return self._components[cid if cid is not None else "\x00orphans"]

    def set_rules(self, rules: FundingRules) -> None:
        self.rules = rules
        self._static.clear()
        self._build_components()
        self.used.clear()
        self._funded.clear()
        self._prefix.clear()

    def set_clock(self, now: int, spent: frozenset[Bound]) -> None:
        """Move the view's clock; components whose window or spent state changed recompute."""
        old_now, old_spent = self.now, self.spent
        self.now, self.spent = now, spent
        for ref, cid in self._comp_of_env.items():
            e = self.rules.envelopes[ref]
            if e.window_open(old_now) != e.window_open(now):
                self._components[cid].dirty = True
        for b in old_spent.symmetric_difference(spent):
            for cid in self._comps_of_bound(b):
                self._components[cid].dirty = True

    def _comps_of_bound(self, b: Bound) -> set[str]:
        if b[0] in ("env", "lend"):
            cid = self._comp_of_env.get((b[1], b[2]))
            return {cid} if cid else set()
        if b[0] == "cap":
            return {cid for ref, cid in self._comp_of_env.items()
                    if any(key == b for key, _ in self.rules.caps_of[ref])}
        return set(self._components)

    def invalidate_run(self, run: str) -> None:
        """A run's terms changed: re-rank its claims (and everything ranked with them)."""
        for name in sorted(self._by_run.get(run, ())):
            c = self._claims[name]
            self._static.pop(name, None)
            comp = self._component_for(c)
            if comp is not self._unpaid:
                comp.dirty = True
                self.disturbances += 1
            if self._terms(run).max_borrow is not None:
                self.invalidate()
                return

    def invalidate(self) -> None:
        self._static.clear()
        for comp in self._components.values():
            comp.dirty = True

    # --- claims ---------------------------------------------------------------------------

    def add(self, c: Claim) -> None:
        self._claims[c.name] = c
        self._by_run.setdefault(c.run, set()).add(c.name)
        comp = self._component_for(c)
        self.touched.add(comp.cid)
        comp.claims[c.name] = c
        if c.payer is None:
            self._set_cls(c, FundingClass.UNFUNDED)
            return
        if comp.dirty:
            self.disturbances += 1
            if comp.since is not None:  # re-ranked from a point: make sure that covers this claim
                rank = self._rank(c)
                if rank is None:
                    self._set_cls(c, FundingClass.UNFUNDED)
                else:
                    self._dirty_from(comp, rank, c.run)
            return
        rank = self._rank(c)
        if rank is None:
            self._set_cls(c, FundingClass.UNFUNDED)
        elif (comp.max_rank is None or rank > comp.max_rank) and self._terms(c.run).max_borrow is None:
            self._decide(c, rank, comp)
            comp.max_rank = rank
        elif self._terms(c.run).max_borrow is None and (self._insert_funded(c, rank, comp)
                                                         or self._insert_unfunded(c, rank, comp)):
            pass
        else:
            self._dirty_from(comp, rank, c.run)
            self.disturbances += 1

    def remove(self, name: str) -> None:
        c = self._claims.pop(name)
        static = self._static.pop(name, None)
        names = self._by_run[c.run]
        names.discard(name)
        if not names:
            del self._by_run[c.run]
        comp = self._component_for(c)
        self.touched.add(comp.cid)
        del comp.claims[name]
        cls = self._cls.pop(name, None)
        if cls is not None:
            if self.reclassified is not None:
                self.reclassified.add(c.run)
            self.class_gpus[cls] -= c.gpus
            if cls is FundingClass.UNFUNDED:
                self._count_unfunded(c.run, -1)
        ranked = name in self._tier_of
        if cls is FundingClass.UNFUNDED and ranked and not comp.dirty:
            comp.starved -= 1
        elif (cls not in (None, FundingClass.UNFUNDED) and not comp.dirty and static is not None
              and static[0] is not None and (comp.starved == 0 or static[0] == comp.max_rank)
              and self._terms(c.run).max_borrow is None):
            # Everyone else in the component is funded and stays so with less usage, or the claim
            # ranks last (`max_rank` bounds every rank in the component, so equal means last) and
            # no class was decided after it: subtract. (`max_rank` stays an upper bound.)
            for b, _ in static[1]:
                self.used[b] -= c.gpus
                lst = self._funded[b]
                if lst[-1] == (static[0], c.gpus):
                    lst.pop()
                else:
                    lst.remove((static[0], c.gpus))
                self._prefix.pop(b, None)
            self._tier_of.pop(name, None)
            return
        if c.payer is not None and (comp.dirty or cls not in (None, FundingClass.UNFUNDED)):
            if static is not None and static[0] is not None:
                self._dirty_from(comp, static[0], c.run)
            else:
                comp.dirty = True
            self.disturbances += 1
            if self._terms(c.run).max_borrow is not None:
                self.invalidate()  # the run's maxBorrowGPUs spans its other lenders' components
        self._tier_of.pop(name, None)

    def _insert_funded(self, c: Claim, rank: Rank, comp: _Component) -> bool:
        """Fund a claim ranked mid-component without re-ranking, when each of its bounds has
        room for it on top of everything funded there now (the ranks after it included): it is
        funded whatever is ranked before it, every claim after it that was funded still fits
        (its usage before it grew by at most what the bound's total had spare), and every
        unfunded one stays short. False (nothing changed) when some bound has no such room."""
        bounds = self._static[c.name][1]
        used = self.used
        if any(b in self.spent or used.get(b, 0) + c.gpus > cap for b, cap in bounds):
            return False
        self._tier_of[c.name] = rank[0]
        self._fund(c, rank, bounds, comp)
        return True

    def _insert_unfunded(self, c: Claim, rank: Rank, comp: _Component) -> bool:
        """Class a claim ranked mid-component unfunded without re-ranking, when some bound of
        it is spent or has no room for it after the claims ranked before it: the fill reaches
        it with that usage whatever comes after, it takes nothing, and so every claim after it
        keeps its class. False (nothing changed) when every bound has room for it there."""
        bounds = self._static[c.name][1]
        if not any(b in self.spent or self._used_before(b, rank) + c.gpus > cap for b, cap in bounds):
            return False
        self._tier_of[c.name] = rank[0]
        self._set_cls(c, FundingClass.UNFUNDED)
        comp.starved += 1
        return True

    def _fund(self, c: Claim, rank: Rank, bounds: list[tuple[Bound, int]], comp: _Component) -> None:
        """Count a funded claim on its bounds (in rank order: mostly at the end) and class it."""
        used = self.used
        for b, _ in bounds:
            used[b] = used.get(b, 0) + c.gpus
            insort(self._funded.setdefault(b, []), (rank, c.gpus))
            self._prefix.pop(b, None)
            comp.bounds.add(b)
        self._set_cls(c, class_for_tier(rank[0]))

    def _dirty_from(self, comp: _Component, rank: Rank, run: str) -> None:
        """Mark `comp` to be re-ranked from `rank` on (or wholly, for a maxBorrowGPUs run)."""
        if self._terms(run).max_borrow is not None:
            comp.dirty = True
        elif not comp.dirty:
            comp.dirty = True
            comp.since = rank
        elif comp.since is not None and rank < comp.since:
            comp.since = rank

    def _set_cls(self, c: Claim, cls: FundingClass) -> None:
        old = self._cls.get(c.name)
        if old is not None:
            self.class_gpus[old] -= c.gpus
        if old is not cls and self.reclassified is not None:
            self.reclassified.add(c.run)
        self._cls[c.name] = cls
        self.class_gpus[cls] += c.gpus
        if (old is FundingClass.UNFUNDED) != (cls is FundingClass.UNFUNDED):
            self._count_unfunded(c.run, 1 if cls is FundingClass.UNFUNDED else -1)

    def _count_unfunded(self, run: str, delta: int) -> None:
        left = self.unfunded_claims.get(run, 0) + delta
        if left:
            self.unfunded_claims[run] = left
        else:
            del self.unfunded_claims[run]

    def claims(self) -> Iterable[Claim]:
        return self._claims.values()

    def has_claims(self, run: str) -> bool:
        return run in self._by_run

    # --- answers ----------------------------------------------------------------------------

    def class_of(self, name: str) -> FundingClass:
        self.refresh()
        return self._cls[name]

    def unfunded_by_owner(self) -> dict[str, int]:
        """Open unfunded GPUs per run owner, reading only the runs with an unfunded claim."""
        self.refresh()
        out: dict[str, int] = {}
        for run in self.unfunded_claims:
            for name in self._by_run[run]:
                if self._cls[name] is FundingClass.UNFUNDED:
                    c = self._claims[name]
                    out[c.owner] = out.get(c.owner, 0) + c.gpus
        return out

    def classes_of(self, names: Iterable[str]) -> dict[str, FundingClass]:
        """The classes of many claims, with one refresh."""
        self.refresh()
        cls = self._cls
        return {n: cls[n] for n in names}

    def classes_with(self, extra: list[Claim]) -> tuple[dict[str, FundingClass], dict[str, int]]:
        """Every claim's class, and per run how many of its claims are unfunded, as if the
        `extra` claims were open too — leaving the view as it is (`changes_with`, applied to
        copies of the view's classes and counts)."""
        over, counts = self.changes_with(extra)
        return {**self._cls, **over}, self.unfunded_with(counts)

    def unfunded_with(self, counts: dict[str, int]) -> dict[str, int]:
        """A copy of `unfunded_claims` with `changes_with`'s counts applied (0: the run leaves)."""
        unfunded = dict(self.unfunded_claims)
        for run, n in counts.items():
            if n:
                unfunded[run] = n
            else:
                unfunded.pop(run, None)
        return unfunded

    def classes(self) -> Mapping[str, FundingClass]:
        """Every open claim's class (the view's own mapping: read it, do not keep it)."""
        self.refresh()
        return self._cls

    def changes_with(self, extra: list[Claim]) -> tuple[dict[str, FundingClass], dict[str, int]]:
        """What `classes_with` would change: the classes that differ from the view's (the extra
        claims' included), and the new unfunded count of each run whose count differs (0 when
        none is left) — leaving the view as it is (no re-ranking to undo, no disturbance). The
        components the extra claims fall in are ranked afresh on the side, as `refresh` would
        after adding them; with a maxBorrowGPUs run in play (one bound across components) the
        claims are added, read and removed instead."""
        self.refresh()
        over: dict[str, FundingClass] = {}
        counts: dict[str, int] = {}
        if not extra:
            return over, counts
        comps = {self._component_for(c) for c in extra} - {self._unpaid}
        if any(self._terms(c.run).max_borrow is not None
               for group in ([*comp.claims.values()] for comp in comps) for c in [*group, *extra]):
            before, before_unfunded = dict(self._cls), dict(self.unfunded_claims)
            for c in extra:
                self.add(c)
            try:
                self.refresh()
                over = {n: cls for n, cls in self._cls.items() if before.get(n) is not cls}
                counts = {r: self.unfunded_claims.get(r, 0) for r in {*self.unfunded_claims, *before_unfunded}
                          if self.unfunded_claims.get(r, 0) != before_unfunded.get(r, 0)}
                return over, counts
            finally:
                for c in extra:
                    self.remove(c.name)

        base, base_unfunded = self._cls, self.unfunded_claims

        def count(c: Claim, cls: FundingClass) -> None:
            old = over.get(c.name, base.get(c.name))
            if old is cls:
                return
            if base.get(c.name) is cls:
                del over[c.name]
            else:
                over[c.name] = cls
            delta = (cls is FundingClass.UNFUNDED) - (old is FundingClass.UNFUNDED)
            if delta:
                counts[c.run] = counts.get(c.run, base_unfunded.get(c.run, 0)) + delta

        def ranked_terms(c: Claim) -> tuple[Rank, list[tuple[Bound, int]]] | None:
            """Rank and bounds of a claim that can be funded now, else None."""
            if c.payer is None:
                return None
            rank, bounds = self._static[c.name] if c.name in self._static else self._static_terms(c)
            if rank is None or not self.rules.envelopes[c.payer].window_open(self.now):
                return None
            return rank, bounds

        ranked: list[tuple[Rank, Claim, list[tuple[Bound, int]]]] = []
        for c in extra:
            got = ranked_terms(c)
            if got is None:
                count(c, FundingClass.UNFUNDED)
            else:
                ranked.append((got[0], c, got[1]))
        if not ranked:
            return over, _changed(counts, base_unfunded)
        # The fill is greedy in rank order: claims ranked before the first extra one keep the
        # classes the view gave them; only the suffix from it is filled again, from what the
        # claims before it use (as `_recompute_from` does, here on the side).
        since = min(r[0] for r in ranked)
        for comp in comps:
            for c in comp.claims.values():
                got = ranked_terms(c)
                if got is not None and got[0] >= since:
                    ranked.append((got[0], c, got[1]))
        ranked.sort(key=lambda r: r[0])
        used: dict[Bound, int] = {}
        for rank, c, bounds in ranked:
            for b, _ in bounds:
                if b not in used:
                    used[b] = self.used_before(b, since)
            if all(b not in self.spent and used[b] + c.gpus <= cap for b, cap in bounds):
                for b, _ in bounds:
                    used[b] += c.gpus
                count(c, class_for_tier(rank[0]))
            else:
                count(c, FundingClass.UNFUNDED)
        return over, _changed(counts, base_unfunded)

    def tier_of(self, name: str) -> int | None:
        self.refresh()
        return self._tier_of.get(name)

    def used_now(self, bound: Bound) -> int:
        self.refresh()
        return self.used.get(bound, 0)

    def used_before(self, bound: Bound, rank: Rank) -> int:
        """Funded GPUs under `bound` of claims ranked before `rank`."""
        self.refresh()
        return self._used_before(bound, rank)

    def _used_before(self, bound: Bound, rank: Rank) -> int:
        """`used_before` as the view stands (current for the bounds of a clean component)."""
        lst = self._funded.get(bound)
        if not lst:
            return 0
        if lst[-1][0] < rank:
            return self.used.get(bound, 0)
        cut = bisect_left(lst, (rank, -1))
        if cut == 0:
            return 0
        prefix = self._prefix.get(bound)
        if prefix is None:
            prefix = self._prefix[bound] = list(accumulate(g for _, g in lst))
        return prefix[cut - 1]

    def refresh(self) -> None:
        if not self._dirty:
            return
        dirty = list(self._dirty)
        if any(self._terms(c.run).max_borrow is not None for comp in dirty for c in comp.claims.values()):
            # maxBorrowGPUs is one bound across components: rank everything together.
            self._recompute(list(self._components.values()))
        else:
            for comp in dirty:
                if comp.since is None:
                    self._recompute([comp])
                else:
                    self._recompute_from(comp, comp.since)

    # --- the ranking --------------------------------------------------------------------------

    def _rank(self, c: Claim) -> Rank | None:
        """The claim's rank, or None when it cannot be funded at all right now."""
        static = self._static.get(c.name)
        if static is None:
            static = self._static[c.name] = self._static_terms(c)
        if static[0] is None:
            return None
        assert c.payer is not None
        if not self.rules.envelopes[c.payer].window_open(self.now):
            return None
        return static[0]

    def _static_terms(self, c: Claim) -> tuple[Rank | None, list[tuple[Bound, int]]]:
        """What ranking needs of a claim apart from the clock: its rank (None when it may never
        be funded under these rules: no such envelope, wrong node, tier not allowed) and its
        bounds. Cached until the rules or any run's terms change (`invalidate`)."""
        assert c.payer is not None
        e = self.rules.envelopes.get(c.payer)
        if e is None:
            return None, []
        if c.node_labels is not None and not (
            dict(c.node_labels).get("gpu.flavor") == e.flavor and labels_match(e.selector, c.node_labels)
        ):
            return None, []
        terms = self._terms(c.run)
        tier = self.rules.tier(c.owner, c.payer, terms.allow_borrow)
        if tier is None:
            return None, []
        return (tier, terms.admitted, c.run, c.group, c.name), self.rules.bounds(c.payer, tier, c.run, terms)

    def _decide(self, c: Claim, rank: Rank, comp: _Component) -> None:
        assert c.payer is not None
        tier = rank[0]
        bounds = self._static[c.name][1]
        used = self.used
        self._tier_of[c.name] = tier
        if all(b not in self.spent and used.get(b, 0) + c.gpus <= cap for b, cap in bounds):
            self._fund(c, rank, bounds, comp)
        else:
            self._set_cls(c, FundingClass.UNFUNDED)
            comp.starved += 1

    def _recompute_from(self, comp: _Component, since: Rank) -> None:
        """Re-rank the claims of `comp` ranked at or after `since`, keeping what was decided
        before it: the fill is greedy in rank order, so a claim's class depends only on the
        claims ranked before it. The same result as `_recompute`, for the suffix's cost."""
        used = self.used
        for b in comp.bounds:
            lst = self._funded.get(b)
            if lst:
                del lst[bisect_left(lst, (since, -1)):]
                used[b] = sum(g for _, g in lst)
            self._prefix.pop(b, None)
        suffix: list[tuple[Rank, Claim]] = []
        starved = 0
        last: Rank | None = None
        unfunded = FundingClass.UNFUNDED
        for c in comp.claims.values():
            rank = self._rank(c)
            if rank is None:
                continue  # unfunded whatever else happens, and so classed when it came
            if rank >= since:
                suffix.append((rank, c))
            else:
                starved += self._cls[c.name] is unfunded
                if last is None or rank > last:
                    last = rank
        suffix.sort(key=lambda rc: rc[0])
        comp.starved = starved
        for rank, c in suffix:
            self._decide(c, rank, comp)
        comp.max_rank = suffix[-1][0] if suffix else last
        comp.dirty = False

    def _recompute(self, comps: list[_Component]) -> None:
        """Forget what these components funded, then refill their claims in one rank order."""
        for comp in comps:
            for b in comp.bounds:
                self.used.pop(b, None)
                self._funded.pop(b, None)
                self._prefix.pop(b, None)
            comp.bounds = set()
        ranked: list[tuple[Rank, Claim, _Component]] = []
        for comp in comps:
            comp.max_rank = None
            comp.starved = 0
            for c in comp.claims.values():
                rank = self._rank(c)
                if rank is None:
                    self._set_cls(c, FundingClass.UNFUNDED)
                    self._tier_of.pop(c.name, None)
                else:
                    ranked.append((rank, c, comp))
        ranked.sort(key=lambda rc: rc[0])
        for rank, c, comp in ranked:
            self._decide(c, rank, comp)
            comp.max_rank = rank
        for comp in comps:
            comp.dirty = False

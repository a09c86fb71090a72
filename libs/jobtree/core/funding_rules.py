"""Funding rules: which tier a claim has on an envelope, and which bounds apply (CALCULUS §2).

Contract: `FundingRules` answers, for budgets and a family DAG, which tier a claim has on an
envelope (applying `sharing`, lending ACLs and `allowBorrow`) and which bounds apply to it
(window, concurrency, lending caps, aggregate caps); `Claim` and `RunTerms` are what a claim
and its run bring; `class_for_tier` names the class a funded tier gives. Pure data.
Not: the ranking and the greedy fill that derive classes (see `funding.FundingView`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from jobtree.core.family import OWNER, SPONSOR, Family
from jobtree.core.model import (
    Budget,
    Envelope,
    EnvelopeRef,
    FundingClass,
    Labels,
    Role,
    Sharing,
)

INF = 1 << 60

Bound = tuple[str, ...]
"""('env', budget, envelope) | ('lend', budget, envelope) | ('cap', budget, cap) | ('borrow', run key)."""

Rank = tuple[int, int, str, int, str]
"""(tier, admission time, run key, group, lease name)."""


def env_bound(ref: EnvelopeRef) -> Bound:
    return ("env", ref[0], ref[1])


def lend_bound(ref: EnvelopeRef) -> Bound:
    return ("lend", ref[0], ref[1])


@dataclass(frozen=True, slots=True)
class Claim:
    """An open lease (or a hypothetical one) as the ranking sees it."""

    name: str
    run: str
    owner: str
    group: int
    role: Role
    gpus: int
    payer: EnvelopeRef | None
    node_labels: Labels | None = None
    """Labels of the lease's node (None for a hypothetical claim: no selector check)."""


@dataclass(frozen=True, slots=True)
class RunTerms:
    """What ranking needs of a run."""

    admitted: int
    allow_borrow: bool = False
    max_borrow: int | None = None
    sponsors: tuple[str, ...] = ()


class FundingRules:
    """Budgets and the family DAG, indexed: tiers and bounds of claims."""

    def __init__(self, budgets: Iterable[Budget], allowances: dict[str, int] | None = None,
                 hour_allowances: dict[str, float] | None = None) -> None:
        """`allowances` / `hour_allowances`: this cluster's share (CALCULUS §9) of an aggregate
        cap (`budget/cap`) replaces its maxConcurrency / maxGPUHours."""
        self.budgets: dict[str, Budget] = {b.name: b for b in budgets}
        self.family = Family(self.budgets.values())
        self.envelopes: dict[EnvelopeRef, Envelope] = {}
        self.owner_of: dict[EnvelopeRef, str] = {}
        self.caps_of: dict[EnvelopeRef, list[tuple[Bound, int]]] = {}
        self.hour_caps: dict[Bound, float] = {}
        allowances = allowances or {}
        hour_allowances = hour_allowances or {}
        for b in self.budgets.values():
            for e in b.envelopes:
                ref = (b.name, e.name)
                self.envelopes[ref] = e
                self.owner_of[ref] = b.owner
                self.caps_of[ref] = []
                if e.max_gpu_hours is not None:
                    self.hour_caps[env_bound(ref)] = e.max_gpu_hours
                if e.lending.max_gpu_hours is not None:
                    self.hour_caps[lend_bound(ref)] = e.lending.max_gpu_hours
            for cap in b.aggregate_caps:
                key: Bound = ("cap", b.name, cap.name)
                limit = allowances.get(f"{b.name}/{cap.name}", cap.max_concurrency)
                for en in cap.envelopes:
                    self.caps_of[(b.name, en)].append((key, INF if limit is None else limit))
                hours = hour_allowances.get(f"{b.name}/{cap.name}", cap.max_gpu_hours)
                if hours is not None:
                    self.hour_caps[key] = hours
        self._tier_cache: dict[tuple[str, EnvelopeRef, bool], int | None] = {}

    def tier(self, owner: str, ref: EnvelopeRef, allow_borrow: bool) -> int | None:
        """The tier of a claim by `owner` on envelope `ref`, or None when it may not draw on it."""
        key = (owner, ref, allow_borrow)
        if key in self._tier_cache:
            return self._tier_cache[key]
        e = self.envelopes.get(ref)
        got: int | None = None
        if e is not None:
            ft = self.family.family_tier(owner, self.owner_of[ref])
            if ft is not None:
                got = ft if ft == OWNER or e.sharing is Sharing.FAMILY else None
            elif allow_borrow and e.lending.lends_to(owner):
                got = SPONSOR
        self._tier_cache[key] = got
        return got

    def bounds(self, ref: EnvelopeRef, tier: int, run: str, terms: RunTerms) -> list[tuple[Bound, int]]:
        """Every concurrency bound a claim on `ref` at `tier` must fit under (with its cap)."""
        e = self.envelopes[ref]
        out: list[tuple[Bound, int]] = [(env_bound(ref), e.concurrency)]
        if tier == SPONSOR:
            mc = e.lending.max_concurrency
            out.append((lend_bound(ref), INF if mc is None else mc))
            if terms.max_borrow is not None:
                out.append((("borrow", run), terms.max_borrow))
        out.extend(self.caps_of[ref])
        return out

    def component_links(self) -> list[list[EnvelopeRef]]:
        """Sets of envelopes whose classification depends on each other (linked by caps)."""
        groups: dict[Bound, list[EnvelopeRef]] = {}
        for ref, caps in self.caps_of.items():
            for key, _ in caps:
                groups.setdefault(key, []).append(ref)
        return list(groups.values())


def class_for_tier(tier: int) -> FundingClass:
    if tier == OWNER:
        return FundingClass.OWNED
    if tier == SPONSOR:
        return FundingClass.BORROWED
    return FundingClass.SHARED

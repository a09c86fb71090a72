"""The family DAG of owners and the tier of a claim on an envelope (CALCULUS §1, §2).

Contract: built from the union of all budgets' parent edges; answers the family relation
between a claimant and an envelope owner as an integer tier that sorts in the calculus's
proximity order (owner < ancestor, nearer first < sibling < cousin < sponsor). Detects cycles.
`owner_claim` is who a namespace's Run may spend for (Forbidden otherwise).
Not: the eligibility rules of sharing and lending (see `funding.tier_for`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from jobtree.core.errors import Forbidden
from jobtree.core.model import Budget

OWNER = 0
ANCESTOR = 100  # + distance (1 = parent)
SIBLING = 1000
COUSIN = 2000
SPONSOR = 3000

TIER_NAMES = {OWNER: "owner", SIBLING: "sibling", COUSIN: "cousin", SPONSOR: "sponsor"}


def tier_name(tier: int) -> str:
    if ANCESTOR < tier < SIBLING:
        return "ancestor"
    return TIER_NAMES[tier]


def is_family_tier(tier: int) -> bool:
    return OWNER < tier < SPONSOR


class Family:
    """Parent edges between owner ids, with memoised relations."""

    def __init__(self, budgets: Iterable[Budget]) -> None:
        parents: dict[str, set[str]] = {}
        for b in budgets:
            parents.setdefault(b.owner, set()).update(b.parents)
        self._parents: dict[str, frozenset[str]] = {k: frozenset(v) for k, v in parents.items()}
        self._ancestors: dict[str, dict[str, int]] = {}
        self._tiers: dict[tuple[str, str], int | None] = {}

    def parents(self, owner: str) -> frozenset[str]:
        return self._parents.get(owner, frozenset())

    def ancestors(self, owner: str) -> dict[str, int]:
        """Every ancestor of `owner` with its shortest distance (parent = 1)."""
        got = self._ancestors.get(owner)
        if got is None:
            got = {}
            queue: deque[tuple[str, int]] = deque((p, 1) for p in sorted(self.parents(owner)))
            while queue:
                o, d = queue.popleft()
                if o in got or o == owner:
                    continue
                got[o] = d
                queue.extend((p, d + 1) for p in sorted(self.parents(o)))
            self._ancestors[owner] = got
        return got

    def family_tier(self, claimant: str, envelope_owner: str) -> int | None:
        """The family tier of `claimant` on an envelope of `envelope_owner`, or None if unrelated."""
        key = (claimant, envelope_owner)
        if key in self._tiers:
            return self._tiers[key]
        tier: int | None = None
        if claimant == envelope_owner:
            tier = OWNER
        else:
            dist = self.ancestors(claimant).get(envelope_owner)
            mine, theirs = self.parents(claimant), self.parents(envelope_owner)
            if dist is not None:
                tier = ANCESTOR + dist
            elif mine & theirs:
                tier = SIBLING
            elif any(p != q and self.parents(p) & self.parents(q) for p in mine for q in theirs):
                tier = COUSIN
        self._tiers[key] = tier
        return tier

    def find_cycle(self) -> list[str] | None:
        """An owner cycle in the parent edges, or None when the graph is a DAG."""
        colour: dict[str, int] = {}
        stack: list[str] = []

        def visit(o: str) -> list[str] | None:
            colour[o] = 1
            stack.append(o)
            for p in sorted(self.parents(o)):
                if colour.get(p) == 1:
                    return [*stack[stack.index(p):], p]
                if p not in colour:
                    found = visit(p)
                    if found:
                        return found
            stack.pop()
            colour[o] = 2
            return None

        for o in sorted(self._parents):
            if o not in colour:
                found = visit(o)
                if found:
                    return found
        return None


def owner_claim(namespace: str, bound: Iterable[str], claimed: str | None, family: Family) -> str:
    """The owner a Run of `namespace` spends for: `claimed`, when it is one of the owners the
    namespace is bound to (`bound`) or a descendant of one (by the budgets' parents); the one
    bound owner when it claims none. Forbidden (naming `spec.owner`, or the namespace) otherwise."""
    owners = list(bound)
    if not owners:
        raise Forbidden("", f"namespace {namespace} is not bound to an owner: annotate it with "
                            "rq.davidlangworthy.io/owner=<owner> (a platform admin's act) before it can run work")
    if not claimed:
        if len(owners) == 1:
            return owners[0]
        raise Forbidden("spec.owner", f"required: namespace {namespace} is shared by {', '.join(owners)}; "
                                      "name one of them")
    ancestors = family.ancestors(claimed)
    if any(claimed == b or b in ancestors for b in owners):
        return claimed
    names = " or ".join(repr(b) for b in owners)
    raise Forbidden("spec.owner", f"{claimed!r} is neither {names} (the owner of namespace {namespace}) nor a "
                                  "descendant; a Run may only spend its namespace's budgets")

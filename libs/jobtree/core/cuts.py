"""The cut order and the seeded lottery (CALCULUS §7).

Contract: given the open leases with their classes (computed with the new claim ranked in),
the runs that hold them, and a per-domain deficit, plan the gentlest cuts that clear the
deficit: (1) reclaim unfunded work, (2) drop spares, (3) shrink malleable runs, (4) a lottery
seeded by sha256(source@time), then (5) spare the cuts the deficit does not need. Freed GPUs
are the union of the kept cuts' slots plus what the gangs they break release. The plan is
pure data; the engine applies it. `capacity_levels` gives the slots each step could free, for
choosing the intended slice.
Not: the decision of when to cut (admission/activation), not lease bookkeeping.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Collection, Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import InitVar, dataclass, field

from jobtree.core.model import FundingClass, Lease, Role, RunSpec, RunStatus, Slot
from jobtree.core.timefmt import format_time

RECLAIM, DROP_SPARE, SHRINK, LOTTERY = 1, 2, 3, 4


def lottery_seed(source: str, t: int) -> str:
    """rho = sha256(source + "@" + YYYY-MM-DDTHH:MM:SSZ), lowercase hex."""
    return hashlib.sha256(f"{source}@{format_time(t)}".encode()).hexdigest()


def draw(seed: str, conflict: Iterable[str], owner_of: Callable[[str], str],
         still_short: Callable[[list[str]], bool]) -> list[str]:
    """The lottery of §7 step 4: victims in draw order while `still_short(victims)`."""
    rng = random.Random(int(seed, 16))
    pool = set(conflict)
    victims: list[str] = []
    while pool and still_short(victims):
        owners = sorted({owner_of(k) for k in pool})
        o = owners[rng.randrange(len(owners))]
        keys = sorted(k for k in pool if owner_of(k) == o)
        victim = keys[rng.randrange(len(keys))]
        victims.append(victim)
        pool.remove(victim)
    return victims


@dataclass(frozen=True, slots=True)
class Cut:
    step: int
    run: str
    leases: tuple[str, ...]
    """For a lottery victim: every open lease of the run."""
    group: int | None = None
    """Set for a whole top-group cut of a malleable run (steps 1 and 3): taken top-down only."""


@dataclass(frozen=True, slots=True)
class CutPlan:
    cuts: tuple[Cut, ...]
    seed: str
    conflict_set: tuple[str, ...]
    freed: frozenset[Slot]
    cleared: bool = True
    """False when even every cut could not clear the deficit: then `cuts` is empty (nothing is
    cut) and the seed and conflict set are only published."""


RunDomains = Sequence[tuple[str, Sequence[Lease]]]
"""A run's open leases grouped by domain: (domain, leases by name), domains in order."""


def run_domains(leases: Iterable[Lease], domain_of: Callable[[str], str]) -> RunDomains:
    by_dom: dict[str, list[Lease]] = {}
    for lease in leases:
        by_dom.setdefault(domain_of(lease.node), []).append(lease)
    return [(d, by_dom[d]) for d in sorted(by_dom)]


@dataclass
class CutWorld:
    """A snapshot of what the cut order may touch.

    Built from its leases alone (`derive`, the default), or handed the per-run indexes the
    engine keeps (`by_run`, `unfunded_runs`, `domains_of`), so a world costs nothing per open
    lease it never looks at."""

    leases: dict[str, Lease]
    """Open leases by name (an index handing the world its runs may hold more: only the leases
    of `by_run` are ever looked up)."""
    classes: Mapping[str, FundingClass]
    runs: dict[str, tuple[RunSpec, RunStatus]]
    domain_of: Callable[[str], str]
    usable: Callable[[Slot], bool]
    """Whether a freed slot can be used by the claim (a Ready node of its flavor)."""
    placing: str
    now: int
    protect_bound_now: bool = True
    """Runs bound at `now` cannot be cut now; a reservation planning a later activation counts them."""
    by_run: dict[str, Sequence[Lease]] = field(default_factory=dict)
    """Run -> its open leases in the world, by name."""
    unfunded_runs: set[str] = field(default_factory=set)
    """Runs holding at least one unfunded lease (the only ones step 1 can take from)."""
    domains_of: Callable[[str], RunDomains] | None = None
    """A run's leases by domain (derived from `by_run` when not handed in)."""
    wholly_unfunded: set[str] = field(default_factory=set)
    """Runs known to hold unfunded leases only (a shortcut: others are checked lease by lease)."""
    spare_runs: Collection[str] | None = None
    """Runs holding an open spare lease, when an index hands them in (step 2 looks at these
    only; None: every run of `by_run` is looked at)."""
    shrinkable: Collection[str] | None = None
    """Runs that are malleable and hold leases, when an index hands them in (step 3 looks at
    these only; None: every run of `by_run` is looked at)."""
    widths: Mapping[str, int] | None = None
    """Run -> the GPUs of its open active leases, when an index hands them in."""
    reclaim_runs_in: Callable[[set[str]], Iterable[str]] | None = None
    """The runs that may have a step-1 unit in some of these domains (a superset), when an index
    answers it (step 1 limited to domains looks at these only)."""
    derive: InitVar[bool] = True

    def __post_init__(self, derive: bool) -> None:
        if not derive:
            return
        unfunded = FundingClass.UNFUNDED
        for lease in sorted(self.leases.values(), key=lambda x: x.name):
            self.by_run.setdefault(lease.run, []).append(lease)  # type: ignore[attr-defined]
            if self.classes.get(lease.name) is unfunded:
                self.unfunded_runs.add(lease.run)

    def run_domains(self, run: str) -> RunDomains:
        if self.domains_of is not None:
            return self.domains_of(run)
        return run_domains(self.by_run[run], self.domain_of)

    def cuttable(self, run: str) -> bool:
        if run == self.placing or run not in self.runs:
            return False
        return not self.protect_bound_now or self.runs[run][1].bound_at != self.now

    def lease_domain(self, lease: Lease) -> str:
        return self.domain_of(lease.node)

    def admitted(self, run: str) -> int:
        st = self.runs[run][1]
        return st.admitted if st.admitted is not None else st.created


def _youngest_first(world: CutWorld, runs: Iterable[str]) -> list[str]:
    """Youngest admission first, then key descending (two stable sorts)."""
    by_key_desc = sorted(runs, reverse=True)
    return sorted(by_key_desc, key=lambda k: -world.admitted(k))


def _groups(leases: Iterable[Lease]) -> dict[int, list[Lease]]:
    out: dict[int, list[Lease]] = {}
    for lease in leases:
        out.setdefault(lease.group, []).append(lease)
    return out


def _active_width(leases: Iterable[Lease]) -> int:
    return sum(x.gpus for x in leases if x.role is Role.ACTIVE)


def units(world: CutWorld, step: int, domains: set[str] | None) -> list[Cut]:
    """Candidate cuts of one step (1-3), in the order the step takes them; `domains` None = everywhere."""
    if step == RECLAIM:
        return _reclaim_units(world, domains)
    if step == DROP_SPARE:
        return _spare_units(world, domains)
    return _shrink_units(world, domains)


def _in(domains: set[str] | None, d: str) -> bool:
    return domains is None or d in domains


def _reclaim_units(world: CutWorld, domains: set[str] | None) -> list[Cut]:
    out: list[Cut] = []
    if domains is None or world.reclaim_runs_in is None:
        keys = _reclaimable(world)
    else:  # units lie in the domains of their leases: only runs holding something there
        keys = [k for k in world.reclaim_runs_in(domains)
                if k in world.unfunded_runs and k in world.by_run and world.cuttable(k)]
    for key in _youngest_first(world, keys):
        out.extend(_reclaim_units_of(world, key, domains))
    return out


def _reclaimable(world: CutWorld) -> list[str]:
    """Every reclaim unit is made of unfunded leases only: runs without one yield none, so they
    are left out before the ordering (which keeps the others' relative order)."""
    return [k for k in world.unfunded_runs if k in world.by_run and world.cuttable(k)]


def _reclaim_units_of(world: CutWorld, key: str, domains: set[str] | None) -> list[Cut]:
    return reclaim_units(RunHolding(key, world.by_run[key], world.run_domains(key), world.runs[key][0],
                                    key in world.wholly_unfunded), world.classes.get, world.domain_of, domains)


@dataclass(frozen=True, slots=True)
class RunHolding:
    """What step 1 reads of one run: its open leases (by name and by domain), its spec, and
    whether all it holds is known to be unfunded."""

    key: str
    leases: Sequence[Lease]
    domains: RunDomains
    spec: RunSpec
    whole: bool = False


def reclaim_units(run: RunHolding, cls: Callable[[str], FundingClass | None], domain_of: Callable[[str], str],
                  domains: set[str] | None = None) -> list[Cut]:
    """One run's reclaim units in the order step 1 takes them: each domain where every lease of
    it is unfunded, then (malleable) whole unfunded top groups down to min."""
    out: list[Cut] = []
    unfunded = FundingClass.UNFUNDED
    for d, members in run.domains:
        if _in(domains, d) and (run.whole or all(cls(x.name) is unfunded for x in members)):
            out.append(Cut(RECLAIM, run.key, tuple(x.name for x in members)))
    spec = run.spec
    if spec.malleable is None:
        return out
    groups = _groups(run.leases)
    width = _active_width(run.leases)
    for g in sorted(groups, reverse=True):
        members = groups[g]
        gw = _active_width(members)
        if width - gw < spec.min_width or not all(cls(x.name) is unfunded for x in members):
            break
        if not any(_in(domains, domain_of(x.node)) for x in members):
            break  # the top group is out of scope: nothing below it may go first
        out.append(Cut(RECLAIM, run.key, tuple(x.name for x in members), g))
        width -= gw
    return out


def reclaim_capacity(run: RunHolding, cls: Callable[[str], FundingClass | None],
                     domain_of: Callable[[str], str]) -> list[Lease]:
    """The leases step 1 could free of one run, each once: a set of slots, so the order of its
    units does not matter, and a fixed-size run's units are its domains where all it holds is
    unfunded (all of them, when it holds unfunded leases only)."""
    if run.spec.malleable is not None:  # a domain unit and a group unit may share leases
        by_name = {x.name: x for x in run.leases}
        return [by_name[n] for n in dict.fromkeys(n for cut in reclaim_units(run, cls, domain_of) for n in cut.leases)]
    if run.whole:
        return list(run.leases)
    unfunded = FundingClass.UNFUNDED
    return [x for _, members in run.domains if all(cls(y.name) is unfunded for y in members) for x in members]


def _spare_units(world: CutWorld, domains: set[str] | None) -> list[Cut]:
    out: list[Cut] = []
    holders = world.by_run if world.spare_runs is None else [k for k in world.spare_runs if k in world.by_run]
    for key in _youngest_first(world, [k for k in holders if world.cuttable(k)]):
        spares = [x for x in world.by_run[key] if x.role is Role.SPARE and _in(domains, world.lease_domain(x))]
        for lease in sorted(spares, key=lambda x: (-x.group, x.name)):
            out.append(Cut(DROP_SPARE, key, (lease.name,)))
    return out


def _shrink_units(world: CutWorld, domains: set[str] | None) -> list[Cut]:
    """Top groups of malleable runs down to min, most surplus first (then key); a run whose top
    group lies outside `domains` is not shrunk."""
    runs: list[tuple[int, str]] = []
    holders = world.by_run if world.shrinkable is None else [k for k in world.shrinkable if k in world.by_run]
    for key in holders:
        spec = world.runs[key][0] if key in world.runs else None
        if spec is None or spec.malleable is None or not world.cuttable(key):
            continue
        width = world.widths.get(key, 0) if world.widths is not None else _active_width(world.by_run[key])
        surplus = width - spec.min_width
        if surplus > 0:
            runs.append((surplus, key))
    out: list[Cut] = []
    for _, key in sorted(runs, key=lambda sk: (-sk[0], sk[1])):
        leases = world.by_run[key]
        spec = world.runs[key][0]
        groups = _groups(leases)
        width = _active_width(leases)
        for g in sorted(groups, reverse=True):
            members = groups[g]
            gw = _active_width(members)
            if width - gw < spec.min_width:
                break
            if not any(_in(domains, world.lease_domain(x)) for x in members):
                break
            out.append(Cut(SHRINK, key, tuple(x.name for x in members), g))
            width -= gw
    return out


def freed_slots(world: CutWorld, cuts: Iterable[Cut]) -> set[Slot]:
    """Slots the cuts free, with the gangs they break: a fixed run that loses an active GPU, or a
    malleable run left below min, frees everything; a malleable run frees whole broken groups."""
    cut_names: dict[str, set[str]] = {}
    for c in cuts:
        cut_names.setdefault(c.run, set()).update(c.leases)
    slots: set[Slot] = set()
    for key, names in cut_names.items():
        for x in _run_freed(world, key, names):
            slots.update(x.slots)
    return slots


def _run_freed(world: CutWorld, key: str, names: set[str]) -> Sequence[Lease]:
    """The leases of one run that cutting `names` frees (with the gang it breaks)."""
    leases = world.by_run.get(key, [])
    spec = world.runs[key][0]
    lost_active = any(x.role is Role.ACTIVE and x.name in names for x in leases)
    if not lost_active:
        return [x for x in leases if x.name in names]
    if spec.malleable is None:
        return leases
    groups = _groups(leases)
    broken = {g for g, ms in groups.items() if any(x.role is Role.ACTIVE and x.name in names for x in ms)}
    intact = sum(_active_width(ms) for g, ms in groups.items() if g not in broken)
    return leases if intact < spec.min_width else [x for x in leases if x.group in broken or x.name in names]


class _Tally:
    """What a list of cuts still leaves short, per domain, kept as cuts join and leave it.

    Open leases of different runs hold different slots, so the usable GPUs the cuts free add up
    run by run: a cut joining or leaving re-derives its own run's share only (what `freed_slots`
    over the whole list would give, without walking the list)."""

    def __init__(self, world: CutWorld, deficit: dict[str, int]) -> None:
        self.world = world
        self.deficit = {d: n for d, n in deficit.items() if n > 0}
        self._cut: dict[str, dict[str, int]] = {}
        """Run -> lease name -> how many kept cuts name it."""
        self._share: dict[str, dict[str, int]] = {}
        """Run -> usable GPUs per domain its cut leases free."""
        self.got: dict[str, int] = {}

    def _share_of(self, run: str, names: set[str]) -> dict[str, int]:
        got: dict[str, int] = {}
        if not names:
            return got
        usable, domain_of = self.world.usable, self.world.domain_of
        for x in _run_freed(self.world, run, names):
            for s in x.slots:
                if usable(s):
                    d = domain_of(s[0])
                    got[d] = got.get(d, 0) + 1
        return got

    def _short(self, got: dict[str, int]) -> dict[str, int]:
        return {d: n - got.get(d, 0) for d, n in self.deficit.items() if n - got.get(d, 0) > 0}

    def short(self) -> dict[str, int]:
        return self._short(self.got)

    def _changed(self, cut: Cut, sign: int) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        """(the run's names after, its share after, the total got after) were `cut` added (+1) or
        removed (-1)."""
        counts = dict(self._cut.get(cut.run, {}))
        for name in cut.leases:
            left = counts.get(name, 0) + sign
            if left:
                counts[name] = left
            else:
                counts.pop(name, None)
        share = self._share_of(cut.run, set(counts))
        got = dict(self.got)
        for d, gpus in self._share.get(cut.run, {}).items():
            got[d] -= gpus
        for d, gpus in share.items():
            got[d] = got.get(d, 0) + gpus
        return counts, share, got

    def short_with(self, cut: Cut, sign: int = 1) -> dict[str, int]:
        return self._short(self._changed(cut, sign)[2])

    def change(self, cut: Cut, sign: int = 1) -> None:
        counts, share, self.got = self._changed(cut, sign)
        self._cut[cut.run], self._share[cut.run] = counts, share


def plan(world: CutWorld, deficit: dict[str, int], source: str, max_step: int = LOTTERY) -> CutPlan:
    """The cut order for a per-domain deficit (`cleared` False, and no cuts, when even every cut
    cannot clear it)."""
    tally = _Tally(world, deficit)
    scope = set(tally.deficit)
    seed = lottery_seed(source, world.now)
    chosen: list[Cut] = []
    cut_names: set[str] = set()
    for step in (RECLAIM, DROP_SPARE, SHRINK):
        if step > max_step:
            break
        stopped: set[str] = set()  # runs whose current top group did not help: keep their lower groups
        for cut in units(world, step, scope):
            short = tally.short()
            if not short:
                break
            if set(cut.leases) <= cut_names:
                continue  # already cut by an earlier step (e.g. a top group reclaimed in step 1)
            if cut.group is not None and cut.run in stopped:
                continue
            after = tally.short_with(cut)
            if any(after.get(d, 0) < n for d, n in short.items()):  # it helps
                chosen.append(cut)
                tally.change(cut)
                cut_names.update(cut.leases)
            elif cut.group is not None:
                stopped.add(cut.run)
    conflict: list[str] = []
    victims: list[str] = []
    if tally.short() and max_step >= LOTTERY:
        freed = freed_slots(world, chosen)
        conflict = sorted(
            k for k, leases in world.by_run.items()
            if world.cuttable(k) and any(
                world.lease_domain(x) in scope and not set(x.slots) <= freed for x in leases
            )
        )
        owner_of = {k: world.runs[k][0].owner for k in conflict}
        drawn: list[str] = []

        def still_short(vs: list[str]) -> bool:
            # `draw` asks with the victims so far, one more each time: add only the new ones.
            for v in vs[len(drawn):]:
                tally.change(_victim(world, v))
                drawn.append(v)
            return bool(tally.short())

        victims = draw(seed, conflict, owner_of.__getitem__, still_short)
        for v in victims[len(drawn):]:
            tally.change(_victim(world, v))
    kept = [*chosen, *(_victim(world, v) for v in victims)]
    if tally.short():
        return CutPlan((), seed, tuple(conflict), frozenset(), cleared=False)
    order = [*(c for c in kept if c.step == LOTTERY)]
    for step in (SHRINK, DROP_SPARE, RECLAIM):
        order.extend(reversed([c for c in chosen if c.step == step]))
    for cut in order:
        if not tally.short_with(cut, -1):
            kept = [c for c in kept if c is not cut]
            tally.change(cut, -1)
    return CutPlan(tuple(kept), seed, tuple(conflict), frozenset(freed_slots(world, kept)))


def _victim(world: CutWorld, key: str) -> Cut:
    return Cut(LOTTERY, key, tuple(x.name for x in world.by_run[key]))


def capacity_levels(world: CutWorld, max_level: int = LOTTERY) -> Iterator[set[Slot]]:
    """Extra slots each level of §7 may count, computed only as far as asked: step 1; +2; +3;
    + every slot of a cuttable run."""
    acc: set[Slot] = set()
    for added in capacity_leases(world, max_level):
        for lease in added:
            acc.update(lease.slots)
        yield set(acc)


def capacity_leases(world: CutWorld, max_level: int = LOTTERY,
                    reclaimed: Container[str] | None = None) -> Iterator[list[Lease]]:
    """The leases each level of `capacity_levels` adds to the one before (each level's slots are
    those of whole leases: a caller keeping its own union copies nothing). `reclaimed`: the
    caller counted step 1 already (from a maintained index), and these are its leases' names;
    the levels after it are yielded."""
    seen: set[str] = set()
    for step in (RECLAIM, DROP_SPARE, SHRINK):
        if step > max_level:
            return
        if step == RECLAIM:
            if reclaimed is not None:
                continue
            found: list[Lease] = []
            cls = world.classes.get
            for key in _reclaimable(world):
                found.extend(reclaim_capacity(RunHolding(key, world.by_run[key], world.run_domains(key),
                                                         world.runs[key][0], key in world.wholly_unfunded),
                                              cls, world.domain_of))
            # Each run's leases once, runs hold different leases, nothing was seen before step 1.
            yield found
            seen.update(x.name for x in found)  # only once a further level is asked for
            continue
        found = [world.leases[n] for cut in units(world, step, None) for n in cut.leases]
        added = {x.name: x for x in found if x.name not in seen and (reclaimed is None or x.name not in reclaimed)}
        seen.update(added)
        yield list(added.values())
    if max_level >= LOTTERY:
        yield [x for key, leases in world.by_run.items() if world.cuttable(key) for x in leases
               if x.name not in seen and (reclaimed is None or x.name not in reclaimed)]

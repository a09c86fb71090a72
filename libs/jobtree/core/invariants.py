"""The invariant oracle: the properties of CALCULUS §10, checked against a cluster's view.

Contract: `check_all(cluster)` raises `InvariantViolation` naming the property and the
offending object when any of these fails at the cluster's `now`: exclusivity (no slot in two
open leases), no overdraft (funded concurrency and GPU-hours within every envelope, lending
and aggregate cap), derivation (classes recomputed from scratch, claims in another order,
equal the cluster's incremental ones), gang (a Running run holds at least its runnable width),
and audit (replaying the journal reproduces the meter). Determinism is a property of whole
runs and is tested by playing scenarios twice. Tests run this after every decision.
Not: part of any decision path; production shells need not call it.
"""

from __future__ import annotations

from jobtree.core import cuts
from jobtree.core.engine import Cluster
from jobtree.core.funding import FundingView
from jobtree.core.funding_rules import INF
from jobtree.core.meter import cap_seconds
from jobtree.core.model import FundingClass, NodeState, Phase, Role, Slot
from jobtree.core.pack import HeldLayer
from jobtree.core.reclaims import ReclaimIndex


class InvariantViolation(AssertionError):
    pass


def check_exclusivity(cl: Cluster) -> None:
    seen: dict[Slot, str] = {}
    for leases in cl.open_by_run.values():
        for lease in leases.values():
            for s in lease.slots:
                if s in seen:
                    raise InvariantViolation(f"exclusivity: slot {s[0]}#{s[1]} in {seen[s]} and {lease.name}")
                seen[s] = lease.name
                if cl.topo.holder(s) != lease.name:
                    raise InvariantViolation(f"exclusivity: topology says {s} is held by {cl.topo.holder(s)}")


def check_no_overdraft(cl: Cluster) -> None:
    cl.funding.refresh()
    for ref in cl.rules.envelopes:
        bounds = cl.rules.bounds(ref, 3000, "", cl.terms(""))
        for b, cap in bounds:
            if b[0] == "borrow":
                continue
            used = cl.funding.used.get(b, 0)
            if cap < INF and used > cap:
                raise InvariantViolation(f"no overdraft: {'/'.join(b)} funds {used} GPUs over its cap {cap}")
    for b, hours in cl.rules.hour_caps.items():
        allowed = max(cap_seconds(hours), cl.meter.floor.get(b, 0))  # a cap lowered below past use
        if cl.meter.consumed.get(b, 0) > allowed:
            raise InvariantViolation(f"no overdraft: {'/'.join(b)} consumed more than {hours} GPU-hours")
    for key in cl.open_by_run:
        terms = cl.terms(key)
        if terms.max_borrow is not None:
            borrowed = sum(x.gpus for x in cl.open_by_run[key].values()
                           if cl.funding.class_of(x.name) is FundingClass.BORROWED)
            if borrowed > terms.max_borrow:
                raise InvariantViolation(f"no overdraft: {key} borrows {borrowed} > maxBorrowGPUs {terms.max_borrow}")


def check_derivation(cl: Cluster) -> None:
    fresh = FundingView(cl.rules, cl.terms)
    fresh.set_clock(cl.now, cl.funding.spent)
    for claim in sorted(cl.funding.claims(), key=lambda c: c.name, reverse=True):
        fresh.add(claim)
    fresh.invalidate()
    for claim in cl.funding.claims():
        a, b = cl.funding.class_of(claim.name), fresh.class_of(claim.name)
        if a is not b:
            raise InvariantViolation(f"derivation: {claim.name} is {a.value} incrementally but {b.value} from scratch")
    unfunded: dict[str, int] = {}
    for claim in cl.funding.claims():
        if cl.funding.class_of(claim.name) is FundingClass.UNFUNDED:
            unfunded[claim.run] = unfunded.get(claim.run, 0) + 1
    if unfunded != cl.funding.unfunded_claims:
        raise InvariantViolation(f"derivation: the unfunded-claims index {cl.funding.unfunded_claims} "
                                 f"is not the classes' {unfunded}")


def check_gang(cl: Cluster) -> None:
    for key, st in cl.status.items():
        if key not in cl.runs:
            continue
        active = sum(x.gpus for x in cl.open_by_run.get(key, {}).values() if x.role is Role.ACTIVE)
        if st.phase is Phase.RUNNING and active < cl.runs[key].spec.min_width:
            raise InvariantViolation(f"gang: {key} is Running with {active} < {cl.runs[key].spec.min_width} GPUs")
        if st.phase is not Phase.RUNNING and active:
            raise InvariantViolation(f"gang: {key} is {st.phase.value} but holds {active} GPUs")


def check_widths(cl: Cluster) -> None:
    """The run-width index (`_width`, what elasticity reads) equals the open active leases."""
    widths = {k: sum(x.gpus for x in ls.values() if x.role is Role.ACTIVE) for k, ls in cl.open_by_run.items()}
    widths = {k: w for k, w in widths.items() if w}
    if widths != cl._width:
        wrong = sorted(k for k in widths.keys() | cl._width.keys() if widths.get(k) != cl._width.get(k))
        raise InvariantViolation(f"derivation: the width index is wrong for run(s) {', '.join(wrong)}")


def check_topology_indexes(cl: Cluster) -> None:
    """The occupancy indexes pack reads equal a count of the slots: each node's free GPUs, the
    Ready nodes of each (flavor, domain) by free, each domain's and flavor's Ready free GPUs,
    and the domains of each flavor by free."""
    topo = cl.topo
    free = {name: sum(h is None for h in holders) for name, holders in topo._holder.items()}
    assert topo._free == free, "free GPUs per node drifted from the slots"
    nodes: dict[tuple[str, str], list[tuple[int, str]]] = {key: [] for key in topo._dom_nodes}
    dom_free = dict.fromkeys(topo._dom_free, 0)
    flavor_free: dict[str, int] = {}
    for name, node in topo.nodes.items():
        if node.state is NodeState.READY:
            key = (node.flavor, node.domain)
            nodes[key].append((-free[name], name))
            dom_free[key] += free[name]
            flavor_free[node.flavor] = flavor_free.get(node.flavor, 0) + free[name]
    assert {k: list(v) for k, v in topo._dom_nodes.items()} == {k: sorted(v) for k, v in nodes.items()}, \
        "Ready nodes by free drifted"
    assert topo._dom_free == dom_free, "free GPUs per domain drifted"
    assert {f: n for f, n in topo._flavor_free.items() if n} == {f: n for f, n in flavor_free.items() if n}, \
        "free GPUs per flavor drifted"
    order = {f: sorted((-dom_free[(f, d)], d) for (g, d) in dom_free if g == f) for f in topo._dom_order}
    assert {f: list(v) for f, v in topo._dom_order.items()} == order, "domains by free drifted"


def check_cut_indexes(cl: Cluster) -> None:
    """The indexes cut worlds read equal what they index: each holder's open leases by name
    (for runs not marked stale) and by domain, every run's spec and status, and the running
    runs with an ETA, the runs holding spares (docs/design/cut-worlds.md)."""
    by_name = {k: tuple(sorted(ls.values(), key=lambda x: x.name)) for k, ls in cl.open_by_run.items() if ls}
    wrong = sorted(k for k in by_name.keys() | cl._open_sorted.keys()
                   if k not in cl._stale_runs and by_name.get(k) != cl._open_sorted.get(k))
    wrong += sorted(k for k, doms in cl._run_domains.items()
                    if k not in cl._stale_runs and doms != cuts.run_domains(by_name.get(k, ()), cl.topo.domain_of))
    if wrong:
        raise InvariantViolation(f"derivation: the cut-world lease index is wrong for run(s) {', '.join(wrong)}")
    runs = {k: (r.spec, cl.status[k]) for k, r in cl.runs.items() if k in cl.status}
    if runs != cl._cut_runs:
        raise InvariantViolation("derivation: the cut-world run index differs from the runs and their status")
    if cl._count_spare_holders() != cl._spare_holders:
        raise InvariantViolation("derivation: the spare-holder index differs from the open spare leases")
    eta = {k for k, st in cl.status.items() if st.phase is Phase.RUNNING and st.eta is not None}
    if eta != cl._eta_running:
        raise InvariantViolation("derivation: the ETA index differs from the running runs that reported one")
    holding = {k for k, ls in cl.open_by_run.items() if ls and k in cl.runs and cl.runs[k].spec.malleable is not None}
    if not holding <= cl._malleable_running:
        raise InvariantViolation("derivation: a malleable run holds leases but is not indexed as running "
                                 f"(cut step 3 reads that index): {', '.join(sorted(holding - cl._malleable_running))}")
    widths = {k: sum(x.gpus for x in ls.values() if x.role is Role.ACTIVE) for k, ls in cl.open_by_run.items()}
    if {k: w for k, w in widths.items() if w} != cl._width:
        raise InvariantViolation("derivation: the width index differs from the runs' open active leases")
    check_reclaim_index(cl)


def check_reclaim_index(cl: Cluster) -> None:
    """The reclaim index, brought up to date as a decision would, equals one built afresh: each
    run's step-1 units, the runs bound now apart, and each flavor's layers of their slots."""
    index = cl._reclaim_index()
    fresh = ReclaimIndex()
    fresh.at = cl.now
    cls, unfunded = cl.funding.classes().get, cl.funding.unfunded_claims
    for k, n in unfunded.items():
        fresh.put(k, cl._step_one(k, n, cls), cl.topo, recent=cl._bound_now(k))
    wrong = sorted(k for k in fresh.names.keys() | index.names.keys() if fresh.names.get(k) != index.names.get(k))
    if wrong:
        raise InvariantViolation(f"derivation: the reclaim index is wrong for run(s) {', '.join(wrong)}")
    if fresh.unlayered != index.unlayered:
        raise InvariantViolation("derivation: the reclaim index's runs with units off Ready nodes are wrong")
    if fresh.recent != index.recent:
        raise InvariantViolation("derivation: the reclaim index's runs bound now differ from the runs bound now")
    for mine, theirs in ((fresh.layers, index.layers), (fresh.recent_layers, index.recent_layers)):
        for flavor in mine.keys() | theirs.keys():
            a, b = mine.get(flavor, HeldLayer()), theirs.get(flavor, HeldLayer())
            if (a.chunks, a.n, a.dom, a.dom_nodes, a.total) != (b.chunks, b.n, b.dom, b.dom_nodes, b.total):
                raise InvariantViolation(f"derivation: a reclaim layer of flavor {flavor} differs from its units")


def check_audit(cl: Cluster, start: int, nodes: list | None = None) -> None:  # type: ignore[type-arg]
    base = nodes if nodes is not None else list(cl.initial_nodes)
    again = Cluster.replay(cl.config, base, start, cl.journal)
    again._move_clock(cl.now)
    if again.meter.consumed != cl.meter.consumed or again.meter.unfunded != cl.meter.unfunded:
        raise InvariantViolation("audit: replaying the journal does not reproduce the meter")


def check_all(cl: Cluster, audit: bool = False) -> None:
    check_exclusivity(cl)
    check_no_overdraft(cl)
    check_derivation(cl)
    check_widths(cl)
    check_cut_indexes(cl)
    check_topology_indexes(cl)
    check_gang(cl)
    if audit:
        check_audit(cl, cl.started)

"""The fleet's metrics, from the budget service's view (issue 12, item 3).

Part of the budget service (see its package docstring). What a platform team graphs
(`deploy/grafana/*.json` query exactly these):
- gauges, refreshed from the view every `EVERY` seconds (`Fleet.refresh`):
  `jobtree_gpus{owner,class,domain}` (open leases' GPUs; class owned, shared, borrowed,
  unfunded or spare), `jobtree_gpus_free{domain}`, `jobtree_nodes{domain,state}`,
  `jobtree_envelope_concurrency{budget,envelope,owner}`, `jobtree_envelope_funded_gpus{...}`,
  `jobtree_envelope_headroom{...}`, `jobtree_envelope_gpu_hours{...}`,
  `jobtree_envelope_max_gpu_hours{...}` (only capped envelopes), `jobtree_runs{phase,reason}`
  (the queue by reason, and what runs);
- from the events the service derives (`Fleet.on_event`, for ledger messages applied while it
  runs): `jobtree_cuts_total{kind,reason}` (RunPreempted / RunReclaimed by closure reason word)
  and the histogram `jobtree_submit_to_bound_seconds` (a run's creation to its binding, in the
  cluster's clock, observed when it starts running).
"""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import Counter, Gauge, Histogram

from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.core import views
from jobtree.core.engine import Cluster
from jobtree.core.funding_rules import env_bound

EVERY = 5.0

GPUS = Gauge("jobtree_gpus", "GPUs held by open leases, by owner, funding class and fabric domain",
             ["owner", "class", "domain"])
FREE = Gauge("jobtree_gpus_free", "GPUs of Ready and Cordoned nodes no lease holds, by fabric domain", ["domain"])
NODES = Gauge("jobtree_nodes", "Nodes by fabric domain and state", ["domain", "state"])
ENV_LABELS = ["budget", "envelope", "owner"]
CONCURRENCY = Gauge("jobtree_envelope_concurrency", "An envelope's concurrency cap (GPUs)", ENV_LABELS)
FUNDED = Gauge("jobtree_envelope_funded_gpus", "GPUs an envelope funds now", ENV_LABELS)
HEADROOM = Gauge("jobtree_envelope_headroom", "GPUs an envelope could still fund now", ENV_LABELS)
HOURS = Gauge("jobtree_envelope_gpu_hours", "GPU-hours an envelope has funded in its window", ENV_LABELS)
MAX_HOURS = Gauge("jobtree_envelope_max_gpu_hours", "An envelope's GPU-hours cap (capped envelopes only)",
                  ENV_LABELS)
RUNS = Gauge("jobtree_runs", "Runs by phase and reason (the queue: Waiting, Pending, Reserved)", ["phase", "reason"])
CUTS = Counter("jobtree_cuts_total", "Runs that lost GPUs to a cut, by kind and reason", ["kind", "reason"])
SUBMIT_TO_BOUND = Histogram("jobtree_submit_to_bound_seconds", "From a run's submission to its binding (cluster clock)",
                            buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600))


def _set(gauge: Gauge, values: dict[tuple[str, ...], float]) -> None:
    gauge.clear()
    for labels, value in values.items():
        gauge.labels(*labels).set(value)


class Fleet:
    def refresh(self, cl: Cluster) -> None:
        gpus: Tally[tuple[str, str, str]] = Tally()
        held: Tally[str] = Tally()
        for leases in cl.open_by_run.values():
            for lease in leases.values():
                node = cl.topo.nodes.get(lease.slots[0][0]) if lease.slots else None
                domain = node.domain if node is not None else "?"
                cls = views.drawn_class(cl, lease)
                gpus[(lease.owner, cls, domain)] += lease.gpus
                held[domain] += lease.gpus
        _set(GPUS, {k: float(v) for k, v in gpus.items()})
        nodes: Tally[tuple[str, str]] = Tally()
        capacity: Tally[str] = Tally()
        for node in cl.topo.nodes.values():
            nodes[(node.domain, node.state.value)] += 1
            if node.state.value != "Fenced":
                capacity[node.domain] += node.gpus
        _set(NODES, {k: float(v) for k, v in nodes.items()})
        _set(FREE, {(d,): float(max(0, capacity[d] - held[d])) for d in capacity})
        concurrency, funded, headroom, hours, cap = {}, {}, {}, {}, {}
        for (budget, name), env in cl.rules.envelopes.items():
            owner = cl.budgets[budget].owner if budget in cl.budgets else ""
            key = (budget, name, owner)
            concurrency[key] = float(env.concurrency)
            funded[key] = float(cl.funding.used_now(env_bound((budget, name))))
            headroom[key] = float(views.headroom(cl, (budget, name)))
            hours[key] = cl.meter.hours(env_bound((budget, name)))
            if env.max_gpu_hours:
                cap[key] = float(env.max_gpu_hours)
        _set(CONCURRENCY, concurrency)
        _set(FUNDED, funded)
        _set(HEADROOM, headroom)
        _set(HOURS, hours)
        _set(MAX_HOURS, cap)
        runs: Tally[tuple[str, str]] = Tally((st.phase.value, st.reason) for st in cl.status.values())
        _set(RUNS, {k: float(v) for k, v in runs.items()})

    def on_event(self, cl: Cluster, event: bus.Event) -> None:
        if event.kind in ("RunPreempted", "RunReclaimed"):
            CUTS.labels(event.kind, event.data.get("reason", "").split("(", 1)[0]).inc()
        elif event.kind == "RunRunning":
            st = cl.status.get(f"{event.namespace}/{event.run}")
            if st is not None and st.bound_at is not None and st.generation <= 1 and st.created is not None:
                SUBMIT_TO_BOUND.observe(max(0, st.bound_at - st.created))

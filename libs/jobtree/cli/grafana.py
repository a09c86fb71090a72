"""Grafana dashboards of jobtree (issue 12, item 3), generated into `deploy/grafana/`.

Contract: `files()` maps a file name to the JSON of one dashboard — `fleet.json` (GPUs by owner,
funding class and domain; free GPUs; nodes by state), `budgets.json` (per envelope: funded
against concurrency, headroom, GPU-hours against the cap; unfunded work) and `scheduler.json`
(the queue by reason, submit-to-bound latency, cuts by reason, request rates and latency per
service, GC pauses). Every panel queries a Prometheus data source `${datasource}` with PromQL
over the metrics the services export (`services/budget/metrics.py`, `bus/runtime.py`);
`metric_names()` lists the metrics the dashboards query, and a test scrapes real services and
checks that every one of them exists. `make crds` writes them, `make crds-check` compares.
"""

from __future__ import annotations

import json
import re
from typing import Any

Json = dict[str, Any]

_PANELS: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    # file: (title, [(panel title, PromQL, unit)])
    "fleet.json": ("jobtree fleet", [
        ("GPUs by funding class", "sum by (class) (jobtree_gpus)", "short"),
        ("GPUs by owner", "sum by (owner) (jobtree_gpus)", "short"),
        ("GPUs by fabric domain and class", "sum by (domain, class) (jobtree_gpus)", "short"),
        ("Free GPUs by fabric domain", "sum by (domain) (jobtree_gpus_free)", "short"),
        ("Unfunded GPUs by owner", 'sum by (owner) (jobtree_gpus{class="unfunded"})', "short"),
        ("Nodes by state", "sum by (state) (jobtree_nodes)", "short"),
    ]),
    "budgets.json": ("jobtree budgets", [
        ("Funded GPUs against concurrency",
         "sum by (budget, envelope) (jobtree_envelope_funded_gpus) / "
         "sum by (budget, envelope) (jobtree_envelope_concurrency)", "percentunit"),
        ("Headroom (GPUs)", "sum by (budget, envelope) (jobtree_envelope_headroom)", "short"),
        ("GPU-hours spent against the cap",
         "sum by (budget, envelope) (jobtree_envelope_gpu_hours) / "
         "sum by (budget, envelope) (jobtree_envelope_max_gpu_hours)", "percentunit"),
        ("GPU-hours spent", "sum by (budget, envelope) (jobtree_envelope_gpu_hours)", "short"),
        ("GPU-hours burn rate (per hour)",
         "sum by (budget, envelope) (rate(jobtree_envelope_gpu_hours[15m])) * 3600", "short"),
    ]),
    "scheduler.json": ("jobtree scheduler health", [
        ("Queue by reason", 'sum by (phase, reason) (jobtree_runs{phase=~"Waiting|Pending|Reserved"})', "short"),
        ("Running runs", 'sum(jobtree_runs{phase="Running"})', "short"),
        ("Submit to bound, p99",
         "histogram_quantile(0.99, sum by (le) (rate(jobtree_submit_to_bound_seconds_bucket[15m])))", "s"),
        ("Cuts by reason", "sum by (kind, reason) (increase(jobtree_cuts_total[1h]))", "short"),
        ("Requests by service and outcome", "sum by (service, verb, outcome) (rate(jobtree_requests_total[5m]))",
         "reqps"),
        ("Request latency p99 by service",
         "histogram_quantile(0.99, sum by (le, service) (rate(jobtree_request_seconds_bucket[5m])))", "s"),
        ("Admission rebuilds", "rate(jobtree_admission_rebuilds_total[5m])", "ops"),
        ("Notifier deliveries and dead letters",
         "sum by (receiver) (rate(jobtree_notifier_delivered_total[5m]))", "ops"),
        ("GC pauses p99", "histogram_quantile(0.99, sum by (le) (rate(jobtree_gc_pause_seconds_bucket[5m])))", "s"),
    ]),
}

_METRIC = re.compile(r"\b(jobtree_[a-z0-9_]+)")


def dashboard(uid: str, title: str, panels: list[tuple[str, str, str]]) -> Json:
    return {
        "uid": uid, "title": title, "tags": ["jobtree"], "schemaVersion": 39, "version": 1, "editable": True,
        "time": {"from": "now-6h", "to": "now"}, "refresh": "30s",
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus"}]},
        "panels": [{
            "id": i + 1, "type": "timeseries", "title": name,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": "A", "expr": expr, "datasource": {"type": "prometheus", "uid": "${datasource}"}}],
        } for i, (name, expr, unit) in enumerate(panels)],
    }


def files() -> dict[str, str]:
    return {name: json.dumps(dashboard(f"jobtree-{name.removesuffix('.json')}", title, panels), indent=2) + "\n"
            for name, (title, panels) in _PANELS.items()}


def metric_names() -> set[str]:
    """Every metric a dashboard queries (a histogram by its name, without _bucket)."""
    out = set()
    for _, panels in _PANELS.values():
        for _, expr, _ in panels:
            out |= {m.removesuffix("_bucket") for m in _METRIC.findall(expr)}
    return out

"""Every reference scenario's nodes, budgets and runs, applied as Kubernetes objects with the real
kubectl to `jobtree up --kubeconfig`, reach the phases the simulator gives for them (and the
same widths and funding split).

What is compared: each scenario's first step (its applies at 0s) against the simulator's first
snapshot. Later steps are timed (minutes to hours of scenario time: a reservation's 15-minute
lead, a completion after an hour) and the live system runs on the wall clock, so they are not
replayed here; gathering them into the first instant would not do either (an elastic run grows
between two applies on the wall clock, not within one instant). The live simulator tests drive
timed steps through the gateway.
Runs are applied one at a time in key order, each once the previous one is admitted, so the wall
clock gives them the order the simulator gives runs of one instant. A namespace is bound to
the owners of its runs (several owners share `default` in some scenarios).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from kubeenv import REPO, KubeUp, StandIn, gpu_node, namespace, poll_until

from jobtree.api.events import funding_words
from jobtree.sim.runner import run_scenario
from jobtree.sim.scenario import load_scenario

SCENARIOS = sorted(p for p in (REPO.parent / "shared" / "scenarios").glob("[0-9]*.yaml")
                   if not p.name.endswith(".expect.yaml"))


def test_the_reference_scenarios_are_there() -> None:
    assert len(SCENARIOS) >= 4, SCENARIOS


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_reference_scenario_as_kubernetes_objects(path: Path, tmp_path: Path) -> None:
    scenario = load_scenario(path)
    raw = yaml.safe_load(path.read_text())
    first = next(iter(run_scenario(scenario)["snapshots"].values()))
    docs = [doc for step in raw["steps"] if str(step.get("at", "")) in ("0s", "0")
            for doc in step.get("apply") or []]
    runs = [d for d in docs if d["kind"] == "Run"]
    want = {r["key"]: (r["phase"], r["width"]["allocated"], funding_words(r["funding"]))
            for r in first["runs"] if r["key"] in {
        f"{d['metadata'].get('namespace', 'default')}/{d['metadata']['name']}" for d in runs}}
    assert want, "the first snapshot shows the runs of the first step"

    api = StandIn(tmp_path)
    up = None
    try:
        api.apply_crds()
        api.apply(*(gpu_node(n.name, n.gpus, n.label("fabric.domain"), region=n.label("region"),
                             flavor=n.label("gpu.flavor")) for n in scenario.nodes))
        up = KubeUp(tmp_path / "up", api, scenario.config.cluster).wait_ready()
        owners: dict[str, list[str]] = {}
        for d in runs:
            owners.setdefault(d["metadata"].get("namespace", "default"), [])
            if d["spec"]["owner"] not in owners[d["metadata"].get("namespace", "default")]:
                owners[d["metadata"].get("namespace", "default")].append(d["spec"]["owner"])
        budgets = [d for d in docs if d["kind"] == "Budget"]
        api.apply(*budgets, *(namespace(ns, ",".join(o)) for ns, o in owners.items()))
        for b in budgets:
            poll_until(f"budget {b['metadata']['name']} accepted", lambda b=b: any(
                c["type"] == "Accepted" and c["status"] == "True"
                for c in api.get_json("budget", b["metadata"]["name"]).get("status", {}).get("conditions", [])))
        # The simulator takes runs of one instant in key order: so does this, one instant each.
        for d in sorted(runs, key=lambda d: (d["metadata"].get("namespace", "default"), d["metadata"]["name"])):
            api.apply(d)
            ns, name = d["metadata"].get("namespace", "default"), d["metadata"]["name"]
            poll_until(f"run {ns}/{name} admitted", lambda ns=ns, name=name: any(
                c["type"] == "Admitted" and c["status"] == "True"
                for c in api.get_json("run", name, "-n", ns).get("status", {}).get("conditions", [])))

        def phases() -> dict[str, tuple[str, int, str]]:
            out = {}
            for ns, name in (k.split("/", 1) for k in want):
                st = api.get_json("run", name, "-n", ns).get("status", {})
                out[f"{ns}/{name}"] = (st.get("phase", ""), st.get("width", 0), st.get("funding", ""))
            return out

        last: dict[str, tuple[str, int, str]] = {}

        def same() -> bool:
            last.update(phases())
            return last == want

        deadline = time.monotonic() + 20
        while not same():
            assert time.monotonic() < deadline, f"live {last} != the simulator's {want}"
            time.sleep(0.2)
    finally:
        if up is not None:
            up.stop()
        api.stop()

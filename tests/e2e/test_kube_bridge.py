"""The kube-bridge end to end: the real kubectl against the stand-in API server, `jobtree up
--kubeconfig` (nats-server, every service, the bridge — real processes). Each test keeps to a GPU
flavor of its own (its nodes, its budget), so one system serves the whole module."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from kubeenv import WORKER, KubeUp, StandIn, UpProcess, budget, gpu_node, namespace, poll_until, run

CLUSTER = "kube"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StandIn, UpProcess]]:
    work = tmp_path_factory.mktemp("kube")
    api = StandIn(work)
    api.apply_crds()
    config = work / "config.yaml"
    config.write_text(f"cluster: {CLUSTER}\nreservationLead: 8s\n")  # reservations activate in seconds
    up = KubeUp(work / "up", api, CLUSTER, "--node-grace", "1", "--pod-grace", "0",
                "--config", str(config)).wait_ready()
    try:
        yield api, up
    finally:
        up.stop()
        api.stop()


def _flavored(api: StandIn, flavor: str, nodes: dict[str, str], gpus: int = 8) -> None:
    api.apply(*(gpu_node(name, gpus, domain, flavor=flavor) for name, domain in nodes.items()))


def _run(api: StandIn, ns: str, name: str) -> dict:
    return api.get_json("run", name, "-n", ns)


def _condition(obj: dict, kind: str) -> dict:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def _pods(api: StandIn, ns: str) -> list[dict]:
    return [p for p in api.get_json("pods", "-n", ns)["items"] if not p["metadata"].get("deletionTimestamp")]


def _run_specs(up: KubeUp) -> Counter[str]:
    """How many times the ledger took a spec per run key (ApplyRun)."""
    return Counter(f"{e.spec_put.run.metadata.namespace}/{e.spec_put.run.metadata.name}"
                   for e in up.ledger_entries() if e.WhichOneof("fact") == "spec_put")


def test_apply_a_budget_and_a_run_and_kubectl_wait_for_running(env: tuple[StandIn, UpProcess]) -> None:
    api, up = env
    _flavored(api, "F1", {"f1-a": "d1", "f1-b": "d1"})
    api.apply(budget("one", "org:one", [{"name": "pool", "flavor": "F1", "concurrency": 16}]),
              namespace("one", "org:one"),
              run("train", "one", 16, group=8, roles=WORKER, flavor="F1"))
    api.kubectl("wait", "-n", "one", "--for=condition=Running", "run/train", "--timeout=30s", timeout=40)
    obj = _run(api, "one", "train")
    st = obj["status"]
    assert (st["phase"], st["width"], st["funding"], st["observedGeneration"]) == ("Running", 16, "16 owned", 1)
    assert "one/train is Running" in st["message"]
    assert _condition(obj, "Admitted")["status"] == "True" and _condition(obj, "Reserved")["status"] == "False"

    leases = poll_until("two GPULeases", lambda: [x for x in api.get_json("gl", "-n", "one")["items"]
                                                   if x["spec"]["runRef"] == "train"] if len(
        api.get_json("gl", "-n", "one")["items"]) == 2 else None)
    nodes = sorted(x["spec"]["slots"][0]["node"] for x in leases)
    assert nodes == ["f1-a", "f1-b"] and all(x["spec"]["gpus"] == 8 for x in leases)
    pods = poll_until("two workload pods", lambda: _pods(api, "one") if len(_pods(api, "one")) == 2 else None)
    by_node = {p["spec"]["nodeName"]: p for p in pods}
    assert sorted(by_node) == nodes
    for pod in pods:
        main = pod["spec"]["containers"][0]
        assert main["resources"]["limits"]["nvidia.com/gpu"] == "8"
        env_ = {e["name"]: e["value"] for e in main["env"]}
        assert env_["JOBTREE_WORLD_SIZE"] == "2" and env_["JOBTREE_RANK"] == pod["metadata"]["labels"][
            "rq.davidlangworthy.io/rank"]
        assert pod["spec"]["subdomain"] == "train-gang" and pod["metadata"]["ownerReferences"][0]["kind"] == "Run"
    assert {p["metadata"]["labels"]["rq.davidlangworthy.io/rank"] for p in pods} == {"0", "1"}
    assert api.get_json("svc", "train-gang", "-n", "one")["spec"]["clusterIP"] == "None"
    listed = json.loads(api.plugin("runs", "pods", "train", "-n", "one", "-o", "json", "--server", up.grpc).stdout)
    assert sorted((p["pod"], p["node"]) for p in listed) == sorted(
        (p["metadata"]["name"], p["spec"]["nodeName"]) for p in pods), "kubectl runs pods lists the bridge's pods"
    table = api.kubectl("get", "runs", "-n", "one").stdout
    assert "Running" in table and "16 owned" in table
    running = poll_until("a Running event", lambda: [e for e in api.get_json("events", "-n", "one")["items"]
                                                     if e["reason"] == "Running"])
    assert len(running) == 1 and "16 GPUs (16 owned)" in running[0]["message"]
    assert "pool=0" in poll_until("the budget's headroom", lambda: api.get_json("budget", "one")
                                  .get("status", {}).get("headroom"))

    for pod in pods:  # the workload finishes: the kubelet says so
        api.set_pod_phase("one", pod["metadata"]["name"], "Succeeded")
    api.kubectl("wait", "-n", "one", "--for=condition=Completed", "run/train", "--timeout=30s", timeout=40)
    closed = poll_until("leases closed Completed", lambda: [x for x in api.get_json("gl", "-n", "one")["items"]
                                                            if x.get("status", {}).get("closureReason") == "Completed"])
    assert len(closed) == 2 and all(x["status"].get("end") for x in closed)
    assert len(_pods(api, "one")) == 2, "finished pods stay for their logs"
    assert _run_specs(up)["one/train"] == 1


def test_owners_can_not_be_forged(env: tuple[StandIn, UpProcess]) -> None:
    api, up = env
    _flavored(api, "F2", {"f2-a": "d2"})
    api.apply(budget("two", "org:two", [{"name": "pool", "flavor": "F2", "concurrency": 8}]),
              budget("two-team", "org:two:team", [{"name": "main", "flavor": "F2", "concurrency": 8}],
                     parents=["org:two"]),
              namespace("two", "org:two:team"), namespace("stray", None))
    api.apply(run("forged", "two", 8, owner="org:two", flavor="F2"), run("unbound", "stray", 8, flavor="F2"),
              run("ok", "two", 8, owner="org:two:team", flavor="F2"))

    def admitted(ns: str, name: str) -> dict:
        return _condition(_run(api, ns, name), "Admitted")

    forged = poll_until("the forged run refused", lambda: admitted("two", "forged") or None)
    assert (forged["status"], forged["reason"]) == ("False", "OwnerForbidden")
    assert "org:two:team" in forged["message"] and "spec.owner" in forged["message"]
    unbound = poll_until("the unbound namespace refused", lambda: admitted("stray", "unbound") or None)
    assert unbound["reason"] == "OwnerForbidden" and "rq.davidlangworthy.io/owner" in unbound["message"]
    assert poll_until("the rightful run admitted", lambda: admitted("two", "ok").get("status") == "True")
    specs = _run_specs(up)
    assert specs["two/ok"] == 1 and specs["two/forged"] == 0 and specs["stray/unbound"] == 0, \
        "nothing of a refused run reaches the ledger"
    warned = [e for e in api.get_json("events", "-n", "two")["items"] if e["reason"] == "OwnerForbidden"]
    assert warned and warned[0]["involvedObject"]["name"] == "forged"


def test_a_node_not_ready_past_its_grace_is_fenced_and_the_gang_swaps_to_its_spare(
        env: tuple[StandIn, UpProcess]) -> None:
    api, up = env
    _flavored(api, "F3", {"f3-a": "d3", "f3-b": "d3"})
    api.apply(budget("three", "org:three", [{"name": "pool", "flavor": "F3", "concurrency": 16}]),
              namespace("three", "org:three"),
              run("swap", "three", 8, group=8, roles=WORKER, flavor="F3", sparesPerGroup=8))
    api.kubectl("wait", "-n", "three", "--for=condition=Running", "run/swap", "--timeout=30s", timeout=40)
    before = poll_until("the pod", lambda: _pods(api, "three"))
    assert len(before) == 1, "a spare lease has no pod"
    victim = before[0]["spec"]["nodeName"]
    api.set_node_ready(victim, False)
    moved = poll_until("the pod on the spare's node", lambda: [
        p for p in _pods(api, "three") if p["spec"]["nodeName"] != victim and len(_pods(api, "three")) == 1])
    assert moved[0]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    leases = api.get_json("gl", "-n", "three")["items"]
    reasons = Counter(x.get("status", {}).get("closureReason") for x in leases)
    assert reasons["NodeFailure"] == 1 and reasons["Swap"] == 1
    assert any(x["spec"].get("mintReason") == "Swap" for x in leases)
    assert _run(api, "three", "swap")["status"]["phase"] == "Running"
    assert "Swapped" in poll_until("a Swapped event", lambda: {
        e["reason"] for e in api.get_json("events", "-n", "three")["items"]} & {"Swapped"})
    assert "fencing node" in up.log("kube-bridge")


def test_a_node_lost_without_a_spare_requeues_a_checkpointed_run(env: tuple[StandIn, UpProcess]) -> None:
    api, _ = env
    _flavored(api, "F7", {"f7-a": "d7", "f7-b": "d7"})
    api.apply(budget("seven", "org:seven", [{"name": "pool", "flavor": "F7", "concurrency": 8}]),
              namespace("seven", "org:seven"),
              run("ckpt", "seven", 8, group=8, flavor="F7", runtime={"checkpoint": "1h"}))
    api.kubectl("wait", "-n", "seven", "--for=condition=Running", "run/ckpt", "--timeout=30s", timeout=40)
    node = api.get_json("gl", "-n", "seven")["items"][0]["spec"]["slots"][0]["node"]
    api.set_node_ready(node, False)
    assert "Requeued" in poll_until("a Requeued event", lambda: {
        e["reason"] for e in api.get_json("events", "-n", "seven")["items"]} & {"Requeued"})
    api.kubectl("wait", "-n", "seven", "--for=condition=Running", "run/ckpt", "--timeout=30s", timeout=40)
    open_ = [x for x in api.get_json("gl", "-n", "seven")["items"] if not x.get("status", {}).get("end")]
    assert len(open_) == 1 and open_[0]["spec"]["slots"][0]["node"] != node


def test_a_killed_bridge_converges_and_decides_nothing_twice(env: tuple[StandIn, UpProcess]) -> None:
    api, up = env
    _flavored(api, "F4", {f"f4-{i}": "d4" for i in range(4)})
    api.apply(budget("four", "org:four", [{"name": "pool", "flavor": "F4", "concurrency": 32}]),
              namespace("four", "org:four"))
    runs = []
    for i in range(8):
        runs.append(run(f"r{i}", "four", 4, flavor="F4"))
    pid = int(up.state()["services"]["kube-bridge"])
    api.apply(*runs[:4])
    os.kill(pid, signal.SIGKILL)  # mid-stream: some of these may be sent, some not
    api.apply(*runs[4:])
    poll_until("a new bridge", lambda: int(up.state()["services"]["kube-bridge"]) != pid)
    for i in range(8):
        api.kubectl("wait", "-n", "four", "--for=condition=Running", f"run/r{i}", "--timeout=40s", timeout=50)
    specs = _run_specs(up)
    assert [specs[f"four/r{i}"] for i in range(8)] == [1] * 8, specs
    leases = [x for x in api.get_json("gl", "-n", "four")["items"]]
    assert Counter(x["spec"]["runRef"] for x in leases) == Counter({f"r{i}": 1 for i in range(8)})
    assert json.loads((up.data_dir / "up.json").read_text())["restarts"].get("kube-bridge", 0) >= 1


def test_deleting_a_run_object_deletes_the_run_and_its_pods(env: tuple[StandIn, UpProcess]) -> None:
    api, up = env
    _flavored(api, "F5", {"f5-a": "d5"})
    spec = run("gone", "five", 8, roles=WORKER, flavor="F5")
    api.apply(budget("five", "org:five", [{"name": "pool", "flavor": "F5", "concurrency": 8}]),
              namespace("five", "org:five"), spec)
    api.kubectl("wait", "-n", "five", "--for=condition=Running", "run/gone", "--timeout=30s", timeout=40)
    poll_until("its pod", lambda: _pods(api, "five"))
    api.kubectl("delete", "run", "gone", "-n", "five")
    poll_until("the run deleted in jobtree", lambda: any(
        e.WhichOneof("fact") == "spec_deleted" and e.spec_deleted.run.name == "gone" for e in up.ledger_entries()))
    poll_until("its pods gone", lambda: not _pods(api, "five"))


def test_an_invalid_run_is_refused_with_the_field_path(env: tuple[StandIn, UpProcess]) -> None:
    api, _ = env
    api.apply(namespace("six", "org:six"))
    bad = run("bad", "six", 0)
    api.apply(bad, run("badroles", "six", 8, roles=[{"name": "Worker!", "template": {}}]))
    refused = poll_until("refused", lambda: _condition(_run(api, "six", "bad"), "Admitted") or None)
    assert refused["status"] == "False" and refused["reason"] == "Invalid" and "totalGPUs" in refused["message"]
    roles = poll_until("roles refused", lambda: _condition(_run(api, "six", "badroles"), "Admitted") or None)
    assert "spec.roles[0].name" in roles["message"]


def test_funded_work_reserves_then_the_lottery_preempts_with_its_seed(env: tuple[StandIn, UpProcess]) -> None:
    """Funded work holds the GPUs: a later funded run reserves, and at its earliest start the cut
    order's lottery preempts the holder (the seed in its condition and Event)."""
    api, up = env
    _flavored(api, "F8", {"f8-a": "d8", "f8-b": "d8"})
    api.apply(budget("eight", "org:eight", [{"name": "pool", "flavor": "F8", "concurrency": 16}]),
              budget("eight-other", "org:other", [{"name": "pool", "flavor": "F8", "concurrency": 16}]),
              namespace("eight", "org:eight,org:other"),
              run("holder", "eight", 16, group=8, owner="org:other", flavor="F8"))
    api.kubectl("wait", "-n", "eight", "--for=condition=Running", "run/holder", "--timeout=30s", timeout=40)
    api.apply(run("main", "eight", 16, group=8, owner="org:eight", flavor="F8"))
    waited = api.kubectl("wait", "-n", "eight", "--for=condition=Reserved", "run/main", "--timeout=30s", timeout=40,
                         check=False)
    if waited.returncode != 0:  # say what the run and the bridge were doing
        pytest.fail(f"main never Reserved: {waited.stderr}\nstatus: {_run(api, 'eight', 'main').get('status')}\n"
                    f"bridge: {up.log('kube-bridge')[-3000:]}")
    reserved = _run(api, "eight", "main")["status"]
    res = poll_until("its Reservation object", lambda: api.get_json("reservations", "-n", "eight")["items"])
    assert res[0]["spec"]["runRef"] == "main" and res[0]["spec"]["deficitGPUs"] == 16
    assert reserved["expectedAt"] == res[0]["spec"]["earliestStart"]
    api.kubectl("wait", "-n", "eight", "--for=condition=Running", "run/main", "--timeout=40s", timeout=50)
    assert _run(api, "eight", "main")["status"]["funding"] == "16 owned"
    preempted = poll_until("holder preempted", lambda: _condition(_run(api, "eight", "holder"), "Preempted")
                           if _condition(_run(api, "eight", "holder"), "Preempted").get("status") == "True" else None)
    assert "RandomPreempt(" in preempted["message"]
    events = poll_until("the Reserved and Preempted events", lambda: [
        e for e in api.get_json("events", "-n", "eight")["items"]] if {"Reserved", "Preempted"} <= {
        e["reason"] for e in api.get_json("events", "-n", "eight")["items"]} else None)
    seeded = [e for e in events if e["reason"] == "Preempted"]
    assert all("seed " in e["message"] and e["involvedObject"]["name"] == "holder" for e in seeded)
    assert poll_until("the reservation released", lambda: [
        r for r in api.get_json("reservations", "-n", "eight")["items"] if r.get("status", {}).get("state") == "Released"])


def test_unfunded_work_is_reclaimed_at_once_for_later_funded_work(env: tuple[StandIn, UpProcess]) -> None:
    api, _ = env
    _flavored(api, "F11", {"f11-a": "d11", "f11-b": "d11"})
    api.apply(budget("eleven", "org:eleven", [{"name": "pool", "flavor": "F11", "concurrency": 16}]),
              namespace("eleven", "org:eleven,org:stray"),
              run("opp", "eleven", 16, group=8, owner="org:stray", flavor="F11"))
    api.kubectl("wait", "-n", "eleven", "--for=condition=Running", "run/opp", "--timeout=30s", timeout=40)
    assert _run(api, "eleven", "opp")["status"]["funding"] == "16 unfunded"
    time.sleep(1.1)  # a later instant: runs of one instant are decided together (the simulator agrees)
    api.apply(run("main", "eleven", 16, group=8, owner="org:eleven", flavor="F11"))
    api.kubectl("wait", "-n", "eleven", "--for=condition=Running", "run/main", "--timeout=30s", timeout=40)
    assert poll_until("opp preempted", lambda: _condition(_run(api, "eleven", "opp"), "Preempted").get("status")
                      == "True")
    reclaimed = poll_until("a Reclaimed event", lambda: [e for e in api.get_json("events", "-n", "eleven")["items"]
                                                          if e["reason"] == "Reclaimed"])
    assert "seed " in reclaimed[0]["message"] and reclaimed[0]["involvedObject"]["name"] == "opp"


def test_a_recall_shows_in_the_borrowers_status(env: tuple[StandIn, UpProcess]) -> None:
    """A lender's own claim turns what a run borrowed unfunded with no fact about that run: its
    status must follow anyway."""
    api, _ = env
    _flavored(api, "F9", {"f9-a": "d9", "f9-b": "d9", "f9-c": "d9"})
    api.apply(budget("nine", "org:nine", [{"name": "pool", "flavor": "F9", "concurrency": 8}]),
              budget("nine-team", "org:nine:team", [{"name": "main", "flavor": "F9", "concurrency": 8}],
                     parents=["org:nine"]),
              namespace("nine", "org:nine:team"), namespace("nine-lead", "org:nine"),
              run("r1", "nine", 16, group=8, flavor="F9"))
    api.kubectl("wait", "-n", "nine", "--for=condition=Running", "run/r1", "--timeout=30s", timeout=40)
    assert poll_until("r1 funded by the family", lambda: _run(api, "nine", "r1")["status"]["funding"]
                      if _run(api, "nine", "r1")["status"].get("funding") == "8 owned, 8 shared" else None)
    api.apply(run("p1", "nine-lead", 8, group=8, flavor="F9"))
    api.kubectl("wait", "-n", "nine-lead", "--for=condition=Running", "run/p1", "--timeout=30s", timeout=40)
    poll_until("r1's status shows the recall", lambda: _run(api, "nine", "r1")["status"].get("funding")
               == "8 owned, 8 unfunded")


def test_a_failed_pod_fails_the_run_and_its_other_pods_stop(env: tuple[StandIn, UpProcess]) -> None:
    api, _ = env
    _flavored(api, "F10", {"f10-a": "d10", "f10-b": "d10"})
    api.apply(budget("ten", "org:ten", [{"name": "pool", "flavor": "F10", "concurrency": 16}]),
              namespace("ten", "org:ten"), run("crash", "ten", 16, group=8, roles=WORKER, flavor="F10"))
    api.kubectl("wait", "-n", "ten", "--for=condition=Running", "run/crash", "--timeout=30s", timeout=40)
    pods = poll_until("two pods", lambda: _pods(api, "ten") if len(_pods(api, "ten")) == 2 else None)
    api.set_pod_phase("ten", pods[0]["metadata"]["name"], "Failed")
    api.kubectl("wait", "-n", "ten", "--for=condition=Failed", "run/crash", "--timeout=30s", timeout=40)
    left = poll_until("the running pod deleted, the failed one kept", lambda: [p["metadata"]["name"] for p in _pods(api, "ten")]
                      if len(_pods(api, "ten")) == 1 else None)
    assert left == [pods[0]["metadata"]["name"]], "a finished pod stays for its logs; a running one is stopped"
    closed = Counter(x.get("status", {}).get("closureReason") for x in api.get_json("gl", "-n", "ten")["items"])
    assert closed["RunFailed"] == 2

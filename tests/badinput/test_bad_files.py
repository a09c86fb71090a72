"""Bad files given to `jobtree` (a real process): scenario files, cluster config files, the
notifier's config, access policies, `jobtree up`'s options.

Each case: exit status 2, exactly one stderr line `jobtree: <the message>`, no traceback, and
nothing made: no stdout, and for `up` no data directory written beyond the lock it takes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cases import CommandCase as Case
from cases import ids

REPO = Path(__file__).resolve().parents[2]

SCENARIO = """\
start: "2026-01-05T00:00:00Z"
config: {cluster: gpu-a}
nodes:
  - generate: {prefix: a-, count: 2, gpus: 8, labels: {region: us, cluster: gpu-a, fabric.domain: A, gpu.flavor: H100-80GB}}
steps:
  - at: 0s
    apply:
      - apiVersion: rq.davidlangworthy.io/v1
        kind: Run
        metadata: {name: r1}
        spec: {owner: org:a, resources: {gpuType: H100-80GB, totalGPUs: 8}}
"""


def sim(content: str) -> tuple[tuple[str, ...], str]:
    return ("sim", "run", "FILE"), content


CASES = [
    Case("scenario-not-yaml", *sim("start: [\n"),
         "invalid YAML: line 2, column 1: expected the node content, but found '<stream end>'"),
    Case("scenario-empty", *sim(""),
         'scenario: the file is empty; expected a mapping with start, nodes and steps'),
    Case("scenario-unknown-key", *sim(SCENARIO + "extras: 1\n"),
         'extras: unknown top-level key; allowed: start, config, nodes, steps'),
    Case("scenario-bad-start", *sim(SCENARIO.replace('"2026-01-05T00:00:00Z"', "yesterday")),
         "start: must be an RFC3339 time such as 2026-01-05T00:00:00Z, got 'yesterday'"),
    Case("scenario-negative-step", *sim(SCENARIO.replace("at: 0s", "at: -5m")),
         "steps[0].at: must not be negative, got '-5m'"),
    Case("scenario-unknown-action", *sim(SCENARIO.replace("apply:", "launch:")),
         'steps[0].launch: unknown step key; a step has `at` and one of: apply, complete, fail, '
         'failNode, cordon, uncordon, delete, shrink, eta, snapshot'),
    Case("scenario-zero-node-count", *sim(SCENARIO.replace("count: 2", "count: 0")),
         'nodes[0].generate.count: must be a positive integer, got 0'),
    Case("scenario-bad-run", *sim(SCENARIO.replace("totalGPUs: 8", "totalGPUs: -8")),
         'steps[0].apply[0].spec.resources.totalGPUs: must be a positive integer, got -8'),
    Case("config-unknown-key", ("serve", "admission", "--config", "FILE"), "colour: red\n",
         'TMP/input.yaml: config.colour: unknown config key; allowed: cluster, period, '
         'reservationLead, preemptionHoldDown, capAllowances'),
    Case("config-bad-period", ("serve", "admission", "--config", "FILE"), "period: soon\n",
         'TMP/input.yaml: config.period: must be a duration such as 15m or 1h30m (units h, m, s), '
         "got 'soon'"),
    Case("config-other-cluster", ("serve", "admission", "--cluster", "a", "--config", "FILE"), "cluster: b\n",
         "TMP/input.yaml: config.cluster is 'b' but --cluster is 'a'"),
    Case("notifier-config-not-a-mapping", ("serve", "notifier", "--config", "FILE"), "- a\n- b\n",
         '--config TMP/input.yaml: must be a mapping, got list'),
    Case("notifier-route-to-nobody", ("serve", "notifier", "--config", "FILE"),
         "receivers: [{name: w, webhook: {url: 'http://127.0.0.1:9/'}}]\nroutes: [{receiver: x}]\n",
         "--config TMP/input.yaml: routes[0].receiver: no receiver named 'x'; receivers: w"),
    Case("policy-bad-role", ("auth", "policy-check", "FILE"),
         "apiVersion: rq.davidlangworthy.io/v1\nkind: AccessPolicy\nspec:\n  identities:\n"
         "  - {name: a, grants: [{role: root}]}\n",
         'TMP/input.yaml: spec.identities[0].grants[0].role: must be one of researcher, '
         "budget-owner, operator, got 'root'"),
    Case("up-config-unknown-key", ("up", "--data-dir", "DIR", "--config", "FILE"), "colour: red\n",
         'TMP/input.yaml: config.colour: unknown config key; allowed: cluster, period, '
         'reservationLead, preemptionHoldDown, capAllowances'),
    Case("up-insecure-and-client-certs", ("up", "--data-dir", "DIR", "--insecure", "--client-certs"), "",
         '--client-certs needs TLS: leave out --insecure'),
    Case("up-notify-bad", ("up", "--data-dir", "DIR", "--notify", "FILE"), "receivers: 5\n",
         '--notify TMP/input.yaml: receivers: required: a list of at least one receiver'),
    Case("gateway-without-tls", ("serve", "gateway"), "",
         'the gateway needs TLS and an access policy (JOBTREE_GRPC_TLS_CERT, JOBTREE_GRPC_TLS_KEY, '
         'JOBTREE_POLICY), or JOBTREE_GRPC_INSECURE=1 to serve plain gRPC on loopback without '
         'identities'),
    Case("admission-bad-snapshot-setting", ("serve", "admission"), "",
         'JOBTREE_SNAPSHOT_EVERY must be a whole number of ledger messages (0 turns snapshots off), '
         "got 'often'"),
]

ENV = {"gateway-without-tls": {}, "admission-bad-snapshot-setting": {"JOBTREE_SNAPSHOT_EVERY": "often"}}


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_bad_file(case: Case, tmp_path: Path) -> None:
    path = tmp_path / "input.yaml"
    path.write_text(case.content)
    data = tmp_path / "data"
    args = [str(path) if a == "FILE" else str(data) if a == "DIR" else a for a in case.args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBTREE_")}
    env.update(ENV.get(case.id, {}))
    proc = subprocess.run([sys.executable, "-m", "jobtree.cli.main", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("jobtree: "), proc.stderr
    shown = lines[0].removeprefix("jobtree: ").replace(str(tmp_path), "TMP")
    assert shown == case.message
    assert not data.exists() or {p.name for p in data.iterdir()} <= {"up.lock"}, "a refused up made files"

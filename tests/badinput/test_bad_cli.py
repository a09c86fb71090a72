"""Bad manifests and bad arguments to `kubectl-runs` (a real process) against a real system.

Each case: exit status 2, exactly one stderr line `kubectl-runs: <the message>`, no traceback,
and the ledger's last sequence and the gateway's runs and budgets as they were.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cases import CommandCase as Case
from cases import ids
from test_bad_grpc import seen
from test_gateway import System
from test_kubectl_runs import kubectl_runs, one_line_error

RUN = """\
apiVersion: rq.davidlangworthy.io/v1
kind: Run
metadata: {name: trainer}
spec: {owner: org:a, resources: {gpuType: H100-80GB, totalGPUs: 8}}
"""


def submit(content: str) -> tuple[tuple[str, ...], str]:
    return ("submit", "-f", "FILE"), content


CASES = [
    Case("manifest-not-yaml", *submit("kind: Run\n  metadata: [\n"),
         'TMP/input.yaml: invalid YAML: line 2, column 11: mapping values are not allowed here'),
    Case("manifest-empty", *submit(""),
         'TMP/input.yaml: no manifest in the file'),
    Case("manifest-unknown-kind", *submit(RUN.replace("kind: Run", "kind: Job")),
         "TMP/input.yaml: kind: must be Budget or Run, got 'Job'"),
    Case("manifest-wrong-api-version", *submit(RUN.replace("rq.davidlangworthy.io/v1", "batch/v1")),
         "TMP/input.yaml: apiVersion: must be rq.davidlangworthy.io/v1, got 'batch/v1'"),
    Case("manifest-no-name", *submit(RUN.replace("{name: trainer}", "{}")),
         'TMP/input.yaml: metadata.name: is required'),
    Case("manifest-unknown-field", *submit(RUN.replace("owner: org:a,", "owner: org:a, colour: red,")),
         "TMP/input.yaml: spec.colour: unknown field 'colour'; allowed here: owner, resources, "
         'locality, sparesPerGroup, malleable, funding, follow, runtime, roles'),
    Case("manifest-gpus-a-string", *submit(RUN.replace("totalGPUs: 8", "totalGPUs: eight")),
         "TMP/input.yaml: spec.resources.totalGPUs: must be an integer, got 'eight'"),
    Case("manifest-second-document-bad", *submit(RUN + "---\n" + RUN.replace("gpuType: H100-80GB", "gpuType: ''")),
         'TMP/input.yaml[1]: spec.resources.gpuType: must be a GPU flavor such as H100-80GB: a '
         "non-empty string without whitespace; got ''"),
    Case("manifest-json-list-bad-item", *submit('[{"apiVersion": "rq.davidlangworthy.io/v1", "kind": "Run"}]'),
         'TMP/input.yaml: metadata: is required'),
    Case("manifest-missing-file", ("submit", "-f", "/nonexistent/run.yaml"), "",
         '/nonexistent/run.yaml: no such file'),
    Case("shrink-to-zero", ("shrink", "trainer", "--to", "0"), "",
         'desiredTotalGPUs: must be a positive integer, got 0'),
    Case("timeout-negative", ("get", "--timeout", "-1"), "",
         '--timeout: must be a positive number of seconds, got -1'),
    Case("local-without-state", ("get", "--local"), "",
         '--local needs --state FILE (a scenario file to play and append to)'),
    Case("unknown-command", ("launch",), "",
         "argument COMMAND: invalid choice: 'launch' (choose from 'submit', 'plan', 'get', 'watch', "
         "'explain', 'budgets', 'global', 'sponsors', 'shrink', 'leases', 'top', 'events', 'pods', 'complete', "
         "'fail', 'delete', 'completions') (see `kubectl-runs --help`)"),
    Case("global-usage-local", ("global", "usage", "--local", "--state", "FILE"), "",
         "global usage: the simulator plays one cluster; ask a gateway whose cluster is joined to a federation "
         "(without --local)"),
    Case("certificate-without-key", ("get", "--client-certificate", "FILE"), "-----BEGIN CERTIFICATE-----\n",
         '--client-certificate and --client-key go together (a certificate needs its key)'),
    Case("config-unknown-key", ("get", "--config", "FILE"), "server: 127.0.0.1:1\ncolour: red\n",
         'TMP/input.yaml: colour: unknown key; allowed: server, token, tokenFile, '
         'certificateAuthority, clientCertificate, clientKey'),
]


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_bad_cli_input(system: System, case: Case, tmp_path: Path) -> None:
    stub = system.stub()
    before = seen(system, stub)
    path = tmp_path / "input.yaml"
    path.write_text(case.content)
    args = [str(path) if a == "FILE" else a for a in case.args]
    line = one_line_error(kubectl_runs(*args, "--server", system.address), 2)
    shown = line.replace(str(tmp_path), "TMP").removeprefix("kubectl-runs: ")
    assert shown == case.message
    assert seen(system, stub) == before, "a refused command changed the ledger or the state"

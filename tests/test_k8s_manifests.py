"""The Kubernetes deployment: every overlay of infra/k8s renders (kubectl kustomize), validates
against Kubernetes 1.30 schemas (kubernetes-validate) and the KServe CRDs, and keeps its security,
scheduling and network promises; `xrayops deploy` merges in the compiled pipeline."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import K8S_SCHEMAS
from xrayops.config import Settings
from tests.crd_schemas import crd_validator
from xrayops import deploy

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
OVERLAYS = ("local", "gpu-cloud")
KUBERNETES_VERSION = "1.30.0"  # the oldest minor the manifests target (KServe 0.15+ needs >= 1.29)
SERVING = K8S / "base" / "serving"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job", "CronJob", "DaemonSet", "Pod"}
LONG_RUNNING = {"Deployment", "StatefulSet", "DaemonSet"}
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$|ACCESS_KEY", re.IGNORECASE)
GATEWAY_NAMESPACE = "istio-system"

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")


@pytest.fixture(scope="module")
def k8s_dir() -> Path:
    return K8S


@pytest.fixture(scope="module")
def rendered(k8s_dir) -> dict[str, list[dict]]:
    return {name: deploy.parse_manifests(deploy.render(k8s_dir, name, default_image="unused:0")) for name in OVERLAYS}


def _workloads(docs):
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def _embedded_pipeline(docs) -> list[dict]:
    config = deploy.find(docs, "ConfigMap", deploy.PIPELINE_CONFIG_MAP)
    return list(yaml.safe_load_all(config["data"][deploy.PIPELINE_KEY]))


# --- rendering ---------------------------------------------------------------------------------


def test_every_overlay_renders_the_whole_platform(rendered):
    expected = {
        ("Deployment", "mlflow"), ("StatefulSet", "mlflow-postgres"), ("Deployment", "feast"),
        ("Deployment", "feast-redis"), ("Deployment", "evidently-ui"), ("CronJob", "xrayops-monitor"),
        ("ServiceAccount", "xrayops-pipeline-runner"), ("ServiceAccount", "xrayops-monitor"),
        ("ConfigMap", "xrayops-config"), ("ConfigMap", "xrayops-pipeline"), ("NetworkPolicy", "default-deny-ingress"),
    }
    for name, docs in rendered.items():
        present = {(d["kind"], d["metadata"]["name"]) for d in docs}
        assert expected <= present, (name, expected - present)
        namespaced = [d for d in docs if d["kind"] not in {"Namespace", "ClusterRole", "ClusterRoleBinding"}]
        assert {d["metadata"].get("namespace") for d in namespaced} == {"xrayops"}, name
        assert any(d["kind"] == "InferenceService" for d in docs), name
    # Storage: MinIO in-cluster locally; the cloud overlay uses the provider's S3.
    assert ("Deployment", "minio") in {(d["kind"], d["metadata"]["name"]) for d in rendered["local"]}
    assert not any(d["metadata"]["name"].startswith("minio") for d in rendered["gpu-cloud"])
    local_cfg = deploy.find(rendered["local"], "ConfigMap", "xrayops-config")["data"]
    cloud_cfg = deploy.find(rendered["gpu-cloud"], "ConfigMap", "xrayops-config")["data"]
    assert local_cfg["XRAYOPS_S3_ENDPOINT_URL"] == "http://minio.xrayops.svc.cluster.local:9000"
    assert "XRAYOPS_S3_ENDPOINT_URL" not in cloud_cfg
    for cfg in (local_cfg, cloud_cfg):  # DVC remote, MLflow artifacts, pipeline root: all on S3
        assert cfg["XRAYOPS_DVC_REMOTE_URL"].startswith("s3://")
        assert cfg["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")


def test_unknown_overlay_is_a_clear_error(k8s_dir):
    with pytest.raises(deploy.DeployError, match=r"no overlay 'prod'.*known: gpu-cloud, local"):
        deploy.render(k8s_dir, "prod", default_image="x:1")


# --- schemas -----------------------------------------------------------------------------------


def test_core_kinds_validate_against_kubernetes_schemas(rendered):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    errors, checked = [], 0
    for name, docs in rendered.items():
        for doc in docs:
            if "." in doc["apiVersion"].split("/")[0] and not doc["apiVersion"].startswith(
                ("apps/", "batch/", "networking.k8s.io/", "rbac.authorization.k8s.io/", "policy/")
            ):
                continue  # CRD kinds: next test
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
                checked += 1
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"{name} {doc['kind']}/{doc['metadata']['name']}: {str(exc).splitlines()[0]}")
    assert errors == []
    assert checked > 50


def test_kserve_kinds_validate_against_crd_schemas(rendered):
    if not K8S_SCHEMAS.is_dir():
        pytest.skip(f"{K8S_SCHEMAS} is absent: no KServe CRD schemas to validate against")
    kserve = [(n, d) for n, docs in rendered.items() for d in docs if d["apiVersion"].startswith("serving.kserve.io/")]
    assert {d["kind"] for _, d in kserve} >= {"InferenceService", "InferenceGraph", "ServingRuntime"}
    errors = []
    for name, doc in kserve:
        group, version = doc["apiVersion"].split("/")
        errors += [f"{name} {doc['kind']}/{doc['metadata']['name']}: {e.message}" for e in
                   crd_validator(doc["kind"], group, version).iter_errors({**doc, "metadata": {}})]
    assert errors == []


# --- security ----------------------------------------------------------------------------------


def _env_vars(node):
    """Every container env entry anywhere (workloads, KServe InferenceServices, ServingRuntimes)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield from value
            else:
                yield from _env_vars(value)
    elif isinstance(node, list):
        for item in node:
            yield from _env_vars(item)


def _secret_refs(docs) -> set[tuple[str, str]]:
    refs = set()
    for env in _env_vars(docs):
        ref = (env.get("valueFrom") or {}).get("secretKeyRef")
        if ref:
            refs.add((ref["name"], ref["key"]))
    return refs


def test_no_plaintext_secrets(rendered, k8s_dir):
    for name, docs in rendered.items():
        assert not [d for d in docs if d["kind"] == "Secret"], f"{name}: Secrets are created out of band"
        for doc in docs:
            for env in _env_vars(doc):
                if SECRETISH.search(env["name"]):
                    assert "value" not in env, f"{name} {doc['metadata']['name']}: {env['name']} in plain text"
        text = deploy.dump_manifests(docs)
        assert "xrayops-dev-key-change-me" not in text  # Settings' development de-id key
        for doc in docs:
            if doc["kind"] == "ConfigMap":
                assert not [k for k in doc.get("data", {}) if SECRETISH.search(k)], (name, doc["metadata"]["name"])
        # The three out-of-band Secrets, referenced by name and key.
        assert {("xrayops-s3", "AWS_ACCESS_KEY_ID"), ("xrayops-s3", "AWS_SECRET_ACCESS_KEY"),
                ("xrayops-db", "username"), ("xrayops-db", "password")} <= _secret_refs(docs)
        # The de-identification key reaches only the pipeline's ingest tasks.
        spec, platform = _embedded_pipeline(docs)[:2]
        executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        with_deid = {
            ex for ex, cfg in executors.items()
            if any(s["secretNameParameter"]["runtimeValue"]["constant"] == "xrayops-deid" for s in cfg.get("secretAsEnv", []))
        }
        assert with_deid == {"exec-ingest-op", "exec-ingest-op-2"}
        assert set(executors) == set(spec["deploymentSpec"]["executors"])  # every task gets config + S3 creds


def test_local_secret_generator_provides_every_referenced_secret(rendered, tmp_path):
    """The git-ignored env files of overlays/local/secrets cover every secretKeyRef and the pipeline's Secrets."""
    src = K8S / "overlays" / "local" / "secrets"
    dst = tmp_path / "secrets"
    shutil.copytree(src, dst)
    for example in dst.glob("*.env.example"):
        example.rename(example.with_name(example.name.removesuffix(".example")))
    secrets = deploy.parse_manifests(deploy.kustomize(dst))
    provided = {(s["metadata"]["name"], k) for s in secrets for k in s["data"]}
    assert {s["metadata"]["namespace"] for s in secrets} == {"xrayops"}
    assert _secret_refs(rendered["local"]) <= provided
    assert ("xrayops-deid", "key") in provided
    assert "*.env" in (src / ".gitignore").read_text().split()  # the filled-in files stay out of git


def test_workloads_run_non_root_read_only_with_limits_and_probes(rendered):
    problems = []
    for name, docs in rendered.items():
        for doc in _workloads(docs):
            spec, label = deploy.pod_spec(doc), f"{name} {doc['kind']}/{doc['metadata']['name']}"
            pod_ctx = spec.get("securityContext") or {}
            if spec.get("serviceAccountName") in (None, "default"):
                problems.append(f"{label}: runs as the default ServiceAccount")
            for c in deploy.containers(doc):
                ctx = c.get("securityContext") or {}
                where = f"{label} [{c['name']}]"
                if not (ctx.get("runAsNonRoot") or pod_ctx.get("runAsNonRoot")):
                    problems.append(f"{where}: not runAsNonRoot")
                if ctx.get("allowPrivilegeEscalation") is not False:
                    problems.append(f"{where}: privilege escalation allowed")
                if ctx.get("readOnlyRootFilesystem") is not True:
                    problems.append(f"{where}: writable root filesystem")
                if (ctx.get("capabilities") or {}).get("drop") != ["ALL"]:
                    problems.append(f"{where}: capabilities not dropped")
                res = c.get("resources") or {}
                for kind in ("requests", "limits"):
                    if not {"cpu", "memory"} <= set(res.get(kind) or {}):
                        problems.append(f"{where}: no cpu/memory {kind}")
                is_init = c in (spec.get("initContainers") or [])
                if doc["kind"] in LONG_RUNNING and not is_init:
                    if not (c.get("livenessProbe") and c.get("readinessProbe")):
                        problems.append(f"{where}: missing liveness/readiness probe")
            if pod_ctx.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                problems.append(f"{label}: no RuntimeDefault seccomp profile")
    assert problems == []


def test_rbac_is_namespaced_and_least_privilege(rendered):
    for name, docs in rendered.items():
        assert not [d for d in docs if d["kind"] in {"ClusterRole", "ClusterRoleBinding"}], name
        roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Role"}
        for role in roles.values():
            for rule in role["rules"]:
                assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], role["metadata"]["name"]
        monitor = roles["xrayops-monitor"]["rules"]
        assert {g for r in monitor for g in r["apiGroups"]} == {"pipelines.kubeflow.org"}  # KFP runs, no k8s API
        assert {(res, v) for r in monitor for res in r["resources"] for v in r["verbs"] if v == "create"} == {
            ("experiments", "create"), ("runs", "create")
        }
        runner_secrets = [r for r in roles["xrayops-pipeline-runner"]["rules"] if "secrets" in r["resources"]]
        assert runner_secrets and all(r.get("resourceNames") == ["xrayops-s3"] for r in runner_secrets)
        # The release step may read and replace the region InferenceService, nothing else of KServe's.
        kserve = [r for r in roles["xrayops-pipeline-runner"]["rules"] if r["apiGroups"] == ["serving.kserve.io"]]
        assert kserve == [{"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"],
                           "resourceNames": ["xrayops-region"], "verbs": ["get", "update"]}]
        isvc = deploy.find(docs, "InferenceService", "xrayops-region")
        config = deploy.find(docs, "ConfigMap", "xrayops-config")["data"]
        assert config["XRAYOPS_INFERENCE_SERVICE"] == isvc["metadata"]["name"]
        assert config["XRAYOPS_SERVING_NAMESPACE"] == isvc["metadata"]["namespace"]
        assert config["XRAYOPS_RELEASE_STORAGE_URI"].startswith("s3://xrayops-models/")
        bindings = {d["metadata"]["name"]: d for d in docs if d["kind"] == "RoleBinding"}
        for sa in ("xrayops-monitor", "xrayops-pipeline-runner"):
            assert bindings[sa]["roleRef"]["name"] == sa and bindings[sa]["subjects"][0]["name"] == sa
        # Only these two talk to an API server; the monitor by a KFP-audience projected token.
        mounting = {
            d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount" and d.get("automountServiceAccountToken") is not False
        }
        assert mounting == {"xrayops-pipeline-runner"}
        cron = deploy.pod_spec(deploy.find(docs, "CronJob", "xrayops-monitor"))
        (token,) = [v for v in cron["volumes"] if v["name"] == "kfp-token"]
        assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"


# --- network policies --------------------------------------------------------------------------


def _matches(selector: dict | None, labels: dict) -> bool:
    """Kubernetes label-selector semantics (matchLabels + matchExpressions); {} selects all."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _ingress_allowed(docs, pod_labels: dict, source_labels: dict, source_namespace: str) -> bool:
    """Whether the NetworkPolicies let a source pod reach a pod in `xrayops` (any port)."""
    policies = [
        d for d in docs
        if d["kind"] == "NetworkPolicy" and "Ingress" in d["spec"].get("policyTypes", ["Ingress"])
        and _matches(d["spec"]["podSelector"], pod_labels)
    ]
    if not policies:
        return True
    ns_labels = {"kubernetes.io/metadata.name": source_namespace}
    for policy in policies:
        for rule in policy["spec"].get("ingress") or []:
            for peer in rule.get("from") or [{}]:
                if not peer:
                    return True
                if "namespaceSelector" in peer:
                    ns_ok = _matches(peer["namespaceSelector"], ns_labels)
                else:
                    ns_ok = source_namespace == "xrayops"
                if ns_ok and ("podSelector" not in peer or _matches(peer["podSelector"], source_labels)):
                    return True
    return False


PREDICTOR = {"serving.kserve.io/inferenceservice": "xrayops-region", "component": "predictor"}
TRANSFORMER = {"serving.kserve.io/inferenceservice": "xrayops-region", "component": "transformer"}
MLFLOW = {"app.kubernetes.io/name": "mlflow"}
FEAST = {"app.kubernetes.io/name": "feast"}
GATEWAY_POD = {"app": "istio-ingressgateway"}
ROUTER = {"serving.kserve.io/inferencegraph": "xrayops-region-graph"}
COMBINER = {"serving.kserve.io/inferenceservice": "xrayops-ensemble-combiner", "component": "predictor"}


def test_network_policies_isolate_predictor_transformer_and_stores(rendered):
    for name, docs in rendered.items():
        deny = deploy.find(docs, "NetworkPolicy", "default-deny-ingress")
        assert deny["spec"]["podSelector"] == {} and "ingress" not in deny["spec"]
        ok = lambda target, src, ns="xrayops": _ingress_allowed(docs, target, src, ns)  # noqa: E731
        # Only the transformer reaches the predictor.
        assert ok(PREDICTOR, TRANSFORMER)
        assert not ok(PREDICTOR, MLFLOW) and not ok(PREDICTOR, GATEWAY_POD, GATEWAY_NAMESPACE)
        assert not ok(PREDICTOR, TRANSFORMER, "other")
        # Only the ingress gateway reaches the transformer.
        assert ok(TRANSFORMER, GATEWAY_POD, GATEWAY_NAMESPACE)
        assert not ok(TRANSFORMER, MLFLOW) and not ok(TRANSFORMER, PREDICTOR) and not ok(TRANSFORMER, {}, "default")
        # The InferenceGraph router: reached from the gateway only; it reaches the members'
        # transformers and the combiner, never a member's predictor.
        assert ok(ROUTER, GATEWAY_POD, GATEWAY_NAMESPACE) and not ok(ROUTER, MLFLOW)
        assert ok(TRANSFORMER, ROUTER) and ok(COMBINER, ROUTER) and not ok(PREDICTOR, ROUTER)
        assert not ok(COMBINER, MLFLOW) and not ok(COMBINER, GATEWAY_POD, GATEWAY_NAMESPACE)
        # The inference-log sink: only the predictors' payload loggers, never a transformer (DICOM).
        sink = {"app.kubernetes.io/name": "xrayops-inference-log"}
        assert ok(sink, PREDICTOR) and ok(sink, {**COMBINER, "serving.kserve.io/inferenceservice": "xrayops-member-byol"})
        assert not ok(sink, TRANSFORMER) and not ok(sink, MLFLOW) and not ok(sink, GATEWAY_POD, GATEWAY_NAMESPACE)
        assert not ok(sink, ROUTER) and not ok(sink, PREDICTOR, "other")
        # Stores: Postgres only from MLflow, Redis only from the feature server.
        assert ok({"app.kubernetes.io/name": "mlflow-postgres"}, MLFLOW)
        assert not ok({"app.kubernetes.io/name": "mlflow-postgres"}, FEAST)
        assert ok({"app.kubernetes.io/name": "feast-redis"}, FEAST)
        assert not ok({"app.kubernetes.io/name": "feast-redis"}, MLFLOW)
        assert ok(MLFLOW, {"app": "anything-in-namespace"}) and not ok(MLFLOW, {}, "default")
    # KFP standalone runs pipeline pods in `kubeflow`: the local overlay lets them reach MLflow.
    assert _ingress_allowed(rendered["local"], MLFLOW, {}, "kubeflow")
    assert not _ingress_allowed(rendered["gpu-cloud"], MLFLOW, {}, "kubeflow")
    # The policies' labels are the ones the workloads carry.
    for doc in _workloads(rendered["local"]):
        spec = doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]
        assert spec["template"]["metadata"]["labels"].get("app.kubernetes.io/name"), doc["metadata"]["name"]


# --- GPU scheduling and the pipeline -----------------------------------------------------------


def test_gpu_scheduling_lives_in_the_gpu_cloud_overlay_only(rendered):
    base_files = [p for p in (K8S / "base").rglob("*.yaml") if SERVING not in p.parents]
    assert not [p for p in base_files if "nvidia.com/gpu" in p.read_text()]
    assert "nvidia.com/gpu" not in deploy.dump_manifests(rendered["local"])
    cloud = rendered["gpu-cloud"]
    spec, platform = _embedded_pipeline(cloud)[:2]
    gpu_exec = {
        n for n, e in spec["deploymentSpec"]["executors"].items()
        if e["container"].get("resources", {}).get("accelerator", {}).get("resourceType") == "nvidia.com/gpu"
    }
    assert gpu_exec == {"exec-pretrain-op", "exec-finetune-op"}
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for ex in gpu_exec:
        assert k8s[ex]["nodeSelector"]["labels"] == {"xrayops.io/pool": "gpu"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in k8s[ex]["tolerations"]
    for ex in set(k8s) - gpu_exec:
        assert "nodeSelector" not in k8s[ex] and "tolerations" not in k8s[ex]
    isvcs = {d["metadata"]["name"]: d for d in cloud if d["kind"] == "InferenceService"}
    combiner = isvcs.pop("xrayops-ensemble-combiner", None)
    if combiner:  # it averages softmax outputs: no GPU
        assert "nodeSelector" not in combiner["spec"]["predictor"]
        assert "nvidia.com/gpu" not in combiner["spec"]["predictor"]["model"]["resources"]["limits"]
    predictors = [d["spec"]["predictor"] for d in isvcs.values()]
    for predictor in predictors:
        assert predictor["nodeSelector"] == {"xrayops.io/pool": "gpu"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in predictor["tolerations"]
        (container,) = [predictor["model"]] if "model" in predictor else predictor["containers"][:1]
        assert container["resources"]["limits"]["nvidia.com/gpu"] in (1, "1")
        assert container["resources"]["requests"].get("nvidia.com/gpu") in (None, 1, "1")
    for doc in cloud:
        if doc["kind"] == "InferenceService" and "transformer" in doc["spec"]:
            assert "nodeSelector" not in doc["spec"]["transformer"]  # DICOM decoding stays on CPU nodes
    assert predictors


def test_pipeline_runs_the_overlays_image(rendered):
    expected = {"local": "ghcr.io/xrayops/xrayops:0.1.0-cpu", "gpu-cloud": "ghcr.io/xrayops/xrayops:0.1.0"}
    for name, docs in rendered.items():
        spec = _embedded_pipeline(docs)[0]
        assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {expected[name]}
        assert deploy.xrayops_image(docs, "unused") == expected[name]
        ours = {c["image"] for d in _workloads(docs) for c in deploy.containers(d) if "ghcr.io/xrayops" in c["image"]}
        assert ours == {expected[name]}
        config = deploy.find(docs, "ConfigMap", deploy.PIPELINE_CONFIG_MAP)["data"]
        assert config["pipelineRoot"].startswith("s3://")


def test_cli_render_with_image_override_and_apply_without_cluster(k8s_dir, tmp_path):
    """`xrayops deploy render --image` re-points every xrayops container and the pipeline; `apply`
    with no reachable cluster exits 2 with a message, not a traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env.update(KUBECONFIG=str(tmp_path / "no-kubeconfig"), XRAYOPS_LOG_LEVEL="WARNING")
    image = "registry.example/ml/xray:2.0"
    out = subprocess.run(
        [sys.executable, "-m", "xrayops.cli", "deploy", "render", "--overlay", "local", "--k8s-dir", str(k8s_dir),
         "--image", image],
        capture_output=True, text=True, env=env, cwd=ROOT, check=True,
    ).stdout
    docs = deploy.parse_manifests(out)
    assert {c["image"] for d in _workloads(docs) for c in deploy.containers(d) if "xray" in c["image"]} == {image}
    assert "ghcr.io/xrayops" not in out  # KServe transformers and the ServingRuntime too
    spec = _embedded_pipeline(docs)[0]
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {image}

    proc = subprocess.run(
        [sys.executable, "-m", "xrayops.cli", "deploy", "apply", "--overlay", "local", "--k8s-dir", str(k8s_dir), "--dry-run"],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "no Kubernetes cluster reachable" in proc.stderr and "Traceback" not in proc.stderr


def test_kubectl_errors_are_explained():
    refused = 'error: error validating "STDIN": failed to download openapi: Get "http://localhost:8080/openapi/v2": dial tcp 127.0.0.1:8080: connect: connection refused'
    assert deploy.explain_kubectl_error(refused).startswith("no Kubernetes cluster reachable")
    forbidden = 'Error from server (Forbidden): deployments.apps "mlflow" is forbidden: User "dev" cannot patch'
    assert deploy.explain_kubectl_error(forbidden) == f"kubectl apply failed: {forbidden}"
    missing_crd = 'error: resource mapping not found for name: "xrayops-region": no matches for kind "InferenceService" in version "serving.kserve.io/v1beta1"'
    assert deploy.explain_kubectl_error(missing_crd).startswith("the cluster lacks a CRD")
    assert deploy.apply_args("client") == ["apply", "-f", "-", "--dry-run=client"]
    assert deploy.apply_args(None) == ["apply", "-f", "-"]
    with pytest.raises(deploy.DeployError, match="--dry-run must be one of"):
        deploy.apply_args("yes")


def test_monitor_cronjob_submits_the_overlays_retraining_pipeline(rendered):
    for name, docs in rendered.items():
        config = deploy.find(docs, "ConfigMap", deploy.PIPELINE_CONFIG_MAP)["data"]
        spec, platform = list(yaml.safe_load_all(config[deploy.RETRAINING_KEY]))[:2]
        assert spec["pipelineInfo"]["name"] == "xrayops-retraining"
        k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        claims = {n for n, e in k8s.items() for m in e.get("pvcMount", [])
                  if m["pvcNameParameter"]["runtimeValue"]["constant"] == deploy.ARCHIVE_PVC}
        assert claims == {"exec-plan-ingest-op", "exec-ingest-part-op"}, name
        assert ("PersistentVolumeClaim", deploy.ARCHIVE_PVC) in {(d["kind"], d["metadata"]["name"]) for d in docs}
        gpu = {n for n, e in spec["deploymentSpec"]["executors"].items() if e["container"].get("resources", {}).get("accelerator")}
        assert gpu == ({"exec-pretrain-op", "exec-finetune-op"} if name == "gpu-cloud" else set()), name
        job = deploy.find(docs, "CronJob", "xrayops-monitor")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        (retrain,) = [c for c in job["containers"] if c["name"] == "retrain"]
        assert f"--package=/pipelines/{deploy.RETRAINING_KEY}" in retrain["args"]
        # The site-training pipeline (the first champions) is deployed beside it, for the same archive and pool.
        site, site_platform = list(yaml.safe_load_all(config[deploy.SITE_TRAINING_KEY]))[:2]
        assert site["pipelineInfo"]["name"] == "xrayops-site-training"
        site_k8s = site_platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        assert {n for n, e in site_k8s.items() for m in e.get("pvcMount", [])
                if m["pvcNameParameter"]["runtimeValue"]["constant"] == deploy.ARCHIVE_PVC} == claims
        site_gpu = {n for n, e in site["deploymentSpec"]["executors"].items()
                    if e["container"].get("resources", {}).get("accelerator")}
        assert site_gpu == gpu, name
        # The release switch comes from the site's config, off unless set; the Settings field exists.
        assert "--param=release=$(XRAYOPS_RELEASE_ON_PROMOTION)" in retrain["args"]
        assert {"configMapRef": {"name": "xrayops-config"}} in retrain["envFrom"]
        site = deploy.find(docs, "ConfigMap", "xrayops-config")["data"]
        assert site["XRAYOPS_RELEASE_ON_PROMOTION"] == "false" and Settings().release_on_promotion is False
        assert any(v["mountPath"] == "/pipelines" and v["name"] == "pipelines" for v in retrain["volumeMounts"])
        assert {"name": "pipelines", "configMap": {"name": deploy.PIPELINE_CONFIG_MAP}} in job["volumes"]
    cloud = {d["metadata"]["name"]: d for d in rendered["gpu-cloud"] if d["kind"] == "PersistentVolumeClaim"}
    assert cloud[deploy.ARCHIVE_PVC]["spec"]["accessModes"] == ["ReadWriteMany"]  # one pod per ingest batch


def test_pipeline_target_reads_the_overlay_config():
    docs = [
        {"kind": "ConfigMap", "metadata": {"name": "xrayops-pipeline"},
         "data": {"gpu": "true", "gpuNodePool": "a100", "gpuCount": "2", "pipelineRoot": "s3://b/r"}},
        {"kind": "CronJob", "metadata": {"name": "xrayops-monitor"},
         "spec": {"jobTemplate": {"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "r/x:1"}]}}}}}},
    ]
    target = deploy.pipeline_target(docs, default_image="d:0")
    assert (target.image, target.gpu, target.gpu_node_pool, target.gpu_count) == ("r/x:1", True, "a100", 2)
    assert deploy.compile_args(target, Path("p.yaml"))[-5:] == ["--gpu", "--gpu-node-pool", "a100", "--gpu-count", "2"]
    retraining = deploy.compile_args(target, Path("r.yaml"), deploy.RETRAINING_KEY)
    assert retraining[:2] == ["pipeline", "compile-retraining"]
    assert "--source-pvc" in retraining and retraining[-5:] == ["--gpu", "--gpu-node-pool", "a100", "--gpu-count", "2"]
    assert deploy.pipeline_target(docs[:1], default_image="d:0", image="o:9").image == "o:9"
    assert deploy.pipeline_target([], default_image="d:0").gpu is False
    docs[0]["data"]["gpuCount"] = "many"
    with pytest.raises(deploy.DeployError, match="gpuCount must be an integer"):
        deploy.pipeline_target(docs, default_image="d:0")


def test_compile_cli_gpu_count_and_cluster_env(tmp_path, rendered):
    out = tmp_path / "p.yaml"
    subprocess.run(
        [sys.executable, "-m", "xrayops.cli", "pipeline", "compile", "--out", str(out), "--gpu", "--gpu-node-pool",
         "h100", "--gpu-count", "2", "--cluster"],
        check=True, cwd=ROOT, capture_output=True,
    )
    spec, platform = list(yaml.safe_load_all(out.read_text()))
    accel = spec["deploymentSpec"]["executors"]["exec-pretrain-op"]["container"]["resources"]["accelerator"]
    assert accel["resourceType"] == "nvidia.com/gpu" and accel["resourceCount"] == "2"
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert k8s["exec-finetune-op"]["nodeSelector"]["labels"] == {"xrayops.io/pool": "h100"}
    config = k8s["exec-register-op"]["configMapAsEnv"][0]
    assert config["configMapName"] == "xrayops-config" and config["optional"] is True
    assert {kv["envVar"] for kv in config["keyToEnv"]} >= {"XRAYOPS_MLFLOW_TRACKING_URI", "XRAYOPS_DVC_REMOTE_URL"}
    # The monitor step snapshots into the dashboard's workspace on the monitoring volume.
    pvc = k8s["exec-monitor-op"]["pvcMount"][0]
    assert pvc["mountPath"] == "/monitoring" and pvc["pvcNameParameter"]["runtimeValue"]["constant"] == "xrayops-monitoring"
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["evidently_workspace"]["defaultValue"] == "/monitoring/evidently"
    ui = deploy.find(rendered["local"], "Deployment", "evidently-ui")
    assert "/monitoring/evidently" in ui["spec"]["template"]["spec"]["containers"][0]["args"]


def test_local_minio_creates_every_bucket_the_platform_names(rendered):
    """A bucket named in the config, the pipeline root or a storageUri but never created fails
    only at run time (the serving releases' xrayops-models once did)."""
    docs = rendered["local"]
    job = deploy.pod_spec(deploy.find(docs, "Job", "minio-buckets"))
    created = {a.split("/", 1)[1] for a in job["containers"][0]["args"] if a.startswith("minio/")}
    named = set()
    for doc in docs:
        if doc["kind"] in ("ConfigMap", "InferenceService", "InferenceGraph"):
            text = yaml.safe_dump(doc) if doc["kind"] != "ConfigMap" else "\n".join(
                v for k, v in doc["data"].items() if not k.endswith(".yaml"))  # not the compiled pipelines
            named |= set(re.findall(r"s3://([a-z0-9.-]+)", text))
    assert {"xrayops-models", "xrayops-data", "xrayops-pipelines"} <= named
    assert named <= created, f"never created: {sorted(named - created)}"

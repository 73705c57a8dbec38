"""The Kubernetes deployment: every overlay of infra/k8s renders (kubectl kustomize), validates
against Kubernetes 1.30 schemas (kubernetes-validate) and the KServe, Kubeflow and Istio CRDs, and
keeps its security, scheduling and network promises; `xrayops deploy` merges in the compiled
pipeline. The mesh's identity rules are tested in test_mesh_security.py."""
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
from tests.crd_schemas import crd_errors
from tests.k8s_policies import Endpoint, network_allows
from xrayops import deploy

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
OVERLAYS = ("local", "gpu-cloud")
KUBERNETES_VERSION = "1.30.0"  # the oldest minor the manifests target (KServe 0.15+ needs >= 1.29)
SERVING = K8S / "base" / "serving"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job", "CronJob", "DaemonSet", "Pod"}
LONG_RUNNING = {"Deployment", "StatefulSet", "DaemonSet"}
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$|ACCESS_KEY", re.IGNORECASE)

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
        ("CronJob", "xrayops-postgres-backup"), ("ServiceAccount", "xrayops-pipeline-runner"),
        ("ServiceAccount", "xrayops-monitor"), ("ConfigMap", "xrayops-config"), ("ConfigMap", "xrayops-pipeline"),
        ("NetworkPolicy", "default-deny"), ("PeerAuthentication", "default"), ("Gateway", "xrayops-gateway"),
        ("InferenceService", "xrayops-region"),
    }
    for name, docs in rendered.items():
        present = {(d["kind"], d["metadata"]["name"]) for d in docs}
        assert expected <= present, (name, expected - present)
        # Namespace-scoped only: the Namespace and the Kubeflow Profile are a cluster admin's (infra/k8s/profile).
        assert {d["metadata"].get("namespace") for d in docs} == {"xrayops"}, name
        assert not {"Namespace", "Profile", "ClusterRole", "ClusterRoleBinding", "SiteIdentity"} & {d["kind"] for d in docs}
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


def test_the_profile_owns_the_namespace_with_mesh_injection_and_pod_security():
    """infra/k8s/profile: the Kubeflow Profile whose namespace the overlays deploy into and KFP
    runs the pipelines in; Kubeflow's profile controller adopts the namespace by its owner."""
    docs = deploy.parse_manifests(deploy.kustomize(K8S / "profile"))
    profile, namespace = deploy.find(docs, "Profile", "xrayops"), deploy.find(docs, "Namespace", "xrayops")
    assert profile["apiVersion"] == "kubeflow.org/v1"
    assert namespace["metadata"]["annotations"]["owner"] == profile["spec"]["owner"]["name"]
    labels = namespace["metadata"]["labels"]
    assert labels["istio-injection"] == "enabled"
    assert labels["pod-security.kubernetes.io/enforce"] == "baseline"
    assert labels["pod-security.kubernetes.io/warn"] == labels["pod-security.kubernetes.io/audit"] == "restricted"
    for overlay in OVERLAYS:
        kustomization = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
        assert kustomization["namespace"] == profile["metadata"]["name"]


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


CRD_GROUPS = ("serving.kserve.io/", "security.istio.io/", "networking.istio.io/")


def test_custom_resources_validate_strictly_against_the_real_crds(rendered):
    """KServe and Istio kinds against ../shared/k8s-schemas (unknown fields fail, as kubectl's
    strict field validation would)."""
    if not K8S_SCHEMAS.is_dir():
        pytest.skip(f"{K8S_SCHEMAS} is absent: no CRD schemas to validate against")
    custom = [(n, d) for n, docs in rendered.items() for d in docs if d["apiVersion"].startswith(CRD_GROUPS)]
    assert {d["kind"] for _, d in custom} >= {
        "InferenceService", "ServingRuntime", "PeerAuthentication", "RequestAuthentication", "AuthorizationPolicy",
        "Gateway", "VirtualService"}
    errors = [f"{name} {doc['kind']}/{doc['metadata']['name']}: {e}" for name, doc in custom for e in crd_errors(doc)]
    assert errors == []
    # ... and the check is real: a misspelt Istio field is reported.
    policy = next(d for _, d in custom if d["kind"] == "AuthorizationPolicy" and d["spec"].get("rules"))
    typo = {**policy, "spec": {**policy["spec"], "rule": policy["spec"]["rules"]}}
    assert any("'rule' was unexpected" in e for e in crd_errors(typo))


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


def _all_containers(node):
    """Every container spec anywhere: workloads, KServe components (their `model`), ServingRuntimes."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            elif key == "model" and isinstance(value, dict):
                yield value
            else:
                yield from _all_containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _all_containers(item)


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
                secret_file = env["name"].endswith("_FILE") and str(env.get("value", "")).startswith("/run/secrets/")
                if SECRETISH.search(env["name"]) and not secret_file:  # a mounted Secret's path is fine
                    assert "value" not in env, f"{name} {doc['metadata']['name']}: {env['name']} in plain text"
        text = deploy.dump_manifests(docs)
        assert "xrayops-dev-key-change-me" not in text  # Settings' development de-id key
        for doc in docs:
            if doc["kind"] == "ConfigMap":
                assert not [k for k in doc.get("data", {}) if SECRETISH.search(k)], (name, doc["metadata"]["name"])
        # The three out-of-band Secrets, referenced by name and key.
        assert {("xrayops-s3", "AWS_ACCESS_KEY_ID"), ("xrayops-s3", "AWS_SECRET_ACCESS_KEY"),
                ("xrayops-db", "username"), ("xrayops-db", "password")} <= _secret_refs(docs)
        # No secret on a command line: no argument expands a variable that holds one, and the
        # database URIs name no credential.
        for doc in docs:
            for c in _all_containers(doc):
                secret_vars = {e["name"] for e in c.get("env") or [] if "secretKeyRef" in (e.get("valueFrom") or {})}
                argv = " ".join(map(str, (c.get("command") or []) + (c.get("args") or [])))
                assert not [v for v in secret_vars if f"$({v})" in argv], (name, doc["metadata"]["name"], c.get("name"))
                assert not re.search(r"://[^/@\s]*:[^/@\s]*@", argv), (name, doc["metadata"]["name"], argv)
        mlflow = deploy.containers(deploy.find(docs, "Deployment", "mlflow"))[0]
        env = {e["name"]: e for e in mlflow["env"]}
        assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == "postgresql+psycopg://mlflow-postgres:5432/mlflow"
        assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "xrayops-db", "key": "password"}
        assert not any("store-uri" in a for a in mlflow["args"])
        postgres = deploy.containers(deploy.find(docs, "StatefulSet", "mlflow-postgres"))[0]
        pg_env = {e["name"]: e.get("value") for e in postgres["env"]}
        assert pg_env["POSTGRES_PASSWORD_FILE"].startswith("/run/secrets/xrayops-db/") and "POSTGRES_PASSWORD" not in pg_env
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
        # KServe: every transformer container and every serving runtime probes its health, and no
        # KServe pod mounts an API token.
        for doc in docs:
            if doc["kind"] == "ServingRuntime":
                pods = [("runtime", doc["spec"]["containers"])]
            elif doc["kind"] == "InferenceService":
                for part in ("predictor", "transformer"):
                    spec = doc["spec"].get(part)
                    if spec and spec.get("automountServiceAccountToken") is not False:
                        problems.append(f"{name} {doc['metadata']['name']} {part}: mounts an API token")
                pods = [("transformer", (doc["spec"].get("transformer") or {}).get("containers") or [])]
            else:
                continue
            for part, cs in pods:
                for c in cs:
                    if not (c.get("livenessProbe") and c.get("readinessProbe")):
                        problems.append(f"{name} {doc['kind']}/{doc['metadata']['name']} {part}: missing probes")
    assert problems == []


def test_no_role_may_patch_or_update_pods(rendered):
    """A step's token (KFP mounts the runner's in every step) cannot rewrite a pod, its own or a
    serving pod: no Role grants patch/update (or a wildcard) on pods or their subresources."""
    for name, docs in rendered.items():
        for role in (d for d in docs if d["kind"] == "Role"):
            for rule in role["rules"]:
                if "" not in rule["apiGroups"] and "*" not in rule["apiGroups"]:
                    continue
                pods = [r for r in rule["resources"] if r == "*" or r == "pods" or r.startswith("pods/")]
                bad = {"patch", "update", "*"} & set(rule["verbs"])
                assert not (pods and bad), f"{name} Role/{role['metadata']['name']} may {sorted(bad)} {pods}"


def test_rbac_is_namespaced_and_least_privilege(rendered):
    for name, docs in rendered.items():
        assert not [d for d in docs if d["kind"] in {"ClusterRole", "ClusterRoleBinding"}], name
        roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Role"}
        assert set(roles) == {"xrayops-pipeline-runner", "xrayops-monitor"}
        for role in roles.values():
            for rule in role["rules"]:
                assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], role["metadata"]["name"]
        monitor = roles["xrayops-monitor"]["rules"]
        assert {g for r in monitor for g in r["apiGroups"]} == {"pipelines.kubeflow.org"}  # KFP runs, no k8s API
        assert {(res, v) for r in monitor for res in r["resources"] for v in r["verbs"] if v == "create"} == {
            ("experiments", "create"), ("runs", "create")
        }
        runner = roles["xrayops-pipeline-runner"]["rules"]
        # What Argo's executor and KFP's launcher need, read-only on pods, named Secrets and ConfigMaps.
        assert {"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]} in runner
        assert [r["verbs"] for r in runner if r["resources"] == ["pods"]] == [["get", "watch"]]
        runner_secrets = [r for r in runner if "secrets" in r["resources"]]
        assert runner_secrets and all(r.get("resourceNames") == ["xrayops-s3"] for r in runner_secrets)
        assert all(r.get("resourceNames") for r in runner if "configmaps" in r["resources"])
        # The release step may read and replace the region InferenceService, nothing else of KServe's.
        kserve = [r for r in runner if r["apiGroups"] == ["serving.kserve.io"]]
        assert kserve == [{"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"],
                           "resourceNames": ["xrayops-region"], "verbs": ["get", "update"]}]
        isvc = deploy.find(docs, "InferenceService", "xrayops-region")
        config = deploy.find(docs, "ConfigMap", "xrayops-config")["data"]
        assert config["XRAYOPS_INFERENCE_SERVICE"] == isvc["metadata"]["name"]
        assert config["XRAYOPS_SERVING_NAMESPACE"] == isvc["metadata"]["namespace"]
        assert config["XRAYOPS_RELEASE_STORAGE_URI"].startswith("s3://xrayops-models/")
        bindings = {d["metadata"]["name"]: d for d in docs if d["kind"] == "RoleBinding"}
        for sa in ("xrayops-monitor", "xrayops-pipeline-runner"):
            assert bindings[sa]["roleRef"]["name"] == sa and bindings[sa]["subjects"] == [
                {"kind": "ServiceAccount", "name": sa, "namespace": "xrayops"}]
        # Only the pipeline runner mounts a token (KFP's launcher and Argo's executor in every step
        # call the API); the monitor presents a KFP-audience projected token; no pod overrides that.
        accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
        mounting = {n for n, d in accounts.items() if d.get("automountServiceAccountToken") is not False}
        assert mounting == {"xrayops-pipeline-runner"}
        for doc in _workloads(docs):
            spec = deploy.pod_spec(doc)
            assert spec["serviceAccountName"] in accounts, doc["metadata"]["name"]
            assert spec.get("automountServiceAccountToken") is False, doc["metadata"]["name"]
        for sa in accounts.values():  # a private registry's pull secret, by name (docs/cluster.md)
            assert sa.get("imagePullSecrets") == [{"name": "xrayops-registry"}], sa["metadata"]["name"]
        cron = deploy.pod_spec(deploy.find(docs, "CronJob", "xrayops-monitor"))
        (token,) = [v for v in cron["volumes"] if v["name"] == "kfp-token"]
        assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"


def test_docs_list_every_service_account_with_its_rights():
    """docs/cluster.md keeps a table of every ServiceAccount the overlays create."""
    text = (ROOT / "docs" / "cluster.md").read_text()
    names = set()
    for overlay in OVERLAYS:
        docs = deploy.parse_manifests(deploy.kustomize(K8S / "overlays" / overlay))
        names |= {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    names.add("xrayops-graph-router")  # components/inferencegraph
    rows = {m.group(1) for m in re.finditer(r"^\| `([a-z0-9-]+)` \|", text, re.MULTILINE)}
    assert names <= rows, sorted(names - rows)


# --- network policies --------------------------------------------------------------------------


def _template_labels(docs, kind: str, name: str) -> dict:
    doc = deploy.find(docs, kind, name)
    spec = doc["spec"]["jobTemplate"]["spec"] if kind == "CronJob" else doc["spec"]
    return spec["template"]["metadata"]["labels"]


def _kserve_labels(docs, isvc: str, part: str) -> dict:
    doc = deploy.find(docs, "InferenceService", isvc)
    return {"serving.kserve.io/inferenceservice": isvc, "component": part, **(doc["spec"][part].get("labels") or {})}


def _step_labels(docs) -> dict:
    """An executor pod of a KFP step: Argo's label plus the pod labels the compiled pipeline asks for."""
    _, platform = _embedded_pipeline(docs)[:2]
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values()
    (labels,) = {tuple(sorted(e["podMetadata"]["labels"].items())) for e in executors}
    return {"workflows.argoproj.io/workflow": "xrayops-retraining-abcde", **dict(labels)}


def _endpoints(docs) -> dict[str, Endpoint]:
    e = {
        "mlflow": _template_labels(docs, "Deployment", "mlflow"),
        "postgres": _template_labels(docs, "StatefulSet", "mlflow-postgres"),
        "feast": _template_labels(docs, "Deployment", "feast"),
        "redis": _template_labels(docs, "Deployment", "feast-redis"),
        "evidently": _template_labels(docs, "Deployment", "evidently-ui"),
        "sink": _template_labels(docs, "Deployment", "xrayops-inference-log"),
        "monitor": _template_labels(docs, "CronJob", "xrayops-monitor"),
        "backup": _template_labels(docs, "CronJob", "xrayops-postgres-backup"),
        "predictor": _kserve_labels(docs, "xrayops-region", "predictor"),
        "transformer": _kserve_labels(docs, "xrayops-region", "transformer"),
        "step": _step_labels(docs),
        "driver": {"workflows.argoproj.io/workflow": "xrayops-retraining-abcde"},
        "kfp-artifacts": {"app": "ml-pipeline-ui-artifact"},
    }
    found = {k: Endpoint(v, name=k) for k, v in e.items()}
    if deploy.find(docs, "Deployment", "minio"):
        found["minio"] = Endpoint(_template_labels(docs, "Deployment", "minio"), name="minio")
        found["buckets"] = Endpoint(_template_labels(docs, "Job", "minio-buckets"), name="buckets")
    found.update({
        "gateway": Endpoint({"app": "istio-ingressgateway", "istio": "ingressgateway"}, "istio-system", name="gateway"),
        "dns": Endpoint({"k8s-app": "kube-dns"}, "kube-system", name="dns"),
        "istiod": Endpoint({"app": "istiod"}, "istio-system", name="istiod"),
        "kfp-api": Endpoint({"app": "ml-pipeline"}, "kubeflow", name="kfp-api"),
        "kfp-ui": Endpoint({"app": "ml-pipeline-ui"}, "kubeflow", name="kfp-ui"),
        "mlmd": Endpoint({"component": "metadata-grpc-server"}, "kubeflow", name="mlmd"),
        "other-namespace": Endpoint({"app": "anything"}, "default", name="other-namespace"),
        "kube-api": Endpoint(ip="172.18.0.2", name="kube-api"),
        "s3": Endpoint(ip="52.218.0.1", name="s3"),
        "metadata-service": Endpoint(ip="169.254.169.254", name="metadata-service"),
    })
    return found


# (source, destination, port[, protocol]): every flow a workload needs (docs/cluster.md, "Network").
NEEDED = [
    *[(w, "dns", 53, "UDP") for w in ("mlflow", "postgres", "feast", "redis", "evidently", "sink", "monitor", "backup",
                                       "predictor", "transformer", "step", "driver")],
    *[(w, "istiod", 15012) for w in ("mlflow", "postgres", "feast", "redis", "evidently", "sink", "monitor", "backup",
                                      "predictor", "transformer", "step", "driver")],
    ("gateway", "transformer", 8080), ("gateway", "mlflow", 5000), ("gateway", "evidently", 8000),
    ("transformer", "predictor", 8080), ("transformer", "predictor", 9081), ("predictor", "sink", 8080),
    ("mlflow", "postgres", 5432), ("backup", "postgres", 5432), ("feast", "redis", 6379),
    ("step", "mlflow", 5000), ("step", "feast", 6566), ("step", "kfp-api", 8887), ("step", "mlmd", 8080),
    ("driver", "kfp-api", 8887), ("driver", "mlmd", 8080), ("monitor", "kfp-api", 8888),
    ("kfp-ui", "kfp-artifacts", 3000),
]
# The API server's port behind the `kubernetes` Service: 443 on managed clusters, 6443 (kind, k3d)
# or 8443 (minikube) locally.
KUBE_API_PORTS = {"local": (6443, 8443), "gpu-cloud": (443,)}
S3_CLIENTS = ("mlflow", "feast", "backup", "predictor", "transformer", "step", "kfp-artifacts")
REFUSED = [
    ("gateway", "predictor", 8080), ("mlflow", "predictor", 8080), ("transformer", "predictor", 8081),
    ("transformer", "sink", 8080), ("gateway", "sink", 8080), ("gateway", "postgres", 5432), ("feast", "postgres", 5432),
    ("step", "postgres", 5432), ("mlflow", "redis", 6379), ("other-namespace", "mlflow", 5000),
    ("other-namespace", "transformer", 8080), ("transformer", "mlflow", 5000), ("predictor", "mlflow", 5000),
    ("monitor", "mlflow", 5000), ("monitor", "kube-api", 443), ("evidently", "kube-api", 443),
    ("predictor", "kfp-api", 8888), ("evidently", "s3", 443),
    ("evidently", "mlflow", 5000), ("monitor", "s3", 443), ("redis", "s3", 443), ("sink", "s3", 443),
    ("gateway", "feast", 6566), ("predictor", "transformer", 8080),
    *[(w, "metadata-service", 80) for w in ("mlflow", "step", "predictor", "backup")],
]


def test_network_policies_deny_by_default_and_open_each_needed_flow(rendered):
    for name, docs in rendered.items():
        deny = deploy.find(docs, "NetworkPolicy", "default-deny")
        assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
        ep = _endpoints(docs)
        ok = lambda src, dst, port, proto="TCP": network_allows(docs, ep[src], ep[dst], port, proto)  # noqa: E731
        api = [(w, "kube-api", port) for w in ("step", "driver") for port in KUBE_API_PORTS[name]]
        missing = [f for f in NEEDED + api if not ok(*f)]
        assert missing == [], (name, missing)
        # On gpu-cloud the S3 clients' HTTPS egress is 0.0.0.0/0 until the site narrows it to its
        # S3 endpoints (policies.yaml): only there can they reach the API server's address, and
        # they hold no API token. Locally they cannot.
        local_only = [(w, "kube-api", p) for w in ("mlflow", "transformer", "predictor") for p in (443, 6443)]
        opened = [f for f in REFUSED + (local_only if name == "local" else []) if ok(*f)]
        assert opened == [], (name, opened)
        # The object store: the provider's S3 over HTTPS on gpu-cloud, MinIO alone locally.
        for client in S3_CLIENTS:
            if name == "local":
                assert ok(client, "minio", 9000) and not ok(client, "s3", 443), client
            else:
                assert ok(client, "s3", 443), client
        if name == "local":
            assert ok("buckets", "minio", 9000) and not ok("evidently", "minio", 9000) and not ok("gateway", "minio", 9000)
            assert not ok("monitor", "minio", 9000) and not ok("other-namespace", "minio", 9000)
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
    for ex in gpu_exec:  # CPU and memory requested and limited; the GPU must be usable or the step fails
        resources = spec["deploymentSpec"]["executors"][ex]["container"]["resources"]
        assert {"resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"} <= set(resources)
        assert {"name": "XRAYOPS_DEVICE", "value": "cuda"} in spec["deploymentSpec"]["executors"][ex]["container"]["env"]
    # One serving variant, one GPU: the single-pod ensemble's predictor; no InferenceGraph members idle beside it.
    isvcs = {d["metadata"]["name"]: d for d in cloud if d["kind"] == "InferenceService"}
    assert set(isvcs) == {"xrayops-region"} and not [d for d in cloud if d["kind"] == "InferenceGraph"]
    predictor = isvcs["xrayops-region"]["spec"]["predictor"]
    assert predictor["nodeSelector"] == {"xrayops.io/pool": "gpu"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in predictor["tolerations"]
    assert predictor["model"]["resources"]["limits"]["nvidia.com/gpu"] in (1, "1")
    assert predictor["model"]["resources"]["requests"].get("nvidia.com/gpu") in (None, 1, "1")
    assert {"name": "XRAYOPS_DEVICE", "value": "cuda"} in predictor["model"]["env"]  # no silent CPU fallback
    assert "nodeSelector" not in isvcs["xrayops-region"]["spec"]["transformer"]  # DICOM decoding stays on CPU nodes
    gpus = [c for d in cloud for c in _all_containers(d) if "nvidia.com/gpu" in ((c.get("resources") or {}).get("limits") or {})]
    assert len(gpus) == 1


def test_pipeline_runs_the_overlays_image(rendered):
    expected = {"local": f"ghcr.io/xrayops/xrayops:0.1.0-cpu@{deploy.PLACEHOLDER_DIGEST}",
                "gpu-cloud": f"ghcr.io/xrayops/xrayops:0.1.0@{deploy.PLACEHOLDER_DIGEST}"}
    for name, docs in rendered.items():
        spec = _embedded_pipeline(docs)[0]
        assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {expected[name]}
        assert deploy.xrayops_image(docs, "unused") == expected[name]
        ours = {c["image"] for c in _all_containers(docs) if "ghcr.io/xrayops" in c.get("image", "")}
        assert ours == {expected[name]}  # workloads, KServe transformers and the ServingRuntime alike
        # Every image of the overlay carries a digest (the repository's are placeholders until
        # `xrayops deploy pin`), so nothing runs by a mutable tag.
        images = {c["image"] for c in _all_containers(docs) if "image" in c}
        assert all(re.search(r"@sha256:[0-9a-f]{64}$", i) for i in images), images
        assert deploy.unpinned_images(docs) == sorted(images)
        config = deploy.find(docs, "ConfigMap", deploy.PIPELINE_CONFIG_MAP)["data"]
        assert config["pipelineRoot"].startswith("s3://")


def test_cli_render_with_image_override_and_apply_without_cluster(k8s_dir, tmp_path):
    """`xrayops deploy render --image` re-points every xrayops container and the pipeline; `apply`
    refuses images without a digest, and with no reachable cluster exits 2 with a message, not a
    traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env.update(KUBECONFIG=str(tmp_path / "no-kubeconfig"), XRAYOPS_LOG_LEVEL="WARNING")
    image = "registry.example/ml/xray:2.0@sha256:" + "ab" * 32
    out = subprocess.run(
        [sys.executable, "-m", "xrayops.app.cli", "deploy", "render", "--overlay", "local", "--k8s-dir", str(k8s_dir),
         "--image", image],
        capture_output=True, text=True, env=env, cwd=ROOT, check=True,
    ).stdout
    docs = deploy.parse_manifests(out)
    assert {c["image"] for d in _workloads(docs) for c in deploy.containers(d) if "xray" in c["image"]} == {image}
    assert "ghcr.io/xrayops" not in out  # KServe transformers and the ServingRuntime too
    spec = _embedded_pipeline(docs)[0]
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {image}

    apply = [sys.executable, "-m", "xrayops.app.cli", "deploy", "apply", "--overlay", "local", "--k8s-dir", str(k8s_dir),
             "--dry-run"]
    refused = subprocess.run(apply, capture_output=True, text=True, env=env, cwd=ROOT)
    assert refused.returncode == 2 and "images not pinned by digest" in refused.stderr
    assert "redis:7.4.1-alpine@sha256:0000" in refused.stderr and "xrayops deploy pin" in refused.stderr
    proc = subprocess.run(apply + ["--allow-unpinned"], capture_output=True, text=True, env=env, cwd=ROOT)
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
        [sys.executable, "-m", "xrayops.app.cli", "pipeline", "compile", "--out", str(out), "--gpu", "--gpu-node-pool",
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
    only at run time (the serving releases' xrayops-models once did). Every bucket that holds a
    record is versioned."""
    docs = rendered["local"]
    job = deploy.pod_spec(deploy.find(docs, "Job", "minio-buckets"))
    steps = job["initContainers"] + job["containers"]
    (make,) = [c for c in steps if c["args"][0] == "mb"]
    created = {a.split("/", 1)[1] for a in make["args"] if a.startswith("minio/")}
    versioned = {c["args"][2].split("/", 1)[1] for c in steps if c["args"][:2] == ["version", "enable"]}
    named = set()
    for doc in docs:
        if doc["kind"] in ("ConfigMap", "InferenceService", "InferenceGraph"):
            text = yaml.safe_dump(doc) if doc["kind"] != "ConfigMap" else "\n".join(
                v for k, v in doc["data"].items() if not k.endswith(".yaml"))  # not the compiled pipelines
            named |= set(re.findall(r"s3://([a-z0-9.-]+)", text))
    config = deploy.find(docs, "ConfigMap", "xrayops-config")["data"]
    named.add(config["BACKUP_S3_BUCKET"])
    assert {"xrayops-models", "xrayops-data", "xrayops-pipelines", "xrayops-backups"} <= named
    assert named <= created, f"never created: {sorted(named - created)}"
    assert versioned == created - {"xrayops-pipelines"}  # the pipeline root holds intermediates only


def test_postgres_backup_dumps_to_the_object_store_and_restores(rendered):
    for name, docs in rendered.items():
        cron = deploy.find(docs, "CronJob", "xrayops-postgres-backup")
        pod = deploy.pod_spec(cron)
        (dump,), (upload,) = pod["initContainers"], pod["containers"]
        assert dump["command"] == ["pg_dump"] and "--format=custom" in dump["args"]
        assert "--host=mlflow-postgres" in dump["args"] and "--file=/backup/mlflow.dump" in dump["args"]
        assert upload["args"][:3] == ["cp", "--quiet", "/backup/mlflow.dump"]
        assert upload["args"][3] == "backup/$(BACKUP_S3_BUCKET)/postgres/mlflow-$(POD_NAME).dump"
        env = {e["name"]: e for e in upload["env"]}
        assert env["MC_HOST_backup"]["value"] == "$(BACKUP_S3_SCHEME)://$(S3_USER):$(S3_PASSWORD)@$(BACKUP_S3_HOST)"
        config = deploy.find(docs, "ConfigMap", "xrayops-config")["data"]
        host = config["BACKUP_S3_HOST"]
        assert host == ("minio.xrayops.svc.cluster.local:9000" if name == "local" else "s3.eu-west-1.amazonaws.com")
        assert pod["serviceAccountName"] == "xrayops-backup"
    # The restore Job (applied by hand) reads the same bucket and restores into the same database.
    (restore,) = yaml.safe_load_all((K8S / "base" / "backup" / "postgres-restore.yaml").read_text())
    spec = restore["spec"]["template"]["spec"]
    assert spec["containers"][0]["command"] == ["pg_restore"] and "--clean" in spec["containers"][0]["args"]
    assert spec["initContainers"][0]["args"][2] == "backup/$(BACKUP_S3_BUCKET)/postgres/$(DUMP)"
    assert restore["spec"]["template"]["metadata"]["labels"] == cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for extra in (K8S / "base" / "backup" / "postgres-restore.yaml", K8S / "base" / "backup" / "dicom-restore.yaml",
                  K8S / "upgrade" / "mlflow-db-upgrade.yaml"):
        for doc in yaml.safe_load_all(extra.read_text()):
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    (upgrade,) = yaml.safe_load_all((K8S / "upgrade" / "mlflow-db-upgrade.yaml").read_text())
    (migrate,) = upgrade["spec"]["template"]["spec"]["containers"]
    assert migrate["args"][:2] == ["db", "upgrade"] and "@" not in migrate["args"][2]  # no credential in the URI
    assert upgrade["spec"]["template"]["spec"]["serviceAccountName"] == "xrayops-backup"  # reaches Postgres
    assert upgrade["spec"]["template"]["metadata"]["labels"] == {"app.kubernetes.io/name": "xrayops-postgres-backup"}
    (snapshot,) = yaml.safe_load_all((K8S / "base" / "backup" / "dicom-snapshot.yaml").read_text())
    (restored,) = yaml.safe_load_all((K8S / "base" / "backup" / "dicom-restore.yaml").read_text())
    assert snapshot["spec"]["source"]["persistentVolumeClaimName"] == deploy.ARCHIVE_PVC
    assert restored["spec"]["dataSource"]["kind"] == "VolumeSnapshot"
    archive = deploy.find(rendered["local"], "PersistentVolumeClaim", deploy.ARCHIVE_PVC)
    assert restored["spec"]["resources"] == archive["spec"]["resources"]

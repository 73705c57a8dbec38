"""The KServe manifests in infra/k8s/base/serving and the InferenceGraph component
(infra/k8s/components/inferencegraph) validate against the real CRD openAPIV3 schemas (kserve
v0.20.0, ../shared/k8s-schemas), strictly: unknown fields fail as kubectl would."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import K8S_SCHEMAS
from tests.crd_schemas import crd_validator

SCHEMAS = K8S_SCHEMAS
SERVING = Path(__file__).resolve().parents[1] / "infra" / "k8s" / "base" / "serving"
GRAPH = SERVING.parents[1] / "components" / "inferencegraph"
CRDS = {
    "InferenceService": "serving.kserve.io_inferenceservices.yaml",
    "InferenceGraph": "serving.kserve.io_inferencegraphs.yaml",
    "ServingRuntime": "serving.kserve.io_servingruntimes.yaml",
}
IMAGE = "ghcr.io/xrayops/xrayops:0.1.0"
pytestmark = pytest.mark.skipif(not SCHEMAS.is_dir(), reason=f"{SCHEMAS} (CRD schemas) is absent")


def errors(doc: dict) -> list[str]:
    group, version = doc["apiVersion"].split("/")
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in crd_validator(doc["kind"], group, version).iter_errors(doc)]


def documents(name: str) -> list[dict]:
    folder = GRAPH if name == "inferencegraph.yaml" else SERVING
    return [d for d in yaml.safe_load_all((folder / name).read_text()) if d]


def all_documents() -> list[tuple[str, dict]]:
    """Every KServe resource (the log sink's core kinds are checked by test_k8s_manifests.py)."""
    paths = [p for p in sorted(SERVING.glob("*.yaml")) if not p.is_symlink()] + [GRAPH / "inferencegraph.yaml"]
    return [(p.name, d) for p in paths if p.name not in ("kustomization.yaml", "patch-gpu.yaml")
            for d in documents(p.name) if d["apiVersion"].startswith("serving.kserve.io/")]


def containers(doc: dict) -> list[dict]:
    spec = doc["spec"]
    found = list(spec.get("containers", []))
    for component in ("predictor", "transformer"):
        part = spec.get(component) or {}
        found += part.get("containers", [])
        if "model" in part:
            found.append(part["model"])
    return found


def test_every_manifest_validates_against_its_crd():
    docs = all_documents()
    assert {d["kind"] for _, d in docs} == set(CRDS)
    for name, doc in docs:
        assert errors(doc) == [], f"{name} {doc['kind']}/{doc['metadata']['name']}"


def test_the_strict_check_catches_a_typo():
    (doc,) = documents("inferenceservice.yaml")
    doc["spec"]["predictor"]["model"]["storageURI"] = doc["spec"]["predictor"]["model"].pop("storageUri")
    assert any("storageURI" in e for e in errors(doc))


def test_kustomization_lists_one_serving_variant():
    """base serves the single-pod ensemble; the InferenceGraph is a Component an overlay opts into."""
    kustomization = yaml.safe_load((SERVING / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["servingruntime.yaml", "inferenceservice.yaml", "log-sink.yaml"]
    assert all((SERVING / r).is_file() for r in kustomization["resources"])
    component = yaml.safe_load((GRAPH / "kustomization.yaml").read_text())
    assert component["kind"] == "Component" and "inferencegraph.yaml" in component["resources"]
    # The link in base/serving (GitOps releases of the graph manifest) is the component's file.
    assert not (SERVING / "inferencegraph.yaml").exists()  # the graph lives in its component only


def test_serving_identities_apart_and_no_api_token():
    """The transformer and the predictor are different mesh principals (only the former may call
    the latter); neither mounts a Kubernetes API token; the transformer has health probes."""
    for name, doc in all_documents():
        if doc["kind"] != "InferenceService":
            continue
        predictor, transformer = doc["spec"]["predictor"], doc["spec"].get("transformer")
        assert predictor["serviceAccountName"] == "xrayops-predictor", name
        assert predictor["automountServiceAccountToken"] is False
        assert predictor["labels"]["xrayops.io/egress-s3"] == "true"  # the storage initializer reaches S3
        if transformer:
            assert transformer["serviceAccountName"] == "xrayops-transformer", name
            assert transformer["automountServiceAccountToken"] is False
            (container,) = transformer["containers"]
            assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
            assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    (graph,) = [d for _, d in all_documents() if d["kind"] == "InferenceGraph"]
    assert graph["spec"]["serviceAccountName"] == "xrayops-graph-router"


def test_inferenceservice_has_transformer_s3_storage_and_payload_logger():
    (doc,) = documents("inferenceservice.yaml")
    predictor, transformer = doc["spec"]["predictor"], doc["spec"]["transformer"]
    assert predictor["model"]["storageUri"].startswith("s3://") and predictor["model"]["runtime"] == "xrayops"
    assert predictor["logger"]["mode"] == "all" and predictor["logger"]["url"].startswith("http")
    assert "logger" not in transformer  # its requests are raw DICOM (PHI): never logged
    assert [a for a in predictor["model"]["args"] if a.startswith("--bundle=")] == [
        "--bundle=/mnt/models/simclr", "--bundle=/mnt/models/byol", "--bundle=/mnt/models/supcon"]
    (container,) = transformer["containers"]
    assert container["image"] == IMAGE and container["args"][:2] == ["serve", "--role=transformer"]
    env = {e["name"]: e for e in container["env"]}
    assert env["STORAGE_URI"]["value"] == predictor["model"]["storageUri"]
    assert "secretKeyRef" in env["XRAYOPS_DEID_KEY"]["valueFrom"]


def test_canary_rolls_out_a_challenger():
    (doc,) = documents("inferenceservice-canary.yaml")
    (base,) = documents("inferenceservice.yaml")
    assert doc["metadata"]["name"] == base["metadata"]["name"]
    assert 0 < doc["spec"]["predictor"]["canaryTrafficPercent"] < 100
    assert doc["spec"]["predictor"]["model"]["storageUri"] != base["spec"]["predictor"]["model"]["storageUri"]


def merge(base, patch):
    if isinstance(base, dict) and isinstance(patch, dict):
        return {k: merge(base.get(k), v) if k in base else v for k, v in patch.items()} | {
            k: v for k, v in base.items() if k not in patch}
    return patch


def test_gpu_patch_applies_to_a_valid_inferenceservice():
    (base,) = documents("inferenceservice.yaml")
    (patch,) = documents("patch-gpu.yaml")
    patched = merge(base, patch)
    assert errors(patched) == []
    assert patched["spec"]["predictor"]["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert patched["spec"]["predictor"]["model"]["resources"]["limits"]["memory"] == "6Gi"  # kept


def test_inferencegraph_averages_members_that_scale_apart():
    docs = documents("inferencegraph.yaml")
    (graph,) = [d for d in docs if d["kind"] == "InferenceGraph"]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "InferenceService"}
    nodes = graph["spec"]["nodes"]
    assert nodes["members"]["routerType"] == "Ensemble"
    members = [s["serviceName"] for s in nodes["members"]["steps"]]
    assert len(members) == 3 and set(members) <= set(services)
    combine = nodes["root"]["steps"][-1]
    assert nodes["root"]["routerType"] == "Sequence" and combine["data"] == "$response"
    assert "--role=combiner" in services[combine["serviceName"]]["spec"]["predictor"]["model"]["args"]


def test_containers_are_non_root_with_requests_and_limits():
    runtime = documents("servingruntime.yaml")[0]
    runtime_container = runtime["spec"]["containers"][0]
    for name, doc in all_documents():
        for container in containers(doc):
            where = f"{name} {doc['metadata']['name']} {container.get('name', 'model')}"
            security = container.get("securityContext") or runtime_container["securityContext"]
            assert security["runAsNonRoot"] is True and security["allowPrivilegeEscalation"] is False, where
            resources = container["resources"]
            assert set(resources["requests"]) >= {"cpu", "memory"} and set(resources["limits"]) >= {"cpu", "memory"}, where
            if "image" in container:
                assert container["image"] == IMAGE, where


def test_container_args_are_ones_the_cli_accepts():
    """Every `serve` argument in the manifests is an option of `xrayops serve` (typer parses them)."""
    from typer.main import get_command

    from xrayops.app.cli import app

    serve = get_command(app).commands["serve"]
    known = {opt for p in serve.params for opt in [*p.opts, *getattr(p, "secondary_opts", [])]}
    runtime_args = documents("servingruntime.yaml")[0]["spec"]["containers"][0]["args"]
    arg_lists = [runtime_args]
    for _, doc in all_documents():
        arg_lists += [c.get("args", []) for c in containers(doc) if c is not None]
    for args in arg_lists:
        for arg in args:
            if arg.startswith("--"):
                assert arg.split("=", 1)[0] in known, arg
    # the names the KServe controller appends to a transformer
    assert {"--model_name", "--predictor_host", "--http_port"} <= known


def components(doc: dict) -> list[tuple[dict, list[dict]]]:
    """(pod-level spec, its containers) for each pod the resource makes."""
    spec = doc["spec"]
    if doc["kind"] == "ServingRuntime":
        return [(spec, spec["containers"])]
    found = []
    for component in ("predictor", "transformer"):
        part = spec.get(component)
        if part:
            found.append((part, part.get("containers", []) + ([part["model"]] if "model" in part else [])))
    return found


def test_pods_run_as_the_image_user_read_only_with_seccomp_and_a_tmp_volume():
    """uid 10001 is the Dockerfile's user; HOME=/tmp is the only writable path, an emptyDir."""
    dockerfile = (SERVING.parents[2] / "Dockerfile").read_text()
    assert "USER 10001:10001" in dockerfile
    checked = 0
    for name, doc in all_documents():
        for pod, pod_containers in components(doc):
            where = f"{name} {doc['metadata']['name']}"
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            if doc["kind"] != "ServingRuntime":
                assert pod["securityContext"]["runAsUser"] == 10001, where
                assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
            for container in pod_containers:
                security = container["securityContext"]
                assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001, where
                assert security["readOnlyRootFilesystem"] is True, where
                assert security["seccompProfile"] == {"type": "RuntimeDefault"}, where
                assert security["capabilities"] == {"drop": ["ALL"]}, where
                (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
                assert "emptyDir" in volumes[tmp["name"]], where
                checked += 1
    assert checked >= 12  # runtime, region (2), canary (2), 3 members x 2, combiner


def test_payload_logger_feeds_the_sink_that_writes_where_the_monitor_reads():
    sink = {d["kind"]: d for d in documents("log-sink.yaml")}
    service, deployment = sink["Service"], sink["Deployment"]
    urls = set()
    for _, doc in all_documents():
        for component in ("predictor", "transformer"):
            logger = (doc["spec"].get(component) or {}).get("logger")
            if logger:
                assert component == "predictor", f"{doc['metadata']['name']}: only predictors log (no DICOM)"
                urls.add(logger["url"])
    assert urls == {f"http://{service['metadata']['name']}.xrayops.svc.cluster.local"}
    assert service["spec"]["ports"][0]["port"] == 80
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][0] == "log-sink"
    log_path = next(a.split("=", 1)[1] for a in container["args"] if a.startswith("--log-path="))
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    (volume,) = [n for n in claims if log_path.startswith(mounts[n] + "/")]
    monitor = SERVING.parent / "monitor"
    cron = yaml.safe_load((monitor / "cronjob.yaml").read_text())
    job = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (monitor_claim,) = [v for v in job["volumes"] if v["name"] == "monitoring"]
    assert monitor_claim["persistentVolumeClaim"]["claimName"] == claims[volume]
    monitor_mount = next(m["mountPath"] for m in job["initContainers"][0]["volumeMounts"] if m["name"] == "monitoring")
    current = next(a.split("=", 1)[1] for a in job["initContainers"][0]["args"] if a.startswith("--current="))
    assert current.removeprefix(monitor_mount) == log_path.removeprefix(mounts[volume])
    # the sink's args are options of `xrayops log-sink`
    from typer.main import get_command

    from xrayops.app.cli import app

    known = {opt for p in get_command(app).commands["log-sink"].params for opt in p.opts}
    assert all(a.split("=", 1)[0] in known for a in container["args"][1:])

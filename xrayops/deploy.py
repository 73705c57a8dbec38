"""Render and apply the cluster deployment: `kubectl kustomize` of an overlay of infra/k8s plus
the compiled KFP pipeline, with no hand-written YAML.

The output is one stream of Kubernetes manifests. The compiled pipeline rides along inside the
`xrayops-pipeline` ConfigMap (key `xrayops-training.yaml`), so `kubectl apply` accepts the whole
stream and the cluster keeps the exact pipeline that goes with the deployed manifests; the
ConfigMap's other keys (gpu, gpuNodePool, gpuCount, pipelineRoot, serviceAccount, namespace) are
the overlay's choices that the pipeline is compiled with and run under (the Kubeflow Profile namespace).

The pipeline is compiled by the CLI in a subprocess because `components` binds its image when
it is imported (XRAYOPS_IMAGE) and the core must not import the adapters (docs/architecture.md).

Two checks guard what is applied: every image is pinned by a digest (`pin` writes them into the
overlay's `images:`; an all-zero digest is the repository's placeholder), and no Istio ALLOW rule
is open to anyone (an empty principal list matches every caller in Istio).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from pydantic import BaseModel

from xrayops.errors import XrayopsError
from xrayops.logs import get_logger

log = get_logger(__name__)

PIPELINE_CONFIG_MAP = "xrayops-pipeline"
PIPELINE_KEY = "xrayops-training.yaml"
# The monitor CronJob submits this one when its window calls for retraining (mounted at /pipelines).
RETRAINING_KEY = "xrayops-retraining.yaml"
SITE_TRAINING_KEY = "xrayops-site-training.yaml"  # the first ensemble on the site's archive
ARCHIVE_PVC = "xrayops-dicom"  # infra/k8s/base/monitor/archive-volume.yaml
# The monitor CronJob always runs the xrayops CLI, so its image is the overlay's xrayops image.
REFERENCE_WORKLOAD = ("CronJob", "xrayops-monitor")
DRY_RUN_MODES = ("client", "server")
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
PLACEHOLDER_DIGEST = "sha256:" + "0" * 64  # the repository's overlays: `xrayops deploy pin` replaces it
# Istio source/condition fields whose empty list would mean "anyone" (or, in a guard, "everyone").
_PEER_FIELDS = ("principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals", "namespaces",
                "notNamespaces", "ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks")
# kubectl's words for "there is no cluster to talk to" (no kubeconfig, refused, DNS, timeout).
_NO_CLUSTER_MARKERS = (
    "connection refused",
    "unable to connect",
    "no configuration has been provided",
    "dial tcp",
    "no such host",
    "i/o timeout",
    "failed to download openapi",
    "couldn't get current server api group list",
)


class DeployError(XrayopsError, RuntimeError):
    """A render or apply step failed; the message says which and what to do."""


class PipelineTarget(BaseModel):
    """How the pipeline is compiled for one overlay."""

    image: str
    gpu: bool = False
    gpu_node_pool: str = "gpu"
    gpu_count: int = 1
    pipeline_root: str = ""
    service_account: str = ""


def list_overlays(k8s_dir: Path) -> list[str]:
    root = Path(k8s_dir) / "overlays"
    return sorted(p.name for p in root.iterdir() if (p / "kustomization.yaml").is_file()) if root.is_dir() else []


def overlay_dir(k8s_dir: Path, overlay: str) -> Path:
    path = Path(k8s_dir) / "overlays" / overlay
    if not (path / "kustomization.yaml").is_file():
        known = ", ".join(list_overlays(k8s_dir)) or "none"
        raise DeployError(f"no overlay {overlay!r} under {Path(k8s_dir) / 'overlays'} (known: {known})")
    return path


def _kubectl(kubectl: str) -> str:
    path = shutil.which(kubectl)
    if path is None:
        raise DeployError(f"{kubectl!r} not found on PATH: install kubectl >= 1.27 (it has kustomize built in)")
    return path


def kustomize(path: Path, kubectl: str = "kubectl") -> str:
    """`kubectl kustomize PATH`: the overlay's manifests as YAML text."""
    proc = subprocess.run([_kubectl(kubectl), "kustomize", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DeployError(f"kustomize of {path} failed: {_last_line(proc.stderr)}")
    return proc.stdout


def parse_manifests(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the embedded pipeline, feature_store.yaml) as readable `|` blocks."""


def _str_representer(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_representer)


def dump_manifests(docs: list[dict]) -> str:
    return "".join("---\n" + yaml.dump(doc, Dumper=_BlockDumper, sort_keys=False, width=120) for doc in docs)


def find(docs: list[dict], kind: str, name: str) -> dict | None:
    return next((d for d in docs if d.get("kind") == kind and d.get("metadata", {}).get("name") == name), None)


def pod_spec(doc: dict) -> dict | None:
    """The pod template's spec of a workload (Deployment, StatefulSet, Job, CronJob, Pod)."""
    spec = doc.get("spec") or {}
    if doc.get("kind") == "Pod":
        return spec
    if doc.get("kind") == "CronJob":
        spec = (spec.get("jobTemplate") or {}).get("spec") or {}
    template = spec.get("template")
    return template.get("spec") if isinstance(template, dict) else None


def containers(doc: dict) -> list[dict]:
    spec = pod_spec(doc) or {}
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def xrayops_image(docs: list[dict], default: str) -> str:
    """The image the overlay gives the xrayops workloads (from the monitor CronJob), else `default`."""
    ref = find(docs, *REFERENCE_WORKLOAD)
    images = {c["image"] for c in containers(ref)} if ref else set()
    if len(images) > 1:
        raise DeployError(f"{REFERENCE_WORKLOAD[1]} runs several images {sorted(images)}; expected the one xrayops image")
    return images.pop() if images else default


def pipeline_target(docs: list[dict], default_image: str, image: str | None = None) -> PipelineTarget:
    """The overlay's pipeline settings (xrayops-pipeline ConfigMap) and its image (or `image`)."""
    data = (find(docs, "ConfigMap", PIPELINE_CONFIG_MAP) or {}).get("data") or {}
    try:
        gpu_count = int(data.get("gpuCount", 1))
    except ValueError:
        raise DeployError(f"{PIPELINE_CONFIG_MAP}: gpuCount must be an integer, got {data.get('gpuCount')!r}") from None
    return PipelineTarget(
        image=image or xrayops_image(docs, default_image),
        gpu=str(data.get("gpu", "false")).strip().lower() in ("1", "true", "yes"),
        gpu_node_pool=data.get("gpuNodePool") or "gpu",
        gpu_count=gpu_count,
        pipeline_root=data.get("pipelineRoot", ""),
        service_account=data.get("serviceAccount", ""),
    )


def replace_image(docs: list[dict], old: str, new: str) -> list[dict]:
    """Every `image: old` runs `new` instead (for `--image` overrides), wherever it sits: workloads,
    KServe InferenceService transformers, ServingRuntime containers."""

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "image" and value == old:
                    node[key] = new
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(docs)
    return docs


def compile_args(target: PipelineTarget, out: Path, key: str = PIPELINE_KEY) -> list[str]:
    """`xrayops pipeline compile` (training), `compile-retraining` or `compile-site-training` arguments for `target`."""
    archive = {RETRAINING_KEY: "compile-retraining", SITE_TRAINING_KEY: "compile-site-training"}
    if key in archive:
        args = ["pipeline", archive[key], "--out", str(out), "--cluster", "--source-pvc", ARCHIVE_PVC]
    else:
        args = ["pipeline", "compile", "--out", str(out), "--cluster"]
    if target.gpu:
        args += ["--gpu", "--gpu-node-pool", target.gpu_node_pool, "--gpu-count", str(target.gpu_count)]
    return args


def compile_pipeline_yaml(target: PipelineTarget, key: str = PIPELINE_KEY) -> str:
    """The training (or retraining) pipeline compiled for `target` (image, GPU pool, cluster
    Secrets), as YAML."""
    with tempfile.TemporaryDirectory(prefix="xrayops-deploy-") as tmp:
        out = Path(tmp) / key
        cmd = [sys.executable, "-m", "xrayops.app.cli", *compile_args(target, out, key)]
        env = {**os.environ, "XRAYOPS_IMAGE": target.image}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise DeployError(f"compiling the pipeline {key} failed: {_last_line(proc.stderr)}")
        return out.read_text()


def with_pipeline(docs: list[dict], pipelines: dict[str, str]) -> list[dict]:
    """Put the compiled pipelines (ConfigMap key -> YAML) into the xrayops-pipeline ConfigMap."""
    config = find(docs, "ConfigMap", PIPELINE_CONFIG_MAP)
    if config is None:
        raise DeployError(f"the overlay has no ConfigMap {PIPELINE_CONFIG_MAP} (infra/k8s/base defines it)")
    config.setdefault("data", {}).update(pipelines)
    return docs


def render(k8s_dir: Path, overlay: str, default_image: str, image: str | None = None, kubectl: str = "kubectl") -> str:
    """The full manifests of `overlay`: kustomize output with the compiled pipeline merged in."""
    docs = parse_manifests(kustomize(overlay_dir(k8s_dir, overlay), kubectl))
    overlay_image = xrayops_image(docs, default_image)
    if image and image != overlay_image:
        replace_image(docs, overlay_image, image)
    problems = open_authorization(docs)
    if problems:
        raise DeployError("the overlay's mesh rules let anyone in (fill the SiteIdentity's lists): " + "; ".join(problems))
    target = pipeline_target(docs, default_image, image)
    unpinned = unpinned_images(docs)
    log.info("deploy.render", overlay=overlay, image=target.image, gpu=target.gpu, documents=len(docs))
    if unpinned:
        log.warning("deploy.unpinned", overlay=overlay, images=unpinned, hint="xrayops deploy pin")
    pipelines = {key: compile_pipeline_yaml(target, key) for key in (PIPELINE_KEY, SITE_TRAINING_KEY, RETRAINING_KEY)}
    return dump_manifests(with_pipeline(docs, pipelines))


# --- supply chain: images by digest ----------------------------------------------------------


class ImagePin(BaseModel):
    """One `images:` entry of an overlay, pinned."""

    name: str
    tag: str = ""
    digest: str

    @property
    def reference(self) -> str:
        return f"{self.name}:{self.tag}" if self.tag else self.name


def _image_fields(node, found: list[str]) -> list[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                found.append(value)
            else:
                _image_fields(value, found)
    elif isinstance(node, list):
        for item in node:
            _image_fields(item, found)
    return found


def unpinned_images(docs: list[dict]) -> list[str]:
    """Every image (workloads, KServe resources; not the embedded pipelines' text) that has no
    digest or still has the placeholder one, sorted."""
    refs = set(_image_fields([d for d in docs if d.get("kind") != "ConfigMap"], []))
    return sorted(r for r in refs if "@" not in r or r.rsplit("@", 1)[1] == PLACEHOLDER_DIGEST)


def parse_digest_args(items: list[str]) -> dict[str, str]:
    """`NAME=sha256:HEX` pairs (the CLI's --digest) as a mapping; a bad one is a DeployError."""
    digests = {}
    for item in items:
        name, sep, digest = item.partition("=")
        if not sep or not name or not DIGEST.match(digest):
            raise DeployError(f"--digest {item!r}: expected IMAGE=sha256:<64 hex digits>")
        digests[name] = digest
    return digests


def resolve_digest(reference: str, crane: str = "crane") -> str:
    """The registry's digest for `reference` (name:tag), with `crane digest` (go-containerregistry)."""
    path = shutil.which(crane)
    if path is None:
        raise DeployError(f"{crane!r} not found on PATH: install crane (github.com/google/go-containerregistry) "
                          f"or give the digest: --digest {reference.split(':')[0]}=sha256:...")
    proc = subprocess.run([path, "digest", reference], capture_output=True, text=True)
    digest = proc.stdout.strip()
    if proc.returncode != 0:
        raise DeployError(f"crane digest {reference} failed: {_last_line(proc.stderr)}")
    if not DIGEST.match(digest):
        raise DeployError(f"crane digest {reference} printed {digest!r}, not a sha256 digest")
    return digest


def pin_overlay(k8s_dir: Path, overlay: str, digests: dict[str, str], resolve: bool = False,
                crane: str = "crane") -> tuple[list[ImagePin], list[str]]:
    """Write digests into the overlay's `images:` (kustomization.yaml, comments kept): the one given
    for an image's name, else the registry's (`resolve`), else it stays as it is. Returns the
    entries pinned now and the names still on the placeholder (or without a digest)."""
    from ruamel.yaml import YAML

    path = overlay_dir(k8s_dir, overlay) / "kustomization.yaml"
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    rt.indent(mapping=2, sequence=4, offset=2)
    doc = rt.load(path.read_text())
    entries = doc.get("images") or []
    known = {e.get("name") for e in entries}
    unknown = sorted(set(digests) - known)
    if unknown:
        raise DeployError(f"{path}: no images entry for {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    pinned, missing = [], []
    for entry in entries:
        name, tag = entry["name"], str(entry.get("newTag") or "")
        target = entry.get("newName") or name
        digest = digests.get(name)
        if digest is None and resolve:
            digest = resolve_digest(f"{target}:{tag}" if tag else target, crane)
        if digest is None:
            if entry.get("digest") in (None, PLACEHOLDER_DIGEST):
                missing.append(name)
            continue
        entry["digest"] = digest
        pinned.append(ImagePin(name=target, tag=tag, digest=digest))
    with path.open("w") as out:
        rt.dump(doc, out)
    log.info("deploy.pin", overlay=overlay, pinned=len(pinned), unpinned=missing)
    return pinned, missing


_BASE_IMAGE_ARG = re.compile(r"^(ARG PYTHON_IMAGE=)([^@\s]+)(@sha256:[0-9a-f]{64})?[ \t]*$", re.MULTILINE)


def pin_dockerfile(dockerfile: Path, digest: str | None = None, resolve: bool = False, crane: str = "crane") -> ImagePin:
    """Pin the Dockerfile's base image (`ARG PYTHON_IMAGE=name:tag@sha256:...`) to `digest`, or to
    the registry's digest of its tag (`resolve`)."""
    text = Path(dockerfile).read_text()
    match = _BASE_IMAGE_ARG.search(text)
    if match is None:
        raise DeployError(f"{dockerfile}: no `ARG PYTHON_IMAGE=name:tag` line to pin")
    reference = match.group(2)
    if digest is None:
        if not resolve:
            raise DeployError("give the base image's digest (--base-digest sha256:...) or --resolve")
        digest = resolve_digest(reference, crane)
    if not DIGEST.match(digest):
        raise DeployError(f"base image digest {digest!r}: expected sha256:<64 hex digits>")
    Path(dockerfile).write_text(text[:match.start()] + f"{match.group(1)}{reference}@{digest}" + text[match.end():])
    name, _, tag = reference.rpartition(":")
    return ImagePin(name=name, tag=tag, digest=digest)


# --- mesh: no ALLOW open to anyone ------------------------------------------------------------


def open_authorization(docs: list[dict]) -> list[str]:
    """AuthorizationPolicy rules that Istio would read as "anyone": an empty list where a site's
    principals belong (an unset field matches every caller), or an ALLOW rule with a source that
    names nobody. Each as `policy: where`."""
    problems = []
    for doc in docs:
        if doc.get("kind") != "AuthorizationPolicy":
            continue
        name, spec = doc["metadata"]["name"], doc.get("spec") or {}
        for i, rule in enumerate(spec.get("rules") or []):
            for j, peer in enumerate(rule.get("from") or []):
                source = peer.get("source") or {}
                empty = [f for f in _PEER_FIELDS if f in source and not source[f]]
                if empty:
                    problems.append(f"{name}: rules[{i}].from[{j}] has an empty {', '.join(empty)}")
                elif (spec.get("action") or "ALLOW") == "ALLOW" and not any(source.get(f) for f in _PEER_FIELDS):
                    problems.append(f"{name}: rules[{i}].from[{j}] names no caller")
            for k, cond in enumerate(rule.get("when") or []):
                if not (cond.get("values") or cond.get("notValues")):
                    problems.append(f"{name}: rules[{i}].when[{k}] ({cond.get('key')}) has no values")
    return problems


def apply_args(dry_run: str | None) -> list[str]:
    if dry_run is not None and dry_run not in DRY_RUN_MODES:
        raise DeployError(f"--dry-run must be one of {', '.join(DRY_RUN_MODES)}, got {dry_run!r}")
    return ["apply", "-f", "-"] + ([f"--dry-run={dry_run}"] if dry_run else [])


def apply(manifests: str, dry_run: str | None = None, kubectl: str = "kubectl", allow_unpinned: bool = False) -> str:
    """`kubectl apply` the rendered manifests; returns kubectl's report. Images without a real
    digest are refused unless `allow_unpinned` (a development cluster with locally loaded images)."""
    unpinned = unpinned_images(parse_manifests(manifests))
    if unpinned and not allow_unpinned:
        raise DeployError(f"images not pinned by digest: {', '.join(unpinned)}; run `xrayops deploy pin` "
                          "(or --allow-unpinned on a development cluster)")
    cmd = [_kubectl(kubectl), *apply_args(dry_run)]
    proc = subprocess.run(cmd, input=manifests, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DeployError(explain_kubectl_error(proc.stderr))
    return proc.stdout


def explain_kubectl_error(stderr: str) -> str:
    detail = _last_line(stderr)
    if any(marker in stderr.lower() for marker in _NO_CLUSTER_MARKERS):
        return (
            "no Kubernetes cluster reachable: check `kubectl config current-context` and KUBECONFIG "
            f"(kubectl said: {detail})"
        )
    if "no matches for kind" in stderr.lower():
        return f"the cluster lacks a CRD (install KServe / Kubeflow Pipelines first, docs/cluster.md): {detail}"
    return f"kubectl apply failed: {detail}"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"

"""Strict validators from the real CRDs in ../shared/k8s-schemas (KServe, Kubeflow, Istio), for the
manifest tests. A file may hold several CRDs (Istio's five security and networking kinds)."""
from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import jsonschema
import yaml

from tests.conftest import K8S_SCHEMAS


def strict(schema):
    """kubectl-like strict field validation: additionalProperties false wherever an object lists
    its properties (k8s-schemas/README.md, step 4)."""
    if isinstance(schema, dict):
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for value in schema.values():
            strict(value)
    elif isinstance(schema, list):
        for value in schema:
            strict(value)
    return schema


def _load(path: Path) -> list[dict]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [d for d in yaml.load_all(path.read_text(), Loader=loader) if isinstance(d, dict)]


@lru_cache(maxsize=None)
def _crd_files() -> dict[tuple[str, str], Path]:
    """(group, kind) -> the file that defines it. Files named after their group (KServe, Kubeflow)
    are indexed by name without parsing them; the others are parsed once."""
    index: dict[tuple[str, str], Path] = {}
    for path in sorted(K8S_SCHEMAS.glob("*.yaml")):
        group, sep, _ = path.stem.partition("_")
        if sep and "." in group:
            index.setdefault((group, "?" + path.stem), path)  # looked up by group below
            continue
        for crd in _load(path):
            if crd.get("kind") == "CustomResourceDefinition":
                index[(crd["spec"]["group"], crd["spec"]["names"]["kind"])] = path
    return index


def _find_crd(kind: str, group: str) -> dict:
    files = _crd_files()
    candidates = [files[(group, kind)]] if (group, kind) in files else [
        p for (g, k), p in files.items() if g == group and k.startswith("?")]
    for path in candidates:
        for crd in _load(path):
            if crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind:
                return crd
    raise LookupError(f"no CRD for {group} {kind} in {K8S_SCHEMAS}")


@lru_cache(maxsize=None)
def crd_validator(kind: str, group: str, version: str) -> jsonschema.Draft4Validator:
    crd = _find_crd(kind, group)
    served = [v for v in crd["spec"]["versions"] if v["name"] == version]
    if not served:
        raise LookupError(f"{group} {kind}: no version {version} (has {[v['name'] for v in crd['spec']['versions']]})")
    return jsonschema.Draft4Validator(strict(copy.deepcopy(served[0]["schema"]["openAPIV3Schema"])))


def has_crd(kind: str, group: str) -> bool:
    try:
        _find_crd(kind, group)
    except LookupError:
        return False
    return True


def crd_errors(doc: dict) -> list[str]:
    """Strict schema errors of a custom resource, as `path: message`. apiVersion and kind chose the
    schema; metadata is Kubernetes' (the CRD schemas leave it open, Istio's do not list it)."""
    group, version = doc["apiVersion"].split("/")
    validator = crd_validator(doc["kind"], group, version)
    body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(body)]

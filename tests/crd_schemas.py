"""Strict validators from the real KServe CRDs in ../shared/k8s-schemas, for the manifest tests."""
from __future__ import annotations

import copy
from functools import lru_cache

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


@lru_cache(maxsize=None)
def crd_validator(kind: str, group: str, version: str) -> jsonschema.Draft4Validator:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for path in K8S_SCHEMAS.glob(f"{group}_*.yaml"):
        crd = yaml.load(path.read_text(), Loader=loader)
        if crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind:
            (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
            return jsonschema.Draft4Validator(strict(copy.deepcopy(served["schema"]["openAPIV3Schema"])))
    raise LookupError(f"no CRD for {group}/{version} {kind} in {K8S_SCHEMAS}")

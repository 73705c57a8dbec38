"""MLflow model registry for bundles: register with lineage, resolve by alias or version."""
from xrayops.registry.mlflow_registry import (
    RegisteredModel,
    RegistryError,
    held_aliases,
    model_version,
    numeric_metrics,
    parse_model_ref,
    register_bundle,
    resolve_bundle,
)

__all__ = ["RegisteredModel", "RegistryError", "held_aliases", "model_version", "numeric_metrics", "parse_model_ref", "register_bundle", "resolve_bundle"]

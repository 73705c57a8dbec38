from kfp.dsl import Input, Model

from components._image import xrayops_component


@xrayops_component
def register_op(
    bundle: Input[Model], tracking_uri: str, model_name: str, alias: str, dataset_md5: str, accuracy: float, pipeline_run: str
) -> str:
    """Register the bundle in MLflow with its lineage; returns the model URI (models:/name/version)."""
    from pathlib import Path

    from xrayops.contracts import Lineage
    from xrayops.registry import register_bundle

    lineage = Lineage(dataset_md5=dataset_md5, pipeline_run=pipeline_run, metrics={"accuracy": accuracy})
    registered = register_bundle(Path(bundle.path), tracking_uri, model_name, lineage, alias=alias)
    return registered.model_uri

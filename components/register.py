from kfp.dsl import Input, Model

from components._image import xrayops_component


@xrayops_component
def register_op(
    bundle: Input[Model], tracking_uri: str, model_name: str, alias: str, dataset_md5: str, accuracy: float, pipeline_run: str
) -> str:
    """Register the bundle in MLflow with its lineage; returns the model URI (models:/name/version)."""
    from pathlib import Path

    from xrayops.config import get_settings
    from xrayops.contracts import Lineage
    from xrayops.registry import register_bundle

    lineage = Lineage(dataset_md5=dataset_md5, pipeline_run=pipeline_run, metrics={"accuracy": accuracy})
    tracking_uri = tracking_uri or get_settings().tracking_uri()
    registered = register_bundle(Path(bundle.path), tracking_uri, model_name, lineage, alias=alias)
    return registered.model_uri

from typing import Optional

from kfp.dsl import Artifact, Input, Model

from components._image import xrayops_component


@xrayops_component
def register_op(
    bundle: Input[Model], tracking_uri: str, model_name: str, alias: str, dataset_md5: str, accuracy: float,
    pipeline_run: str, name_suffix: str = "", dataset_version: Optional[Input[Artifact]] = None,
) -> str:
    """Register the bundle in MLflow with its lineage; returns the model URI (models:/name/version).
    `name_suffix` registers it as NAME-SUFFIX (one registered model per ensemble member);
    `dataset_version` (the version step's dvc_file) gives the dataset md5 in place of `dataset_md5`."""
    from pathlib import Path

    from xrayops.config import get_settings
    from xrayops.contracts import Lineage
    from xrayops.registry import register_bundle

    md5 = dataset_version.metadata["md5"] if dataset_version is not None else dataset_md5
    lineage = Lineage(dataset_md5=md5, pipeline_run=pipeline_run, metrics={"accuracy": accuracy})
    tracking_uri = tracking_uri or get_settings().tracking_uri()
    name = f"{model_name}-{name_suffix}" if name_suffix else model_name
    registered = register_bundle(Path(bundle.path), tracking_uri, name, lineage, alias=alias)
    return registered.model_uri

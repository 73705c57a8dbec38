from typing import Optional

from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components._image import xrayops_component


@xrayops_component
def finetune_op(
    dataset: Input[Dataset],
    backbone: Input[Model],
    dataset_md5: str,
    epochs: int,
    seed: int,
    pipeline_run: str,
    bundle: Output[Model],
    finetune_last_stage: bool = False,
    orientation_assume_upright: bool = False,
    labels_from_store: bool = False,
    dicom: Optional[Input[Dataset]] = None,
    dataset_version: Optional[Input[Artifact]] = None,
):
    """Linear region head on the frozen backbone (Langer et al. 2024), plus the orientation head
    (Baltruschat et al. 2018) from the truth.csv angles when the DICOM folder has them (synth), or, with
    `orientation_assume_upright`, from the images turned by known amounts -> model bundle.
    `labels_from_store`: train on the feature store's point-in-time labels (reviewers'
    corrections over PACS tags) as of now, instead of the manifest's tags. `dataset_version` (the
    version step's dvc_file) gives the dataset md5 as an artifact, in place of `dataset_md5`."""
    from pathlib import Path

    from xrayops.contracts import Lineage
    from xrayops.data.truth import export_truth
    from xrayops.train.finetune import FinetuneConfig, finetune

    # synth's angles by source pseudonym; None without truth.csv, or in a task without the key
    _, angles = export_truth(Path(dicom.path) if dicom is not None else None)
    md5 = dataset_version.metadata["md5"] if dataset_version is not None else dataset_md5
    lineage = Lineage(dataset_md5=md5, pipeline_run=pipeline_run)
    labels = None
    if labels_from_store:
        from datetime import datetime, timezone

        import pandas as pd

        from xrayops.config import get_settings
        from xrayops.features import dataset_training_labels, open_store

        labels = dataset_training_labels(open_store(get_settings()), Path(dataset.path), datetime.now(timezone.utc))
        tags = pd.read_parquet(Path(dataset.path) / "manifest.parquet", columns=["image_id", "region"])
        tags = dict(zip(tags["image_id"].astype(str), tags["region"].astype(str)))
        bundle.metadata["relabelled_from_store"] = sum(1 for i, label in labels.items() if tags.get(i) != label)
    finetune(
        Path(dataset.path),
        Path(backbone.path) / "backbone.pt",
        Path(bundle.path),
        FinetuneConfig(epochs=epochs, seed=seed, finetune_last_stage=finetune_last_stage,
                       orientation_assume_upright=orientation_assume_upright),
        lineage=lineage,
        angles=angles,
        labels=labels,
    )

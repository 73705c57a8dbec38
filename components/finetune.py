from kfp.dsl import Dataset, Input, Model, Output

from components._image import xrayops_component


@xrayops_component
def finetune_op(
    dataset: Input[Dataset],
    backbone: Input[Model],
    dicom: Input[Dataset],
    dataset_md5: str,
    epochs: int,
    seed: int,
    pipeline_run: str,
    bundle: Output[Model],
    finetune_last_stage: bool = False,
):
    """Linear region head on the frozen backbone (paper 000), plus the orientation head
    (paper 004) when the DICOM folder has a truth.csv with angles -> model bundle."""
    from pathlib import Path

    from xrayops.contracts import Lineage
    from xrayops.data.dataset import read_truth_angles
    from xrayops.train.finetune import FinetuneConfig, finetune

    truth_csv = Path(dicom.path) / "truth.csv"
    angles = read_truth_angles(truth_csv) if truth_csv.exists() else None
    lineage = Lineage(dataset_md5=dataset_md5, pipeline_run=pipeline_run)
    finetune(
        Path(dataset.path),
        Path(backbone.path) / "backbone.pt",
        Path(bundle.path),
        FinetuneConfig(epochs=epochs, seed=seed, finetune_last_stage=finetune_last_stage),
        lineage=lineage,
        angles=angles,
    )

from kfp.dsl import Dataset, Output

from components._image import xrayops_component


@xrayops_component
def synth_op(
    n: int, seed: int, size: int, mislabel_rate: float, shift: float, ood_rate: float, dicom: Output[Dataset]
):
    """Synthetic radiographs (DICOM + truth.csv): the embedded default data."""
    from pathlib import Path

    from xrayops.data.synth import synthesize

    summary = synthesize(
        Path(dicom.path), n=n, seed=seed, size=size, mislabel_rate=mislabel_rate, shift=shift, ood_rate=ood_rate
    )
    dicom.metadata.update({"n_files": summary.n_files, "n_mislabeled": summary.n_mislabeled, "seed": seed})

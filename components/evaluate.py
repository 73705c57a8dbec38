from typing import Optional

from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components._image import xrayops_component


@xrayops_component
def evaluate_op(
    dataset: Input[Dataset], bundle: Input[Model], metrics: Output[Metrics], report: Output[HTML],
    dicom: Optional[Input[Dataset]] = None,
) -> float:
    """Held-out evaluation: metrics.json, confusion matrix, HTML report. Returns accuracy. Scored
    against the truth.csv of the DICOM folder where there is one (synth), else the PACS tags."""
    import shutil
    from pathlib import Path

    import pandas as pd

    from xrayops.data.dataset import read_truth_angles
    from xrayops.evaluate.report import evaluate_bundle

    truth_csv = Path(dicom.path) / "truth.csv" if dicom is not None else None
    truth = angles = None
    if truth_csv is not None and truth_csv.exists():  # synthetic data carries its true labels and orientations
        frame = pd.read_csv(truth_csv)
        truth = dict(zip(frame["file"], frame["true_region"]))
        angles = read_truth_angles(truth_csv)
    out = Path(report.path).parent / "evaluation"
    result = evaluate_bundle(Path(bundle.path), Path(dataset.path), out, split="test", truth=truth, truth_angles=angles)
    for name, value in result.metrics.items():
        if isinstance(value, (int, float)) and value == value:  # KFP metrics refuse NaN
            metrics.log_metric(name, float(value))
    shutil.copyfile(result.html_path, report.path)
    return float(result.metrics["accuracy"])

from typing import List, Optional

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

    from xrayops.data.truth import export_truth
    from xrayops.evaluate.report import evaluate_bundle

    truth, angles = export_truth(dicom.path if dicom is not None else None)
    out = Path(report.path).parent / "evaluation"
    result = evaluate_bundle(Path(bundle.path), Path(dataset.path), out, split="test", truth=truth, truth_angles=angles)
    for name, value in result.metrics.items():
        if isinstance(value, (int, float)) and value == value:  # KFP metrics refuse NaN
            metrics.log_metric(name, float(value))
    shutil.copyfile(result.html_path, report.path)
    return float(result.metrics["accuracy"])


@xrayops_component
def evaluate_ensemble_op(
    dataset: Input[Dataset], bundles: Input[List[Model]], metrics: Output[Metrics], report: Output[HTML],
    dicom: Optional[Input[Dataset]] = None,
) -> float:
    """Langer et al. 2024's ensemble (softmax average of the members) evaluated beside each member on the
    test split: one report comparing them. Returns the ensemble's accuracy."""
    import shutil
    from pathlib import Path

    from xrayops.data.truth import export_truth
    from xrayops.evaluate.report import evaluate_ensemble

    truth, angles = export_truth(dicom.path if dicom is not None else None)
    out = Path(report.path).parent / "evaluation"
    result = evaluate_ensemble([Path(b.path) for b in bundles], Path(dataset.path), out, split="test", truth=truth,
                               truth_angles=angles)
    for name, value in result.metrics.items():
        if isinstance(value, (int, float)) and value == value:
            metrics.log_metric(name, float(value))
    for key, member in result.metrics["members"].items():  # "simclr:bundle" -> member_simclr_accuracy
        metrics.log_metric(f"member_{key.split(':')[0]}_accuracy", float(member["accuracy"]))
    shutil.copyfile(result.html_path, report.path)
    return float(result.metrics["accuracy"])

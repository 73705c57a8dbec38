from typing import NamedTuple

from kfp.dsl import HTML, Dataset, Input, Output

from components._image import xrayops_component


@xrayops_component
def monitor_op(
    reference: Input[Dataset], current: Input[Dataset], report: Output[HTML]
) -> NamedTuple("MonitorOut", [("retrain", bool), ("drift_share", float)]):
    """Evidently drift of a current batch against the training reference, and the retrain decision."""
    import shutil
    from collections import namedtuple
    from pathlib import Path

    from xrayops.monitor import monitor_window

    result = monitor_window(
        Path(reference.path) / "manifest.parquet",
        Path(current.path) / "manifest.parquet",
        Path(report.path).parent / "monitor",
    )
    shutil.copyfile(result.drift.html_path, report.path)
    report.metadata.update({"retrain": result.decision.retrain, "reasons": result.decision.reasons})
    return namedtuple("MonitorOut", ["retrain", "drift_share"])(result.decision.retrain, result.drift.drift_share)

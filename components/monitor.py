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

    from xrayops.config import get_settings
    from xrayops.data.manifest import read_manifest
    from xrayops.monitor import decide_retrain, drift_report

    ref = read_manifest(Path(reference.path) / "manifest.parquet")
    cur = read_manifest(Path(current.path) / "manifest.parquet")
    out = Path(report.path).parent / "drift"
    drift = drift_report(ref[ref.status == "ok"], cur[cur.status == "ok"], out)
    decision = decide_retrain(drift, label_noise_rate=None, ood_rate=None, settings=get_settings())
    shutil.copyfile(drift.html_path, report.path)
    report.metadata.update({"retrain": decision.retrain, "reasons": decision.reasons})
    return namedtuple("MonitorOut", ["retrain", "drift_share"])(decision.retrain, drift.drift_share)

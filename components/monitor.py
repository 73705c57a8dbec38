from typing import NamedTuple

from kfp.dsl import HTML, Artifact, Dataset, Input, Output

from components._image import xrayops_component


@xrayops_component
def monitor_op(
    reference: Input[Dataset],
    current: Input[Dataset],
    report: Output[HTML],
    evidently: Output[Artifact],
    workspace_dir: str = "",
) -> NamedTuple("MonitorOut", [("retrain", bool), ("drift_share", float)]):
    """Evidently drift of a current batch against the training reference, and the retrain decision.

    The window is added as a snapshot to the Evidently workspace `workspace_dir` (on a cluster, the
    dashboard's volume), else to a workspace inside the `evidently` output artifact.
    """
    import shutil
    from collections import namedtuple
    from pathlib import Path

    from xrayops.monitor import monitor_window

    workspace = Path(workspace_dir) if workspace_dir else Path(evidently.path)
    result = monitor_window(
        Path(reference.path) / "manifest.parquet",
        Path(current.path) / "manifest.parquet",
        Path(report.path).parent / "monitor",
        workspace=workspace,
    )
    shutil.copyfile(result.drift.html_path, report.path)
    report.metadata.update({"retrain": result.decision.retrain, "reasons": result.decision.reasons})
    evidently.metadata.update({"workspace": str(workspace), "project_id": result.snapshot.project_id,
                               "snapshot_id": result.snapshot.snapshot_id})
    if workspace_dir:  # the artifact then only points at the shared workspace
        Path(evidently.path).mkdir(parents=True, exist_ok=True)
        (Path(evidently.path) / "snapshot.json").write_text(result.snapshot.model_dump_json(indent=2))
    return namedtuple("MonitorOut", ["retrain", "drift_share"])(result.decision.retrain, result.drift.drift_share)

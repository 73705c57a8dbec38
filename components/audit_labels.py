from typing import NamedTuple

from kfp.dsl import HTML, Dataset, Input, Model, Output

from components._image import xrayops_component


@xrayops_component
def audit_labels_op(
    dataset: Input[Dataset],
    backbone: Input[Model],
    issues: Output[Dataset],
    worklist: Output[HTML],
    n_folds: int = 5,
    flag_below: float = 0.1,
    pool_studies: bool = True,
    worklist_limit: int = 200,
) -> NamedTuple("AuditOut", [("n_issues", int), ("label_health_score", float)]):
    """Confident-learning audit of the PACS labels on out-of-fold linear-head probabilities,
    and the radiologists' review worklist. flag_below 0 leaves the flags to cleanlab's filter;
    pool_studies judges a study's images with the same tag together."""
    import shutil
    from collections import namedtuple
    from pathlib import Path

    from xrayops.monitor.label_audit import AuditConfig, audit_labels
    from xrayops.monitor.worklist import write_audit_worklist

    out = Path(issues.path)
    out.mkdir(parents=True, exist_ok=True)
    cfg = AuditConfig(n_folds=n_folds, flag_below=flag_below or None, pool_studies=pool_studies)
    audit = audit_labels(dataset.path, Path(backbone.path) / "backbone.pt", out, cfg)
    _, review = write_audit_worklist(audit.scores_path, dataset.path, out, limit=worklist_limit or None)
    shutil.copyfile(review.html_path, worklist.path)
    issues.metadata.update({"n_issues": audit.n_issues, "n_cleanlab_issues": audit.n_cleanlab_issues,
                            "label_health_score": audit.label_health_score,
                            "n_images": audit.n_images})
    return namedtuple("AuditOut", ["n_issues", "label_health_score"])(audit.n_issues, audit.label_health_score)

from kfp.dsl import HTML, Artifact, Dataset, Input, Model, Output

from components._image import xrayops_component


@xrayops_component
def change_record_op(
    dataset: Input[Dataset],
    champion: Input[Model],
    champion_uri: str,
    challenger: Input[Model],
    challenger_uri: str,
    test_set: str,
    decision: Input[Artifact],
    dvc_remote_url: str,
    s3_endpoint_url: str,
    labels_from_store: bool,
    trigger_window: str,
    trigger_reasons: str,
    trigger_log: str,
    record: Output[HTML],
    record_json: Output[Artifact],
) -> str:
    """The change record of this run's challenger (shown by the KFP UI as HTML): the dataset diff
    against the champion's version (read from the DVC remote), reviewers' corrections, the code and
    configuration diff, the trigger's evidence, the gate's decision with subgroups, both models'
    metrics with intervals, and the approval block. Returns the record id."""
    import shutil
    from datetime import datetime, timezone
    from pathlib import Path

    from xrayops.bundle_meta import read_bundle_meta
    from xrayops.config import get_settings
    from xrayops.evaluate.gate import GateDecision
    from xrayops.release.change_record import ChangeInputs, build_change_record, trigger_evidence

    settings = get_settings()
    labels = None
    if labels_from_store:  # the labels the challenger trained on, as of when it was trained
        from xrayops.features import dataset_training_labels, open_store

        made = read_bundle_meta(Path(challenger.path)).created_at or datetime.now(timezone.utc)
        labels = dataset_training_labels(open_store(settings), Path(dataset.path), made)
    inputs = ChangeInputs(
        champion_bundle=Path(champion.path), champion_ref=champion_uri, challenger_bundle=Path(challenger.path),
        challenger_ref=challenger_uri, data_dir=Path(dataset.path), test_set=test_set,
        gate=GateDecision.model_validate_json(Path(decision.path).read_text()),
        dvc_remote=dvc_remote_url or settings.dvc_remote(), s3_endpoint_url=s3_endpoint_url or settings.s3_endpoint_url,
        labels=labels, trigger=trigger_evidence(Path(trigger_log) if trigger_log else None, trigger_window,
                                                trigger_reasons, settings.dashboard_url),
        requires_approval=settings.release_requires_approval, image=settings.image,
    )
    made, json_path, html_path = build_change_record(inputs, Path(record.path).parent / "change-record")
    shutil.copyfile(html_path, record.path)
    shutil.copyfile(json_path, record_json.path)
    record.metadata.update({"record_id": made.record_id, "promote": made.gate.promote,
                            "refused_subgroups": [f"{g.attribute}={g.value}" for g in made.gate.refused_subgroups]})
    return made.record_id

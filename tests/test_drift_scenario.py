"""`xrayops demo --scenario drift` at small scale, with the real components: the champion serves,
a vendor-shifted batch with more wrong tags arrives, monitoring sees it, the trigger retrains on
the new DVC version, the gate promotes the challenger and serving answers from it."""
import json
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient

from xrayops.config import Settings
from xrayops.monitor.trigger import AuditLog
from xrayops.registry.mlflow_registry import TAG_DATASET_MD5
from xrayops.monitor.ui import find_chromium
from xrayops.app.scenario import DriftScenarioConfig, run_drift_scenario

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    root = tmp_path_factory.mktemp("drift")
    repo = root / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    settings = Settings(data_dir=repo / "data", dvc_remote_url=str(root / "remote"), deid_key="drift-test-key-not-secret")
    # At this scale both models are near chance and their accuracies differ by noise, so the gate
    # margin is opened to exercise promotion and reload; the gate's own decisions are tested in
    # test_gate.py, and the demo-scale run (README) gates with the configured 0.01.
    cfg = DriftScenarioConfig(out=root / "out", repo_dir=repo, n=300, n_window=40, synth_size=96, image_size=48,
                              pretrain_epochs=2, batch_size=64, finetune_epochs=40, workers=1, gate_margin=1.0)
    return run_drift_scenario(cfg, settings), settings


def test_monitoring_sees_the_shift_and_the_trigger_fires_once(story):
    summary, settings = story
    rows = summary.step("monitor").facts["windows"]
    calm, shifted = rows[:2], rows[2:]
    assert max(r["drift_share"] for r in calm) < settings.drift_share_threshold <= min(r["drift_share"] for r in shifted)
    assert [r["action"] for r in rows] == ["none", "none", "launched", "suppressed"]
    audit = AuditLog(summary.out / "monitor" / "trigger.jsonl").read()
    assert len(audit) == 4 and audit[2].run_id == str(summary.out / "kfp-retrain")  # the retraining pipeline ran
    assert "drift_share" in audit[2].crossed and audit[3].suppressed_by == "duplicate cause"


def test_challenger_trained_on_the_new_dataset_version_is_gated_and_promoted(story):
    summary, settings = story
    v1 = summary.step("version").facts["md5"]
    gate = json.loads((summary.out / "gate.json").read_text())
    assert gate["test_set"] != v1 and gate["test_set"] == summary.step("gate").facts["test_set"]
    assert summary.step("gate").facts["v2_ok"] > summary.step("ingest").facts["ok"]  # the batch joined v2
    assert gate["promote"] and gate["ci_low"] > -gate["margin"] and gate["n"] > 0
    uri = settings.model_copy(update={"output_dir": summary.out}).tracking_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    challenger = client.get_model_version_by_alias(settings.registered_model_name, "champion")
    assert challenger.tags[TAG_DATASET_MD5] == gate["test_set"]
    assert int(challenger.version) == summary.step("register").facts["version"] + 1


def test_retraining_reviews_the_suspect_labels_and_trains_on_the_corrections(story):
    import pandas as pd

    from xrayops.bundle import load_bundle

    summary, _ = story
    review = summary.step("gate").facts["review"]
    audit_dir = summary.out / "label-audit"
    decisions = pd.read_csv(audit_dir / "review_decisions.csv", dtype=str, keep_default_na=False)
    worklist = pd.read_csv(audit_dir / "review_worklist.csv", dtype=str, keep_default_na=False)
    assert 0 < review["reviewed"] == len(decisions) <= min(review["flagged"], 200)
    assert decisions["image_id"].tolist() == worklist["image_id"].tolist()[: len(decisions)]  # most doubtful first
    assert review["relabelled"] > 0 and review["rejected"] == 0
    assert review["relabelled"] + review["kept"] + review["excluded"] == review["reviewed"]
    # The decisions reached the feature store as label events ...
    events = pd.read_parquet(summary.out / "feature_repo" / "data" / "reviewed_labels.parquet")
    assert len(events) == review["reviewed"] and set(events["reviewer"]) == {"simulated-radiologist"}
    # ... and the challenger trained on them: every relabel changed one training label.
    meta = load_bundle(Path(summary.step("gate").artefacts["challenger_bundle"])).meta
    assert meta.lineage.metrics["labels_changed_from_tags"] == review["relabelled"]


def test_serving_reloads_onto_the_new_champion(story):
    summary, _ = story
    reload = summary.step("reload").facts
    assert reload["served_versions"] == [reload["champion_alias_version"]]
    assert reload["champion_alias_version"] != str(summary.step("register").facts["version"])
    # ... through a serving release, as on a cluster: the promoted version replaces the first release,
    # and the InferenceService manifest records the one before for a rollback.
    import yaml

    from xrayops.release.plan import ANNOTATION_PREVIOUS, ANNOTATION_RELEASE

    assert reload["members"] == {"simclr": f"models:/xrayops-region/{reload['champion_alias_version']}"}
    assert reload["replaces"] and reload["replaces"] != reload["release_id"]
    notes = yaml.safe_load(Path(summary.step("reload").artefacts["inference_service"]).read_text())["metadata"]["annotations"]
    assert (notes[ANNOTATION_RELEASE], notes[ANNOTATION_PREVIOUS]) == (reload["release_id"], reload["replaces"])


@pytest.mark.skipif(find_chromium() is None, reason="headless Chromium not installed")
def test_dashboard_screenshot_is_written(story):
    summary, _ = story
    shot = summary.step("dashboard").artefacts["screenshot"]
    from PIL import Image

    assert Image.open(shot).size == (1400, 1800)


def test_gate_cli_scores_both_versions_on_the_versioned_test_set(story, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from xrayops.app.cli import app
    from xrayops.versioning import read_dvc_file

    summary, settings = story
    repo = settings.data_dir.parent
    monkeypatch.setenv("XRAYOPS_OUTPUT_DIR", str(summary.out))
    monkeypatch.setenv("XRAYOPS_DATA_DIR", str(settings.data_dir))
    name = settings.registered_model_name
    out = tmp_path / "gate.json"
    result = CliRunner().invoke(app, ["gate", "--champion", f"models:/{name}/1", "--challenger", f"models:/{name}/2",
                                      "--dataset-dvc", str(repo / "data.dvc"), "--no-promote", "--out", str(out)])
    assert result.exit_code == 0, result.output
    decision = json.loads(out.read_text())
    # The export as reviewed, versioned beside the pipeline's own ingestion of it.
    assert decision["test_set"] == read_dvc_file(repo / "data.dvc")["md5"] != summary.step("version").facts["md5"]
    assert decision["champion"] == f"models:/{name}/1" and decision["challenger"] == f"models:/{name}/2"
    assert decision["promote"] == (decision["ci_low"] > -decision["margin"])
    # Scored against the PACS tags here (no --truth): every tagged test image, and no alias moved.
    uri = settings.model_copy(update={"output_dir": summary.out}).tracking_uri()
    assert str(MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(name, "champion").version) == "2"
    refused = CliRunner().invoke(app, ["gate", "--champion", f"models:/{name}/1", "--challenger", f"models:/{name}@champion",
                                       "--dataset-dvc", str(repo / "data.dvc"), "--out", str(out)])
    assert refused.exit_code == 2 and "VERSION" in refused.output


def test_demo_cli_refuses_a_missing_backbone(tmp_path, monkeypatch):
    import os

    # Whatever the verb does to the environment stays in this test.
    monkeypatch.setenv("XRAYOPS_DEID_KEY", os.environ.get("XRAYOPS_DEID_KEY", "drift-test-key-not-secret"))
    from typer.testing import CliRunner

    from xrayops.app.cli import app

    result = CliRunner().invoke(app, ["demo", "--scenario", "drift", "--out", str(tmp_path), "--backbone",
                                      str(tmp_path / "nope.pt")])
    assert result.exit_code == 2 and "nope.pt not found" in result.output
    assert not any(tmp_path.iterdir())  # refused before any work


def test_the_promotion_is_approved_on_a_change_record_before_it_is_served(story):
    from xrayops.release.approval import read_entries, verify_chain

    summary, settings = story
    approval = summary.step("approve").facts
    assert approval["approved"] is True and approval["by"] == "Demo Quality Officer (stand-in)"
    assert Path(summary.step("approve").artefacts["change_record"]).is_file()
    log = Path(summary.step("approve").artefacts["audit_log"])
    assert verify_chain(log).ok
    (entry,) = read_entries(log)
    assert entry.decision == "approved" and entry.release_id == approval["release_id"] and entry.change_record_sha256
    assert summary.step("reload").facts["release_id"] == approval["release_id"]  # the approved release is served

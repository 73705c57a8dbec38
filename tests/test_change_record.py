"""The change record (xrayops.release.change_record): built from two real bundles on a versioned
dataset (the previous version's manifest read from a real DVC remote), it carries the dataset diff,
reviewers' corrections, the trigger's evidence, the gate with subgroups and both models' metrics
with intervals; it renders in headless Chromium without console messages and prints to PDF."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_dataset import make_data_dir, random_backbone

from xrayops.monitor.trigger import AuditLog, TriggerDecision, TriggerSignals
from xrayops.monitor.ui import find_chromium
from xrayops.release.change_record import (
    ChangeInputs,
    ChangeRecord,
    build_change_record,
    config_diff,
    print_pdf,
    render_change_record,
    trigger_evidence,
)
from xrayops.release.dataset_diff import DatasetDiffError, diff_manifests, label_corrections, read_version_manifest

torch.set_num_threads(1)
needs_chromium = pytest.mark.skipif(find_chromium() is None, reason="headless Chromium not installed")


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """v1 (the champion's data, pushed to a DVC remote) and v2 = v1 plus a new vendor's images,
    one v1 image gone; a champion trained on v1 and a challenger on v2."""
    from xrayops.bundle_meta import read_bundle_meta
    from xrayops.contracts import Lineage
    from xrayops.train import FinetuneConfig, finetune
    from xrayops.versioning import version_dataset

    root = tmp_path_factory.mktemp("change-record")
    tiny = make_data_dir(root / "repo" / "data", n_per_class=20, n_unknown=0, seed=9)
    manifest = pd.read_parquet(tiny.data_dir / "manifest.parquet")
    ok = (manifest["status"] == "ok").to_numpy()
    position = np.arange(len(manifest))
    manifest["manufacturer"] = np.where(ok, np.where(position % 4 == 0, "NewVendor", "OldVendor"), "")
    manifest["study_id"] = [f"s{k // 10}" for k in position]
    v2 = manifest.copy()
    v1 = manifest[~((manifest["manufacturer"] == "NewVendor") | (manifest["image_id"] == "i1"))].copy()
    v1 = pd.concat([v1, manifest[manifest["image_id"] == "i1"]])  # i1 is in v1 only (removed in v2)
    v2 = v2[v2["image_id"] != "i1"]
    v2.loc[v2["image_id"] == "i2", "region"] = "wrist"  # a tag that changed between the versions
    v1.to_parquet(tiny.data_dir / "manifest.parquet", index=False)
    remote = root / "dvc-remote"
    v1_version = version_dataset(root / "repo", root / "repo" / "data", remote_url=str(remote))
    v2.to_parquet(tiny.data_dir / "manifest.parquet", index=False)
    backbone = random_backbone(root / "backbone.pt")
    champion = finetune(tiny.data_dir, backbone, root / "champion", FinetuneConfig(epochs=2, batch_size=64),
                        lineage=Lineage(dataset_md5=v1_version.md5, git_commit="1111111", pipeline_run="run-1"))
    challenger = finetune(tiny.data_dir, backbone, root / "challenger", FinetuneConfig(epochs=3, batch_size=64, seed=1),
                          lineage=Lineage(dataset_md5="v2md5.dir", git_commit="2222222", pipeline_run="run-2"))
    return dict(tiny=tiny, v1=v1, v2=v2, remote=remote, v1_md5=v1_version.md5, champion=champion,
                challenger=challenger, metas=(read_bundle_meta(champion), read_bundle_meta(challenger)), root=root)


def test_the_previous_version_is_read_from_the_dvc_remote_and_diffed(versions):
    got = read_version_manifest(str(versions["remote"]), versions["v1_md5"])
    assert sorted(got["image_id"]) == sorted(versions["v1"]["image_id"])
    diff = diff_manifests(got, versions["v2"], versions["v1_md5"], "v2md5.dir")
    new = int(((versions["v2"]["manufacturer"] == "NewVendor") & (versions["v2"]["status"] == "ok")).sum())
    assert diff.added == new and diff.added_by == {"manufacturer": {"NewVendor": new}}
    assert diff.removed == 1 and diff.removed_by == {"manufacturer": {"OldVendor": 1}}
    assert diff.tag_changes == 1 and diff.kept == diff.n_current - diff.added
    with pytest.raises(DatasetDiffError, match="not in the DVC remote"):
        read_version_manifest(str(versions["remote"]), "0" * 32 + ".dir")
    with pytest.raises(DatasetDiffError, match="not a DVC directory hash"):
        read_version_manifest(str(versions["remote"]), "abc")


def test_corrections_and_config_diff():
    fixed = label_corrections({"a": "hand", "b": "knee", "c": "skull", "d": "hand"},
                              {"a": "wrist", "b": "unknown", "c": "skull", "d": "wrist", "e": "knee"})
    assert fixed.n_labels == 5 and fixed.by_reason == {"exclude": 1, "relabel": 3}
    assert [(t.from_label, t.to_label, t.n) for t in fixed.transitions][:1] == [("hand", "wrist", 2)]
    from xrayops.contracts import ModelBundleMeta, PreprocessingSpec

    a = ModelBundleMeta(classes=["hand"], preprocessing=PreprocessingSpec(size=32), weights_sha256="x")
    b = a.model_copy(update={"temperature": 1.5, "weights_sha256": "y", "preprocessing": PreprocessingSpec(size=64)})
    assert [(c.field, c.champion, c.challenger) for c in config_diff(a, b)] == [
        ("preprocessing.size", "32", "64"), ("temperature", "1.0", "1.5")]


def _trigger_log(path):
    log = AuditLog(path)
    for window, action in (("w-1", "none"), ("w-2", "launched")):
        log.append(TriggerDecision(
            decided_at=datetime(2026, 12, 1, 8, tzinfo=timezone.utc), window_id=window, model_version="1",
            crossed=["drift_share"] if action == "launched" else [], action=action, run_id="run-abc" if action == "launched" else "",
            reasons=["data drift share 0.50 >= 0.30 (manufacturer, pixel_std)"] if action == "launched" else [],
            signals=TriggerSignals(window_id=window, drift_share=0.5, drifted_columns=["manufacturer", "pixel_std"],
                                   label_noise_rate=0.21, reference_label_noise_rate=0.12, n_judged=240, ood_rate=0.04),
            policy={}))
    return path


@pytest.fixture(scope="module")
def record(versions):
    root = versions["root"]
    trigger = trigger_evidence(_trigger_log(root / "trigger.jsonl"), dashboard_url="http://dashboard.example/projects/p1")
    inputs = ChangeInputs(
        champion_bundle=versions["champion"], champion_ref="models:/xrayops-region/1",
        challenger_bundle=versions["challenger"], challenger_ref="models:/xrayops-region/2",
        data_dir=versions["tiny"].data_dir, test_set="v2md5.dir", truth=versions["tiny"].truth,
        dvc_remote=str(versions["remote"]), labels={"i3": "unknown", "i4": "skull" if versions["v2"].set_index("image_id").loc["i4", "region"] != "skull" else "knee"},
        trigger=trigger, gate_samples=300, subgroup_min_n=5)
    return build_change_record(inputs, root / "record")


def test_the_record_carries_what_changed_why_and_the_evidence(record, versions):
    rec, json_path, html_path = record
    assert ChangeRecord.model_validate_json(json_path.read_text()) == rec
    assert rec.record_id.startswith("cr-") and rec.release is None and rec.approval is None
    assert rec.dataset.previous_md5 == versions["v1_md5"] and rec.dataset.added > 0 and rec.dataset.removed == 1
    assert rec.corrections.by_reason == {"exclude": 1, "relabel": 1}
    assert rec.trigger.window_id == "w-2" and rec.trigger.run_id == "run-abc" and rec.trigger.drift_share == 0.5
    assert rec.code.champion_commit == "1111111" and rec.code.challenger_commit == "2222222"
    assert any(c.field == "lineage.dataset_md5" for c in rec.config)
    assert {g.value for g in rec.gate.subgroups if g.attribute == "manufacturer"} == {"NewVendor", "OldVendor"}
    table = rec.challenger.evaluation.vs_truth
    assert table.intervals.accuracy.low <= table.accuracy <= table.intervals.accuracy.high
    page = html_path.read_text()
    for fact in (rec.record_id, "keep the champion" if not rec.gate.promote else "promote", "NewVendor",
                 "data drift share 0.50 &gt;= 0.30 (manufacturer, pixel_std)", 'href="http://dashboard.example/projects/p1"',
                 "21.0% (12.0%)", versions["v1_md5"], "awaiting approval", "xrayops release approve RELEASE_ID",
                 f"{table.accuracy:.3f} [{table.intervals.accuracy.low:.3f}, {table.intervals.accuracy.high:.3f}]",
                 "Signature", "2222222"):
        assert fact in page, fact


def test_a_record_without_a_previous_version_or_trigger_says_so(versions, tmp_path):
    rec, _, html_path = build_change_record(ChangeInputs(
        champion_bundle=versions["champion"], champion_ref="models:/x/1", challenger_bundle=versions["challenger"],
        challenger_ref="models:/x/2", data_dir=versions["tiny"].data_dir, test_set="v2md5.dir", gate_samples=200,
        previous_manifest=tmp_path / "missing.parquet"), tmp_path)
    page = html_path.read_text()
    assert rec.dataset is None and "missing.parquet not found" in rec.dataset_note
    assert "No trigger record: this run was started by hand." in page and "trained on the PACS tags as ingested" in page


@needs_chromium
def test_the_record_renders_in_headless_chromium_without_console_errors_and_prints(record, tmp_path):
    rec, _, html_path = record
    printed = print_pdf(html_path, tmp_path / "change_record.pdf")
    assert printed.console == []
    pdf = printed.pdf.read_bytes()
    assert pdf.startswith(b"%PDF-") and len(pdf) > 10_000 and pdf.count(b"/Type /Page") >= 2
    # The check sees console errors where there are some: a page with a failing script.
    broken = tmp_path / "broken.html"
    broken.write_text(render_change_record(rec).replace("</body>", "<script>noSuchFunction()</script></body>"))
    assert any("noSuchFunction is not defined" in line for line in print_pdf(broken, tmp_path / "b.pdf").console)


@needs_chromium
def test_cli_records_a_published_release_then_its_approval(versions, tmp_path, monkeypatch):
    """`xrayops release record` on a candidate release (the retrained member replacing the champion's),
    printed to PDF; approved with the record's hash; recorded again, the approval block shows who."""
    from typer.testing import CliRunner

    from xrayops.app.cli import app
    from xrayops.registry import register_bundle
    from xrayops.release import release_models

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    champion = register_bundle(versions["champion"], uri, "cr-region", alias="champion").model_uri
    challenger = register_bundle(versions["challenger"], uri, "cr-region", alias="challenger").model_uri
    storage = tmp_path / "store"
    first = release_models(None, [champion], str(storage), uri).release
    from tests.test_release import base_isvc

    live = release_models([base_isvc()], [champion], str(storage), uri)
    candidate = release_models(live.documents, [challenger], str(storage), uri).release
    assert candidate.previous == first.release_id
    dvc_file = tmp_path / "data.dvc"
    dvc_file.write_text("outs:\n- md5: v2md5.dir\n  path: data\n")
    for key, value in {"XRAYOPS_MLFLOW_TRACKING_URI": uri, "XRAYOPS_RELEASE_STORAGE_URI": str(storage),
                       "XRAYOPS_DVC_REMOTE_URL": str(versions["remote"]), "XRAYOPS_OUTPUT_DIR": str(tmp_path / "out"),
                       "XRAYOPS_RELEASE_AUDIT_LOG": str(tmp_path / "audit.jsonl"), "XRAYOPS_GATE_BOOTSTRAP_SAMPLES": "300",
                       "XRAYOPS_DASHBOARD_URL": "http://dash.example/p"}.items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    record = ["release", "record", candidate.release_id, "--dataset-dvc", str(dvc_file), "--data-dir",
              str(versions["tiny"].data_dir), "--out", str(tmp_path / "record"), "--pdf"]
    res = runner.invoke(app, record)
    assert res.exit_code == 0, res.output
    said = json.loads(res.stdout[res.stdout.index("{"):])
    assert said["approval"] == "awaiting approval" and said["console"] == [] and said["release"] == candidate.release_id
    assert (tmp_path / "record" / "change_record.pdf").read_bytes().startswith(b"%PDF-")
    page = (tmp_path / "record" / "change_record.html").read_text()
    assert f"Candidate release <strong>{candidate.release_id}</strong>" in page and challenger in page
    assert f"xrayops release approve {candidate.release_id} --by NAME" in page
    assert versions["v1_md5"] in page  # the champion's dataset version, read from the DVC remote

    res = runner.invoke(app, ["release", "approve", candidate.release_id, "--by", "Dr. Q. Officer", "--note",
                              "subgroups read", "--record", str(tmp_path / "record" / "change_record.html")])
    assert res.exit_code == 0, res.output
    entry = json.loads(res.stdout[res.stdout.index("{"):])["entry"]
    assert len(entry["change_record_sha256"]) == 64
    res = runner.invoke(app, record[:-1])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "record" / "change_record.html").read_text()
    assert "Approval: approved" in page and "Dr. Q. Officer" in page and entry["hash"] in page
    res = runner.invoke(app, ["release", "record", first.release_id, "--dataset-dvc", str(dvc_file), "--data-dir",
                              str(versions["tiny"].data_dir), "--out", str(tmp_path / "r2")])
    assert res.exit_code == 2 and "give the champion to compare with" in " ".join(res.output.split())

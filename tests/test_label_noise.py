"""Label noise: the online rate from the inference log, the cleanlab audit with out-of-fold
probabilities, the review worklist and reviewer decisions as label events."""
from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from xrayops.monitor.label_audit import (
    AuditConfig,
    audit_frame,
    audit_labels,
    compact_labels,
    flagged_vs_truth,
    out_of_fold_probabilities,
    pool_quality,
)
from xrayops.monitor.label_noise import label_noise_report, label_noise_table
from xrayops.monitor.review import decisions_to_events, events_frame, read_decisions
from xrayops.monitor.worklist import rank_for_review, thumbnail_png, write_worklist
from xrayops.regions import REGIONS
from tests.tiny_dataset import make_data_dir, random_backbone


def _log() -> pd.DataFrame:
    ts = pd.Timestamp("2025-03-01T10:00:00Z")
    return pd.DataFrame({
        "timestamp": [ts, ts, ts + pd.Timedelta("1h"), ts + pd.Timedelta("1h"), ts + pd.Timedelta("2h"), ts],
        "site": ["north", "north", "south", "south", "south", "north"],
        "manufacturer": ["A", "B", "A", None, "A", "B"],
        "region": ["hand", "hand", "knee", "knee", "skull", "rib"],
        "dicom_region": ["wrist", "hand", "knee", "unknown", "rib", "skull"],
        "confidence": [0.95, 0.99, 0.97, 0.99, 0.5, 0.91],
    })


def test_online_rate_per_window_site_and_vendor():
    log = _log()
    # judged = confident and tagged: rows 0, 1, 2, 5; disagreeing: rows 0 and 5.
    report = label_noise_report(log, 0.9, groupings=(("site",), ("manufacturer",), ("scanner",)))
    assert (report.n_judged, report.n_disagreeing, report.rate) == (4, 2, 0.5)
    assert report.missing_columns == ["scanner"]
    by_site = {r["site"]: r for r in report.breakdowns[0].rows}
    assert by_site["north"]["rate"] == pytest.approx(2 / 3) and by_site["north"]["n_judged"] == 3
    assert by_site["south"]["rate"] == 0.0 and by_site["south"]["n_predictions"] == 3
    by_vendor = {r["manufacturer"]: r for r in report.breakdowns[1].rows}
    assert by_vendor["B"]["rate"] == 0.5 and by_vendor[""]["rate"] is None  # blank tag: own group, nothing judged

    hourly = label_noise_table(log, 0.9, by=["site"], window="1h")
    assert hourly["window_start"].dt.hour.tolist() == [10, 11, 12]
    assert hourly["rate"].tolist()[:2] == [pytest.approx(2 / 3), 0.0] and pd.isna(hourly["rate"].iloc[2])
    with pytest.raises(ValueError, match="no such column"):
        label_noise_table(log, 0.9, by=["scanner"])
    with pytest.raises(ValueError, match="lacks columns"):
        label_noise_report(log.drop(columns=["confidence"]), 0.9)
    empty = label_noise_report(log.iloc[:0], 0.9)
    assert empty.rate is None and empty.n_predictions == 0


def _clusters(n_per_class: int, classes: list[str], flip: float, rng: np.random.Generator):
    """Well-separated Gaussian embeddings per true class, with a share of labels flipped."""
    centres = rng.normal(0, 1, (len(classes), 16)) * 4
    true = np.repeat(np.arange(len(classes)), n_per_class)
    x = centres[true] + rng.normal(0, 1, (len(true), 16))
    given = true.copy()
    flipped = rng.choice(len(true), int(flip * len(true)), replace=False)
    given[flipped] = (true[flipped] + 1 + rng.integers(0, len(classes) - 1, len(flipped))) % len(classes)
    return x, true, given


def test_out_of_fold_probabilities_never_see_their_own_label():
    rng = np.random.default_rng(0)
    classes = ["skull", "knee", "hand"]
    x, true, given = _clusters(40, classes, 0.1, rng)
    probs = out_of_fold_probabilities(x, given, 3, n_folds=5, seed=0)
    assert probs.shape == (120, 3) and np.allclose(probs.sum(1), 1)
    # The flipped images are predicted as their TRUE class: their own wrong label was held out.
    wrong = given != true
    assert (probs[wrong].argmax(1) == true[wrong]).mean() >= 0.9
    with pytest.raises(ValueError, match="at least"):
        out_of_fold_probabilities(x[:3], given[:3], 3)


def test_audit_frame_finds_flipped_labels_with_cleanlab():
    rng = np.random.default_rng(1)
    classes = ["skull", "knee", "hand", "pelvis_hip"]
    x, true, given = _clusters(60, classes, 0.05, rng)
    rows = pd.DataFrame({"image_id": [f"i{k}" for k in range(len(given))], "region": [classes[g] for g in given],
                         "source_name": [f"f{k}" for k in range(len(given))]})
    table, scores, present = audit_frame(rows, x, AuditConfig(n_folds=4))
    assert present == [r for r in REGIONS if r in classes]
    truth = pd.DataFrame({"file": rows["source_name"], "true_region": [classes[t] for t in true],
                          "mislabeled": true != given, "ood": False})
    measured = flagged_vs_truth(table, truth)
    assert measured["n_wrong"] == 12
    assert measured["recall"] >= 0.9 and measured["precision"] >= 0.8
    assert 0.85 <= scores.health <= 1.0
    # Wrong labels score lower than right ones.
    assert table.loc[true != given, "label_quality"].mean() < table.loc[true == given, "label_quality"].mean()
    # The default flags are the images whose own tag gets < 0.1 out-of-fold probability;
    # cleanlab's confident-learning filter is kept beside them.
    assert (table["is_issue"] == (table["given_probability"] < 0.1)).all()
    assert table["is_issue"].tolist() == scores.is_issue.tolist() and "cleanlab_issue" in table
    by_filter = flagged_vs_truth(table, truth, "cleanlab_issue")
    assert by_filter["n_flagged"] == int(scores.cleanlab_issue.sum()) and by_filter["recall"] >= 0.9
    filter_only, _, _ = audit_frame(rows, x, AuditConfig(n_folds=4, flag_below=None))
    assert filter_only["is_issue"].tolist() == filter_only["cleanlab_issue"].tolist() == table["cleanlab_issue"].tolist()
    with pytest.raises(ValueError, match="not regions"):
        compact_labels(["skull", "spleen"])


def test_pool_quality_is_the_geometric_mean_over_a_group():
    pooled = pool_quality(np.array([0.04, 0.5, 0.9, 0.2]), ["s1|hand", "s1|hand", "s2|knee", "s3|hand"])
    assert np.allclose(pooled, [0.1414214, 0.1414214, 0.9, 0.2])
    assert np.array_equal(pool_quality(np.array([0.3, 0.7]), None), [0.3, 0.7])
    with pytest.raises(ValueError, match="3 group keys for 2 images"):
        pool_quality(np.array([0.3, 0.7]), ["a", "b", "c"])


def test_a_study_tag_is_judged_on_all_the_images_that_carry_it():
    """Tags are wrong per study (paper 001's study-level labels); pooling a study's images finds
    more of the wrong tags than judging each image alone when single views are ambiguous."""
    rng = np.random.default_rng(4)
    classes = ["skull", "knee", "hand", "pelvis_hip"]
    n_studies = 240
    true_study = rng.integers(0, len(classes), n_studies)
    given_study = true_study.copy()
    flipped = rng.choice(n_studies, 24, replace=False)
    given_study[flipped] = (true_study[flipped] + rng.integers(1, len(classes), len(flipped))) % len(classes)
    study = np.repeat(np.arange(n_studies), 2)  # two views a study
    true, given = true_study[study], given_study[study]
    centres = rng.normal(0, 1, (len(classes), 16)) * 1.6  # overlapping: one view is often ambiguous
    x = centres[true] + rng.normal(0, 1, (len(true), 16))
    rows = pd.DataFrame({"image_id": [f"i{k}" for k in range(len(true))], "study_id": [f"stu-{s}" for s in study],
                         "region": [classes[g] for g in given], "source_name": [f"f{k}" for k in range(len(true))]})
    truth = pd.DataFrame({"file": rows["source_name"], "true_region": [classes[t] for t in true]})
    pooled, _, _ = audit_frame(rows, x, AuditConfig(n_folds=4))
    alone, _, _ = audit_frame(rows, x, AuditConfig(n_folds=4, pool_studies=False))
    assert np.allclose(alone["label_quality"], alone["image_quality"])
    assert np.allclose(pooled["image_quality"], alone["image_quality"])  # same heads, same image scores
    expected = np.exp(np.log(pooled["image_quality"]).groupby(study).transform("mean"))
    assert np.allclose(pooled["label_quality"], expected)
    # A study's images stand or fall together.
    assert (pooled.groupby(study)["is_issue"].nunique() == 1).all()
    p, a = flagged_vs_truth(pooled, truth), flagged_vs_truth(alone, truth)
    assert p["n_wrong"] == 48
    assert p["recall"] > a["recall"] and p["precision"] >= a["precision"]
    # Without study ids every image is its own group.
    no_ids, _, _ = audit_frame(rows.drop(columns="study_id"), x, AuditConfig(n_folds=4))
    assert np.allclose(no_ids["label_quality"], no_ids["image_quality"])


def test_an_ensemble_averages_its_members_out_of_fold_probabilities():
    rng = np.random.default_rng(2)
    classes = ["skull", "knee", "hand"]
    x, true, given = _clusters(30, classes, 0.1, rng)
    noise = rng.normal(0, 1, x.shape)  # a member that knows nothing
    rows = pd.DataFrame({"image_id": [f"i{k}" for k in range(len(given))], "region": [classes[g] for g in given],
                         "source_name": [f"f{k}" for k in range(len(given))]})
    cfg = AuditConfig(n_folds=3)
    good, _, _ = audit_frame(rows, x, cfg)
    blind, _, _ = audit_frame(rows, noise, cfg)
    both, _, present = audit_frame(rows, [x, noise], cfg)
    columns = [f"prob_{c}" for c in present]
    assert np.allclose(both[columns], (good[columns].to_numpy() + blind[columns].to_numpy()) / 2)
    # Averaging with a blind member pulls the probabilities towards uniform.
    assert both["suggested_probability"].mean() < good["suggested_probability"].mean()
    with pytest.raises(ValueError, match="at least one"):
        audit_frame(rows, [], cfg)


def test_stage_features_pool_the_named_resnet_stages():
    import torch

    from xrayops.models.backbone import build_backbone, stage_features

    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18")
    backbone.eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        last = stage_features(backbone, x, ("layer4",))
        multi = stage_features(backbone, x, ("layer4", "layer2", "layer3"))
    assert torch.allclose(last, backbone(x), atol=1e-6)
    assert multi.shape == (3, 128 + 256 + dim)  # stage order, whatever order they were named in
    assert torch.allclose(multi[:, -dim:], last, atol=1e-6)
    with pytest.raises(ValueError, match="subset"):
        stage_features(backbone, x, ("layer5",))


def test_audit_labels_on_a_dataset_writes_issues_and_worklist(tmp_path):
    data = make_data_dir(tmp_path / "data", n_per_class=20, size=32, mislabel_rate=0.1, seed=3)
    backbone = random_backbone(tmp_path / "backbone.pt")
    audit = audit_labels(data.data_dir, backbone, tmp_path / "audit",
                         AuditConfig(n_folds=3, rotation_average=False, device="cpu"))
    scores = pd.read_parquet(audit.scores_path)
    assert audit.backbones == [str(backbone)] and audit.config.stages == ["layer2", "layer3", "layer4"]
    assert audit.n_cleanlab_issues == int(scores["cleanlab_issue"].sum())
    flagged_tags = scores.loc[scores["is_issue"], ["study_id", "given_region"]].drop_duplicates()
    assert audit.n_issue_tags == len(flagged_tags)
    # One image a study here, so pooling a study's images leaves every image's quality as it is.
    assert np.allclose(scores["label_quality"], scores["image_quality"])
    labelled = data.manifest[(data.manifest["status"] == "ok") & data.manifest["split"].isin(["train", "val"])
                             & (data.manifest["region"] != "unknown")]
    assert audit.n_images == len(scores) == len(labelled)
    assert 0.0 <= audit.label_health_score <= 1.0 and audit.classes == [r for r in REGIONS if r in labelled["region"].values]
    issues = pd.read_csv(audit.issues_path)
    assert len(issues) == audit.n_issues and issues["is_issue"].all()
    assert issues["label_quality"].is_monotonic_increasing

    worklist = write_worklist(scores[scores["is_issue"]], data.data_dir, tmp_path / "review", limit=5)
    csv = pd.read_csv(worklist.csv_path, keep_default_na=False)
    assert len(csv) == worklist.n_items == min(5, audit.n_issues)
    assert {"decision", "corrected_region", "reviewer", "timestamp"} <= set(csv.columns)
    page = worklist.html_path.read_text()
    assert page.count("data:image/png;base64,") == worklist.n_items


def test_audit_labels_cli_with_an_ensemble_and_the_truth(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from xrayops.app.cli import app

    monkeypatch.setenv("XRAYOPS_DEVICE", "cpu")
    data = make_data_dir(tmp_path / "data", n_per_class=12, size=32, mislabel_rate=0.1, seed=4)
    # As ingestion would write it: the manifest holds keyed pseudonyms of the files truth.csv names.
    import os

    from xrayops.contracts import ManifestRow
    from xrayops.data.manifest import read_manifest, write_manifest
    from xrayops.dicom.deid import source_pseudonym

    manifest = data.data_dir / "manifest.parquet"
    key = os.environ["XRAYOPS_DEID_KEY"]
    rows = [ManifestRow.model_validate({**{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()},
                                        "source_name": source_pseudonym(r["source_name"], key)})
            for r in read_manifest(manifest).to_dict("records")]
    write_manifest(rows, manifest)
    truth = tmp_path / "truth.csv"
    pd.DataFrame({"file": list(data.truth), "true_region": list(data.truth.values())}).to_csv(truth, index=False)
    members = [random_backbone(tmp_path / f"b{seed}.pt", seed=seed) for seed in (0, 1)]
    runner = CliRunner()
    base = ["audit-labels", "--data-dir", str(data.data_dir), "--folds", "3", "--worklist-limit", "4"]
    result = runner.invoke(app, [*base, "--backbone", str(members[0]), "--backbone", str(members[1]),
                                 "--out", str(tmp_path / "audit"), "--truth", str(truth)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout[result.stdout.index("{"):])
    assert out["audit"]["backbones"] == [str(m) for m in members]
    scores = pd.read_parquet(tmp_path / "audit" / "label_scores.parquet")
    assert out["against_truth"]["n_flagged"] == out["audit"]["n_issues"] == int((scores["given_probability"] < 0.1).sum())
    assert out["cleanlab_filter_against_truth"]["n_flagged"] == out["audit"]["n_cleanlab_issues"]
    assert out["worklist"]["n_items"] == min(4, out["audit"]["n_issues"])
    # 0 leaves the flags to cleanlab's filter; a missing backbone or a bad threshold is refused.
    filt = runner.invoke(app, [*base, "--backbone", str(members[0]), "--out", str(tmp_path / "f"), "--flag-below", "0"])
    assert filt.exit_code == 0, filt.output
    audit = json.loads((tmp_path / "f" / "label_audit.json").read_text())
    assert audit["n_issues"] == audit["n_cleanlab_issues"] and audit["config"]["flag_below"] is None
    missing = runner.invoke(app, [*base, "--backbone", str(tmp_path / "nope.pt")])
    assert missing.exit_code != 0 and "nope.pt not found" in " ".join(missing.output.split())
    bad = runner.invoke(app, [*base, "--backbone", str(members[0]), "--flag-below", "1.5"])
    assert bad.exit_code != 0 and "--flag-below" in bad.output


def test_worklist_ranking_and_thumbnail():
    issues = pd.DataFrame({"image_id": ["a", "b", "c"], "label_quality": [0.3, 0.1, 0.1],
                           "suggested_probability": [0.6, 0.7, 0.9]})
    assert rank_for_review(issues)["image_id"].tolist() == ["c", "b", "a"]
    # A study's images share the label quality; the one that contradicts the tag most comes first.
    study = issues.assign(image_quality=[0.3, 0.02, 0.5])
    assert rank_for_review(study)["image_id"].tolist() == ["b", "c", "a"]
    assert rank_for_review(issues)["rank"].tolist() == [1, 2, 3]
    png = Image.open(io.BytesIO(base64.b64decode(thumbnail_png(np.full((32, 32), 4000, np.uint16), size=48))))
    assert png.size == (48, 48) and np.asarray(png).max() == 255


def test_reviewer_decisions_become_label_events_and_bad_rows_are_rejected(tmp_path):
    given = {"a": "hand", "b": "wrist", "c": "knee", "d": "skull"}
    csv = tmp_path / "decisions.csv"
    pd.DataFrame([
        {"image_id": "a", "decision": "relabel", "corrected_region": "wrist", "reviewer": "dr.x", "timestamp": "2025-03-02T09:00:00"},
        {"image_id": "b", "decision": "keep", "corrected_region": "", "reviewer": "dr.y", "timestamp": "2025-03-02T10:00:00+01:00"},
        {"image_id": "c", "decision": "exclude", "corrected_region": "", "reviewer": "dr.x", "timestamp": "2025-03-02"},
        {"image_id": "d", "decision": "", "corrected_region": "", "reviewer": "", "timestamp": ""},  # not reviewed yet
        {"image_id": "zz", "decision": "keep", "corrected_region": "", "reviewer": "dr.x", "timestamp": "2025-03-02"},
        {"image_id": "a", "decision": "relabel", "corrected_region": "spleen", "reviewer": "dr.x", "timestamp": "2025-03-02"},
        {"image_id": "a", "decision": "maybe", "corrected_region": "", "reviewer": "dr.x", "timestamp": "2025-03-02"},
        {"image_id": "b", "decision": "keep", "corrected_region": "", "reviewer": "dr.x", "timestamp": "yesterday"},
        {"image_id": "b", "decision": "keep", "corrected_region": "", "reviewer": " ", "timestamp": "2025-03-02"},
    ]).to_csv(csv, index=False)
    imported = read_decisions(csv, given)
    assert [(e.image_id, e.region, e.decision) for e in imported.events] == [
        ("a", "wrist", "relabel"), ("b", "wrist", "keep"), ("c", "unknown", "exclude")]
    assert imported.events[1].event_timestamp.isoformat() == "2025-03-02T09:00:00+00:00"  # converted to UTC
    reasons = {r.line: r.reason for r in imported.rejected}
    assert sorted(reasons) == [5, 6, 7, 8, 9]
    assert "unknown image_id" in reasons[5] and "spleen" in reasons[6] and "maybe" in reasons[7]
    assert "bad timestamp" in reasons[8] and "reviewer" in reasons[9]
    frame = events_frame(imported.events)
    assert str(frame["event_timestamp"].dt.tz) == "UTC" and frame["source"].eq("reviewer").all()
    with pytest.raises(ValueError, match="lacks columns"):
        decisions_to_events(pd.DataFrame({"image_id": ["a"]}), given)


def test_reviewed_labels_round_trip_through_the_store_into_finetune(tmp_path, monkeypatch):
    """import-reviews writes label events; finetune --labels-from-store trains on them, and a
    cutoff before the review still trains on the PACS tags."""
    from typer.testing import CliRunner

    from xrayops.bundle import load_bundle
    from xrayops.app.cli import app

    tiny = make_data_dir(tmp_path / "data", n_per_class=6, size=32, n_unknown=0, n_quarantined=0)
    backbone = random_backbone(tmp_path / "backbone.pt")
    monkeypatch.setenv("XRAYOPS_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("XRAYOPS_DATA_DIR", str(tiny.data_dir))
    train = tiny.manifest[tiny.manifest["split"] == "train"]
    relabel = train.iloc[:3]
    others = [r for r in REGIONS if r not in set(relabel["region"])]
    decisions = pd.DataFrame({"image_id": [*relabel["image_id"], train["image_id"].iloc[3]],
                              "decision": ["relabel"] * 3 + ["exclude"],
                              "corrected_region": [others[0]] * 3 + [""], "reviewer": "dr.x",
                              "timestamp": "2030-01-02T00:00:00Z"})
    decisions.to_csv(tmp_path / "decisions.csv", index=False)
    runner = CliRunner()
    imported = runner.invoke(app, ["import-reviews", str(tmp_path / "decisions.csv")])
    assert imported.exit_code == 0, imported.output
    common = ["finetune", "--backbone", str(backbone), "--epochs", "2", "--labels-from-store"]
    after = runner.invoke(app, [*common, "--out", str(tmp_path / "after"), "--as-of", "2030-01-03T00:00:00Z"])
    assert after.exit_code == 0, after.output
    before = runner.invoke(app, [*common, "--out", str(tmp_path / "before"), "--as-of", "2030-01-01T00:00:00Z"])
    assert before.exit_code == 0, before.output
    metrics_after = load_bundle(tmp_path / "after").meta.lineage.metrics
    metrics_before = load_bundle(tmp_path / "before").meta.lineage.metrics
    assert metrics_after["labels_changed_from_tags"] == 3 and metrics_before["labels_changed_from_tags"] == 0
    assert metrics_after["train_images"] == metrics_before["train_images"] - 1  # the excluded image left
    bad = runner.invoke(app, [*common, "--out", str(tmp_path / "x"), "--as-of", "next tuesday"])
    assert bad.exit_code == 2 and "not an ISO time" in bad.output

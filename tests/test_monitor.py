"""Monitoring with the real Evidently: drift report, rates, retrain decision."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest

from xrayops.config import Settings
from xrayops.contracts import InferenceLogRecord, ModelBundleMeta, PreprocessingSpec
from xrayops.inference_log import append_records
from xrayops.monitor import (
    decide_retrain,
    drift_report,
    frame_for_drift,
    label_noise_rate,
    monitor_window,
    ood_rate,
)
from xrayops.monitor.drift import DriftResult
from xrayops.regions import REGIONS

SETTINGS = Settings(drift_share_threshold=0.5, label_noise_threshold=0.15, ood_rate_threshold=0.2)


def manifest_frame(n: int, rng: np.random.Generator, mean_shift: float = 0.0, std_shift: float = 0.0,
                   manufacturers=("ACME", "Globex")) -> pd.DataFrame:
    """Manifest-like rows: image statistics in [0, 1] units, header fields, PACS region."""
    return pd.DataFrame({
        "image_id": [f"img{i}" for i in range(n)],
        "status": "ok",
        "region": rng.choice(REGIONS[:4], n),
        "pixel_mean": rng.normal(0.40 + mean_shift, 0.05, n),
        "pixel_std": rng.normal(0.20 + std_shift, 0.03, n),
        "pixel_spacing": rng.choice([0.1, 0.15], n),
        "manufacturer": rng.choice(manufacturers, n),
        "photometric_interpretation": rng.choice(["MONOCHROME2", "MONOCHROME1"], n, p=[0.8, 0.2]),
    })


def log_frame(manifest: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """The same images as inference-log rows: the tag label becomes dicom_region."""
    log = manifest.drop(columns=["status"]).rename(columns={"region": "dicom_region"})
    log["region"] = log["dicom_region"]
    log["confidence"] = rng.uniform(0.5, 1.0, len(log))
    log["request_id"] = "r"
    return log


def test_frame_for_drift_maps_manifest_and_log_to_shared_columns():
    rng = np.random.default_rng(0)
    manifest = manifest_frame(6, rng)
    manifest.loc[0, "status"] = "quarantined"
    framed = frame_for_drift(manifest)
    assert len(framed) == 5
    assert framed["dicom_region"].tolist() == manifest["region"].iloc[1:].tolist()
    assert "predicted_region" not in framed and "image_id" not in framed

    log = log_frame(manifest_frame(4, rng), rng)
    log["region"] = "knee"
    framed_log = frame_for_drift(log)
    assert framed_log["predicted_region"].tolist() == ["knee"] * 4
    assert framed_log["dicom_region"].tolist() == log["dicom_region"].tolist()
    assert "confidence" in framed_log
    # Already-framed input comes back unchanged.
    pd.testing.assert_frame_equal(frame_for_drift(framed_log), framed_log)


def test_same_distribution_shows_little_drift_and_no_retrain(tmp_path):
    rng = np.random.default_rng(1)
    reference = manifest_frame(400, rng)
    current = log_frame(manifest_frame(200, rng), rng)
    drift = drift_report(reference, current, tmp_path)
    assert drift.columns == ["pixel_mean", "pixel_std", "pixel_spacing", "manufacturer",
                             "photometric_interpretation", "dicom_region"]
    assert drift.skipped_columns == []  # confidence / predicted_region exist only in the log
    assert drift.drift_share <= 1 / 6
    assert (drift.n_reference, drift.n_current) == (400, 200)
    assert drift.column_scores["pixel_mean"] > 0.05 and "K-S" in drift.column_methods["pixel_mean"]
    decision = decide_retrain(drift, settings=SETTINGS)
    assert not decision.retrain and decision.reasons == []


def test_small_window_against_a_large_reference_is_tested_with_p_values(tmp_path):
    """Evidently alone switches to distances once the reference passes 1,000 rows; a 120-row
    window of the same distribution then drifts by sampling noise. The smaller side decides."""
    from xrayops.monitor.drift import drift_methods

    assert {k: m.name for k, m in drift_methods(5000, 120).items()} == {"num_method": "ks", "cat_method": "chisquare"}
    assert drift_methods(300, 5000) == drift_methods(5000, 120)
    assert drift_methods(5000, 2000) == {}
    rng = np.random.default_rng(3)
    reference = manifest_frame(3000, rng)
    calm = [drift_report(reference, log_frame(manifest_frame(120, rng), rng), tmp_path / f"w{k}") for k in range(5)]
    assert all("K-S" in d.column_methods["pixel_mean"] for d in calm)
    assert "chi-square" in calm[0].column_methods["manufacturer"] or "Z-test" in calm[0].column_methods["manufacturer"]
    assert max(d.drift_share for d in calm) <= 1 / 6  # at most one column by chance at p < 0.05
    large = drift_report(reference, log_frame(manifest_frame(1500, rng), rng), tmp_path / "large")
    assert "Wasserstein" in large.column_methods["pixel_mean"]
    shifted = drift_report(reference, log_frame(manifest_frame(120, rng, mean_shift=0.1), rng), tmp_path / "shifted")
    assert "pixel_mean" in shifted.drifted_columns


def test_shifted_window_drifts_and_triggers_retrain_naming_the_columns(tmp_path):
    rng = np.random.default_rng(2)
    reference = manifest_frame(400, rng)
    shifted = manifest_frame(200, rng, mean_shift=0.1, std_shift=0.05, manufacturers=("ACME", "Initech"))
    current = log_frame(shifted, rng)
    drift = drift_report(reference, current, tmp_path)
    assert {"pixel_mean", "pixel_std", "manufacturer"} <= set(drift.drifted_columns)
    assert drift.drift_share >= 0.5
    assert drift.column_scores["pixel_mean"] < 1e-6
    decision = decide_retrain(drift, settings=SETTINGS)
    assert decision.retrain
    assert len(decision.reasons) == 1
    assert decision.reasons[0].startswith("data drift") and "manufacturer" in decision.reasons[0]
    assert decision.drift_share == drift.drift_share


def test_report_files_are_written(tmp_path):
    rng = np.random.default_rng(3)
    drift = drift_report(manifest_frame(100, rng), manifest_frame(100, rng, mean_shift=0.2), tmp_path / "out")
    html = drift.html_path.read_text()
    assert drift.html_path.parent == tmp_path / "out"
    assert len(html) > 100_000 and "pixel_mean" in html
    snapshot = json.loads(drift.json_path.read_text())
    assert "metrics" in snapshot and len(snapshot["metrics"]) > 1


def test_columns_empty_on_one_side_are_skipped_and_bad_input_is_refused(tmp_path):
    rng = np.random.default_rng(4)
    reference = manifest_frame(80, rng)
    current = log_frame(manifest_frame(40, rng), rng)
    current["pixel_spacing"] = None
    drift = drift_report(reference, current, tmp_path)
    assert drift.skipped_columns == ["pixel_spacing"] and "pixel_spacing" not in drift.columns
    with pytest.raises(ValueError, match="rows on both sides"):
        drift_report(reference, current.iloc[:0], tmp_path)
    with pytest.raises(ValueError, match="no drift column"):
        drift_report(pd.DataFrame({"x": [1.0]}), pd.DataFrame({"x": [2.0]}), tmp_path)


def test_label_noise_rate_counts_confident_known_disagreements():
    log = pd.DataFrame({
        "region":       ["hand",  "hand",  "knee", "knee",    "skull", "rib"],
        "dicom_region": ["wrist", "hand",  "knee", "unknown", "rib",   "skull"],
        "confidence":   [0.95,    0.99,    0.97,   0.99,      0.5,     0.91],
    })
    # Judged: rows 0, 1, 2, 5 (confident, tag known); disagreeing: rows 0 and 5.
    assert label_noise_rate(log, min_confidence=0.9) == pytest.approx(0.5)
    assert label_noise_rate(log, min_confidence=0.999) is None
    assert label_noise_rate(log.iloc[:0], 0.9) is None


def test_ood_rate_uses_the_threshold_and_ignores_missing_scores():
    log = pd.DataFrame({"ood_score": [1.0, 5.0, None, 9.0, 2.0]})
    assert ood_rate(log, 4.0) == pytest.approx(0.5)
    assert ood_rate(pd.DataFrame({"ood_score": [None]}), 4.0) is None


def _no_drift(tmp_path) -> DriftResult:
    return DriftResult(drift_share=0.0, drifted_columns=[], columns=["pixel_mean"], column_scores={"pixel_mean": 0.9},
                       column_methods={"pixel_mean": "K-S p_value"}, column_thresholds={"pixel_mean": 0.05},
                       n_reference=10, n_current=10, html_path=tmp_path / "a.html", json_path=tmp_path / "a.json")


def test_decision_on_label_noise_and_ood_alone(tmp_path):
    drift = _no_drift(tmp_path)
    noisy = decide_retrain(drift, label_noise_rate=0.2, ood_rate=0.05, settings=SETTINGS)
    assert noisy.retrain and len(noisy.reasons) == 1 and noisy.reasons[0].startswith("label noise: 20.0%")
    ood = decide_retrain(drift, label_noise_rate=0.1, ood_rate=0.3, settings=SETTINGS)
    assert ood.retrain and ood.reasons[0].startswith("out of domain: 30.0%")
    calm = decide_retrain(drift, label_noise_rate=0.1, ood_rate=0.1, settings=SETTINGS)
    assert not calm.retrain
    unmeasured = decide_retrain(None, settings=SETTINGS)
    assert not unmeasured.retrain and unmeasured.drift_share is None
    assert calm.thresholds == {"drift_share": 0.5, "label_noise_rate": 0.15, "ood_rate": 0.2}


def test_monitor_window_over_a_manifest_and_an_inference_log(tmp_path):
    rng = np.random.default_rng(5)
    manifest_path = tmp_path / "manifest.parquet"
    manifest_frame(300, rng).to_parquet(manifest_path)
    current = manifest_frame(100, rng)
    now = datetime(2025, 1, 1, tzinfo=timezone.utc)
    records = [
        InferenceLogRecord(
            timestamp=now, request_id="r", model_name="m", model_version="v", manufacturer=row.manufacturer,
            photometric_interpretation=row.photometric_interpretation, pixel_spacing=row.pixel_spacing,
            pixel_mean=row.pixel_mean, pixel_std=row.pixel_std,
            # Every 4th confident image disagrees with its tag: label-noise rate 0.25.
            region="skull" if i % 4 == 0 else row.region, dicom_region=row.region if row.region != "skull" else "rib",
            confidence=0.95, ood_score=float(i % 10),
        )
        for i, row in enumerate(current.itertuples())
    ]
    append_records(tmp_path / "log", records)
    expected_noise = float(np.mean([r.region != r.dicom_region for r in records]))
    meta = ModelBundleMeta(classes=list(REGIONS), preprocessing=PreprocessingSpec(), ood_threshold=7.5)
    result = monitor_window(manifest_path, tmp_path / "log", tmp_path / "monitor", SETTINGS, bundle_meta=meta)
    assert result.label_noise_rate == pytest.approx(expected_noise) and expected_noise >= 0.25
    assert result.ood_rate == pytest.approx(0.2)  # scores 8 and 9 of 0..9
    assert result.decision.retrain
    assert any(r.startswith("label noise") for r in result.decision.reasons)
    assert any(r.startswith("out of domain") for r in result.decision.reasons)
    saved = json.loads(result.result_path.read_text())
    assert saved["decision"]["retrain"] is True and saved["drift"]["n_current"] == 100

    # A manifest as the current window: drift only, no online rates.
    other = tmp_path / "other.parquet"
    manifest_frame(100, rng).to_parquet(other)
    plain = monitor_window(manifest_path, other, tmp_path / "monitor2", SETTINGS)
    assert plain.label_noise_rate is None and plain.ood_rate is None

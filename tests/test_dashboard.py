"""The quality officers' dashboard: monitoring windows land in an Evidently workspace, `evidently ui`
serves them on 127.0.0.1, and headless Chromium (Debian's `chromium`) renders the panels."""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from PIL import Image

from xrayops.config import Settings
from xrayops.contracts import InferenceLogRecord, ModelBundleMeta, PreprocessingSpec
from xrayops.inference_log import append_records, read_log
from xrayops.monitor import monitor_window
from xrayops.monitor.dashboard import DRIFT_SHARE, LABEL_NOISE, OOD, PANEL_TITLES, PREDICTION_MIX, VOLUME
from xrayops.monitor.label_noise import label_noise_table
from xrayops.monitor.ui import capture_dashboard, find_chromium, project_url, running_ui
from xrayops.regions import REGIONS

SETTINGS = Settings(drift_share_threshold=0.3, label_noise_threshold=0.15, ood_rate_threshold=0.2)
META = ModelBundleMeta(classes=list(REGIONS), preprocessing=PreprocessingSpec(), confidence_threshold=0.9,
                       ood_threshold=0.5)
START = datetime(2026, 1, 5, 8, tzinfo=timezone.utc)


def manifest(tmp_path, n=300, seed=0):
    rng = np.random.default_rng(seed)
    import pandas as pd

    path = tmp_path / "manifest.parquet"
    pd.DataFrame({
        "image_id": [f"m{i}" for i in range(n)], "status": "ok", "region": rng.choice(REGIONS[:5], n),
        "pixel_mean": rng.normal(0.40, 0.05, n), "pixel_std": rng.normal(0.20, 0.03, n),
        "pixel_spacing": rng.choice([0.10, 0.15], n), "manufacturer": rng.choice(["ACME", "Globex"], n),
        "photometric_interpretation": "MONOCHROME2",
    }).to_parquet(path)
    return path


def window_records(k: int, n: int, shifted: bool, noise: float, site: str = "north", seed: int = 0):
    """One window of served images; a shifted window comes from a new vendor with brighter images,
    more out-of-domain scores and `noise` of its confident predictions against the tag."""
    rng = np.random.default_rng(seed + k)
    records = []
    for i in range(n):
        tag = str(rng.choice(REGIONS[:5]))
        wrong = rng.random() < noise
        records.append(InferenceLogRecord(
            timestamp=START + timedelta(hours=k, minutes=i % 50), request_id=f"w{k}-r{i // 4}", model_name="xr",
            model_version="1", site=site, manufacturer="Initech" if shifted else str(rng.choice(["ACME", "Globex"])),
            photometric_interpretation="MONOCHROME2", pixel_spacing=0.2 if shifted else float(rng.choice([0.10, 0.15])),
            pixel_mean=float(rng.normal(0.55 if shifted else 0.40, 0.05)), pixel_std=float(rng.normal(0.20, 0.03)),
            region=REGIONS[(REGIONS.index(tag) + 1) % len(REGIONS)] if wrong else tag, confidence=0.95,
            dicom_region=tag, ood_score=float(rng.uniform(0.0, 0.8 if shifted else 0.52)),
        ))
    return records


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Two calm windows, then two from a vendor-shifted batch with more wrong tags."""
    tmp = tmp_path_factory.mktemp("dash")
    reference = manifest(tmp)
    results = []
    for k, (shifted, noise) in enumerate([(False, 0.04), (False, 0.05), (True, 0.20), (True, 0.25)]):
        log_dir = tmp / f"log{k}"
        append_records(log_dir, window_records(k, 120, shifted, noise))
        results.append(monitor_window(reference, log_dir, tmp / f"monitor{k}", SETTINGS, bundle_meta=META,
                                      workspace=tmp / "evidently"))
    return tmp / "evidently", results


def test_windows_are_snapshots_whose_signals_rise_with_the_shift(workspace):
    ws, results = workspace
    calm, shifted = results[:2], results[2:]
    assert all(r.snapshot is not None and r.snapshot.workspace == ws for r in results)
    assert len({r.snapshot.snapshot_id for r in results}) == 4
    assert len({r.snapshot.project_id for r in results}) == 1  # one project, one series per signal
    assert max(r.drift.drift_share for r in calm) < SETTINGS.drift_share_threshold
    assert min(r.drift.drift_share for r in shifted) >= SETTINGS.drift_share_threshold
    assert max(r.label_noise_rate for r in calm) < 0.1 < min(r.label_noise_rate for r in shifted)
    assert max(r.ood_rate for r in calm) < min(r.ood_rate for r in shifted)
    assert [r.decision.retrain for r in results] == [False, False, True, True]
    # The snapshot carries what the decision saw, and the window's own volume.
    assert results[3].snapshot.signals.label_noise_rate == results[3].label_noise_rate
    assert results[3].snapshot.signals.n_images == 120 and results[3].snapshot.signals.n_requests == 30


def test_label_noise_is_broken_down_per_site_and_vendor(tmp_path):
    # Site "south" runs the new vendor with a quarter of its tags wrong; "north" is calm.
    append_records(tmp_path, window_records(0, 80, False, 0.0, site="north") + window_records(1, 80, True, 0.25, site="south"))
    log = read_log(tmp_path)
    result = monitor_window(manifest(tmp_path), tmp_path, tmp_path / "monitor", SETTINGS, bundle_meta=META)
    by = {tuple(b.by): {tuple(r[c] for c in b.by): r for r in b.rows} for b in result.label_noise.breakdowns}
    south_wrong = int((log[log.site == "south"].region != log[log.site == "south"].dicom_region).sum())
    assert south_wrong > 10
    assert by[("site",)][("north",)]["rate"] == 0.0
    assert by[("site",)][("south",)]["n_disagreeing"] == south_wrong
    assert by[("site",)][("south",)]["rate"] == pytest.approx(south_wrong / 80)
    assert by[("manufacturer",)][("Initech",)]["rate"] == pytest.approx(south_wrong / 80)
    assert {k[0] for k in by[("manufacturer",)]} == {"ACME", "Globex", "Initech"}
    assert result.label_noise.rate == pytest.approx(result.label_noise_rate) == pytest.approx(south_wrong / 160)
    # Per hour window and site: the two windows fall in two hours.
    table = label_noise_table(log, 0.9, by=["site"], window="1h")
    assert list(table["site"]) == ["north", "south"] and list(table["n_disagreeing"]) == [0, south_wrong]


def test_logs_without_a_site_column_read_back_blank(tmp_path):
    import pyarrow.parquet as pq

    from xrayops.inference_log import records_to_table

    table = records_to_table(window_records(0, 3, False, 0.0))
    pq.write_table(table.drop(["site"]), tmp_path / "part-0-old.parquet")  # a part from before the field
    append_records(tmp_path, window_records(1, 2, False, 0.0, site="south"))
    log = read_log(tmp_path)
    assert log["site"].isna().sum() == 3 and list(log["site"].dropna()) == ["south", "south"]
    result = monitor_window(manifest(tmp_path), tmp_path, tmp_path / "monitor", SETTINGS, bundle_meta=META)
    sites = {r["site"] for b in result.label_noise.breakdowns if b.by == ["site"] for r in b.rows}
    assert sites == {"", "south"}  # the unknown site is a group of its own, not dropped


def _panel(dom: str, title: str) -> str:
    """The rendered DOM from the panel's title up to the next panel's title."""
    start = dom.index(title)
    ends = [dom.find(other, start + len(title)) for other in PANEL_TITLES if other != title]
    return dom[start:min([e for e in ends if e > 0], default=len(dom))]


def _line_ys(dom: str, title: str) -> list[float]:
    """The y coordinates (SVG: down is larger) of the line plotted in the panel `title`."""
    path = re.search(r'<path[^>]*d="([^"]+)"[^>]*class="MuiLineElement-root', _panel(dom, title))
    assert path, f"no line drawn under {title!r}"
    numbers = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", path.group(1))]
    return numbers[1::2]


@pytest.mark.skipif(find_chromium() is None, reason="headless Chromium not installed (Debian: apt-get install chromium)")
def test_evidently_ui_renders_the_panels_in_headless_chromium(workspace, tmp_path):
    ws, results = workspace
    with running_ui(ws, log_path=tmp_path / "ui.log") as base:
        assert base.startswith("http://127.0.0.1:")
        capture = capture_dashboard(project_url(base, results[0].snapshot.project_id), tmp_path / "dashboard.png")
    for title in PANEL_TITLES:
        assert title in capture.dom, title
    # The line panels plot the windows: the shifted ones sit higher (smaller SVG y) than the calm ones.
    for title in (DRIFT_SHARE, LABEL_NOISE, OOD):
        ys = _line_ys(capture.dom, title)
        assert ys[-1] < ys[0], (title, ys)
    for title in (VOLUME, PREDICTION_MIX):
        assert "MuiBarElement-root" in _panel(capture.dom, title), title
    image = Image.open(capture.screenshot)
    assert image.format == "PNG" and image.size == (1400, 1800)
    colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 100  # charts, legends and text, not a blank page


from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pandas as pd

from xrayops.contracts import InferenceLogRecord
from xrayops.inference_log import LOG_SCHEMA, append_records, log_parts, read_log

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)


def make_record(i: int, **overrides) -> InferenceLogRecord:
    fields = dict(
        timestamp=T0 + timedelta(minutes=i),
        request_id=f"req-{i}",
        model_name="xrayops-region",
        model_version="3",
        image_id=f"img-{i}",
        manufacturer="ACME",
        photometric_interpretation="MONOCHROME2",
        pixel_spacing=0.15,
        pixel_mean=100.0 + i,
        pixel_std=40.0,
        region="hand",
        confidence=0.95,
        dicom_region="wrist",
        label_disagreement=True,
        ood_score=0.1,
        embedding=[0.5, -1.25, 2.0],
    )
    fields.update(overrides)
    return InferenceLogRecord(**fields)


def test_schema_matches_contract():
    assert LOG_SCHEMA.names == list(InferenceLogRecord.model_fields)


def test_round_trip_keeps_values_and_embedding_list(tmp_path):
    log = tmp_path / "log"
    append_records(log, [make_record(0), make_record(1)])
    df = read_log(log)
    assert list(df.columns) == list(InferenceLogRecord.model_fields)
    assert df["request_id"].tolist() == ["req-0", "req-1"]
    assert df["pixel_mean"].tolist() == [100.0, 101.0]
    assert df["label_disagreement"].tolist() == [True, True]
    assert [list(e) for e in df["embedding"]] == [[0.5, -1.25, 2.0]] * 2
    assert df["timestamp"].iloc[0] == pd.Timestamp(T0)


def test_each_append_is_a_new_part_and_reads_sorted_by_time(tmp_path):
    log = tmp_path / "log"
    append_records(log, [make_record(5)])
    append_records(log, [make_record(1), make_record(3)])
    assert len(log_parts(log)) == 2
    assert read_log(log)["request_id"].tolist() == ["req-1", "req-3", "req-5"]


def test_nulls_and_naive_timestamps(tmp_path):
    log = tmp_path / "log"
    naive = datetime(2025, 1, 1, 13, 0)
    append_records(log, [make_record(0, pixel_spacing=None, ood_score=None, embedding=[], timestamp=naive)])
    append_records(log, [make_record(1)])
    df = read_log(log)
    first = df[df["request_id"] == "req-0"].iloc[0]
    assert pd.isna(first["pixel_spacing"]) and pd.isna(first["ood_score"])
    assert list(first["embedding"]) == []
    assert first["timestamp"] == pd.Timestamp("2025-01-01 13:00", tz="UTC")


def test_since_filters_records(tmp_path):
    log = tmp_path / "log"
    append_records(log, [make_record(i) for i in range(5)])
    df = read_log(log, since=T0 + timedelta(minutes=3))
    assert df["request_id"].tolist() == ["req-3", "req-4"]


def test_missing_or_empty_log_gives_empty_frame(tmp_path):
    assert append_records(tmp_path / "log", []) is None
    df = read_log(tmp_path / "log")
    assert df.empty and list(df.columns) == list(InferenceLogRecord.model_fields)


def test_concurrent_appends_lose_nothing(tmp_path):
    log = tmp_path / "log"
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda i: append_records(log, [make_record(i)]), range(20)))
    df = read_log(log)
    assert sorted(df["request_id"]) == sorted(f"req-{i}" for i in range(20))
    assert not list(log.glob(".*.tmp"))

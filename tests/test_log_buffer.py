"""The buffered inference log: parts of many records, by count and by age, nothing lost on close."""
from __future__ import annotations

import time
from datetime import datetime, timezone

import pyarrow.parquet as pq

from xrayops.contracts import InferenceLogRecord
from xrayops.inference_log import log_parts, read_log
from xrayops.log_buffer import LogBuffer


def record(i: int) -> InferenceLogRecord:
    return InferenceLogRecord(timestamp=datetime.now(timezone.utc), request_id=f"req-{i}", model_name="m",
                              model_version="v", pixel_mean=0.5, pixel_std=0.1, region="hand", confidence=0.9)


def test_a_part_is_written_per_max_records(tmp_path):
    buffer = LogBuffer(tmp_path, max_records=5, max_seconds=3600)
    for i in range(12):
        buffer.add([record(i)])
    assert [pq.read_metadata(p).num_rows for p in log_parts(tmp_path)] == [5, 5] and buffer.waiting == 2
    buffer.close()
    assert len(read_log(tmp_path)) == 12 and len(log_parts(tmp_path)) == 3


def test_records_that_waited_max_seconds_are_written_without_more_traffic(tmp_path):
    buffer = LogBuffer(tmp_path, max_records=1000, max_seconds=0.3)
    buffer.add([record(0), record(1)])
    deadline = time.monotonic() + 10
    while not log_parts(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(read_log(tmp_path)) == 2 and buffer.waiting == 0
    buffer.close()


def test_close_writes_what_waits_and_refuses_more(tmp_path):
    buffer = LogBuffer(tmp_path, max_records=100, max_seconds=3600)
    buffer.add([record(i) for i in range(7)])
    assert log_parts(tmp_path) == []
    buffer.close()
    buffer.close()  # twice is harmless
    assert read_log(tmp_path).request_id.tolist() == [f"req-{i}" for i in range(7)]
    try:
        buffer.add([record(8)])
    except RuntimeError as exc:
        assert "closed" in str(exc)
    else:
        raise AssertionError("a closed buffer accepted records")

"""Inference-log records buffered into parquet parts of many rows.

One part per request made thousands of small files under load, which the monitor then reads one
by one. Records are kept in memory and written as one part when `max_records` are waiting, when
the oldest has waited `max_seconds`, and on `close` (the server's shutdown, SIGTERM included), so a
stopped server loses none.
"""
from __future__ import annotations

import atexit
import threading
import time
from pathlib import Path

from xrayops.contracts import InferenceLogRecord
from xrayops.inference_log import append_records
from xrayops.logs import get_logger

log = get_logger(__name__)


class LogBuffer:
    """Thread-safe: `add` from request handlers, a timer thread writes parts that waited too long."""

    def __init__(self, path: str | Path, max_records: int = 512, max_seconds: float = 10.0) -> None:
        if max_records < 1 or max_seconds <= 0:
            raise ValueError("max_records must be >= 1 and max_seconds > 0")
        self.path = Path(path)
        self.max_records, self.max_seconds = max_records, max_seconds
        self._records: list[InferenceLogRecord] = []
        self._oldest = 0.0
        self._lock = threading.RLock()  # a signal handler may close while this thread holds it
        self._closed = threading.Event()
        self._timer = threading.Thread(target=self._flush_when_old, name="inference-log-flush", daemon=True)
        self._timer.start()
        atexit.register(self.close)  # an interpreter exit without stop() still writes what is waiting

    def add(self, records: list[InferenceLogRecord]) -> Path | None:
        """Buffer `records`; the part written, when they filled the buffer, else None."""
        if not records:
            return None
        with self._lock:
            if self._closed.is_set():
                raise RuntimeError("the inference log buffer is closed")
            if not self._records:
                self._oldest = time.monotonic()
            self._records.extend(records)
            full = len(self._records) >= self.max_records
        return self.flush() if full else None

    def flush(self) -> Path | None:
        """Write what is waiting as one part; the part's path, or None when nothing waited."""
        with self._lock:
            records, self._records = self._records, []
            if not records:
                return None
            try:
                return append_records(self.path, records)
            except OSError as exc:  # keep the records for the next try rather than lose them
                self._records = records + self._records
                log.error("inference log write failed; records kept for the next flush", error=str(exc),
                          waiting=len(self._records))
                return None

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self.flush()
        atexit.unregister(self.close)

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._records)

    def _flush_when_old(self) -> None:
        tick = min(1.0, self.max_seconds / 4)
        while not self._closed.wait(tick):
            with self._lock:
                due = bool(self._records) and time.monotonic() - self._oldest >= self.max_seconds
            if due:
                self.flush()

"""Instances to studies: a study is complete when no new instance came for the quiet period.

Bounded: at most `max_instances` instances and `max_bytes` bytes are held; past either `add` says no and the SCP answers the sender
"out of resources" (PS3.4 B.2.3), so the sender retries later and nothing is dropped silently.
Thread-safe: pynetdicom calls `add` from its association threads.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from xrayops.route.items import ReceivedInstance, Study


class StudyGrouper:
    def __init__(self, quiet_seconds: float, max_instances: int, clock: Callable[[], float] = time.monotonic,
                 max_bytes: int | None = None) -> None:  # fmt: skip
        self.quiet_seconds, self.max_instances, self.clock = quiet_seconds, max_instances, clock
        self.max_bytes = max_bytes
        self._studies: dict[str, Study] = {}
        self._held = 0
        self._bytes = 0
        self._lock = threading.Lock()

    def add(self, study_uid: str, study_id: str, instance: ReceivedInstance) -> bool:
        """Hold `instance` in its study; False when full (the caller refuses it with a status).
        A resent instance (same SOP Instance UID) replaces the one held."""
        now = self.clock()
        with self._lock:
            study = self._studies.get(study_uid)
            same = [] if study is None else [i for i, held in enumerate(study.instances)
                                             if held.sop_instance_uid == instance.sop_instance_uid]  # fmt: skip
            replaced = len(study.instances[same[0]].data) if same else 0
            if not same and self._held >= self.max_instances:
                return False
            if self.max_bytes is not None and self._bytes - replaced + len(instance.data) > self.max_bytes:
                return False
            if study is None:
                study = self._studies[study_uid] = Study(study_uid, study_id, first_received=now)
            if same:
                study.instances[same[0]] = instance
            else:
                study.instances.append(instance)
                self._held += 1
            self._bytes += len(instance.data) - replaced
            study.last_received = now
            return True

    def complete(self) -> list[Study]:
        """Remove and return the studies quiet for the quiet period, oldest first."""
        now = self.clock()
        with self._lock:
            done = [s for s in self._studies.values() if now - s.last_received >= self.quiet_seconds]
            return self._take(done)

    def drain(self) -> list[Study]:
        """Remove and return every study held (shutdown: they are processed now, not lost)."""
        with self._lock:
            return self._take(list(self._studies.values()))

    def _take(self, studies: list[Study]) -> list[Study]:
        for study in studies:
            del self._studies[study.study_instance_uid]
            self._held -= len(study.instances)
            self._bytes -= sum(len(i.data) for i in study.instances)
        return sorted(studies, key=lambda s: s.first_received)

    def next_due(self) -> float | None:
        """When the next open study goes quiet (the clock's time), None when none is open."""
        with self._lock:
            if not self._studies:
                return None
            return min(s.last_received for s in self._studies.values()) + self.quiet_seconds

    @property
    def held(self) -> int:
        with self._lock:
            return self._held

    @property
    def open_studies(self) -> int:
        with self._lock:
            return len(self._studies)

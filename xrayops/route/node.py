"""The node's pipeline: received instances -> complete studies -> endpoint (sr=true) -> PACS.

`RouteNode.receive` is what the C-STORE SCP calls; a flusher thread moves complete studies onto a
bounded queue; `workers` threads each take a study and `process` it:
1. the study's instances go to the endpoint in requests of at most `max_images_per_request`, retried
   with backoff when a retry can help; a request the endpoint rejects (4xx: one unusable file
   rejects the request) is split, each instance sent alone, so only the bad one fails;
2. images the admission policy refuses are answered "not applicable" and their SR says so (a
   refused CT is reported, not dropped);
3. the SRs (one per study, merged from the per-image SRs: `sr_per="study"`; or one per image)
   are C-STOREd to the PACS, retried with backoff;
4. whatever still fails goes to the dead-letter folder with its reason, and is logged and counted.
Nothing of the study's data reaches a log: pseudonyms, counts and reason codes.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from xrayops.dicom.decode import DicomError, read_dicom
from xrayops.dicom.deid import pseudonymize
from xrayops.logs import get_logger
from xrayops.results.sr import SRError, from_part10, merge_image_srs, source_header, to_part10
from xrayops.route.deadletter import DeadLetter
from xrayops.route.errors import EndpointError, RouteError, StoreError
from xrayops.route.grouping import StudyGrouper
from xrayops.route.items import EndpointAnswer, ReceivedInstance, Study
from xrayops.route.metrics import RouteMetrics
from xrayops.route.retry import RetryPolicy, with_retries

log = get_logger(__name__)


class Endpoint(Protocol):
    def __call__(self, blobs: list[bytes]) -> EndpointAnswer: ...


Store = Callable[[list[bytes]], None]  # C-STORE the SRs (Part 10) to the PACS; raises StoreError


@dataclass
class StudyOutcome:
    study_id: str
    images: int = 0
    answered: int = 0
    refused: int = 0
    stored: int = 0  # SRs stored
    dead_lettered: int = 0  # images (endpoint) or SRs (store) kept in the dead-letter folder
    reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class NodeOptions:
    quiet_seconds: float = 10.0
    max_pending_instances: int = 2000
    max_pending_bytes: int | None = None
    max_queued_studies: int = 16
    workers: int = 2
    max_images_per_request: int = 32
    sr_per: Literal["study", "image"] = "study"
    retry: RetryPolicy = RetryPolicy()
    shutdown_seconds: float = 60.0  # at stop: how long the workers may take over what is left


class RouteNode:
    def __init__(self, endpoint: Endpoint, store: Store, dead_letter: DeadLetter, key: bytes | str,
                 options: NodeOptions = NodeOptions(), metrics: RouteMetrics | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:  # fmt: skip
        self.endpoint, self.store, self.dead_letter, self.key = endpoint, store, dead_letter, key
        self.options, self.sleep = options, sleep
        self.metrics = metrics or RouteMetrics()
        self.grouper = StudyGrouper(options.quiet_seconds, options.max_pending_instances,
                                    max_bytes=options.max_pending_bytes)  # fmt: skip
        self.queue: queue.Queue[Study] = queue.Queue(maxsize=options.max_queued_studies)
        self._stop = threading.Event()
        self._wake = threading.Event()  # a new instance: the flusher recomputes when the next study is due
        self._threads: list[threading.Thread] = []
        self._busy = 0  # studies a worker is processing
        self._lock = threading.Lock()

    # ------------------------------------------------------------ receiving

    def receive(self, study_uid: str, sop_uid: str, data: bytes) -> bool:
        """Hold one received instance; False when the node is full (answer "out of resources")."""
        study_id = pseudonymize(study_uid, self.key, "stu-")
        instance = ReceivedInstance(sop_uid, data, pseudonymize(sop_uid, self.key, "img-"))
        if not self.grouper.add(study_uid, study_id, instance):
            self.metrics.busy.inc()
            log.warning("route.busy", study_id=study_id, image_id=instance.image_id, held=self.grouper.held)
            return False
        self.metrics.received.inc()
        self.metrics.held.set(self.grouper.held)
        self._wake.set()
        log.info("route.received", study_id=study_id, image_id=instance.image_id, bytes=len(data))
        return True

    # ------------------------------------------------------------ threads

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._flush_loop, name="route-flusher", daemon=True)]
        self._threads += [threading.Thread(target=self._work_loop, name=f"route-worker-{i}", daemon=True)
                          for i in range(self.options.workers)]  # fmt: skip
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """No new studies complete by the clock; every open study is processed now, for at most
        `shutdown_seconds`; what is still left then is dead-lettered (reason "shutdown")."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + self.options.shutdown_seconds
        pending = self.grouper.drain()
        while pending and time.monotonic() < deadline:
            try:
                self.queue.put(pending[0], timeout=0.2)
                pending.pop(0)
            except queue.Full:
                continue
        while (not self.queue.empty() or self._busy) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = pending + self._take_queued()
        for study in left:
            self._dead_letter_study(study, "shutdown", RouteError("retryable", "shutdown", "the node stopped first"), 0)
        for thread in self._threads:
            thread.join(timeout=1.0)
        self._threads = []

    def _take_queued(self) -> list[Study]:
        out = []
        while True:
            try:
                out.append(self.queue.get_nowait())
            except queue.Empty:
                return out

    def _flush_loop(self) -> None:
        while not self._stop.is_set():
            for study in self.grouper.complete():
                while True:  # a full queue holds the flusher: the grouper, bounded, then refuses senders
                    try:
                        self.queue.put(study, timeout=0.2)
                        break
                    except queue.Full:
                        if self._stop.is_set():
                            self.queue.put(study)  # stop() drains the queue
                            break
                self.metrics.queued.set(self.queue.qsize())
                self.metrics.held.set(self.grouper.held)
            # Wake when the next study goes quiet, or when an instance arrives (it may open a study):
            # not on a fixed tick, which would add up to a tick to every study's latency.
            due = self.grouper.next_due()
            self._wake.wait(5.0 if due is None else max(0.005, due - self.grouper.clock()))
            self._wake.clear()

    def _work_loop(self) -> None:
        while True:
            try:
                study = self.queue.get(timeout=0.2)
            except queue.Empty:
                if self._stop.is_set() and self.queue.empty():
                    return
                continue
            with self._lock:
                self._busy += 1
            self.metrics.queued.set(self.queue.qsize())
            try:
                self.process(study)
            except Exception as exc:  # a bug must not kill the worker or lose the study
                log.error("route.study_failed", study_id=study.study_id, error=type(exc).__name__)
                self._dead_letter_study(study, "endpoint", RouteError("rejected", "internal_error", type(exc).__name__), 0)
            finally:
                with self._lock:
                    self._busy -= 1

    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def health(self) -> dict:
        return {"status": "ok" if self.alive() else "stopped", "instances_held": self.grouper.held,
                "open_studies": self.grouper.open_studies, "studies_queued": self.queue.qsize(), "busy": self._busy}

    # ------------------------------------------------------------ one study

    def process(self, study: Study) -> StudyOutcome:
        start = time.monotonic()
        outcome = StudyOutcome(study.study_id, images=len(study.instances))
        answered: list[tuple[ReceivedInstance, bytes]] = []  # (instance, its SR)
        size = self.options.max_images_per_request
        for begin in range(0, len(study.instances), size):
            answered += self._answer(study, study.instances[begin : begin + size], outcome)
        if answered:
            srs = self._reports(study, answered, outcome)
            if srs:
                self._store(study, srs, outcome)
        outcome.seconds = time.monotonic() - start
        self.metrics.seconds.observe(outcome.seconds)
        result = "stored" if outcome.stored and not outcome.dead_lettered else ("partial" if outcome.stored else "failed")
        self.metrics.studies.labels(result).inc()
        log.info("route.study", study_id=study.study_id, outcome=result, images=outcome.images,
                 answered=outcome.answered, refused=outcome.refused, srs_stored=outcome.stored,
                 dead_lettered=outcome.dead_lettered, reasons=sorted(set(outcome.reasons)),
                 seconds=round(outcome.seconds, 3))  # fmt: skip
        return outcome

    def _call_endpoint(self, study: Study, chunk: Sequence[ReceivedInstance]) -> tuple[EndpointAnswer, int]:
        def call() -> EndpointAnswer:
            answer = self.endpoint([i.data for i in chunk])
            if not (len(answer.responses) == len(answer.srs) == len(chunk)):
                raise EndpointError("rejected", "endpoint_bad_answer",
                                    f"{len(answer.responses)} answers and {len(answer.srs)} SRs for {len(chunk)} images")
            return answer

        return with_retries(call, self.options.retry, self._on_retry("endpoint", study), self.sleep)

    def _answer(self, study: Study, chunk: Sequence[ReceivedInstance], outcome: StudyOutcome):
        try:
            answer, _ = self._call_endpoint(study, chunk)
        except EndpointError as exc:
            if exc.kind == "rejected" and len(chunk) > 1:  # one bad file rejects a request: find it
                log.warning("route.isolating", study_id=study.study_id, images=len(chunk), reason=exc.reason)
                return [pair for one in chunk for pair in self._answer(study, [one], outcome)]
            self._fail(study, "endpoint", exc, outcome, instances=chunk, image_id=chunk[0].image_id if len(chunk) == 1 else "")
            return []
        pairs = []
        for instance, response, sr in zip(chunk, answer.responses, answer.srs):
            if response.applicable:
                outcome.answered += 1
                self.metrics.answered.inc()
            else:
                outcome.refused += 1
                self.metrics.refused.labels(response.refusal_reason or "unknown").inc()
                log.info("route.not_applicable", study_id=study.study_id, image_id=instance.image_id,
                         reason=response.refusal_reason)  # fmt: skip
            pairs.append((instance, sr))
        return pairs

    def _reports(self, study: Study, answered: list[tuple[ReceivedInstance, bytes]], outcome: StudyOutcome) -> list[bytes]:
        if self.options.sr_per == "image":
            return [sr for _, sr in answered]
        try:
            sources = [source_header(read_dicom(instance.data)) for instance, _ in answered]
            return [to_part10(merge_image_srs(sources, [from_part10(sr) for _, sr in answered]))]
        except (SRError, DicomError, ValueError) as exc:
            # The per-image SRs the endpoint made are still good: store those rather than nothing.
            log.warning("route.study_sr_failed", study_id=study.study_id, error=type(exc).__name__)
            return [sr for _, sr in answered]

    def _store(self, study: Study, srs: list[bytes], outcome: StudyOutcome) -> None:
        def call() -> None:
            self.store(srs)

        try:
            with_retries(call, self.options.retry, self._on_retry("store", study), self.sleep)
        except StoreError as exc:
            self._fail(study, "store", exc, outcome, srs=srs)
            return
        outcome.stored += len(srs)
        self.metrics.stored.inc(len(srs))

    def _on_retry(self, stage: str, study: Study):
        def note(exc: RouteError, attempt: int, wait: float) -> None:
            self.metrics.retries.labels(stage).inc()
            log.warning("route.retry", study_id=study.study_id, stage=stage, reason=exc.reason, attempt=attempt,
                        wait_seconds=round(wait, 2))  # fmt: skip

        return note

    def _fail(self, study: Study, stage, exc: RouteError, outcome: StudyOutcome, instances=(), srs=(), image_id="") -> None:
        attempts = getattr(exc, "attempts", 1)
        folder = self.dead_letter.put(study.study_id, stage, exc.reason, exc.kind, attempts, exc.detail,
                                      instances=instances, srs=srs, image_id=image_id)  # fmt: skip
        outcome.dead_lettered += len(srs) or len(instances) or 1
        outcome.reasons.append(exc.reason)
        self.metrics.failed.labels(stage, exc.reason).inc(len(srs) or len(instances) or 1)
        log.error("route.dead_letter", study_id=study.study_id, image_id=image_id or None, stage=stage,
                  reason=exc.reason, kind=exc.kind, attempts=attempts, folder=folder.name)  # fmt: skip

    def _dead_letter_study(self, study: Study, stage, exc: RouteError, attempts: int) -> None:
        exc.attempts = attempts
        self._fail(study, stage, exc, StudyOutcome(study.study_id), instances=study.instances)


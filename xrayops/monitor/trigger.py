"""Retraining triggers: thresholds over a monitoring window's signals, with cooldown and
dedup against run storms, and every decision appended to a JSONL audit log.

The core launches nothing itself: it calls a `launcher(arguments) -> run id` handed in by
the composition root (kfp.Client against a cluster, kfp.local when embedded; see
`xrayops.app.cli`), so this module stays free of kfp imports and is tested with a fake launcher.

Signals and their thresholds (Settings):
  drift share              >= drift_share_threshold
  label-noise rate JUMP    (window rate - reference rate) >= label_noise_jump_threshold; the
                           reference is the first rate logged for the serving model version
                           (what "normal" looked like when it went live), unless given
  OOD rate                 >= ood_rate_threshold
  accuracy on newly reviewed labels (optional) < min_reviewed_accuracy
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pydantic import BaseModel, Field

from xrayops.config import Settings
from xrayops.logs import get_logger

log = get_logger(__name__)

Launcher = Callable[[dict], str]


class TriggerSignals(BaseModel):
    window_id: str  # one monitoring window (e.g. its end time); the same window never launches twice
    model_version: str = ""  # the serving champion the window was scored by
    drift_share: float | None = None
    drifted_columns: list[str] = Field(default_factory=list)
    label_noise_rate: float | None = None
    n_judged: int | None = None  # confident, tagged predictions behind the rate (None: not reported)
    reference_label_noise_rate: float | None = None
    ood_rate: float | None = None
    reviewed_accuracy: float | None = None  # champion accuracy on labels reviewed in the window
    n_reviewed: int = 0


class TriggerPolicy(BaseModel):
    drift_share: float = 0.3
    label_noise_jump: float = 0.05
    ood_rate: float = 0.2
    min_reviewed_accuracy: float | None = None
    min_reviewed: int = 20  # fewer reviewed labels say too little about accuracy
    # A rate over fewer judged predictions is too noisy to jump on: at 30, one image moves it 3 points.
    min_judged: int = 30
    cooldown: timedelta = timedelta(hours=24)

    @classmethod
    def from_settings(cls, settings: Settings, min_reviewed_accuracy: float | None = None) -> TriggerPolicy:
        return cls(drift_share=settings.drift_share_threshold, label_noise_jump=settings.label_noise_jump_threshold,
                   ood_rate=settings.ood_rate_threshold, cooldown=timedelta(hours=settings.retrain_cooldown_hours),
                   min_reviewed_accuracy=min_reviewed_accuracy)


class TriggerDecision(BaseModel):
    decided_at: datetime
    window_id: str
    model_version: str
    crossed: list[str]  # names of the signals over threshold
    reasons: list[str]  # one sentence per crossed signal, with its numbers
    action: str  # "none" | "launched" | "suppressed" | "launch_failed"
    suppressed_by: str = ""  # "duplicate window" | "duplicate cause" | "cooldown"
    run_id: str = ""
    error: str = ""
    signals: TriggerSignals
    policy: dict


def crossed_signals(signals: TriggerSignals, policy: TriggerPolicy) -> dict[str, str]:
    """Signal name -> reason sentence, for each signal over its threshold. Unmeasured signals never cross."""
    out = {}
    if signals.drift_share is not None and signals.drift_share >= policy.drift_share:
        out["drift_share"] = (f"data drift share {signals.drift_share:.2f} >= {policy.drift_share:.2f}"
                              + (f" ({', '.join(signals.drifted_columns)})" if signals.drifted_columns else ""))
    enough = signals.n_judged is None or signals.n_judged >= policy.min_judged
    if signals.label_noise_rate is not None and signals.reference_label_noise_rate is not None and enough:
        jump = signals.label_noise_rate - signals.reference_label_noise_rate
        if jump >= policy.label_noise_jump:
            out["label_noise_jump"] = (f"label-noise rate {signals.label_noise_rate:.1%} is {jump:+.1%} over its "
                                       f"reference {signals.reference_label_noise_rate:.1%} (jump threshold {policy.label_noise_jump:.1%})")
    if signals.ood_rate is not None and signals.ood_rate >= policy.ood_rate:
        out["ood_rate"] = f"out-of-domain rate {signals.ood_rate:.1%} >= {policy.ood_rate:.1%}"
    if (policy.min_reviewed_accuracy is not None and signals.reviewed_accuracy is not None
            and signals.n_reviewed >= policy.min_reviewed and signals.reviewed_accuracy < policy.min_reviewed_accuracy):
        out["reviewed_accuracy"] = (f"accuracy {signals.reviewed_accuracy:.1%} on {signals.n_reviewed} newly reviewed "
                                    f"labels < {policy.min_reviewed_accuracy:.1%}")
    return out


class AuditLog:
    """Append-only JSONL of trigger decisions; one line per decision, flushed and fsynced."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def read(self) -> list[TriggerDecision]:
        if not self.path.exists():
            return []
        decisions = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                decisions.append(TriggerDecision.model_validate_json(line))
            except ValueError as exc:  # a torn or hand-edited line must not stop the monitor
                log.warning("trigger audit log line unreadable", path=str(self.path), line=number, error=str(exc)[:200])
        return decisions

    def append(self, decision: TriggerDecision) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(decision.model_dump_json() + "\n")
            f.flush()
            os.fsync(f.fileno())


def reference_noise_rate(history: list[TriggerDecision], model_version: str, min_judged: int = 0) -> float | None:
    """The first label-noise rate logged while `model_version` was serving (over at least
    `min_judged` judged predictions, where the window reported its count)."""
    for decision in history:
        n = decision.signals.n_judged
        if (decision.model_version == model_version and decision.signals.label_noise_rate is not None
                and (n is None or n >= min_judged)):
            return decision.signals.label_noise_rate
    return None


def suppression(history: list[TriggerDecision], signals: TriggerSignals, crossed: list[str], now: datetime,
                cooldown: timedelta) -> str:
    """Why a launch must not happen now, or "" when it may."""
    launched = [d for d in history if d.action == "launched"]
    if any(d.window_id == signals.window_id for d in launched):
        return "duplicate window"
    # The run launched for this cause on this model has not produced a new champion yet.
    if any(d.model_version == signals.model_version and set(crossed) <= set(d.crossed) for d in launched):
        return "duplicate cause"
    if any(now - d.decided_at < cooldown for d in launched):
        return "cooldown"
    return ""


def decide_and_launch(
    signals: TriggerSignals,
    policy: TriggerPolicy,
    audit_log: AuditLog,
    launcher: Launcher,
    now: datetime | None = None,
) -> TriggerDecision:
    """Evaluate the window, launch a retraining run when a signal crossed and nothing suppresses
    it, and append the decision (launched or not) to the audit log."""
    now = now or datetime.now(timezone.utc)
    history = audit_log.read()
    if signals.reference_label_noise_rate is None:
        reference = reference_noise_rate(history, signals.model_version, policy.min_judged)
        signals = signals.model_copy(update={"reference_label_noise_rate": reference})
    crossed = crossed_signals(signals, policy)
    decision = TriggerDecision(
        decided_at=now, window_id=signals.window_id, model_version=signals.model_version, crossed=sorted(crossed),
        reasons=[crossed[k] for k in sorted(crossed)], action="none", signals=signals,
        policy=policy.model_dump(mode="json"),
    )
    if crossed:
        why_not = suppression(history, signals, sorted(crossed), now, policy.cooldown)
        if why_not:
            decision.action, decision.suppressed_by = "suppressed", why_not
        else:
            arguments = {"trigger_window": signals.window_id, "trigger_reasons": "; ".join(decision.reasons)}
            try:
                decision.run_id = str(launcher(arguments))
                decision.action = "launched"
            except Exception as exc:  # the decision and the failure are logged; the monitor goes on
                decision.action, decision.error = "launch_failed", f"{type(exc).__name__}: {exc}"
    audit_log.append(decision)
    log.info("retrain trigger", action=decision.action, crossed=decision.crossed, suppressed_by=decision.suppressed_by,
             run_id=decision.run_id, window=signals.window_id)
    return decision


def signals_from_monitor(result, window_id: str, model_version: str = "") -> TriggerSignals:
    """TriggerSignals from a `MonitorResult` (xrayops.monitor.window)."""
    return TriggerSignals(
        window_id=window_id, model_version=model_version, drift_share=result.drift.drift_share,
        drifted_columns=list(result.drift.drifted_columns), label_noise_rate=result.label_noise_rate,
        n_judged=result.label_noise.n_judged if getattr(result, "label_noise", None) is not None else None,
        ood_rate=result.ood_rate,
    )


def read_audit_json(path: str | Path) -> list[dict]:
    """The audit log as plain dicts (for reports and dashboards)."""
    return [json.loads(d.model_dump_json()) for d in AuditLog(path).read()]

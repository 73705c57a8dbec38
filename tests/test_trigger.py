"""Retraining triggers: thresholds, label-noise jump, cooldown, dedup, audit log (fake launcher)."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from xrayops.config import Settings
from xrayops.monitor.trigger import (
    AuditLog,
    TriggerPolicy,
    TriggerSignals,
    crossed_signals,
    decide_and_launch,
)

T0 = datetime(2025, 5, 1, tzinfo=timezone.utc)
POLICY = TriggerPolicy(drift_share=0.3, label_noise_jump=0.05, ood_rate=0.2, min_reviewed_accuracy=0.9,
                       cooldown=timedelta(hours=24))


class FakeLauncher:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[dict] = []
        self.fail = fail

    def __call__(self, arguments: dict) -> str:
        self.calls.append(arguments)
        if self.fail:
            raise ConnectionError("KFP API unreachable")
        return f"run-{len(self.calls)}"


def test_policy_from_settings_and_each_signal():
    policy = TriggerPolicy.from_settings(Settings(label_noise_jump_threshold=0.07, retrain_cooldown_hours=6))
    assert (policy.drift_share, policy.label_noise_jump, policy.ood_rate) == (0.3, 0.07, 0.2)
    assert policy.cooldown == timedelta(hours=6)

    calm = TriggerSignals(window_id="w", drift_share=0.1, label_noise_rate=0.12, reference_label_noise_rate=0.10,
                          ood_rate=0.05, reviewed_accuracy=0.5, n_reviewed=5)  # too few reviews to judge
    assert crossed_signals(calm, POLICY) == {}
    hot = calm.model_copy(update={"drift_share": 0.5, "drifted_columns": ["manufacturer"], "label_noise_rate": 0.2,
                                  "ood_rate": 0.25, "n_reviewed": 40})
    reasons = crossed_signals(hot, POLICY)
    assert sorted(reasons) == ["drift_share", "label_noise_jump", "ood_rate", "reviewed_accuracy"]
    assert "manufacturer" in reasons["drift_share"] and "+10.0%" in reasons["label_noise_jump"]
    # A high but steady label-noise rate is no jump; an unmeasured reference never triggers.
    steady = calm.model_copy(update={"label_noise_rate": 0.3, "reference_label_noise_rate": 0.28})
    assert crossed_signals(steady, POLICY) == {}
    assert crossed_signals(calm.model_copy(update={"reference_label_noise_rate": None, "label_noise_rate": 0.9}), POLICY) == {}
    # A jump over too few judged predictions (1 of 6 disagreeing) is noise, not a trigger.
    few = hot.model_copy(update={"n_judged": POLICY.min_judged - 1})
    assert "label_noise_jump" not in crossed_signals(few, POLICY)
    assert "label_noise_jump" in crossed_signals(few.model_copy(update={"n_judged": POLICY.min_judged}), POLICY)


def test_launch_cooldown_dedup_and_audit_log(tmp_path):
    audit = AuditLog(tmp_path / "trigger.jsonl")
    launcher = FakeLauncher()

    # First window of model v1: its rate becomes the reference; nothing crosses.
    first = decide_and_launch(TriggerSignals(window_id="w1", model_version="1", label_noise_rate=0.08, drift_share=0.0),
                              POLICY, audit, launcher, now=T0)
    assert first.action == "none" and launcher.calls == []

    # Label noise jumps against the reference from the log: launch.
    w2 = TriggerSignals(window_id="w2", model_version="1", label_noise_rate=0.2, drift_share=0.1)
    second = decide_and_launch(w2, POLICY, audit, launcher, now=T0 + timedelta(hours=1))
    assert second.action == "launched" and second.run_id == "run-1" and second.crossed == ["label_noise_jump"]
    assert second.signals.reference_label_noise_rate == 0.08
    assert launcher.calls[0]["trigger_window"] == "w2" and "label-noise" in launcher.calls[0]["trigger_reasons"]

    # Same window again (monitor re-run): duplicate. Same cause on the same model: duplicate.
    again = decide_and_launch(w2, POLICY, audit, launcher, now=T0 + timedelta(hours=2))
    assert again.action == "suppressed" and again.suppressed_by == "duplicate window"
    w3 = w2.model_copy(update={"window_id": "w3"})
    assert decide_and_launch(w3, POLICY, audit, launcher, now=T0 + timedelta(days=3)).suppressed_by == "duplicate cause"
    # A new cause inside the cooldown: suppressed by the cooldown; after it: launched.
    drift = TriggerSignals(window_id="w4", model_version="1", drift_share=0.6, label_noise_rate=0.08)
    assert decide_and_launch(drift, POLICY, audit, launcher, now=T0 + timedelta(hours=5)).suppressed_by == "cooldown"
    later = drift.model_copy(update={"window_id": "w5"})
    assert decide_and_launch(later, POLICY, audit, launcher, now=T0 + timedelta(hours=30)).action == "launched"
    # A new champion (v2) may fire for the old cause again; its own first rate is its reference.
    v2 = TriggerSignals(window_id="w6", model_version="2", label_noise_rate=0.2, reference_label_noise_rate=0.05)
    assert decide_and_launch(v2, POLICY, audit, launcher, now=T0 + timedelta(days=5)).action == "launched"
    assert len(launcher.calls) == 3

    # A failing launcher is logged, not raised.
    failed = decide_and_launch(TriggerSignals(window_id="w7", model_version="3", ood_rate=0.5), POLICY, audit,
                               FakeLauncher(fail=True), now=T0 + timedelta(days=9))
    assert failed.action == "launch_failed" and "KFP API unreachable" in failed.error

    lines = (tmp_path / "trigger.jsonl").read_text().splitlines()
    assert len(lines) == 8
    assert [json.loads(line)["action"] for line in lines] == [
        "none", "launched", "suppressed", "suppressed", "suppressed", "launched", "launched", "launch_failed"]
    assert json.loads(lines[1])["signals"]["label_noise_rate"] == 0.2  # the numbers behind each decision

    # A torn line does not stop the next decision.
    with (tmp_path / "trigger.jsonl").open("a") as f:
        f.write('{"decided_at": "2025-\n')
    assert len(audit.read()) == 8


def test_cli_logs_a_calm_window_without_launching(tmp_path, monkeypatch):
    from xrayops.app.cli.monitor import retrain_trigger_cmd
    from xrayops.monitor.decision import RetrainDecision
    from xrayops.monitor.drift import DriftResult
    from xrayops.monitor.window import MonitorResult

    drift = DriftResult(drift_share=0.1, drifted_columns=[], columns=["pixel_mean"], column_scores={}, column_methods={},
                        column_thresholds={}, n_reference=10, n_current=10, html_path=tmp_path / "d.html",
                        json_path=tmp_path / "d.json")
    result = MonitorResult(drift=drift, label_noise_rate=0.05, ood_rate=0.01, result_path=tmp_path / "monitor.json",
                           decision=RetrainDecision(retrain=False))
    (tmp_path / "monitor.json").write_text(result.model_dump_json())
    monkeypatch.setenv("XRAYOPS_OUTPUT_DIR", str(tmp_path))
    # The command function itself (a CliRunner would point structlog at a stream it then closes).
    retrain_trigger_cmd(monitor_result=tmp_path / "monitor.json", window_id="2025-05-01", model_version="4",
                        audit_log=tmp_path / "trigger.jsonl", pipeline_root=tmp_path / "kfp")
    logged = AuditLog(tmp_path / "trigger.jsonl").read()
    assert [(d.action, d.window_id, d.model_version) for d in logged] == [("none", "2025-05-01", "4")]
    assert logged[0].signals.label_noise_rate == 0.05 and logged[0].signals.drift_share == 0.1


def test_cli_launches_the_retraining_pipeline_over_the_archive(tmp_path, monkeypatch):
    """A drifted window with --source-dir launches the retraining graph (kfp.local here; the
    graph itself runs in tests/test_retraining_pipeline.py), and the decision records the run."""
    import pipelines.retraining
    from xrayops.app.cli.monitor import retrain_trigger_cmd
    from xrayops.monitor.decision import RetrainDecision
    from xrayops.monitor.drift import DriftResult
    from xrayops.monitor.window import MonitorResult

    launched = []
    monkeypatch.setattr(pipelines.retraining, "run_retraining_local",
                        lambda root, log_path=None, **params: launched.append((root, log_path, params)))
    drift = DriftResult(drift_share=0.5, drifted_columns=["manufacturer"], columns=["manufacturer"], column_scores={},
                        column_methods={}, column_thresholds={}, n_reference=10, n_current=10,
                        html_path=tmp_path / "d.html", json_path=tmp_path / "d.json")
    result = MonitorResult(drift=drift, label_noise_rate=0.05, ood_rate=0.01, result_path=tmp_path / "monitor.json",
                           decision=RetrainDecision(retrain=True))
    (tmp_path / "monitor.json").write_text(result.model_dump_json())
    monkeypatch.setenv("XRAYOPS_OUTPUT_DIR", str(tmp_path))
    monkeypatch.setenv("XRAYOPS_GATE_MARGIN", "0.02")
    monkeypatch.delenv("XRAYOPS_KFP_HOST", raising=False)
    (tmp_path / "archive").mkdir()
    retrain_trigger_cmd(monitor_result=tmp_path / "monitor.json", window_id="2025-05-02", model_version="4",
                        audit_log=tmp_path / "trigger.jsonl", pipeline_root=tmp_path / "kfp",
                        source_dir=tmp_path / "archive", source_pvc="unused")
    ((root, log_path, params),) = launched
    assert root == tmp_path / "kfp" and log_path == tmp_path / "kfp" / "kfp-local.log"
    assert params["source_dir"] == str((tmp_path / "archive").resolve()) and params["gate_margin"] == 0.02
    (decision,) = AuditLog(tmp_path / "trigger.jsonl").read()
    assert decision.action == "launched" and decision.crossed == ["drift_share"]
    assert decision.run_id == str((tmp_path / "kfp").resolve())


def test_demo_retrain_step_goes_through_the_trigger(tmp_path, monkeypatch):
    """The demo's retrain step: launched once with the pipeline's gate as its facts, held back by
    dedup the second time, and a failing launch is logged, not raised (fake pipeline runner)."""
    from types import SimpleNamespace

    from xrayops.app.demo import DemoConfig, retrain_through_trigger
    from xrayops.monitor.decision import RetrainDecision
    from xrayops.monitor.drift import DriftResult
    from xrayops.monitor.window import MonitorResult

    drift = DriftResult(drift_share=0.5, drifted_columns=["manufacturer"], columns=["manufacturer"], column_scores={},
                        column_methods={}, column_thresholds={}, n_reference=10, n_current=10,
                        html_path=tmp_path / "d.html", json_path=tmp_path / "window-7.json")
    result = MonitorResult(drift=drift, label_noise_rate=0.0, ood_rate=0.01, result_path=tmp_path / "monitor.json",
                           decision=RetrainDecision(retrain=True))
    gate = {"challenger": "models:/xrayops-region/2", "champion_accuracy": 0.62, "challenger_accuracy": 0.5994,
            "ci_low": -0.0551, "ci_high": 0.0121, "promote": False}
    calls = []

    def fake_run(root, log_path, **params):
        calls.append(params)
        (tmp_path / "gate.json").write_text(json.dumps(gate))
        return SimpleNamespace(output=SimpleNamespace(path=str(tmp_path / "gate.json")))

    cfg = DemoConfig(out=tmp_path, finetune_epochs=7)
    settings = Settings(output_dir=tmp_path, gate_margin=0.03)
    artefacts, facts = retrain_through_trigger(result, "1", tmp_path, cfg, settings, fake_run)
    assert facts == {"trigger": "launched", "crossed": ["drift_share"], "challenger": "models:/xrayops-region/2",
                     "champion_accuracy": 0.62, "challenger_accuracy": 0.599, "ci": [-0.055, 0.012], "promoted": False,
                     "refused_subgroups": []}
    ((params),) = calls
    assert params["source_dir"] == str(tmp_path / "synth") and params["finetune_epochs"] == 7
    assert params["gate_margin"] == 0.03 and artefacts["trigger_log"] == tmp_path / "monitor" / "trigger.jsonl"

    _, again = retrain_through_trigger(result, "1", tmp_path, cfg, settings, fake_run)
    assert again == {"trigger": "suppressed", "crossed": ["drift_share"]} and len(calls) == 1

    def broken(root, log_path, **params):
        raise RuntimeError("Task 'champion-op' finished with status FAILURE")

    (tmp_path / "monitor" / "trigger.jsonl").unlink()
    _, failed = retrain_through_trigger(result, "1", tmp_path, cfg, settings, broken)
    assert failed["trigger"] == "launch_failed" and "champion-op" in failed["error"]
    assert [d.action for d in AuditLog(tmp_path / "monitor" / "trigger.jsonl").read()] == ["launch_failed"]

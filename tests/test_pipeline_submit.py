"""`xrayops pipeline submit`: the real kfp.Client against a small fake of the KFP v2beta1 REST API
on 127.0.0.1 (healthz, experiments, runs, recurring runs), plus the clear errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipelines.submit import SubmitError, kfp_cron, parse_params, submit
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "registry.example/xrayops:7.1"


class FakeKFP(BaseHTTPRequestHandler):
    """Just enough of ml-pipeline's REST API for kfp.Client's run and recurring-run calls."""

    state: dict = {}

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        if url.path == "/apis/v2beta1/healthz":
            return self._reply(200, {"multi_user": False})
        if url.path == "/apis/v2beta1/experiments":
            wanted = json.loads(urllib.parse.parse_qs(url.query)["filter"][0])["predicates"][0]["stringValue"]
            found = [e for e in self.state["experiments"] if e["display_name"] == wanted]
            return self._reply(200, {"experiments": found, "total_size": len(found)} if found else {})
        self._reply(404, {"error": "not found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        self.state["requests"].append((self.path, body, self.headers.get("Authorization")))
        if self.state.get("deny"):
            return self._reply(403, {"error": "User cannot create runs", "code": 7})
        if self.path == "/apis/v2beta1/experiments":
            exp = {**body, "experiment_id": f"exp-{len(self.state['experiments']) + 1}"}
            self.state["experiments"].append(exp)
            return self._reply(200, exp)
        if self.path == "/apis/v2beta1/runs":
            return self._reply(200, {**body, "run_id": "run-1", "state": "PENDING"})
        if self.path == "/apis/v2beta1/recurringruns":
            return self._reply(200, {**body, "recurring_run_id": "rr-1", "status": "ENABLED"})
        self._reply(404, {"error": "not found"})


@pytest.fixture()
def kfp_api():
    state = {"experiments": [], "requests": []}
    handler = type("Handler", (FakeKFP,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """The cluster-mode pipeline compiled by the CLI with a custom image (bound at import time)."""
    out = tmp_path_factory.mktemp("pkg") / "xrayops-training.yaml"
    env = {**os.environ, "XRAYOPS_IMAGE": IMAGE}
    subprocess.run([sys.executable, "-m", "xrayops.app.cli", "pipeline", "compile", "--cluster", "--out", str(out)],
                   check=True, env=env, cwd=ROOT, capture_output=True)
    return out


def _cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "XRAYOPS_LOG_LEVEL": "WARNING", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "xrayops.app.cli", "pipeline", "submit", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT)


def test_submit_starts_one_run_with_the_compiled_pipeline(kfp_api, package):
    host, state = kfp_api
    result = submit(host, package, arguments={"n_images": 84}, experiment="xrayops-ci", run_name="ci-1",
                    namespace="team-a", service_account="xrayops-pipeline-runner", pipeline_root="s3://b/root")
    assert (result.run_id, result.experiment_id, result.recurring_run_id) == ("run-1", "exp-1", None)
    (exp_path, exp, _), (run_path, run, _) = state["requests"]
    assert exp_path == "/apis/v2beta1/experiments" and (exp["display_name"], exp["namespace"]) == ("xrayops-ci", "team-a")
    assert run_path == "/apis/v2beta1/runs"
    assert run["display_name"] == "ci-1" and run["experiment_id"] == "exp-1"
    assert run["service_account"] == "xrayops-pipeline-runner"
    assert run["runtime_config"] == {"pipeline_root": "s3://b/root", "parameters": {"n_images": 84}}
    spec = run["pipeline_spec"]["pipeline_spec"]  # with the Kubernetes platform spec beside it
    assert spec["pipelineInfo"]["name"] == "xrayops-training"
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {IMAGE}
    platform = run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert "secretAsEnv" in platform["exec-version-dataset-op"]
    # A second submission reuses the experiment instead of creating another.
    submit(host, package, experiment="xrayops-ci", namespace="team-a")
    assert [p for p, _, _ in state["requests"]].count("/apis/v2beta1/experiments") == 1


def test_submit_recurring_run_through_the_cli(kfp_api, package):
    host, state = kfp_api
    proc = _cli("--host", host, "--package", str(package), "--recurring", "0 3 * * *", "--namespace", "team-a",
                "--param", "pretrain_epochs=2", "--param", "model_name=xrayops-region", "--token", "t0k3n")
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer == {"submitted": True, "host": host, "experiment_id": "exp-1", "recurring_run_id": "rr-1",
                      "cron": "0 0 3 * * *"}
    path, body, auth = state["requests"][-1]
    assert path == "/apis/v2beta1/recurringruns" and auth == "Bearer t0k3n"
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert body["mode"] == "ENABLE" and body["no_catchup"] is True and body["max_concurrency"] == 1
    assert body["runtime_config"]["parameters"] == {"pretrain_epochs": 2, "model_name": "xrayops-region"}


def test_unreachable_host_and_refusals_are_clear_errors(kfp_api, package):
    closed = f"http://127.0.0.1:{free_port()}"
    proc = _cli("--host", closed, "--package", str(package))
    assert proc.returncode == 2
    assert f"KFP endpoint {closed} is unreachable" in proc.stderr and "Traceback" not in proc.stderr
    host, state = kfp_api
    state["deny"] = True
    proc = _cli("--host", host, "--package", str(package), "--namespace", "team-a")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "refused the request: HTTP 403" in proc.stderr and "User cannot create runs" in proc.stderr
    proc = _cli("--host", "ml-pipeline:8888", "--package", str(package))
    assert proc.returncode == 2 and "--host must be an http(s) URL" in proc.stderr


def test_if_retrain_submits_only_when_the_monitor_says_so(tmp_path, package):
    from xrayops.monitor.decision import RetrainDecision
    from xrayops.monitor.drift import DriftResult
    from xrayops.monitor.window import MonitorResult

    drift = DriftResult(drift_share=0.05, drifted_columns=[], columns=["a"], column_scores={"a": 0.5},
                        column_methods={"a": "ks"}, column_thresholds={"a": 0.05}, n_reference=10, n_current=10,
                        html_path=tmp_path / "d.html", json_path=tmp_path / "d.json")
    result = tmp_path / "monitor.json"
    result.write_text(MonitorResult(drift=drift, decision=RetrainDecision(retrain=False, reasons=[]),
                                    result_path=result).model_dump_json())
    closed = f"http://127.0.0.1:{free_port()}"  # never contacted when there is nothing to retrain
    proc = _cli("--host", closed, "--package", str(package), "--if-retrain", str(result))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"submitted": False, "retrain": False, "reasons": []}
    result.write_text(result.read_text().replace('"retrain":false', '"retrain":true'))
    proc = _cli("--host", closed, "--package", str(package), "--if-retrain", str(result))
    assert proc.returncode == 2 and "is unreachable" in proc.stderr  # it did try to submit
    proc = _cli("--host", closed, "--if-retrain", str(tmp_path / "missing.json"))
    assert proc.returncode == 2 and "no monitoring result" in proc.stderr


def test_if_retrain_submits_the_retraining_pipeline_over_the_archive(kfp_api, tmp_path):
    """What the monitor CronJob runs: no --package, so the retraining pipeline is compiled, with the
    archive's PVC mounted on the ingestion tasks."""
    from xrayops.monitor.decision import RetrainDecision
    from xrayops.monitor.drift import DriftResult
    from xrayops.monitor.window import MonitorResult

    drift = DriftResult(drift_share=0.5, drifted_columns=["a"], columns=["a"], column_scores={"a": 0.01},
                        column_methods={"a": "ks"}, column_thresholds={"a": 0.05}, n_reference=10, n_current=10,
                        html_path=tmp_path / "d.html", json_path=tmp_path / "d.json")
    result = tmp_path / "monitor.json"
    result.write_text(MonitorResult(drift=drift, decision=RetrainDecision(retrain=True, reasons=["drift"]),
                                    result_path=result).model_dump_json())
    host, state = kfp_api
    proc = _cli("--host", host, "--if-retrain", str(result), "--source-pvc", "pacs-archive", "--gpu",
                env_extra={"XRAYOPS_IMAGE": IMAGE})
    assert proc.returncode == 0, proc.stderr
    run = state["requests"][-1][1]
    spec = run["pipeline_spec"]["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "xrayops-retraining"
    platform = run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    claims = [m["pvcNameParameter"]["runtimeValue"]["constant"] for m in platform["exec-ingest-part-op"]["pvcMount"]]
    assert claims == ["pacs-archive"] and platform["exec-pretrain-op"]["nodeSelector"]["labels"] == {"xrayops.io/pool": "gpu"}
    # The first champions: the site-training pipeline over the same archive, with the run's arguments.
    proc = _cli("--host", host, "--pipeline", "site-training", "--source-pvc", "pacs-archive",
                "--param", "ssl_methods=[simclr, byol]", "--param", "release=true")
    assert proc.returncode == 0, proc.stderr
    run = state["requests"][-1][1]
    assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "xrayops-site-training"
    assert run["runtime_config"]["parameters"] == {"ssl_methods": ["simclr", "byol"], "release": True}
    platform = run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert [m["pvcNameParameter"]["runtimeValue"]["constant"] for m in platform["exec-ingest-part-op"]["pvcMount"]] \
        == ["pacs-archive"]
    proc = _cli("--host", host, "--pipeline", "nightly", "--package", str(tmp_path / "x.yaml"))
    assert proc.returncode == 2 and "--pipeline must be training, site-training or retraining" in " ".join(proc.stderr.split())


def test_cron_and_params_parsing():
    assert kfp_cron("*/30 * * * *") == "0 */30 * * * *"
    assert kfp_cron("0 0 9 ? * 2-6") == "0 0 9 ? * 2-6"
    with pytest.raises(SubmitError, match="5- or 6-field"):
        kfp_cron("hourly")
    assert parse_params(["n_images=84", "drift_shift=0.5", "alias=champion", "dvc_remote_url="]) == {
        "n_images": 84, "drift_shift": 0.5, "alias": "champion", "dvc_remote_url": ""
    }
    with pytest.raises(SubmitError, match="KEY=VALUE"):
        parse_params(["n_images"])

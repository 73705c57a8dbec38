"""Shared fixtures: a real S3 endpoint (moto's server on 127.0.0.1), free ports, a git repo."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The de-identification key of the whole test session (the product has no default key): every
# test and every process a test starts (servers, kfp.local tasks) pseudonymises with it. Set here,
# not in the environment, so `make test` passes with no key configured.
TEST_DEID_KEY = "xrayops-test-session-key-not-secret"
os.environ["XRAYOPS_DEID_KEY"] = TEST_DEID_KEY
os.environ.pop("XRAYOPS_DEID_KEY_FILE", None)

SHARED = Path(__file__).resolve().parents[2] / "shared"
DICOM_SAMPLES = Path(os.environ.get("XRAYOPS_DICOM_SAMPLES", SHARED / "dicom-samples"))
K8S_SCHEMAS = SHARED / "k8s-schemas"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """End a process this test started, by its PID: SIGTERM, then SIGKILL if it lingers."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited early with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"port {port} did not open within {timeout}s")


@pytest.fixture()
def s3_endpoint(monkeypatch):
    """moto's S3 server on 127.0.0.1, stopped by PID afterwards. Yields (endpoint_url, bucket)."""
    import boto3

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc)
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(key, value)
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="xrayops-data")
        yield endpoint, "xrayops-data"
    finally:
        stop_process(proc)


@pytest.fixture()
def git_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    (repo / "README").write_text("x\n")
    subprocess.run(["git", "add", "README"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "init"], cwd=repo, check=True, env=env)
    return repo

"""Run `xrayops serve` in a subprocess, for the tests, the demo and the benchmarks.

`start_server_process` starts one on free ports and returns once the model answers ready;
`running_server` does the same as a context manager. Servers are stopped by PID (SIGTERM, then
SIGKILL), so nothing is left running.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from xrayops.bundle_meta import read_bundle_meta

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A server started by `start_server_process`; `stop()` ends it by PID."""

    process: subprocess.Popen
    url: str
    grpc_address: str | None
    model_name: str
    output_path: Path
    owns_output: bool = False  # a temp file we created: removed on stop
    stopped: bool = field(default=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def output_tail(self, n_chars: int = 4000) -> str:
        try:
            return self.output_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`; returns the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.owns_output:
            self.output_path.unlink(missing_ok=True)
        self.stopped = True
        return self.process.returncode


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_server_process(
    bundle_dir: str | Path | Sequence[str | Path],
    host: str = "127.0.0.1",
    http_port: int | None = None,
    grpc_port: int | None = None,
    enable_grpc: bool = True,
    log_path: str | Path | None = None,
    model_name: str | None = None,
    model_version: str | None = None,
    output_path: str | Path | None = None,
    startup_timeout: float = 180.0,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """Start `xrayops serve` in a subprocess and return once the model answers ready.

    Several bundle folders serve an ensemble. Free ports are picked when none are given.
    `extra_args` go to the command line (e.g. ["--role", "transformer", ...]), `env` over
    os.environ (e.g. XRAYOPS_SERVE_MAX_REQUEST_MB). Server output goes to `output_path` (a temp
    file by default). Raises RuntimeError with the server's output if it exits or is not
    ready within `startup_timeout` seconds.
    """
    dirs = [bundle_dir] if isinstance(bundle_dir, (str, Path)) else list(bundle_dir)
    name = model_name or read_bundle_meta(Path(dirs[0])).name
    http_port = http_port or free_port(host)
    grpc_port = (grpc_port or free_port(host)) if enable_grpc else None
    owns_output = output_path is None
    if owns_output:
        handle, path = tempfile.mkstemp(prefix="xrayops-serve-", suffix=".log")
        os.close(handle)
        output_path = path
    output_path = Path(output_path)
    cmd = [sys.executable, "-m", "xrayops.app.cli", "serve", *[a for d in dirs for a in ("--model", str(d))],
           "--host", host, "--http-port", str(http_port), "--model-name", name, *extra_args]
    cmd += ["--grpc-port", str(grpc_port)] if grpc_port else ["--no-grpc"]
    cmd += ["--log-path", str(log_path)] if log_path is not None else ["--no-local-log"]
    if model_version:
        cmd += ["--model-version", model_version]
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    with open(output_path, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url_host = f"[{host}]" if ":" in host else host
    server = ServerProcess(
        process=process,
        url=f"http://{url_host}:{http_port}",
        grpc_address=f"{url_host}:{grpc_port}" if grpc_port else None,
        model_name=name,
        output_path=output_path,
        owns_output=owns_output,
    )
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if _http_ok(f"{server.url}/v2/health/ready") and _http_ok(f"{server.url}/v2/models/{name}/ready"):
            return server
        time.sleep(0.3)
    problem = (
        f"server exited with code {process.returncode}" if process.poll() is not None
        else f"server not ready within {startup_timeout:.0f}s"
    )
    output = server.output_tail()
    server.stop()
    raise RuntimeError(f"{problem}:\n{output}")


@contextmanager
def running_server(bundle_dir: str | Path | Sequence[str | Path], **kwargs) -> Iterator[str]:
    """`start_server_process` as a context manager yielding the base URL; the server is
    stopped by PID on exit."""
    server = start_server_process(bundle_dir, **kwargs)
    try:
        yield server.url
    finally:
        server.stop()

"""The quality officers' dashboard process: `evidently ui` over the monitoring workspace, and a
headless-Chromium capture of the project dashboard (DOM and screenshot) for tests and docs.

The UI is Evidently's own server (a subprocess, bound to 127.0.0.1 unless told otherwise); the
capture uses the system Chromium (Debian's `chromium`), so nothing is downloaded.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel

from xrayops.logs import get_logger

log = get_logger(__name__)

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


class DashboardCapture(BaseModel):
    url: str
    dom: str  # the rendered page, after the dashboard's scripts ran
    screenshot: Path | None = None


def ui_command(workspace: str | Path, host: str = "127.0.0.1", port: int = 8000) -> list[str]:
    """`evidently ui` for the workspace, run by this interpreter (no PATH lookup)."""
    launcher = "import sys; from evidently.cli import app; sys.argv[0] = 'evidently'; sys.exit(app())"
    return [sys.executable, "-c", launcher, "ui", "--workspace", str(Path(workspace).resolve()),
            "--host", host, "--port", str(port)]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"evidently ui exited with {proc.returncode} before listening on {host}:{port}")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"evidently ui did not listen on {host}:{port} within {timeout:.0f}s")


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop the process we started, by its PID: terminate, then kill if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


@contextmanager
def running_ui(workspace: str | Path, host: str = "127.0.0.1", port: int | None = None,
               log_path: str | Path | None = None, timeout: float = 60.0) -> Iterator[str]:
    """`evidently ui` on host:port (a free port when None) for the block; yields its base URL."""
    port = port or free_port(host)
    sink = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(ui_command(workspace, host, port), stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_for_port(host, port, proc, timeout)
        log.info("evidently ui started", pid=proc.pid, url=f"http://{host}:{port}", workspace=str(workspace))
        yield f"http://{host}:{port}"
    finally:
        stop(proc)
        if log_path:
            sink.close()


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _chromium(binary: str, profile: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    # Reduced motion: the charts draw their final state instead of animating towards it, so
    # the capture does not depend on how far an animation got.
    command = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--force-prefers-reduced-motion", "--hide-scrollbars", "--no-first-run",
               f"--user-data-dir={profile}", "--virtual-time-budget=15000", *args]
    return subprocess.run(command, capture_output=True, timeout=timeout, check=False)


def capture_dashboard(url: str, screenshot: str | Path | None = None, chromium: str | None = None,
                      window: tuple[int, int] = (1400, 1800), timeout: float = 90.0) -> DashboardCapture:
    """Open `url` in headless Chromium: the rendered DOM, and a PNG screenshot when asked."""
    binary = chromium or find_chromium()
    if binary is None:
        raise FileNotFoundError(f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)}); apt-get install chromium")
    size = f"--window-size={window[0]},{window[1]}"
    with tempfile.TemporaryDirectory(prefix="xrayops-chromium-") as profile:
        dumped = _chromium(binary, profile, size, "--dump-dom", url, timeout=timeout)
        if dumped.returncode != 0 or not dumped.stdout:
            raise RuntimeError(f"chromium --dump-dom {url} failed ({dumped.returncode}): {dumped.stderr.decode()[-500:]}")
        shot = None
        if screenshot is not None:
            shot = Path(screenshot).resolve()
            shot.parent.mkdir(parents=True, exist_ok=True)
            taken = _chromium(binary, profile, size, f"--screenshot={shot}", url, timeout=timeout)
            if taken.returncode != 0 or not shot.exists():
                raise RuntimeError(f"chromium --screenshot {url} failed ({taken.returncode}): {taken.stderr.decode()[-500:]}")
    return DashboardCapture(url=url, dom=dumped.stdout.decode("utf-8", errors="replace"), screenshot=shot)


def project_url(base_url: str, project_id: str) -> str:
    return f"{base_url.rstrip('/')}/projects/{project_id}"


def monitoring_project_id(workspace: str | Path) -> str:
    """The id of the workspace's "xrayops monitoring" project (created, with its dashboard, if absent)."""
    from xrayops.monitor.workspace import open_project

    return str(open_project(workspace)[1].id)


def capture_workspace(workspace: str | Path, screenshot: str | Path | None = None,
                      log_path: str | Path | None = None) -> DashboardCapture:
    """Start the UI for the workspace, capture the monitoring project's dashboard, stop the UI."""
    project_id = monitoring_project_id(workspace)
    with running_ui(workspace, log_path=log_path) as base:
        return capture_dashboard(project_url(base, project_id), screenshot)

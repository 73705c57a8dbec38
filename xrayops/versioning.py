"""Dataset versioning with DVC: `dvc add` the dataset folder and `dvc push` it to a remote.

The remote is a local directory by default and any S3 endpoint (MinIO, moto, AWS) by URL.
Machine-specific remote settings go to `.dvc/config.local`, so the committed config stays clean.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from xrayops.errors import XrayopsError
from xrayops.contracts import DatasetVersion
from xrayops.logs import get_logger

log = get_logger(__name__)

REMOTE_NAME = "storage"


class VersioningError(XrayopsError, RuntimeError):
    """A DVC command failed; the message carries DVC's own output."""


def _dvc(repo_dir: Path, *args: str, env: dict[str, str] | None = None) -> str:
    cmd = [sys.executable, "-m", "dvc", *args]
    proc = subprocess.run(
        cmd, cwd=repo_dir, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if proc.returncode != 0:
        raise VersioningError(f"dvc {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _is_git_repo(path: Path) -> bool:
    proc = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=path, capture_output=True, text=True)
    return proc.returncode == 0 and Path(proc.stdout.strip()).resolve() == path.resolve()


def ensure_dvc_repo(repo_dir: Path) -> None:
    """`dvc init` the folder if needed; without git it becomes a --no-scm DVC repo."""
    if (repo_dir / ".dvc").is_dir():
        return
    args = ["init", "-q"] if _is_git_repo(repo_dir) else ["init", "-q", "--no-scm"]
    _dvc(repo_dir, *args)
    _dvc(repo_dir, "config", "core.analytics", "false")


def configure_remote(repo_dir: Path, url: str, endpoint_url: str = "") -> None:
    """Point the default remote at `url` (a directory or s3://bucket/prefix) in config.local."""
    if "://" not in url:
        url = str(Path(url).resolve())
        Path(url).mkdir(parents=True, exist_ok=True)
    _dvc(repo_dir, "remote", "add", "--local", "--force", "--default", REMOTE_NAME, url)
    if endpoint_url:
        _dvc(repo_dir, "remote", "modify", "--local", REMOTE_NAME, "endpointurl", endpoint_url)


def read_dvc_file(dvc_file: Path) -> dict:
    outs = yaml.safe_load(dvc_file.read_text())["outs"][0]
    return {"md5": outs["md5"], "path": outs["path"], "nfiles": int(outs.get("nfiles", 0))}


def version_dataset(
    repo_dir: Path, data_path: Path, remote_url: str = "", endpoint_url: str = ""
) -> DatasetVersion:
    """Track `data_path` (relative to `repo_dir`) with DVC and push it; returns the content hash.

    The `.dvc` file sits next to the folder (data/ -> data.dvc), which is what git commits as the version.
    """
    repo_dir = Path(repo_dir).resolve()
    data_path = Path(data_path)
    rel = data_path.resolve().relative_to(repo_dir) if data_path.is_absolute() else data_path
    if not (repo_dir / rel).is_dir():
        raise VersioningError(f"dataset folder {repo_dir / rel} does not exist; run ingest first")
    ensure_dvc_repo(repo_dir)
    if remote_url:
        configure_remote(repo_dir, remote_url, endpoint_url)
    log.info("dvc add", path=str(rel))
    _dvc(repo_dir, "add", "-q", str(rel))
    log.info("dvc push", remote=remote_url or "default")
    _dvc(repo_dir, "push", "-q", str(rel) + ".dvc")
    info = read_dvc_file(repo_dir / (str(rel) + ".dvc"))
    remote = remote_url or _dvc(repo_dir, "remote", "default").strip()
    return DatasetVersion(path=str(rel), md5=info["md5"], remote=remote, n_files=info["nfiles"])


def pull_dataset(repo_dir: Path, dvc_file: Path) -> None:
    """Restore a dataset version from the remote (`dvc pull`)."""
    _dvc(Path(repo_dir).resolve(), "pull", "-q", str(dvc_file))


def git_commit(repo_dir: Path) -> str:
    """HEAD commit of the repo holding the code, with '-dirty' when there are local changes."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True)
    if head.returncode != 0:
        return ""
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir, capture_output=True, text=True
    )
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")

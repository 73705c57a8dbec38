import hashlib
import json
import shutil

import boto3
import numpy as np
import pytest

from xrayops.versioning import VersioningError, git_commit, pull_dataset, read_dvc_file, version_dataset


def _write_dataset(root, value: int = 1):
    data = root / "data"
    (data / "shards").mkdir(parents=True, exist_ok=True)
    np.save(data / "shards" / "shard-00000.npy", np.full((3, 8, 8), value, dtype=np.uint8))
    (data / "preprocessing.json").write_text('{"size": 8}')
    return data


def test_local_remote_push_and_pull_roundtrip(git_repo, tmp_path):
    data = _write_dataset(git_repo)
    remote = tmp_path / "remote"
    version = version_dataset(git_repo, data, remote_url=str(remote))

    assert version.md5.endswith(".dir") and version.n_files == 2
    assert read_dvc_file(git_repo / "data.dvc")["md5"] == version.md5
    assert sum(1 for p in remote.rglob("*") if p.is_file()) >= 3  # 2 files + the .dir listing

    # A fresh checkout restores the exact bytes from the remote.
    original = (data / "shards" / "shard-00000.npy").read_bytes()
    shutil.rmtree(data)
    shutil.rmtree(git_repo / ".dvc" / "cache")
    pull_dataset(git_repo, git_repo / "data.dvc")
    assert (data / "shards" / "shard-00000.npy").read_bytes() == original


def test_hash_follows_content(git_repo, tmp_path):
    data = _write_dataset(git_repo, value=1)
    first = version_dataset(git_repo, data, remote_url=str(tmp_path / "r"))
    again = version_dataset(git_repo, data, remote_url=str(tmp_path / "r"))
    _write_dataset(git_repo, value=2)
    changed = version_dataset(git_repo, data, remote_url=str(tmp_path / "r"))
    assert first.md5 == again.md5 != changed.md5


def test_s3_remote_on_moto_push_wipe_pull_verify(git_repo, s3_endpoint, monkeypatch):
    endpoint, bucket = s3_endpoint
    data = _write_dataset(git_repo)
    version = version_dataset(git_repo, data, remote_url=f"s3://{bucket}/datasets", endpoint_url=endpoint)
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket)["Contents"]]
    assert len(keys) == 3 and all(k.startswith("datasets/") for k in keys)
    assert any(version.md5.removesuffix(".dir")[2:] in k for k in keys)

    # A fresh machine: no cache, no data, credentials from an AWS config file instead of the env.
    original = {p.relative_to(data).as_posix(): p.read_bytes() for p in data.rglob("*") if p.is_file()}
    shutil.rmtree(data)
    shutil.rmtree(git_repo / ".dvc" / "cache")
    credentials = git_repo.parent / "aws-credentials"
    credentials.write_text("[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    pull_dataset(git_repo, git_repo / "data.dvc")
    pulled = {p.relative_to(data).as_posix(): p.read_bytes() for p in data.rglob("*") if p.is_file()}
    assert pulled == original
    # every file's md5 is the one DVC recorded in the directory listing it pushed
    listing = json.loads(next((git_repo / ".dvc" / "cache").rglob(version.md5.removesuffix(".dir")[2:] + ".dir")).read_text())
    assert {e["relpath"]: e["md5"] for e in listing} == {k: hashlib.md5(v).hexdigest() for k, v in pulled.items()}


def test_missing_dataset_is_a_clear_error(git_repo):
    with pytest.raises(VersioningError, match="does not exist"):
        version_dataset(git_repo, git_repo / "nope")


def test_git_commit_reports_head_and_dirty(git_repo):
    head = git_commit(git_repo)
    assert len(head) == 40
    (git_repo / "README").write_text("changed\n")
    assert git_commit(git_repo) == head + "-dirty"

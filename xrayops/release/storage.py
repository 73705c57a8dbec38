"""The serving storage releases are written to: a local folder (file://) or S3 (MinIO, moto, AWS).

Only this module touches the storage. Files go up first and release.json last, so a release
whose release.json exists is complete; an interrupted publish leaves no release, only files that
the next publish of the same members overwrites.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from urllib.parse import urlparse

from pydantic import ValidationError

from xrayops.bundle_meta import META, WEIGHTS, file_sha256
from xrayops.contracts import ModelBundleMeta
from xrayops.release.plan import RELEASE_FILE, RELEASES, Release, ReleaseError
from xrayops.registry.mlflow_registry import local_path

BUNDLE_FILES = (META, WEIGHTS)


class LocalStore:
    """Releases under a folder (a shared volume, or tests and the demo)."""

    def __init__(self, storage_uri: str):
        self.storage_uri = storage_uri
        self.root = local_path(storage_uri)

    def _dir(self, release_id: str) -> Path:
        return self.root / RELEASES / release_id

    def read_text(self, release_id: str, name: str) -> str | None:
        path = self._dir(release_id) / name
        return path.read_text() if path.is_file() else None

    def size(self, release_id: str, name: str) -> int | None:
        path = self._dir(release_id) / name
        return path.stat().st_size if path.is_file() else None

    def put_file(self, release_id: str, name: str, source: Path) -> None:
        target = self._dir(release_id) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)

    def copy(self, from_id: str, to_id: str, name: str) -> None:
        self.put_file(to_id, name, self._dir(from_id) / name)

    def sha256(self, release_id: str, name: str) -> str | None:
        path = self._dir(release_id) / name
        return file_sha256(path) if path.is_file() else None

    def release_ids(self) -> list[str]:
        folder = self.root / RELEASES
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def put_text(self, release_id: str, name: str, text: str) -> None:
        target = self._dir(release_id) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(target)


class S3Store:
    """Releases under s3://bucket/prefix; credentials from the environment (the serving account's)."""

    def __init__(self, storage_uri: str, endpoint_url: str = ""):
        import boto3

        parsed = urlparse(storage_uri)
        self.storage_uri = storage_uri
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        self.client = boto3.client("s3", endpoint_url=endpoint_url or None)

    def _key(self, release_id: str, name: str) -> str:
        return "/".join(p for p in (self.prefix, RELEASES, release_id, name) if p)

    def _call(self, what: str, fn, *args, missing_ok: bool = False, **kwargs):
        """One S3 call; a missing key is None where `missing_ok`, any other failure (no bucket,
        no credentials, no endpoint) a ReleaseError that says what was being done where."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if missing_ok and code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise ReleaseError(f"S3 {what} in s3://{self.bucket}/{self.prefix} failed: {code or exc}") from exc
        except (BotoCoreError, S3UploadFailedError) as exc:
            raise ReleaseError(f"S3 {what} in s3://{self.bucket}/{self.prefix} failed: {exc}") from exc

    def read_text(self, release_id: str, name: str) -> str | None:
        key = self._key(release_id, name)
        answer = self._call(f"read of {key}", self.client.get_object, Bucket=self.bucket, Key=key, missing_ok=True)
        return None if answer is None else answer["Body"].read().decode()

    def size(self, release_id: str, name: str) -> int | None:
        key = self._key(release_id, name)
        head = self._call(f"head of {key}", self.client.head_object, Bucket=self.bucket, Key=key, missing_ok=True)
        return None if head is None else int(head["ContentLength"])

    def sha256(self, release_id: str, name: str) -> str | None:
        """Hashed as it streams down: a weights file is not held in memory."""
        key = self._key(release_id, name)
        answer = self._call(f"read of {key}", self.client.get_object, Bucket=self.bucket, Key=key, missing_ok=True)
        if answer is None:
            return None
        digest = hashlib.sha256()
        for chunk in answer["Body"].iter_chunks(1 << 20):
            digest.update(chunk)
        return digest.hexdigest()

    def release_ids(self) -> list[str]:
        prefix = "/".join(p for p in (self.prefix, RELEASES) if p) + "/"
        pages = self._call(f"listing of {prefix}", lambda: list(self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix, Delimiter="/")))
        return sorted(c["Prefix"][len(prefix):].rstrip("/") for page in pages for c in page.get("CommonPrefixes", []))

    def put_file(self, release_id: str, name: str, source: Path) -> None:
        key = self._key(release_id, name)
        self._call(f"upload of {key}", self.client.upload_file, str(source), self.bucket, key)

    def copy(self, from_id: str, to_id: str, name: str) -> None:  # server side: no download
        source, key = self._key(from_id, name), self._key(to_id, name)
        self._call(f"copy of {source}", self.client.copy, {"Bucket": self.bucket, "Key": source}, self.bucket, key)

    def put_text(self, release_id: str, name: str, text: str) -> None:
        key = self._key(release_id, name)
        self._call(f"write of {key}", self.client.put_object, Bucket=self.bucket, Key=key, Body=text.encode(),
                   ContentType="application/json")


def open_store(storage_uri: str, endpoint_url: str = "") -> LocalStore | S3Store:
    scheme = urlparse(storage_uri).scheme
    if scheme == "s3":
        return S3Store(storage_uri, endpoint_url)
    if scheme in ("", "file"):
        return LocalStore(storage_uri)
    raise ReleaseError(f"unsupported serving storage {storage_uri!r}: use s3://BUCKET/PREFIX or a folder")


def parse_release(text: str, where: str) -> Release:
    try:
        return Release.model_validate_json(text)
    except ValidationError as exc:
        raise ReleaseError(f"{where} has a bad {RELEASE_FILE}: {exc}") from exc


def read_release(store, release_id: str) -> Release:
    """A published release, from its release.json."""
    text = store.read_text(release_id, RELEASE_FILE)
    if text is None:
        raise ReleaseError(f"release {release_id} is not in {store.storage_uri} (no {RELEASE_FILE})")
    return parse_release(text, f"release {release_id} in {store.storage_uri}")


def list_releases(store) -> tuple[list[Release], list[str]]:
    """The published releases, oldest first, and the ids of folders without a release.json (a
    publish that did not finish; the next publish of the same members completes it)."""
    releases, incomplete = [], []
    for rid in store.release_ids():
        text = store.read_text(rid, RELEASE_FILE)
        if text is None:
            incomplete.append(rid)
        else:
            releases.append(parse_release(text, f"release {rid} in {store.storage_uri}"))
    return sorted(releases, key=lambda r: r.created_at), incomplete


def verify_release(store, release_id: str) -> dict[str, str]:
    """Every member's weights in the store hashed against the sha256 the release lists (an audit:
    is what serving loads exactly what was released?): member -> "ok" or what is wrong."""
    release = read_release(store, release_id)
    found = {}
    for m in release.members:
        try:
            recorded = read_member_meta(store, release_id, m.member).weights_sha256
        except ReleaseError:
            recorded = None
        actual = store.sha256(release_id, f"{m.member}/{WEIGHTS}")
        if recorded is None or actual is None:
            found[m.member] = f"missing {META if recorded is None else WEIGHTS}"
        elif actual != m.weights_sha256:
            found[m.member] = f"weights sha256 {actual[:12]}, released {m.weights_sha256[:12]}"
        elif recorded != m.weights_sha256:
            found[m.member] = f"{META} records {recorded[:12]}, released {m.weights_sha256[:12]}"
        else:
            found[m.member] = "ok"
    return found


def read_member_meta(store, release_id: str, member: str) -> ModelBundleMeta:
    text = store.read_text(release_id, f"{member}/{META}")
    if text is None:
        raise ReleaseError(f"release {release_id} in {store.storage_uri} has no {member}/{META}")
    return ModelBundleMeta.model_validate_json(text)


def write_release(store, release: Release, bundles: dict[str, Path]) -> Release:
    """Publish `release`: members in `bundles` from their local folders, the others copied from the
    previous release. Publishing a release that already exists checks it and writes nothing."""
    text = store.read_text(release.release_id, RELEASE_FILE)
    if text is not None:
        existing = parse_release(text, f"release {release.release_id} in {store.storage_uri}")
        check_published(store, existing)
        return existing
    for m in release.members:
        for name in BUNDLE_FILES:
            key = f"{m.member}/{name}"
            if m.member in bundles:
                store.put_file(release.release_id, key, Path(bundles[m.member]) / name)
            elif release.previous:
                store.copy(release.previous, release.release_id, key)
            else:
                raise ReleaseError(f"member {m.member!r} has neither a local bundle nor a previous release to copy from")
    check_published(store, release, bundles)
    store.put_text(release.release_id, RELEASE_FILE, release.model_dump_json(indent=2))
    return release


def check_published(store, release: Release, bundles: dict[str, Path] | None = None) -> None:
    """Every member is in the store with the weights it is released with (sha256 in bundle.json;
    sizes against the local files). Serving checks the weights' sha256 again before it loads them."""
    for m in release.members:
        meta = read_member_meta(store, release.release_id, m.member)
        if meta.weights_sha256 != m.weights_sha256:
            raise ReleaseError(f"release {release.release_id}: member {m.member} holds weights {meta.weights_sha256[:12]}, "
                               f"expected {m.weights_sha256[:12]}")
        size = store.size(release.release_id, f"{m.member}/{WEIGHTS}")
        if size is None:
            raise ReleaseError(f"release {release.release_id}: member {m.member} has no {WEIGHTS}")
        if bundles and m.member in bundles and size != (Path(bundles[m.member]) / WEIGHTS).stat().st_size:
            raise ReleaseError(f"release {release.release_id}: {m.member}/{WEIGHTS} was not stored whole ({size} bytes)")


def release_of_folders(bundle_dirs: list[Path], metas: list[ModelBundleMeta]) -> Release | None:
    """The release a server's bundle folders were copied from (`/mnt/models/<member>` with
    release.json beside them), after checking that every folder (its loaded bundle.json in `metas`)
    is one of its members with the weights it lists; None when they are not a release's (a bundle
    served from a training run)."""
    parents = {Path(d).resolve().parent for d in bundle_dirs}
    if len(parents) != 1 or not (next(iter(parents)) / RELEASE_FILE).is_file():
        return None
    folder = next(iter(parents))
    release = parse_release((folder / RELEASE_FILE).read_text(), str(folder))
    listed = {m.member: m.weights_sha256 for m in release.members}
    wrong = sorted(Path(d).name for d, meta in zip(bundle_dirs, metas) if listed.get(Path(d).name) != meta.weights_sha256)
    if wrong:  # a subset is fine: the transformer reads one member's preprocessing spec
        raise ReleaseError(f"{', '.join(wrong)} in {folder} is not a member of release {release.release_id} with the "
                           f"weights it lists ({', '.join(sorted(listed))})")
    return release

"""Release registry versions to serving: resolve, plan, publish, point the InferenceService.

The InferenceService comes in and goes out as a dict: read from a manifest file or from the
cluster by the caller (CLI, pipeline component), so the same steps serve GitOps and a live rollout.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, SkipValidation

from xrayops.bundle_meta import read_bundle_meta
from xrayops.contracts import ModelBundleMeta
from xrayops.logs import get_logger
from xrayops.release.manifest import primary_service
from xrayops.registry import model_version, parse_model_ref, resolve_bundle
from xrayops.release.plan import (
    Release,
    ReleaseError,
    ReleaseMember,
    live_release_id,
    member_of,
    plan_release,
    point_manifest,
    previous_release_id,
)
from xrayops.release.storage import open_store, read_member_meta, read_release, write_release

log = get_logger(__name__)


class ReleaseResult(BaseModel):
    """What a release or roll-back did: the release now served and the documents that point at it."""

    model_config = ConfigDict(frozen=True)

    release: Release
    # The documents given (a manifest's, or the live InferenceService) pointed at the release, to
    # apply or write out (None: none were given). Not validated: they are the caller's own objects
    # (a round-trip YAML map keeps a manifest's comments), which validation would copy into dicts.
    documents: SkipValidation[list[dict] | None]
    previous: str | None  # the release it replaces on the InferenceService

    @property
    def inference_service(self) -> dict | None:
        """The rolled InferenceService that names the release (the only one, outside a graph)."""
        return primary_service(self.documents) if self.documents else None


def pinned_uri(ref: str, tracking_uri: str | None) -> str:
    """models:/NAME@ALIAS as the version the alias names now: a release never moves with an alias."""
    if ref.startswith("models:/") and parse_model_ref(ref).alias is not None:
        return f"models:/{parse_model_ref(ref).name}/{model_version(ref, tracking_uri)}"
    return ref


def resolve_members(
    refs: list[str], tracking_uri: str | None, work_dir: Path
) -> list[tuple[ReleaseMember, ModelBundleMeta, Path]]:
    """Each model (registry reference or bundle folder) downloaded, its weights checked, pinned."""
    resolved = []
    for i, ref in enumerate(refs):
        uri = pinned_uri(ref, tracking_uri)
        bundle_dir = resolve_bundle(uri, tracking_uri, Path(work_dir) / str(i))
        meta = read_bundle_meta(bundle_dir)
        resolved.append((member_of(meta, uri), meta, bundle_dir))
    return resolved


def live_release(store, isvc: dict | None) -> tuple[Release | None, dict[str, ModelBundleMeta]]:
    rid = live_release_id(isvc) if isvc is not None else None
    if rid is None:
        return None, {}
    live = read_release(store, rid)
    return live, {m.member: read_member_meta(store, rid, m.member) for m in live.members}


def release_models(
    docs: list[dict] | None,
    refs: list[str],
    storage_uri: str,
    tracking_uri: str | None,
    endpoint_url: str = "",
    replace_all: bool = False,
    require_approval: bool = False,
) -> ReleaseResult:
    """Publish `refs` (with the live release's other members unless `replace_all`) to the serving
    storage and return `docs` (a manifest's documents, or the live InferenceService) pointed at the
    new release (None: publish only, with no live release to keep members from).

    With `require_approval` (XRAYOPS_RELEASE_REQUIRES_APPROVAL) a release that is not approved in
    the registry (xrayops.release.approval) is published to the storage, where it can be recorded
    and approved, but `docs` are not pointed at it: ApprovalError says what is missing."""
    store = open_store(storage_uri, endpoint_url)
    isvc = primary_service(docs) if docs else None
    live, live_metas = live_release(store, isvc)
    with tempfile.TemporaryDirectory(prefix="xrayops-release-") as work:  # registry downloads, gone once published
        resolved = resolve_members(refs, tracking_uri, Path(work))
        if live is None and isvc is not None and not replace_all:
            log.warning("the InferenceService serves no release yet: the first release serves only the given models",
                        models=[m.model_uri for m, _, _ in resolved])
        release = plan_release([(m, meta) for m, meta, _ in resolved], live, live_metas, storage_uri, replace_all)
        release = write_release(store, release, {m.member: path for m, _, path in resolved})
    log.info("published release", release=release.release_id, uri=release.uri,
             members={m.member: m.model_uri for m in release.members}, previous=release.previous)
    if require_approval and docs:
        from xrayops.release.approval import require_approval as approved

        approved(tracking_uri, release)
    return ReleaseResult(release=release, documents=point_manifest(docs, release) if docs else None,
                         previous=live.release_id if live is not None else None)


def roll_back(docs: list[dict], storage_uri: str, endpoint_url: str = "", to: str | None = None,
              require_approval: bool = False, tracking_uri: str | None = None) -> ReleaseResult:
    """`docs` (a manifest's, or the live InferenceService) pointed back at the release before the
    live one, or at release `to` when given (whatever the service records as previous). With
    `require_approval`, a `to` other than the recorded previous release (which served before)
    must be approved."""
    isvc = primary_service(docs)
    target = to or previous_release_id(isvc)
    if target is None:
        raise ReleaseError("nothing to roll back to: the InferenceService records no previous release")
    if target == live_release_id(isvc):
        raise ReleaseError(f"release {target} is already live")
    release = read_release(open_store(storage_uri, endpoint_url), target)
    if require_approval and target != previous_release_id(isvc):
        from xrayops.release.approval import require_approval as approved

        approved(tracking_uri, release)
    log.info("rolling back", release=release.release_id, live=live_release_id(isvc))
    return ReleaseResult(release=release, documents=point_manifest(docs, release), previous=live_release_id(isvc))


def release_to_folder(
    refs: list[str], storage_dir: Path, tracking_uri: str | None, rolled: Path, start_from: Path | None,
) -> tuple[Release, list[Path]]:
    """A release on one machine (demo, scenario), as on a cluster: published into `storage_dir` and
    the InferenceService manifest `rolled` pointed at it, which continues from itself once written,
    else starts as a copy of `start_from` (none there: publish only). Returns the release and its
    member folders, laid out as KServe's storage initializer mounts them."""
    from xrayops.release.manifest import read_manifest, write_manifest

    source = rolled if rolled.is_file() else start_from
    docs = read_manifest(source) if source is not None and source.is_file() else None
    outcome = release_models(docs, refs, str(storage_dir), tracking_uri, replace_all=True)
    if outcome.documents:
        write_manifest(outcome.documents, rolled)
    return outcome.release, [Path(outcome.release.uri) / m.member for m in outcome.release.members]

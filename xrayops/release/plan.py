"""What a serving release is, and how it changes the InferenceService. Pure: data in, data out.

A release is an immutable folder under the serving storage, one sub-folder per ensemble member
(Langer et al. 2024 averages SimCLR, BYOL and SupCon members), named by the members' weights:

    <storage>/releases/<release_id>/{simclr,byol,supcon}/{bundle.json,weights.pt}
    <storage>/releases/<release_id>/release.json      (written last: the release exists once it does)

The InferenceService points its storageUri at one release, so a rollout is a spec change that
KServe rolls like any other (new pods verify every weights.pt before they turn ready) and a
rollback points it back. The release live before is kept on the InferenceService as an annotation.
"""
from __future__ import annotations

import copy
import hashlib
from datetime import datetime, timezone

from pydantic import BaseModel, Field

from xrayops.errors import XrayopsError
from xrayops.contracts import ModelBundleMeta
from xrayops.ensemble import EnsembleError, check_members

RELEASE_FILE = "release.json"
RELEASES = "releases"
MOUNT = "/mnt/models"  # where KServe's storage initializer puts storageUri's files
ANNOTATION_RELEASE = "xrayops.io/release"
ANNOTATION_PREVIOUS = "xrayops.io/release-previous"
ANNOTATION_MODELS = "xrayops.io/release-models"
BUNDLE_ARG = "--bundle="
MEMBER_LABEL = "xrayops.io/member"  # a member's own InferenceService (serving/inferencegraph.yaml)


class ReleaseError(XrayopsError, RuntimeError):
    """A release that cannot be planned, published or rolled out."""


class ReleaseMember(BaseModel):
    """One ensemble member: a registry version, pinned."""

    member: str  # folder name inside the release: the member's SSL method
    model_uri: str  # models:/NAME/VERSION (or the bundle folder when released without a registry)
    weights_sha256: str
    ssl_method: str
    arch: str


class Release(BaseModel):
    release_id: str
    storage_uri: str  # the serving storage the release lives under, e.g. s3://xrayops-models/region
    members: list[ReleaseMember]
    previous: str | None = None  # the release that was live when this one was planned
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def uri(self) -> str:
        return release_uri(self.storage_uri, self.release_id)


def release_uri(storage_uri: str, release_id: str) -> str:
    return f"{storage_uri.rstrip('/')}/{RELEASES}/{release_id}"


def member_of(meta: ModelBundleMeta, model_uri: str) -> ReleaseMember:
    if not meta.weights_sha256:
        raise ReleaseError(f"{model_uri} has no weights sha256 in its bundle.json; re-export it before releasing")
    return ReleaseMember(member=meta.ssl_method, model_uri=model_uri, weights_sha256=meta.weights_sha256,
                         ssl_method=meta.ssl_method, arch=meta.arch)


def release_id(members: list[ReleaseMember]) -> str:
    """Named by what it serves: the same members give the same id, so publishing again is a no-op."""
    digest = hashlib.sha256()
    for m in sorted(members, key=lambda m: m.member):
        digest.update(f"{m.member}:{m.weights_sha256}\n".encode())
    return "r-" + digest.hexdigest()[:12]


def plan_release(
    new: list[tuple[ReleaseMember, ModelBundleMeta]],
    live: Release | None,
    live_metas: dict[str, ModelBundleMeta] | None = None,
    storage_uri: str | None = None,
    replace_all: bool = False,
) -> Release:
    """The release that serves `new` in place of the live members of the same SSL method and keeps
    the live release's other members (a retrained SimCLR head replaces the SimCLR member; BYOL and
    SupCon stay). `replace_all` serves exactly `new`. The members must make one ensemble."""
    if not new:
        raise ReleaseError("nothing to release: give at least one model")
    names = [m.member for m, _ in new]
    if len(set(names)) != len(names):
        raise ReleaseError(f"two models for the same member {sorted(n for n in names if names.count(n) > 1)[0]!r}: "
                           "an ensemble serves one model per SSL method")
    storage = storage_uri or (live.storage_uri if live else None)
    if not storage:
        raise ReleaseError("no serving storage URI: give one (XRAYOPS_RELEASE_STORAGE_URI)")
    members = {m.member: (m, meta) for m, meta in new}
    if live is not None and not replace_all:
        for kept in live.members:
            if kept.member not in members:
                meta = (live_metas or {}).get(kept.member)
                if meta is None:
                    raise ReleaseError(f"the metadata of live member {kept.member!r} is needed to check the ensemble")
                members[kept.member] = (kept, meta)
    ordered = [members[k] for k in sorted(members)]
    try:
        check_members([meta for _, meta in ordered])
    except EnsembleError as exc:
        raise ReleaseError(f"these models do not make one ensemble: {exc}") from exc
    chosen = [m for m, _ in ordered]
    return Release(release_id=release_id(chosen), storage_uri=storage, members=chosen,
                   previous=live.release_id if live else None)


def live_release_id(isvc: dict) -> str | None:
    return ((isvc.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_RELEASE)


def previous_release_id(isvc: dict) -> str | None:
    return ((isvc.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_PREVIOUS)


def _bundle_args(args: list[str], paths: list[str], where: str) -> list[str]:
    """`args` with its --bundle=... arguments replaced by `paths`, where the first one stood (after a
    subcommand such as `serve`), or at the end."""
    if any(a == "--bundle" for a in args):
        raise ReleaseError(f"{where} passes --bundle as a separate argument; write it as --bundle=PATH")
    at = next((i for i, a in enumerate(args) if a.startswith(BUNDLE_ARG)), len(args))
    kept = [a for a in args if not a.startswith(BUNDLE_ARG)]
    at -= sum(1 for a in args[:at] if a.startswith(BUNDLE_ARG))
    return kept[:at] + [BUNDLE_ARG + p for p in paths] + kept[at:]


def _set_list(parent: dict, key: str, values: list) -> None:
    current = parent.get(key)
    if isinstance(current, list):
        current[:] = values  # in place: a round-trip YAML list keeps its style and comments
    else:
        parent[key] = values


def _point(isvc: dict, release: Release, storage_uri: str, paths: list[str]) -> dict:
    if isvc.get("kind") != "InferenceService":
        raise ReleaseError(f"expected an InferenceService, got kind {isvc.get('kind')!r}")
    out = copy.deepcopy(isvc)
    out.pop("status", None)
    try:
        model = out["spec"]["predictor"]["model"]
    except (KeyError, TypeError):
        raise ReleaseError("the InferenceService has no spec.predictor.model to point at the release") from None
    model["storageUri"] = storage_uri
    _set_list(model, "args", _bundle_args(list(model.get("args") or []), paths, "spec.predictor.model.args"))
    for container in ((out["spec"].get("transformer") or {}).get("containers") or []):
        _set_list(container, "args", _bundle_args(list(container.get("args") or []), paths[:1], "the transformer"))
        env = container.setdefault("env", [])
        for var in env:
            if var.get("name") == "STORAGE_URI":
                var["value"] = storage_uri
                var.pop("valueFrom", None)
                break
        else:
            env.append({"name": "STORAGE_URI", "value": storage_uri})
    annotations = out.setdefault("metadata", {}).setdefault("annotations", {})
    current = live_release_id(isvc)
    if current and current != release.release_id:
        annotations[ANNOTATION_PREVIOUS] = current
    annotations[ANNOTATION_RELEASE] = release.release_id
    annotations[ANNOTATION_MODELS] = ",".join(m.model_uri for m in release.members)
    return out


def point_inference_service(isvc: dict, release: Release) -> dict:
    """The InferenceService serving `release`: the predictor loads every member from the release's
    folder, the transformer reads its preprocessing spec from the first member, and the
    annotations say which release is live and which was before (for a rollback)."""
    return _point(isvc, release, release.uri, [f"{MOUNT}/{m.member}" for m in release.members])


def point_member_service(isvc: dict, release: Release, member: str) -> dict:
    """One member's own InferenceService (the InferenceGraph variant, members scaling apart): its
    storageUri is that member's folder of the release, mounted whole at /mnt/models."""
    if member not in {m.member for m in release.members}:
        raise ReleaseError(f"release {release.release_id} has no member {member!r}, which "
                           f"{(isvc.get('metadata') or {}).get('name')} serves; release one (or remove it from the graph)")
    return _point(isvc, release, f"{release.uri}/{member}", [MOUNT])


def point_manifest(docs: list[dict], release: Release) -> list[dict]:
    """Every InferenceService of a manifest pointed at `release`: a member's own (label
    xrayops.io/member) at its folder, any other (the single-pod ensemble, the graph's combiner) at
    the whole release. Other documents are kept as they are."""
    if not any(d.get("kind") == "InferenceService" for d in docs):
        raise ReleaseError("the manifest holds no InferenceService")
    out = []
    for doc in docs:
        member = ((doc.get("metadata") or {}).get("labels") or {}).get(MEMBER_LABEL)
        if doc.get("kind") != "InferenceService":
            out.append(doc)
        elif member:
            out.append(point_member_service(doc, release, member))
        else:
            out.append(point_inference_service(doc, release))
    return out

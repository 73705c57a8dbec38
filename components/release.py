from typing import List, NamedTuple

from kfp.dsl import Artifact, Output

from components._image import xrayops_component


@xrayops_component
def release_op(
    model_uris: List[str],
    tracking_uri: str,
    storage_uri: str,
    s3_endpoint_url: str,
    inference_service: str,
    namespace: str,
    manifest: str,
    release: Output[Artifact],
    rendered: Output[Artifact],
    replace_all: bool = False,
) -> NamedTuple("ReleaseOut", [("release_id", str), ("uri", str), ("status", str)]):
    """Publish registry versions as a serving release (each replaces the live member of its SSL
    method; the others stay, unless `replace_all`) and point the InferenceService at it: the live
    one(s) through the Kubernetes API, or, with `manifest` (a file), only the rolled manifest as `rendered`.
    With XRAYOPS_RELEASE_REQUIRES_APPROVAL an unapproved release is published to the storage and the
    step ends with status "awaiting approval", the service untouched (`rendered`: as it was)."""
    from collections import namedtuple
    from pathlib import Path

    from xrayops.config import get_settings
    from xrayops.release import release_models
    from xrayops.release.approval import ApprovalError
    from xrayops.release.cluster import live_services, replace_services
    from xrayops.release.manifest import read_manifest, write_manifest

    out = namedtuple("ReleaseOut", ["release_id", "uri", "status"])
    settings = get_settings()
    docs = read_manifest(Path(manifest)) if manifest else live_services(inference_service, namespace)
    try:
        outcome = release_models(docs, list(model_uris), storage_uri or settings.release_storage_uri,
                                 tracking_uri or settings.tracking_uri(), s3_endpoint_url or settings.s3_endpoint_url,
                                 replace_all, settings.release_requires_approval)
    except ApprovalError as exc:
        if exc.release is None:
            raise
        write_manifest(docs, Path(rendered.path))
        Path(release.path).write_text(exc.release.model_dump_json(indent=2))
        release.metadata.update({"release_id": exc.release.release_id, "uri": exc.release.uri, "applied": False,
                                 "status": "awaiting approval", "detail": str(exc)})
        return out(exc.release.release_id, exc.release.uri, "awaiting approval")
    if not manifest:  # the single-pod ensemble, or every member of the InferenceGraph and its combiner
        replace_services(outcome.documents)
    write_manifest(outcome.documents, Path(rendered.path))
    Path(release.path).write_text(outcome.release.model_dump_json(indent=2))
    release.metadata.update({"release_id": outcome.release.release_id, "uri": outcome.release.uri,
                             "replaces": outcome.previous or "", "applied": not manifest, "status": "released"})
    return out(outcome.release.release_id, outcome.release.uri, "released")

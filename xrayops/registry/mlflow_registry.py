"""Model registry on MLflow: register a bundle directory with its lineage, resolve it back.

A bundle is logged as plain run artifacts (`bundle/bundle.json`, `bundle/weights.pt`), not
as an MLflow model flavour: the bundle format is ours and `xrayops.bundle` loads it. The
model version's source is the concrete artifact URI of that folder, so any MLflow
(sqlite + local files here, a tracking server with S3 on a cluster) can serve it back.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from pydantic import BaseModel

from xrayops.errors import XrayopsError
from xrayops.bundle_meta import BundleError, verify_bundle
from xrayops.contracts import Lineage, ModelBundleMeta
from xrayops.logs import get_logger

log = get_logger(__name__)

ARTIFACT_PATH = "bundle"  # artifact folder of the registration run

TAG_DATASET_MD5 = "xrayops.dataset_md5"
TAG_GIT_COMMIT = "xrayops.git_commit"
TAG_PIPELINE_RUN = "xrayops.pipeline_run"
TAG_BUNDLE_SHA256 = "xrayops.bundle_sha256"
MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"  # MLflow's own UI shows this one


class RegistryError(XrayopsError, RuntimeError):
    """A bundle that cannot be registered or a model reference that cannot be resolved."""


class RegisteredModel(BaseModel):
    name: str
    version: int
    run_id: str
    model_uri: str  # models:/<name>/<version>
    alias: str
    source: str = ""  # artifact URI of the bundle folder
    bundle_sha256: str = ""


class ModelRef(BaseModel):
    """A parsed `models:/name@alias` or `models:/name/version` reference."""

    name: str
    alias: str | None = None
    version: int | None = None


def sqlite_artifact_root(tracking_uri: str) -> Path | None:
    """Local artifact folder next to a sqlite tracking database; None for other backends."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db_path = Path(tracking_uri[len("sqlite:///") :])
    return db_path.parent / "artifacts"


def check_bundle(bundle_dir: Path) -> ModelBundleMeta:
    """The bundle's metadata after the weights check, with bundle errors as RegistryError."""
    try:
        return verify_bundle(bundle_dir)
    except BundleError as exc:
        raise RegistryError(str(exc)) from exc


def numeric_metrics(metrics: dict) -> dict[str, float]:
    """The scalar entries of a metrics.json: a registry's metrics are flat numbers."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def bundle_params(meta: ModelBundleMeta) -> dict[str, str]:
    spec = meta.preprocessing
    return {
        "arch": meta.arch,
        "ssl_method": meta.ssl_method,
        "embedding_dim": str(meta.embedding_dim),
        "n_classes": str(len(meta.classes)),
        "temperature": str(meta.temperature),
        "ood_threshold": str(meta.ood_threshold),
        "confidence_threshold": str(meta.confidence_threshold),
        "image_size": str(spec.size),
        "output_dtype": spec.output_dtype,
        "keep_aspect": str(spec.keep_aspect),
        "contract_version": meta.version,
    }


def lineage_tags(lineage: Lineage, bundle_sha256: str) -> dict[str, str]:
    tags = {
        TAG_DATASET_MD5: lineage.dataset_md5,
        TAG_GIT_COMMIT: lineage.git_commit,
        TAG_PIPELINE_RUN: lineage.pipeline_run,
        TAG_BUNDLE_SHA256: bundle_sha256,
    }
    if lineage.git_commit:
        tags[MLFLOW_GIT_COMMIT] = lineage.git_commit
    return tags


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    # The registry lives in the same store as the runs: one sqlite file locally, one server on a cluster.
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _experiment_id(client, experiment: str, artifact_root: Path | None) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    location = (artifact_root / experiment).as_uri() if artifact_root is not None else None
    try:
        return client.create_experiment(experiment, artifact_location=location)
    except MlflowException:
        # Another registration created it between our lookup and create.
        return client.get_experiment_by_name(experiment).experiment_id


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name)
        except MlflowException:
            client.get_registered_model(name)


def register_bundle(
    bundle_dir: str | Path,
    tracking_uri: str,
    name: str,
    lineage: Lineage | None = None,
    alias: str = "champion",
    experiment: str | None = None,
) -> RegisteredModel:
    """Log the bundle as artifacts of a new run, register it as a new version of `name`,
    and point `alias` at that version.

    `lineage` defaults to the lineage stored in the bundle. Metrics become run metrics;
    dataset md5, git commit, pipeline run and the weights sha256 become run and version tags.
    """
    from mlflow.entities import Metric, Param, RunTag

    bundle_dir = Path(bundle_dir)
    meta = check_bundle(bundle_dir)
    lineage = lineage if lineage is not None else meta.lineage
    artifact_root = sqlite_artifact_root(tracking_uri)
    if artifact_root is not None:
        artifact_root.mkdir(parents=True, exist_ok=True)

    client = _client(tracking_uri)
    experiment_id = _experiment_id(client, experiment or name, artifact_root)
    tags = lineage_tags(lineage, meta.weights_sha256)
    run = client.create_run(experiment_id, run_name=f"register-{name}", tags=tags)
    run_id = run.info.run_id
    try:
        now_ms = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[Metric(key, float(value), now_ms, 0) for key, value in sorted(lineage.metrics.items())],
            params=[Param(key, value) for key, value in bundle_params(meta).items()],
        )
        client.log_artifacts(run_id, str(bundle_dir), ARTIFACT_PATH)
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)

    _ensure_registered_model(client, name)
    source = f"{run.info.artifact_uri.rstrip('/')}/{ARTIFACT_PATH}"
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    client.set_registered_model_alias(name, alias, version.version)
    registered = RegisteredModel(
        name=name,
        version=int(version.version),
        run_id=run_id,
        model_uri=f"models:/{name}/{version.version}",
        alias=alias,
        source=source,
        bundle_sha256=meta.weights_sha256,
    )
    log.info("registered bundle", name=name, version=registered.version, alias=alias, run_id=run_id)
    return registered


def parse_model_ref(model_ref: str) -> ModelRef:
    """`models:/name@alias` or `models:/name/<version>` as a `ModelRef`."""
    if not model_ref.startswith("models:/"):
        raise RegistryError(f"not a registry reference: {model_ref!r}")
    body = model_ref[len("models:/") :].strip("/")
    if "@" in body:
        name, _, alias = body.partition("@")
        if name and alias and "/" not in name:
            return ModelRef(name=name, alias=alias)
    elif body.count("/") == 1:
        name, _, version = body.partition("/")
        if name and version.isdigit():
            return ModelRef(name=name, version=int(version))
    raise RegistryError(f"bad model reference {model_ref!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")


def local_path(model_ref: str) -> Path:
    if model_ref.startswith("file:"):
        parsed = urlparse(model_ref)
        return Path(url2pathname(unquote(parsed.path)))
    return Path(model_ref)


def _model_version(ref: str, tracking_uri: str | None):
    """The MLflow ModelVersion a `models:/` reference names (an alias resolved now)."""
    parsed = parse_model_ref(ref)
    if not tracking_uri:
        raise RegistryError(f"a tracking URI is needed to resolve {ref}")
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        if parsed.alias is not None:
            return client.get_model_version_by_alias(parsed.name, parsed.alias)
        return client.get_model_version(parsed.name, str(parsed.version))
    except MlflowException as exc:
        raise RegistryError(f"cannot resolve {ref} in {tracking_uri}: {exc.message}") from exc


def held_aliases(tracking_uri: str, names: list[str], alias: str) -> dict[str, int]:
    """The registered models among `names` on which `alias` is set, with the version it names. A
    registry that cannot be asked is an error, not an empty answer."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    held = {}
    for name in names:
        try:
            held[name] = int(client.get_model_version_by_alias(name, alias).version)
        except MlflowException as exc:
            # no such model / no such alias on it: not held; anything else is the registry failing
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise RegistryError(f"cannot read alias {alias!r} of {name} in {tracking_uri}: {exc.message}") from exc
    return held


def model_version(ref: str, tracking_uri: str | None) -> int:
    """The version number behind `models:/NAME@ALIAS` (or `models:/NAME/VERSION`), so a run can
    record which version it used even after the alias moves."""
    return int(_model_version(ref, tracking_uri).version)


def resolve_bundle(model_ref: str | Path, tracking_uri: str | None = None, dest: str | Path | None = None) -> Path:
    """The local bundle folder for a registry reference, a local path or a file:// URI.

    Registry references are downloaded under `dest/<name>/<version>/` and checked: the weights
    must hash to the sha256 recorded both in bundle.json and on the model version.
    Local bundles are returned in place, after the same weights check.
    """
    ref = str(model_ref)
    if not ref.startswith("models:/"):
        bundle_dir = local_path(ref)
        if not bundle_dir.is_dir():
            raise RegistryError(f"bundle folder {bundle_dir} does not exist")
        check_bundle(bundle_dir)
        return bundle_dir

    parsed = parse_model_ref(ref)
    if dest is None:
        raise RegistryError(f"a destination folder is needed to download {ref}")
    from mlflow.artifacts import download_artifacts

    version = _model_version(ref, tracking_uri)

    target = Path(dest) / parsed.name / str(version.version)
    if target.exists():
        shutil.rmtree(target)  # never mix files of an earlier download into this one
    target.mkdir(parents=True)
    # A folder URI lands as dst_path/<folder name>; the returned path is where the files are.
    bundle_dir = Path(download_artifacts(artifact_uri=version.source, dst_path=str(target), tracking_uri=tracking_uri))
    meta = check_bundle(bundle_dir)
    recorded = version.tags.get(TAG_BUNDLE_SHA256, "")
    if recorded and recorded != meta.weights_sha256:
        raise RegistryError(
            f"{ref} (version {version.version}) records weights sha256 {recorded} but the downloaded "
            f"bundle has {meta.weights_sha256}"
        )
    log.info("resolved bundle", ref=ref, version=version.version, path=str(bundle_dir))
    return bundle_dir

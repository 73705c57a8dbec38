"""Registry against a real MLflow (sqlite backend, local artifacts) in a temp folder."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from mlflow import MlflowClient

from xrayops.contracts import Lineage, ModelBundleMeta, PreprocessingSpec
from xrayops.regions import REGIONS
from xrayops.registry import RegistryError, parse_model_ref, register_bundle, resolve_bundle
from xrayops.registry.mlflow_registry import TAG_BUNDLE_SHA256, TAG_DATASET_MD5, TAG_GIT_COMMIT, TAG_PIPELINE_RUN


def write_dummy_bundle(bundle_dir: Path, weights: bytes) -> ModelBundleMeta:
    """bundle.json + weights.pt in the bundle layout; the weights bytes are opaque to the registry."""
    bundle_dir.mkdir(parents=True)
    (bundle_dir / "weights.pt").write_bytes(weights)
    meta = ModelBundleMeta(
        classes=list(REGIONS),
        preprocessing=PreprocessingSpec(size=32),
        weights_sha256=hashlib.sha256(weights).hexdigest(),
    )
    (bundle_dir / "bundle.json").write_text(meta.model_dump_json())
    return meta


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    first = write_dummy_bundle(root / "b1", b"weights-one")
    second = write_dummy_bundle(root / "b2", b"weights-two")
    lineage1 = Lineage(dataset_md5="d41d8cd98f00b204e9800998ecf8427e.dir", git_commit="abc123", pipeline_run="run-1",
                       metrics={"accuracy": 0.91, "macro_f1": 0.88})
    lineage2 = Lineage(dataset_md5="0cc175b9c0f1b6a831c399e269772661.dir", git_commit="def456", pipeline_run="run-2",
                       metrics={"accuracy": 0.95})
    r1 = register_bundle(root / "b1", uri, "xray-test", lineage1)
    r2 = register_bundle(root / "b2", uri, "xray-test", lineage2)
    return dict(root=root, uri=uri, metas=(first, second), lineages=(lineage1, lineage2), registered=(r1, r2))


def test_versions_increment_and_alias_moves(registry):
    r1, r2 = registry["registered"]
    assert (r1.version, r2.version) == (1, 2)
    assert r2.model_uri == "models:/xray-test/2" and r2.alias == "champion"
    client = MlflowClient(tracking_uri=registry["uri"], registry_uri=registry["uri"])
    assert int(client.get_model_version_by_alias("xray-test", "champion").version) == 2
    assert client.get_model_version("xray-test", "1").aliases == []


def test_artifacts_live_next_to_the_database(registry):
    r1, _ = registry["registered"]
    assert r1.source.startswith((registry["root"] / "artifacts").as_uri())


def test_resolve_by_alias_and_version_returns_the_right_files(registry, tmp_path):
    champion = resolve_bundle("models:/xray-test@champion", registry["uri"], tmp_path)
    assert (champion / "weights.pt").read_bytes() == b"weights-two"
    assert ModelBundleMeta.model_validate_json((champion / "bundle.json").read_text()) == registry["metas"][1]
    first = resolve_bundle("models:/xray-test/1", registry["uri"], tmp_path)
    assert (first / "weights.pt").read_bytes() == b"weights-one"
    assert first != champion


def test_lineage_is_stored_as_tags_metrics_and_params(registry):
    r1, r2 = registry["registered"]
    client = MlflowClient(tracking_uri=registry["uri"], registry_uri=registry["uri"])
    run = client.get_run(r1.run_id)
    assert run.data.tags[TAG_DATASET_MD5] == "d41d8cd98f00b204e9800998ecf8427e.dir"
    assert run.data.tags[TAG_GIT_COMMIT] == "abc123"
    assert run.data.tags[TAG_PIPELINE_RUN] == "run-1"
    assert run.data.tags[TAG_BUNDLE_SHA256] == hashlib.sha256(b"weights-one").hexdigest()
    assert run.data.metrics == {"accuracy": 0.91, "macro_f1": 0.88}
    assert run.data.params["image_size"] == "32" and run.data.params["n_classes"] == "14"
    version = client.get_model_version("xray-test", str(r2.version))
    assert version.tags[TAG_GIT_COMMIT] == "def456" and version.run_id == r2.run_id


def test_local_path_and_file_uri_resolve_in_place(registry):
    local = registry["root"] / "b1"
    assert resolve_bundle(local) == local
    assert resolve_bundle(local.as_uri()) == local


def test_corrupt_bundle_is_refused(tmp_path, registry):
    write_dummy_bundle(tmp_path / "bad", b"good-weights")
    (tmp_path / "bad" / "weights.pt").write_bytes(b"tampered")
    with pytest.raises(RegistryError, match="does not match"):
        register_bundle(tmp_path / "bad", registry["uri"], "xray-test", Lineage())
    with pytest.raises(RegistryError, match="does not match"):
        resolve_bundle(tmp_path / "bad")


def test_tampered_registry_artifact_is_refused_on_download(registry, tmp_path):
    r1, _ = registry["registered"]
    stored = Path(r1.source.removeprefix("file://")) / "weights.pt"
    original = stored.read_bytes()
    stored.write_bytes(b"swapped after registration")
    try:
        with pytest.raises(RegistryError, match="does not match"):
            resolve_bundle("models:/xray-test/1", registry["uri"], tmp_path)
    finally:
        stored.write_bytes(original)


def test_bad_references(registry, tmp_path):
    with pytest.raises(RegistryError, match="bad model reference"):
        parse_model_ref("models:/xray-test/latest-ish")
    with pytest.raises(RegistryError, match="cannot resolve"):
        resolve_bundle("models:/xray-test@nobody", registry["uri"], tmp_path)
    with pytest.raises(RegistryError, match="does not exist"):
        resolve_bundle(tmp_path / "nowhere")
    with pytest.raises(RegistryError, match="missing"):
        resolve_bundle(tmp_path)
    assert parse_model_ref("models:/a@b").alias == "b"
    assert parse_model_ref("models:/a/7").version == 7


def test_a_registry_artifact_without_a_weights_hash_is_refused_on_download(registry, tmp_path):
    r1, _ = registry["registered"]
    stored = Path(r1.source.removeprefix("file://")) / "bundle.json"
    original = stored.read_text()
    meta = ModelBundleMeta.model_validate_json(original).model_copy(update={"weights_sha256": ""})
    stored.write_text(meta.model_dump_json())
    try:
        with pytest.raises(RegistryError, match="records no weights_sha256"):
            resolve_bundle("models:/xray-test/1", registry["uri"], tmp_path)
    finally:
        stored.write_text(original)

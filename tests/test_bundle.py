"""Model bundles: round trip, sha256 verification, clear errors for broken bundles."""
import json

import pytest
import torch

from xrayops.bundle import BundleError, BundleIntegrityError, file_sha256, load_bundle, save_bundle
from xrayops.contracts import Lineage, ModelBundleMeta, PreprocessingSpec
from xrayops.models import RegionClassifier, build_backbone
from xrayops.regions import REGIONS

torch.set_num_threads(1)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = RegionClassifier(*build_backbone(), n_classes=len(REGIONS)).eval()
    meta = ModelBundleMeta(
        classes=list(REGIONS), preprocessing=PreprocessingSpec(size=32), temperature=1.7, ood_threshold=-3.0,
        lineage=Lineage(dataset_md5="abc", metrics={"val_accuracy": 0.9}),
    )
    written = save_bundle(tmp_path / "bundle", model, meta)
    return tmp_path / "bundle", model, written


def test_round_trip_gives_the_same_model_and_meta(saved):
    bundle_dir, model, written = saved
    assert written.weights_sha256 == file_sha256(bundle_dir / "weights.pt")
    assert written.created_at is not None
    loaded = load_bundle(bundle_dir)
    assert loaded.meta == written
    assert loaded.meta.temperature == 1.7 and loaded.meta.lineage.dataset_md5 == "abc"
    assert not loaded.model.training
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(loaded.model(x), model(x))


def test_rotation_average_travels_with_the_bundle(tmp_path):
    torch.manual_seed(0)
    model = RegionClassifier(*build_backbone(), n_classes=len(REGIONS), rotation_average=True).eval()
    meta = ModelBundleMeta(classes=list(REGIONS), preprocessing=PreprocessingSpec(size=32))  # field left at False
    assert save_bundle(tmp_path, model, meta).rotation_average is True  # taken from the model
    loaded = load_bundle(tmp_path)
    assert loaded.model.rotation_average and loaded.meta.rotation_average
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.model(torch.rot90(x, 2, (-2, -1))), loaded.model(x), atol=1e-4)


def test_tampered_weights_are_refused(saved):
    bundle_dir, _, _ = saved
    data = bytearray((bundle_dir / "weights.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle_dir / "weights.pt").write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="sha256"):
        load_bundle(bundle_dir)


def test_missing_and_corrupt_bundles_say_what_is_wrong(saved, tmp_path):
    bundle_dir, _, written = saved
    with pytest.raises(BundleError, match="bundle.json is missing"):
        load_bundle(tmp_path / "nowhere")
    meta_path = bundle_dir / "bundle.json"
    meta_path.write_text("{not json")
    with pytest.raises(BundleError, match="corrupt"):
        load_bundle(bundle_dir)
    meta_path.write_text(json.dumps({**json.loads(written.model_dump_json()), "arch": "resnet50", "embedding_dim": 2048}))
    with pytest.raises(BundleError, match="cannot load .* as a resnet50"):
        load_bundle(bundle_dir)
    meta_path.write_text(written.model_dump_json())
    (bundle_dir / "weights.pt").unlink()
    with pytest.raises(BundleError, match="weights.pt is missing"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("recorded", ["", None])
def test_a_bundle_without_a_weights_hash_is_never_loaded(saved, recorded):
    """Empty or missing weights_sha256: nothing to verify against, so load_bundle, the server and the
    registry all refuse it (none may load unverified weights)."""
    from serving.server import serve
    from xrayops.registry import RegistryError, resolve_bundle

    bundle_dir, _, _ = saved
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    if recorded is None:
        del meta["weights_sha256"]
    else:
        meta["weights_sha256"] = recorded
    (bundle_dir / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleIntegrityError, match="records no weights_sha256"):
        load_bundle(bundle_dir)
    with pytest.raises(RuntimeError, match="records no weights_sha256"):
        serve(bundle_dir, http_port=1, grpc_port=None)  # refused before anything listens
    with pytest.raises(RegistryError, match="records no weights_sha256"):
        resolve_bundle(bundle_dir)

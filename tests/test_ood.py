"""Feature-space out-of-domain detection (Mahalanobis: Lee et al. 2018; kNN: Sun et al. 2022):
the math by hand, what a trained bundle flags, the detector inside the bundle, older bundles,
and ensembles."""
import json
import shutil

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf
from tiny_dataset import make_data_dir, random_backbone

from tests.conftest import DICOM_SAMPLES
from xrayops.bundle import BundleError, BundleIntegrityError, file_sha256, load_bundle, save_bundle
from xrayops.contracts import InferenceResponse, ModelBundleMeta, PreprocessingSpec
from xrayops.data.dataset import load_images, read_ok_rows
from xrayops.dicom.decode import read_dicom
from xrayops.dicom.pixels import preprocess
from xrayops.ensemble import combine_responses, predict_ensemble
from xrayops.evaluate.metrics import auroc_ci, roc_auc
from xrayops.evaluate.report import evaluate_bundle
from xrayops.inference import predict_arrays
from xrayops.models import RegionClassifier, build_backbone, energy_score
from xrayops.models.backbone import stage_features
from xrayops.models.ood import (
    OodError,
    detector_from_state,
    detector_state,
    fit_knn,
    fit_mahalanobis,
    fit_ood_detector,
    fit_relative_mahalanobis,
    ood_scores,
    shared_covariance,
)
from xrayops.regions import REGIONS
from xrayops.train import FinetuneConfig, finetune

torch.set_num_threads(1)
SIZE = 32
CT_SLICE = DICOM_SAMPLES / "other" / "fodicom__D_CLUNIE_CT1_RLE_FRAGS.dcm"


# --- the math, by hand ---


def test_mahalanobis_matches_a_hand_computed_case():
    # Class 0 at (0, 0), class 1 at (10, 0); residuals (+-2, 0) and (0, +-1):
    # pooled covariance diag(8, 2) / 4 = diag(2, 0.5), trace / D = 1.25.
    x = np.array([[-2.0, 0.0], [2.0, 0.0], [10.0, -1.0], [10.0, 1.0]])
    y = np.array(["a", "a", "b", "b"])
    means, covariance, shrinkage = shared_covariance(x, y, shrinkage=0.0)
    assert np.allclose(means, [[0, 0], [10, 0]]) and np.allclose(covariance, np.diag([2.0, 0.5])) and shrinkage == 0.0
    plain = fit_mahalanobis(x, y, shrinkage=0.0)
    # (0, 2): 4 / 0.5 = 8 to class a (100 / 2 + 8 = 58 to b); (3, 0): 9 / 2 = 4.5 to a (49 / 2 to b).
    assert ood_scores(plain, [[0.0, 2.0], [3.0, 0.0], [10.0, 0.0]]) == pytest.approx([8.0, 4.5, 0.0])
    # Half-way shrinkage towards 1.25 I: diag(1.625, 0.875).
    shrunk = fit_mahalanobis(x, y, shrinkage=0.5)
    assert ood_scores(shrunk, [[0.0, 2.0], [3.0, 0.0]]) == pytest.approx([4 / 0.875, 9 / 1.625])


def test_ledoit_wolf_shrinks_the_class_centred_covariance():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    x = rng.normal(size=(60, 30)) * np.linspace(0.2, 3.0, 30) + 5.0 * y[:, None]
    means, covariance, shrinkage = shared_covariance(x, y)
    centred = x - means[y]
    assert 0 < shrinkage < 1
    assert np.allclose(covariance, LedoitWolf(assume_centered=True).fit(centred).covariance_)
    # 30 dimensions from 60 images: the plain covariance is ill-conditioned, the shrunk one far less.
    assert np.linalg.cond(covariance) < np.linalg.cond(centred.T @ centred / 60) / 5


def test_knn_matches_a_hand_computed_case():
    reference = np.array([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])  # unit vectors (1,0), (0,1), (-1,0)
    # (2, 2) -> (1, 1)/sqrt 2: cosines 0.7071, 0.7071, -0.7071; distance sqrt(2 - 2 cos).
    assert ood_scores(fit_knn(reference, k=1), [[2.0, 2.0]]) == pytest.approx([np.sqrt(2 - np.sqrt(2))])
    assert ood_scores(fit_knn(reference, k=2), [[2.0, 2.0]]) == pytest.approx([np.sqrt(2 - np.sqrt(2))])
    assert ood_scores(fit_knn(reference, k=3), [[20.0, 20.0]]) == pytest.approx([np.sqrt(2 + np.sqrt(2))])
    assert ood_scores(fit_knn(reference, k=1), [[0.0, 0.5]]) == pytest.approx([0.0])  # on a reference direction


def test_detectors_refuse_what_they_cannot_score():
    x = np.eye(3)
    with pytest.raises(OodError, match="k must be in 1..3"):
        fit_knn(x, k=4)
    with pytest.raises(OodError, match="unknown OOD method"):
        fit_ood_detector(x, [0, 1, 2], "energy")
    with pytest.raises(OodError, match="finite"):
        fit_mahalanobis([[0.0, np.nan], [1.0, 1.0]], [0, 1])
    with pytest.raises(OodError, match="3 embeddings but 2 labels"):
        fit_mahalanobis(x, [0, 1])
    with pytest.raises(OodError, match="fitted on 3"):
        ood_scores(fit_knn(x, k=1), np.ones((2, 4)))
    with pytest.raises(OodError, match="no ood_detector.precision"):
        detector_from_state({k: v for k, v in detector_state(fit_mahalanobis(x, [0, 0, 1])).items() if "means" in k},
                            "mahalanobis")


def test_relative_mahalanobis_is_the_class_distance_minus_the_background_distance():
    rng = np.random.default_rng(3)
    # Two classes apart along x; every image also varies a lot along y (brightness, say).
    x = np.c_[np.r_[rng.normal(-3, 0.5, 50), rng.normal(3, 0.5, 50)], rng.normal(0, 5, 100)]
    y = np.r_[np.zeros(50, int), np.ones(50, int)]
    relative = fit_relative_mahalanobis(x, y)
    assert relative.method == "relative_mahalanobis" and relative.background_mean.shape == (1, 2)
    assert np.allclose(relative.background_mean, x.mean(0, keepdims=True))
    query = np.array([[0.0, 0.0], [-3.0, 12.0], [0.0, 12.0], [9.0, 0.0]])
    expected = ood_scores(fit_mahalanobis(x, y), query) - ood_scores(fit_mahalanobis(x, np.zeros(100, int)), query)
    assert ood_scores(relative, query) == pytest.approx(expected)
    # Moving along the direction every training image varies in (y) adds to the class distance,
    # and the background distance takes most of it away again.
    plain, rel = ood_scores(fit_mahalanobis(x, y), query), ood_scores(relative, query)
    assert plain[2] - plain[0] > 4.0 and abs(rel[2] - rel[0]) < 0.2 * (plain[2] - plain[0])
    # Its four arrays travel in the weights and come back the same.
    back = detector_from_state(detector_state(relative), "relative_mahalanobis")
    assert np.array_equal(ood_scores(back, query), ood_scores(relative, query))
    with pytest.raises(OodError, match="no ood_detector.background_mean, ood_detector.background_precision"):
        detector_from_state(detector_state(fit_mahalanobis(x, y)), "relative_mahalanobis")


def test_dihedral_views_at_each_zoom():
    from xrayops.models.ood_features import dihedral_views, view_features, zoom

    x = torch.rand(2, 1, 20, 20, generator=torch.Generator().manual_seed(6))
    views = dihedral_views(x, (1.0, 2.0, 0.5))
    assert views.shape == (8 * 3 * 2, 1, 20, 20)
    assert torch.equal(views[:2], x) and torch.equal(views[2:4], torch.rot90(x, 1, dims=(-2, -1)))
    assert torch.equal(views[8:10], torch.flip(x, dims=(-1,)))  # the first mirror image
    # Zoom 2: the central half enlarged; zoom 0.5: the whole image in a black border.
    assert torch.allclose(zoom(x, 2.0), torch.nn.functional.interpolate(x[..., 5:15, 5:15], size=(20, 20),
                                                                          mode="bilinear", align_corners=False))
    shrunk = zoom(x, 0.5)
    assert shrunk[..., :5, :].abs().max() == 0 and shrunk[..., 5:15, 5:15].min() > 0
    with pytest.raises(ValueError, match="positive"):
        zoom(x, 0.0)
    # Averaged over the eight views at zoom 1, the features of an image and of its turned or
    # mirrored copy are the same.
    model = plain_model()
    x = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        base = view_features(model.backbone, x, ("layer2", "layer4"), (1.0,))
        turned = view_features(model.backbone, torch.rot90(torch.flip(x, dims=(-2,)), 1, dims=(-2, -1)),
                               ("layer2", "layer4"), (1.0,))
    assert base.shape == (3, 128 + 512) and torch.allclose(base, turned, atol=1e-5)
    # The four plain turns at zoom 1, given (as the region pass captures them), are not computed again.
    assert dihedral_views(x, (1.0, 1.2), skip_plain_turns=True).shape[0] == (16 - 4) * 3
    with pytest.raises(ValueError, match="zoom 1.0 is not among"):
        dihedral_views(x, (1.2,), skip_plain_turns=True)
    with torch.no_grad():
        four = torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)])
        plain = stage_features(model.backbone, four, ("layer2", "layer4")).view(4, 3, -1).mean(0)
        full = view_features(model.backbone, x, ("layer2", "layer4"), (1.0, 1.2))
        reused = view_features(model.backbone, x, ("layer2", "layer4"), (1.0, 1.2), plain_turns=plain)
    assert torch.allclose(full, reused, atol=1e-5)


# --- a small trained bundle ---


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Four shape classes at 32 px, a random frozen backbone, one bundle per detector: relative
    Mahalanobis on pooled stages 2-4 over test-time views (the default), Mahalanobis on the region
    pass's pooled stages 2-4, kNN on the region embedding."""
    root = tmp_path_factory.mktemp("ood")
    data = make_data_dir(root / "data", n_per_class=30, size=SIZE, n_unknown=0)
    backbone = random_backbone(root / "backbone.pt")
    configs = {"relative_mahalanobis": FinetuneConfig(epochs=10, binary_heads=False),
               "mahalanobis": FinetuneConfig(epochs=10, binary_heads=False, ood_method="mahalanobis", ood_zooms=()),
               "knn": FinetuneConfig(epochs=10, binary_heads=False, ood_method="knn", ood_stages=(), ood_zooms=())}
    bundles = {method: finetune(data.data_dir, backbone, root / method, cfg) for method, cfg in configs.items()}
    return data, bundles


def foreign_images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    squares = (np.indices((SIZE, SIZE)) // 4).sum(0) % 2
    out = {"noise": rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8), "checkerboard": (squares * 255).astype(np.uint8)}
    if CT_SLICE.is_file():  # a real CT slice, through the same pixel pipeline as a radiograph
        out["ct"] = preprocess(read_dicom(CT_SLICE), PreprocessingSpec(size=SIZE))
    return out


@pytest.mark.parametrize("method", ["relative_mahalanobis", "mahalanobis", "knn"])
def test_noise_checkerboard_and_ct_score_above_every_in_domain_test_image(trained, method):
    data, bundles = trained
    bundle = load_bundle(bundles[method])
    assert bundle.meta.ood_method == method and bundle.ood is not None and bundle.ood.method == method
    rows = read_ok_rows(data.data_dir, "test")
    in_domain, _ = predict_arrays(bundle, list(load_images(data.data_dir, rows)))
    foreign = foreign_images()
    if not CT_SLICE.is_file():
        pytest.skip(f"real CT sample {CT_SLICE} is absent")
    answers, _ = predict_arrays(bundle, list(foreign.values()))
    highest = max(r.ood_score for r in in_domain)
    for name, answer in zip(foreign, answers):
        assert answer.ood_score > highest, name
        assert answer.ood is True, name
    # The threshold sits at the validation split's 95th percentile: few in-domain test images pass it.
    assert np.mean([r.ood for r in in_domain]) <= 0.15


def pooled_stages_by_hand(model: RegionClassifier, images: np.ndarray) -> np.ndarray:
    """Stages 2-4 pooled over the four right-angle turns, computed apart from the served path."""
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)
    with torch.no_grad():
        turned = torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)])
        return stage_features(model.backbone, turned, ("layer2", "layer3", "layer4")).view(4, len(x), -1).mean(0).numpy()


def test_the_served_score_is_the_detector_fitted_on_the_training_features(trained):
    data, bundles = trained
    bundle = load_bundle(bundles["mahalanobis"])
    assert bundle.meta.ood_stages == ["layer2", "layer3", "layer4"] and bundle.ood.dim == 128 + 256 + 512
    train = read_ok_rows(data.data_dir, "train")
    train_x = pooled_stages_by_hand(bundle.model, load_images(data.data_dir, train))
    refit = fit_mahalanobis(train_x, [REGIONS.index(r) for r in train["region"]])  # finetune's class ids
    assert np.allclose(refit.means, bundle.ood.means, atol=1e-4)
    val = read_ok_rows(data.data_dir, "val")
    val_images = load_images(data.data_dir, val)
    answers, _ = predict_arrays(bundle, list(val_images))
    scores = np.array([r.ood_score for r in answers])
    # The served features come from hooks on the one backbone pass: the same as a separate pass.
    assert np.allclose(scores, ood_scores(refit, pooled_stages_by_hand(bundle.model, val_images)), rtol=1e-3)
    assert bundle.meta.ood_threshold == pytest.approx(np.percentile(scores, 95), rel=1e-6)
    assert bundle.meta.ood_scale == pytest.approx(np.percentile(scores, 95) - np.median(scores), rel=1e-6)


def test_the_default_detector_scores_stages_over_test_time_views(trained):
    from xrayops.models.ood_features import DEFAULT_ZOOMS, view_features

    data, bundles = trained
    bundle = load_bundle(bundles["relative_mahalanobis"])
    assert bundle.meta.ood_method == "relative_mahalanobis" and bundle.meta.ood_zooms == list(DEFAULT_ZOOMS)
    assert bundle.meta.ood_stages == ["layer2", "layer3", "layer4"] and bundle.ood.dim == 128 + 256 + 512

    def by_hand(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.from_numpy(images).float().div(255).unsqueeze(1)
            return view_features(bundle.model.backbone, x, ("layer2", "layer3", "layer4"), DEFAULT_ZOOMS).numpy()

    train = read_ok_rows(data.data_dir, "train")
    refit = fit_relative_mahalanobis(by_hand(load_images(data.data_dir, train)),
                                     [REGIONS.index(r) for r in train["region"]])
    assert np.allclose(refit.background_mean, bundle.ood.background_mean, atol=1e-4)
    val_images = load_images(data.data_dir, read_ok_rows(data.data_dir, "val"))
    answers, _ = predict_arrays(bundle, list(val_images), batch_size=7)  # batches do not change a score
    scores = np.array([r.ood_score for r in answers])
    assert np.allclose(scores, ood_scores(refit, by_hand(val_images)), rtol=1e-3, atol=1e-3)
    assert bundle.meta.ood_threshold == pytest.approx(np.percentile(scores, 95), rel=1e-5)


def test_stage_capture_records_one_pass_as_a_separate_pass_computes_it():
    from xrayops.models.ood_features import StageCapture, stages_width

    model = plain_model()  # no rotation averaging: one backbone call per batch
    x = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), StageCapture(model.backbone, ["layer4", "layer1"]) as capture:
        embedding = model.embed(x)
        captured = capture.features(3, rotation_average=False)
        expected = stage_features(model.backbone, x, ("layer1", "layer4"))
    assert captured.shape == (3, stages_width(model.backbone, ["layer1", "layer4"])) == (3, 64 + 512)
    assert torch.allclose(captured, expected, atol=1e-5) and torch.allclose(captured[:, 64:], embedding, atol=1e-5)
    with torch.no_grad(), StageCapture(model.backbone, ["layer2"]) as capture:
        model.embed(x)
        with pytest.raises(RuntimeError, match="3 rows for 2 images"):
            capture.features(2, rotation_average=True)
    assert not model.backbone.layer2._forward_hooks  # the hooks go when the capture closes
    with pytest.raises(ValueError, match="subset of"):
        StageCapture(model.backbone, ["fc"])


# --- the bundle ---


def plain_model() -> RegionClassifier:
    torch.manual_seed(0)
    return RegionClassifier(*build_backbone(), n_classes=len(REGIONS)).eval()


def meta(**update) -> ModelBundleMeta:
    return ModelBundleMeta(classes=list(REGIONS), preprocessing=PreprocessingSpec(size=SIZE), temperature=1.5, **update)


def test_the_detector_round_trips_inside_the_hashed_weights(tmp_path):
    rng = np.random.default_rng(1)
    detector = fit_ood_detector(rng.normal(size=(40, 512)), rng.integers(0, 3, 40), "knn", k=3)
    written = save_bundle(tmp_path / "b", plain_model(), meta(ood_threshold=0.5, ood_scale=0.1), detector)
    assert written.ood_method == "knn" and written.ood_k == 3
    assert not [p.name for p in (tmp_path / "b").iterdir() if p.name not in ("weights.pt", "bundle.json")]
    loaded = load_bundle(tmp_path / "b")
    assert loaded.ood.method == "knn" and loaded.ood.k == 3 and np.array_equal(loaded.ood.reference, detector.reference)
    query = rng.normal(size=(5, 512))
    assert np.array_equal(ood_scores(loaded.ood, query), ood_scores(detector, query))
    # The detector is part of what the sha256 covers: changing it is refused like changing weights.
    state = torch.load(tmp_path / "b" / "weights.pt", weights_only=True)
    state["ood_detector.reference"][0, 0] += 1.0
    torch.save(state, tmp_path / "b" / "weights.pt")
    with pytest.raises(BundleIntegrityError):
        load_bundle(tmp_path / "b")


def test_a_bundle_naming_a_detector_needs_its_arrays(tmp_path):
    rng = np.random.default_rng(2)
    detector = fit_ood_detector(rng.normal(size=(30, 512)), rng.integers(0, 3, 30), "mahalanobis")
    save_bundle(tmp_path / "b", plain_model(), meta(ood_threshold=1.0), detector)
    state = torch.load(tmp_path / "b" / "weights.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("ood_detector.")}, tmp_path / "b" / "weights.pt")
    written = json.loads((tmp_path / "b" / "bundle.json").read_text())
    written["weights_sha256"] = file_sha256(tmp_path / "b" / "weights.pt")
    (tmp_path / "b" / "bundle.json").write_text(json.dumps(written))
    with pytest.raises(BundleError, match="no ood_detector.means, ood_detector.precision"):
        load_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match="none was given"):
        save_bundle(tmp_path / "c", plain_model(), meta(ood_threshold=1.0, ood_method="mahalanobis"))
    # A detector on stages 2-4 has 128 + 256 + 512 dimensions, not the embedding's 512.
    with pytest.raises(BundleError, match="512 dimensions, its features 896"):
        save_bundle(tmp_path / "d", plain_model(), meta(ood_threshold=1.0, ood_stages=["layer2", "layer3", "layer4"]),
                    detector)


def test_an_older_bundle_without_the_new_fields_serves_the_energy_score(tmp_path):
    model = plain_model()
    with torch.no_grad():
        model.head.weight.mul_(20)
    save_bundle(tmp_path / "old", model, meta(ood_threshold=-3.0))
    written = json.loads((tmp_path / "old" / "bundle.json").read_text())
    for key in ("ood_method", "ood_k", "ood_scale"):  # bundle.json as bundles were written before them
        written.pop(key)
    (tmp_path / "old" / "bundle.json").write_text(json.dumps(written))
    bundle = load_bundle(tmp_path / "old")
    assert bundle.ood is None and bundle.meta.ood_method == "energy" and bundle.meta.ood_scale is None
    arrays = [np.random.default_rng(i).integers(0, 256, (SIZE, SIZE), dtype=np.uint8) for i in range(6)]
    answers, _ = predict_arrays(bundle, arrays)
    with torch.no_grad():
        logits = bundle.model(torch.from_numpy(np.stack(arrays)).float().div(255).unsqueeze(1))
    expected = energy_score(logits, 1.5).numpy()
    assert [r.ood_score for r in answers] == pytest.approx(expected.tolist(), abs=1e-4)
    assert [r.ood for r in answers] == [bool(s > -3.0) for s in expected]


# --- ensembles ---


def answer(score: float) -> InferenceResponse:
    return InferenceResponse(region=REGIONS[0], confidence=1.0, probabilities={c: float(c == REGIONS[0]) for c in REGIONS},
                             ood_score=score)


def test_ensemble_averages_margins_in_each_members_own_units():
    # Member a: Mahalanobis, threshold 600, scale 100; member b: kNN, threshold 0.4, scale 0.1.
    metas = [meta(ood_threshold=600.0, ood_scale=100.0), meta(ood_threshold=0.4, ood_scale=0.1)]
    (far, near), = [combine_responses([[answer(900.0), answer(550.0)], [answer(0.35), answer(0.38)]], metas, "e", "v")]
    assert far.ood_score == pytest.approx((3.0 + -0.5) / 2) and far.ood is True  # a is sure, b mildly against
    assert near.ood_score == pytest.approx((-0.5 + -0.2) / 2) and near.ood is False
    # A member without a scale (an older bundle): raw margins for all, as before.
    older = [meta(ood_threshold=600.0, ood_scale=100.0), meta(ood_threshold=-3.0)]
    (out,) = combine_responses([[answer(700.0)], [answer(-5.0)]], older, "e", "v")
    assert out.ood_score == pytest.approx((100.0 + -2.0) / 2)


def test_ensemble_of_trained_members_flags_the_ct_slice(trained):
    data, bundles = trained
    if not CT_SLICE.is_file():
        pytest.skip(f"real CT sample {CT_SLICE} is absent")
    members = [load_bundle(bundles["mahalanobis"]), load_bundle(bundles["knn"])]
    rows = read_ok_rows(data.data_dir, "test")
    arrays = [*load_images(data.data_dir, rows)[:6], foreign_images()["ct"]]
    combined, _ = predict_ensemble(members, arrays)
    own = [predict_arrays(m, arrays)[0] for m in members]
    for i, response in enumerate(combined):
        margins = [(o[i].ood_score - m.meta.ood_threshold) / m.meta.ood_scale for o, m in zip(own, members)]
        assert response.ood_score == pytest.approx(np.mean(margins), rel=1e-6)
        assert response.ood == (np.mean(margins) > 0)
    assert combined[-1].ood is True


# --- the evaluation report ---


def test_auroc_interval_resamples_both_groups():
    assert auroc_ci([1, 1, 0, 0, 0], [5.0, 4.0, 1.0, 2.0, 3.0]) == (1.0, 1.0)  # separated in every resample
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(8, bool), np.zeros(200, bool)]
    s = np.r_[rng.normal(1.0, 1.0, 8), rng.normal(0.0, 1.0, 200)]
    low, high = auroc_ci(y, s, n_boot=500)
    assert low < roc_auc(y, s) < high and high - low > 0.1  # 8 positives pin little down
    assert np.isnan(auroc_ci([0, 0], [1.0, 2.0])[0])


def test_report_shows_the_served_ood_auroc_with_its_interval(trained, tmp_path):
    data, bundles = trained
    copy = shutil.copytree(data.data_dir, tmp_path / "data")
    rows = read_ok_rows(copy, "test")
    truth = dict(data.truth)
    rng = np.random.default_rng(9)
    for i, (_, row) in enumerate(rows.iloc[:4].iterrows()):  # four test images become noise, out of domain
        shard = np.load(copy / "shards" / row["shard"])
        shard[row["shard_index"]] = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
        np.save(copy / "shards" / row["shard"], shard)
        truth[row["source_name"]] = "unknown"
    result = evaluate_bundle(bundles["mahalanobis"], copy, tmp_path / "eval", "test", truth, gradcam_per_group=0)
    m = result.metrics
    answers, _ = predict_arrays(load_bundle(bundles["mahalanobis"]), list(load_images(copy, rows)))
    out_of_domain = np.arange(len(rows)) < 4
    scores = [r.ood_score for r in answers]
    assert m["ood_method"] == "mahalanobis" and m["n_truth_out_of_domain"] == 4
    assert m["ood_auroc"] == pytest.approx(roc_auc(out_of_domain, scores)) and m["ood_auroc"] == 1.0
    assert (m["ood_auroc_ci_low"], m["ood_auroc_ci_high"]) == pytest.approx(auroc_ci(out_of_domain, scores))
    assert m["ood_detection_rate"] == 1.0
    page = result.html_path.read_text()
    assert "Out-of-domain detection (vs truth)" in page and "1.0000 [1.0000, 1.0000]" in page
    assert "mahalanobis on layer2+layer3+layer4" in page


def test_finetune_cli_chooses_the_detector_and_its_views(tmp_path):
    from typer.testing import CliRunner

    from xrayops.app.cli import app

    data = make_data_dir(tmp_path / "data", n_per_class=8, size=SIZE, n_unknown=0)
    backbone = random_backbone(tmp_path / "backbone.pt")
    common = ["finetune", "--backbone", str(backbone), "--data-dir", str(data.data_dir), "--epochs", "2"]
    runner = CliRunner()
    one_zoom = runner.invoke(app, [*common, "--out", str(tmp_path / "one"), "--ood-zoom", "1"])
    assert one_zoom.exit_code == 0, one_zoom.output
    meta = load_bundle(tmp_path / "one").meta
    assert meta.ood_method == "relative_mahalanobis" and meta.ood_zooms == [1.0]
    no_views = runner.invoke(app, [*common, "--out", str(tmp_path / "none"), "--ood-zoom", "0", "--ood-method", "mahalanobis"])
    assert no_views.exit_code == 0, no_views.output
    meta = load_bundle(tmp_path / "none").meta
    assert meta.ood_method == "mahalanobis" and meta.ood_zooms == [] and meta.ood_stages == ["layer2", "layer3", "layer4"]
    bad = runner.invoke(app, [*common, "--out", str(tmp_path / "bad"), "--ood-method", "guess"])
    assert bad.exit_code == 2 and "ood_method" in bad.output and not (tmp_path / "bad").exists()
    too_far = runner.invoke(app, [*common, "--out", str(tmp_path / "far"), "--ood-zoom", "9"])
    assert too_far.exit_code == 2 and "ood_zooms" in too_far.output

"""evaluate_bundle: metrics against PACS tags and truth, files written, spec mismatch refused."""
import json

import numpy as np
import pytest
import torch
from tiny_dataset import make_data_dir, random_backbone

from xrayops.bundle import load_bundle
from xrayops.contracts import PreprocessingSpec
from xrayops.data.dataset import DatasetError, load_images, read_ok_rows
from sklearn import metrics as skm

from xrayops.ensemble import average_probabilities
from xrayops.evaluate.gradcam_figures import grad_cam
from xrayops.evaluate.metrics import classification_metrics, expected_calibration_error
from xrayops.evaluate.report import evaluate_bundle, evaluate_ensemble, uncalibrated
from xrayops.regions import REGION_INDEX as CLASS_ID
from xrayops.inference import predict_arrays
from xrayops.train import FinetuneConfig, finetune

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tiny = make_data_dir(root / "data", n_per_class=25, n_unknown=6, mislabel_rate=0.2, seed=3)
    bundle_dir = finetune(tiny.data_dir, random_backbone(root / "backbone.pt"), root / "bundle", FinetuneConfig(epochs=10, batch_size=64))
    return tiny, bundle_dir


def test_metrics_against_tags_and_truth(setup, tmp_path):
    tiny, bundle_dir = setup
    rows = read_ok_rows(tiny.data_dir, "test")
    truth = dict(tiny.truth)
    out_of_domain = rows["source_name"].iloc[:2].tolist()
    truth.update({name: "unknown" for name in out_of_domain})  # two test images are really out of domain
    result = evaluate_bundle(bundle_dir, tiny.data_dir, tmp_path, "test", truth)
    m = result.metrics

    responses, _ = predict_arrays(load_bundle(bundle_dir), list(load_images(tiny.data_dir, rows)), rows["region"].tolist())
    predicted = np.array([r.region for r in responses])
    tagged = (rows["region"] != "unknown").to_numpy()
    expected = classification_metrics(rows["region"][tagged], predicted[tagged], load_bundle(bundle_dir).meta.classes)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "cohen_kappa", "mcc", "chance_majority"):
        assert m["vs_pacs"][key] == pytest.approx(expected[key]), key
    assert m["vs_pacs"]["confusion_matrix"] == expected["confusion_matrix"]
    assert m["n_images"] == len(rows) and m["vs_pacs"]["n"] == tagged.sum()
    true = rows["source_name"].map(truth).to_numpy()
    in_domain = true != "unknown"
    assert m["vs_truth"]["n"] == in_domain.sum() and m["n_truth_out_of_domain"] == 2
    assert m["vs_truth"]["accuracy"] == pytest.approx(np.mean(predicted[in_domain] == true[in_domain]))
    both = in_domain & tagged
    assert m["pacs_label_error_rate"] == pytest.approx(np.mean(rows["region"].to_numpy()[both] != true[both]))
    assert m["pacs_label_error_rate"] > 0  # mislabel_rate 0.2
    assert m["ood_detection_rate"] == pytest.approx(np.mean([r.ood for r in responses[:2]]))
    # Flat scalars on top for lineage/MLflow: unprefixed vs the tags, truth_* vs the truth.
    assert m["accuracy"] == m["vs_pacs"]["accuracy"] and m["truth_accuracy"] == m["vs_truth"]["accuracy"]
    assert m["truth_chance_uniform"] == pytest.approx(1 / 14)
    assert m["chance_accuracy"] == max(m["chance_uniform"], m["chance_majority"])

    assert json.loads(result.metrics_path.read_text()) == json.loads(json.dumps(m))
    assert result.confusion_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.truth_confusion_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = result.html_path.read_text()
    # Two confusion matrices plus Grad-CAM overlays of right and wrong predictions.
    assert page.count("data:image/png;base64,") == 2 + len(result.gradcam_pngs) and "vs true regions" in page
    assert "pelvis_hip" in page and {p.name for p in result.gradcam_pngs} <= {"gradcam_correct.png", "gradcam_wrong.png"}
    assert result.gradcam_pngs and all(p.read_bytes()[:4] == b"\x89PNG" for p in result.gradcam_pngs)
    # ECE before and after temperature scaling; OOD AUROC from the energy score vs the truth's unknowns.
    probs = np.array([[r.probabilities[c] for c in load_bundle(bundle_dir).meta.classes] for r in responses])
    assert m["vs_truth"]["ece"] == pytest.approx(
        expected_calibration_error([CLASS_ID[t] for t in true[in_domain]], probs[in_domain]))
    assert 0 <= m["ece_uncalibrated"] <= 1 and m["ece_uncalibrated"] != m["ece"]
    energy = np.array([r.ood_score for r in responses])
    assert m["ood_auroc"] == pytest.approx(skm.roc_auc_score(~in_domain, energy))


def test_without_truth_only_tags_are_scored(setup, tmp_path):
    tiny, bundle_dir = setup
    result = evaluate_bundle(bundle_dir, tiny.data_dir, tmp_path, "val")
    assert "vs_truth" not in result.metrics and result.truth_confusion_png is None
    assert result.metrics["split"] == "val" and result.html_path.exists()


def test_refuses_data_preprocessed_differently(setup, tmp_path):
    tiny, bundle_dir = setup
    (tiny.data_dir / "preprocessing.json").write_text(PreprocessingSpec(size=32, keep_aspect=False).model_dump_json())
    try:
        with pytest.raises(DatasetError, match="preprocessed with"):
            evaluate_bundle(bundle_dir, tiny.data_dir, tmp_path)
    finally:
        (tiny.data_dir / "preprocessing.json").write_text(PreprocessingSpec(size=32).model_dump_json())
    with pytest.raises(DatasetError, match="no ok images in split 'holdout'"):
        evaluate_bundle(bundle_dir, tiny.data_dir, tmp_path, "holdout")


def test_uncalibrated_probabilities_undo_the_temperature():
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.3, 0.2]])
    soft = lambda z: np.exp(z) / np.exp(z).sum(1, keepdims=True)  # noqa: E731
    assert np.allclose(uncalibrated(soft(logits / 3.0), 3.0), soft(logits))
    assert uncalibrated(soft(logits), None) is None


def test_grad_cam_finds_the_evidence():
    """A head that reads only the mean activation of layer4 channel c: Grad-CAM must light up
    where that channel fires, i.e. where the bright patch is, and follow it when the image turns."""
    from xrayops.models import RegionClassifier, build_backbone

    torch.manual_seed(0)
    backbone, dim = build_backbone()
    for average in (False, True):
        model = RegionClassifier(backbone, dim, 2, rotation_average=average).eval()
        x = torch.zeros(1, 1, 64, 64)
        x[..., 4:20, 40:60] = 1.0  # a bright patch, top right
        with torch.no_grad():
            features = backbone.layer4(backbone.layer3(backbone.layer2(backbone.layer1(
                backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))))))
            # the channel whose activation differs most between the patch and elsewhere
            channel = int((features[0, :, 0, 1] - features[0, :, 1, 0]).argmax())
            model.head.weight.zero_()
            model.head.bias.zero_()
            model.head.weight[1, channel] = 1.0
        cam = grad_cam(model, x, torch.tensor([1]))[0]
        assert cam.shape == (64, 64) and float(cam.max()) == pytest.approx(1.0)
        assert cam[:32, 32:].mean() > 2 * cam[32:, :32].mean(), average


def test_ensemble_averages_members_and_reports_them_side_by_side(setup, tmp_path):
    tiny, bundle_dir = setup
    other = finetune(tiny.data_dir, random_backbone(tmp_path / "b2.pt", seed=1), tmp_path / "bundle2",
                     FinetuneConfig(epochs=10, batch_size=64))
    result = evaluate_ensemble([bundle_dir, other], tiny.data_dir, tmp_path / "ens", "test", tiny.truth)
    m = result.metrics
    assert len(m["members"]) == 2 and all("vs_truth" in v for v in m["members"].values())
    rows = read_ok_rows(tiny.data_dir, "test")
    images = list(load_images(tiny.data_dir, rows))
    classes = load_bundle(bundle_dir).meta.classes
    member_probs = [
        np.array([[r.probabilities[c] for c in classes] for r in predict_arrays(load_bundle(b), images)[0]])
        for b in (bundle_dir, other)
    ]
    # paper 000: argmax of the summed softmax outputs
    predicted = np.array(classes)[(member_probs[0] + member_probs[1]).argmax(1)]
    tagged = (rows["region"] != "unknown").to_numpy()
    assert m["accuracy"] == pytest.approx(np.mean(predicted[tagged] == rows["region"].to_numpy()[tagged]))
    assert "Ensemble and members" in result.html_path.read_text()
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_ensemble([bundle_dir], tiny.data_dir, tmp_path / "one")


def test_average_probabilities_rule():
    a, b = np.array([[0.6, 0.4]]), np.array([[0.0, 1.0]])
    assert np.allclose(average_probabilities([a, b]), [[0.3, 0.7]])
    assert np.allclose(average_probabilities([a, b], weights=[3, 1]), [[0.45, 0.55]])
    with pytest.raises(ValueError, match="weight"):
        average_probabilities([a, b], weights=[1])

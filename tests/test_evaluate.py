"""evaluate_bundle: metrics against PACS tags and truth, files written, spec mismatch refused."""
import json

import numpy as np
import pytest
import torch
from tiny_dataset import make_data_dir, random_backbone

from xrayops.bundle import load_bundle
from xrayops.contracts import PreprocessingSpec
from xrayops.data.dataset import DatasetError, load_images, read_ok_rows
from xrayops.evaluate.metrics import classification_metrics
from xrayops.evaluate.report import evaluate_bundle
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
    assert page.count("data:image/png;base64,") == 2 and "vs true regions" in page and "pelvis_hip" in page


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

"""Binary heads from optional manifest label columns, study-level aggregation (paper 001), and the
optional last-stage fine-tune."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_dataset import make_data_dir, random_backbone

from xrayops.bundle import load_bundle
from xrayops.data.manifest import read_manifest
from xrayops.evaluate.report import evaluate_bundle
from xrayops.evaluate.study import aggregate_binary, aggregate_region
from xrayops.data.dataset import load_images, read_ok_rows
from xrayops.models.backbone import load_backbone, save_backbone
from xrayops.train import FinetuneConfig, finetune

torch.set_num_threads(1)


def test_at_least_one_and_majority_rules_by_hand():
    ids = ["a", "a", "a", "b", "b", "c"]
    scores = [0.9, 0.2, 0.1, 0.6, 0.7, 0.3]
    labels = [0, 1, 0, 0, 0, 0]
    any_rule = aggregate_binary(ids, scores, labels, "at_least_one")
    assert any_rule["study_id"].tolist() == ["a", "b", "c"]
    assert any_rule["score"].tolist() == [0.9, 0.7, 0.3]  # positive at 0.5: a and b
    assert any_rule["label"].tolist() == [1.0, 0.0, 0.0]  # a study is positive if any image is
    assert any_rule["n_images"].tolist() == [3, 2, 1]
    majority = aggregate_binary(ids, scores, labels, "majority")
    # a: one of three images positive -> negative; b: both -> positive.
    assert majority["score"].tolist() == pytest.approx([0.2, 0.65, 0.3])
    assert ((majority["score"] >= 0.5) == [False, True, False]).all()
    with pytest.raises(ValueError, match="unknown study rule"):
        aggregate_binary(ids, scores, labels, "mean")

    probs = np.array([[0.6, 0.4], [0.1, 0.9], [0.3, 0.7], [0.8, 0.2]])
    region = aggregate_region(["s", "s", "s", "t"], probs, ["knee", "hand"])
    assert region["region"].tolist() == ["hand", "knee"]  # s: mean (0.33, 0.67)
    assert region["confidence"].tolist() == pytest.approx([2 / 3, 0.8])


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Tiny data with an `implant` column (disc and ring shapes carry one), an empty `abnormal`
    column, and studies of two test images each."""
    root = tmp_path_factory.mktemp("binary")
    data = make_data_dir(root / "data", n_per_class=30, n_unknown=0, size=32)
    path = data.data_dir / "manifest.parquet"
    frame = read_manifest(path)
    truth = frame["source_name"].map(data.truth)
    frame["implant"] = np.where(frame["status"] == "ok", truth.isin(["skull", "knee"]).astype(float), np.nan)
    position = frame["source_name"].str.extract(r"img(\d+)")[0].astype(float)
    frame["study_id"] = np.where(position.notna(), "st" + (position // 10).fillna(0).astype(int).astype(str), frame["study_id"])
    frame.to_parquet(path, index=False)
    return data, calibrated_backbone(root / "backbone.pt", data.data_dir)


def calibrated_backbone(path, data_dir):
    """A random backbone whose batch-norm running statistics are those of the data, as after
    pretraining (with the init statistics, eval-mode activations are unnormalised)."""
    backbone, _, _ = load_backbone(random_backbone(path))
    for module in backbone.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the passes
    images = torch.from_numpy(load_images(data_dir, read_ok_rows(data_dir))).float().div(255).unsqueeze(1)
    backbone.train()
    with torch.no_grad():
        for k in range(4):
            backbone(torch.rot90(images, k, dims=(-2, -1)))
    return save_backbone(path, backbone, "resnet18", "simclr")


def test_binary_head_is_trained_bundled_and_scored_per_image_and_study(labelled, tmp_path):
    data, backbone = labelled
    bundle_dir = finetune(data.data_dir, backbone, tmp_path / "bundle", FinetuneConfig(epochs=30))
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    assert meta["binary_heads"] == ["implant"]  # `abnormal` has no labels: no head
    assert meta["lineage"]["metrics"]["val_implant_auc"] > 0.8
    bundle = load_bundle(bundle_dir)
    assert set(bundle.model.binary_heads) == {"implant"}

    result = evaluate_bundle(bundle_dir, data.data_dir, tmp_path / "eval", truth=data.truth, gradcam_per_group=0)
    implant = result.metrics["binary"]["implant"]
    image = implant["image"]
    assert image["n_positive"] + image["n_negative"] == result.metrics["n_images"] == 24
    assert image["auc"] > 0.8 and result.metrics["implant_auc"] == image["auc"]
    for key in ("auc", "sensitivity", "specificity"):
        low, high = image[f"{key}_ci"]
        assert low <= image[key] <= high and high - low > 0
    # 24 test images at positions 4, 9, 14, ...: two per study.
    assert implant["study_at_least_one"]["n_studies"] == implant["study_majority"]["n_studies"] == 12
    assert result.metrics["n_studies"] == 12 and 0 <= result.metrics["study_accuracy"] <= 1
    assert "Binary heads" in result.html_path.read_text() and "implant (study at least one)" in result.html_path.read_text()


def test_without_label_columns_no_binary_head_and_old_manifests_still_read(tmp_path):
    data = make_data_dir(tmp_path / "data", n_per_class=10, n_unknown=0, size=32)
    frame = pd.read_parquet(data.data_dir / "manifest.parquet").drop(columns=["abnormal", "implant"])
    frame.to_parquet(data.data_dir / "manifest.parquet", index=False)
    assert read_manifest(data.data_dir / "manifest.parquet")["implant"].isna().all()
    bundle_dir = finetune(data.data_dir, random_backbone(tmp_path / "b.pt"), tmp_path / "bundle", FinetuneConfig(epochs=2))
    assert json.loads((bundle_dir / "bundle.json").read_text())["binary_heads"] == []
    assert len(load_bundle(bundle_dir).model.binary_heads) == 0


def test_last_stage_fine_tune_changes_only_layer4(labelled, tmp_path):
    data, backbone = labelled
    cfg = FinetuneConfig(epochs=5, finetune_last_stage=True, last_stage_epochs=3, binary_heads=False)
    bundle_dir = finetune(data.data_dir, backbone, tmp_path / "bundle", cfg)
    tuned = load_bundle(bundle_dir).model.backbone.state_dict()
    original = load_backbone(backbone)[0].state_dict()
    assert all(torch.equal(tuned[k], original[k]) for k in original if k.startswith(("conv1", "layer1", "layer3")))
    assert not torch.equal(tuned["layer4.1.conv2.weight"], original["layer4.1.conv2.weight"])
    assert json.loads((bundle_dir / "bundle.json").read_text())["lineage"]["metrics"]["finetuned_last_stage"] == 1.0


def test_ood_threshold_and_temperature_are_fitted_on_validation(labelled, tmp_path):
    from torch.nn import functional as F

    from xrayops.inference import predict_arrays

    data, backbone = labelled
    bundle = load_bundle(finetune(data.data_dir, backbone, tmp_path / "bundle", FinetuneConfig(epochs=10, binary_heads=False)))
    rows = read_ok_rows(data.data_dir, "val")
    responses, _ = predict_arrays(bundle, list(load_images(data.data_dir, rows)))
    energies = np.array([r.ood_score for r in responses])
    # The threshold is the 95th percentile of the validation energies: about 5 % flagged there.
    assert bundle.meta.ood_threshold == pytest.approx(np.percentile(energies, 95), rel=1e-4, abs=1e-4)
    assert 1 <= sum(r.ood for r in responses) <= 2  # of 24 validation images
    # Temperature scaling lowers the validation NLL against T = 1 (it minimises it).
    logits = torch.log(torch.tensor([[r.probabilities[c] for c in bundle.meta.classes] for r in responses]))
    logits = logits * bundle.meta.temperature  # back to the raw logits, up to a per-row constant
    labels = torch.tensor([bundle.meta.classes.index(r) for r in rows["region"]])
    t = bundle.meta.temperature
    assert t != 1.0 and F.cross_entropy(logits / t, labels) <= F.cross_entropy(logits, labels)


def test_ensemble_averages_the_members_binary_heads(labelled, tmp_path):
    from xrayops.evaluate.report import evaluate_ensemble

    data, backbone = labelled
    bundles = [finetune(data.data_dir, backbone, tmp_path / f"b{seed}", FinetuneConfig(epochs=10, seed=seed))
               for seed in (0, 1)]
    result = evaluate_ensemble(bundles, data.data_dir, tmp_path / "ens", truth=data.truth)
    members = list(result.metrics["members"].values())
    assert all(m["implant_auc"] > 0.8 for m in members) and result.metrics["implant_auc"] > 0.8
    assert result.metrics["binary"]["implant"]["study_majority"]["n_studies"] == 12
    assert "implant_auc" in result.html_path.read_text()


def test_served_answers_carry_the_binary_heads(labelled, tmp_path):
    """Hospital IT get P(implant) beside the region: per model, averaged over an ensemble, and
    through the v2 wire format and back."""
    from serving.schema import ImageBatch, ServedResponse, encode_v2, output_types, parse_infer_response
    from xrayops.ensemble import predict_ensemble
    from xrayops.inference import predict_arrays

    data, backbone = labelled
    bundles = [load_bundle(finetune(data.data_dir, backbone, tmp_path / f"b{seed}", FinetuneConfig(epochs=10, seed=seed)))
               for seed in (0, 1)]
    rows = read_ok_rows(data.data_dir, "test")
    images = list(load_images(data.data_dir, rows))
    truth = rows["source_name"].map(data.truth)
    responses, embeddings = predict_arrays(bundles[0], images)
    with torch.no_grad():
        expected = bundles[0].model.binary_probabilities(torch.from_numpy(embeddings))["implant"].numpy()
    p = np.array([r.findings["implant"] for r in responses])
    assert list(responses[0].findings) == ["implant"] and np.allclose(p, expected, atol=1e-5)
    positive = truth.isin(["skull", "knee"]).to_numpy()
    assert p[positive].mean() > 0.5 > p[~positive].mean()  # discs and rings carry the implant

    combined, _ = predict_ensemble(bundles, images, None, "ens", "v")
    second, _ = predict_arrays(bundles[1], images)
    both = np.array([[a.findings["implant"], b.findings["implant"]] for a, b in zip(responses, second)])
    assert np.allclose([r.findings["implant"] for r in combined], both.mean(axis=1), atol=1e-6)

    classes = bundles[0].meta.classes
    batch = ImageBatch(protocol="v2", request_id="r1", pixels=images, dicom_regions=["unknown"] * len(images))
    served = [ServedResponse(**r.model_dump()) for r in combined]
    wire = encode_v2(served, classes, "ens", "v", batch)
    assert "finding_implant" in {o.name for o in wire.outputs}
    back = parse_infer_response(wire)
    assert [round(r.findings["implant"], 5) for r in back] == [round(r.findings["implant"], 5) for r in combined]
    assert {"name": "finding_implant", "datatype": "FP32", "shape": [-1]} in output_types(len(classes), False, ["implant"])
    # A model without binary heads answers without findings, and the wire carries none.
    plain = [r.model_copy(update={"findings": {}}) for r in served]
    assert "finding_implant" not in {o.name for o in encode_v2(plain, classes, "m", "v", batch).outputs}
    assert all(r.findings == {} for r in parse_infer_response(encode_v2(plain, classes, "m", "v", batch)))

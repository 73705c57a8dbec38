"""Subgroups (xrayops.evaluate.subgroups): the gate refuses a challenger that is better overall
but worse for one vendor's images; the evaluation report and the gate break results down by the
manifest's acquisition attributes with n and intervals."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_dataset import make_data_dir, random_backbone

from xrayops.evaluate.gate import GateModel, GatePolicy, ScoredModel, gate, run_gate, score_bundle
from xrayops.evaluate.metrics import read_evaluation
from xrayops.evaluate.subgroups import NOT_RECORDED, subgroup_attributes, transfer_syntax_family

torch.set_num_threads(1)
REGIONS = ["hand", "knee", "skull", "wrist"]


def _vendor_set(seed: int = 0, n_a: int = 400, n_b: int = 60):
    """Two images per study; vendor B's studies are degraded for the challenger only."""
    rng = np.random.default_rng(seed)
    n = n_a + n_b
    vendor = np.array(["VendorA"] * n_a + ["VendorB"] * n_b)
    studies = np.array([f"s{k // 2}" for k in range(n)])
    view = np.array(["PA" if int(s[1:]) % 2 else "AP" for s in studies])
    truth = np.repeat(rng.choice(REGIONS, n // 2), 2)
    champion_right = rng.random(n) < 0.8
    challenger_right = champion_right.copy()
    a = vendor == "VendorA"
    challenger_right[a & ~champion_right] = rng.random(int((a & ~champion_right).sum())) < 0.6  # better on A
    b = vendor == "VendorB"
    challenger_right[b & champion_right] = rng.random(int((b & champion_right).sum())) < 0.6  # worse on B

    def scored(name, right):
        preds = [t if ok else REGIONS[(REGIONS.index(t) + 1) % 4] for t, ok in zip(truth, right)]
        return ScoredModel(name=name, test_set="md5-v2", image_ids=[f"i{k}" for k in range(n)], y_true=list(truth),
                           y_pred=preds, study_ids=list(studies),
                           subgroups={"manufacturer": list(vendor), "view_position": list(view)})
    return scored("champion", champion_right), scored("challenger", challenger_right), champion_right, challenger_right, b


def test_better_overall_but_worse_for_one_vendor_is_refused_and_named():
    champion, challenger, a_right, b_right, vendor_b = _vendor_set()
    assert b_right.mean() > a_right.mean()  # overall the challenger is better
    decision = gate(champion, challenger, margin=0.01, samples=1000, subgroup_min_n=30, subgroup_margin=0.05)
    assert decision.ci_low > -0.01  # the overall test alone would promote
    assert not decision.promote
    (refused,) = decision.refused_subgroups
    assert (refused.attribute, refused.value, refused.n, refused.n_studies) == ("manufacturer", "VendorB", 60, 30)
    assert refused.checked and refused.difference.high < 0
    assert refused.challenger_accuracy == pytest.approx(b_right[vendor_b].mean())
    assert refused.champion_accuracy == pytest.approx(a_right[vendor_b].mean())
    assert "manufacturer=VendorB (n=60)" in decision.reason and "keep the champion" in decision.reason
    assert "not worse beyond the margin 0.010" in decision.reason  # the overall verdict stays readable
    shown = {(g.attribute, g.value): g for g in decision.subgroups}
    assert set(shown) == {("manufacturer", "VendorA"), ("manufacturer", "VendorB"), ("view_position", "AP"),
                          ("view_position", "PA")}
    assert not shown[("manufacturer", "VendorA")].refused and shown[("manufacturer", "VendorA")].difference.low > 0
    assert decision.n_studies == 230 and decision.subgroup_min_n == 30
    # The decision's JSON (gate.json, the KFP artifact) carries the typed subgroup results.
    again = type(decision).model_validate_json(decision.model_dump_json())
    assert again.refused_subgroups[0].value == "VendorB"


def test_small_subgroups_are_shown_but_not_decided_and_the_margin_is_never_tighter_than_overall():
    champion, challenger, *_ = _vendor_set()
    lenient = gate(champion, challenger, margin=0.01, samples=1000, subgroup_min_n=61)
    assert lenient.promote and lenient.refused_subgroups == []
    b = next(g for g in lenient.subgroups if g.value == "VendorB")
    assert not b.checked and b.difference.high < 0  # shown with its interval, too small to decide on
    assert "subgroups of >= 61 images" in lenient.reason
    wide = gate(champion, challenger, margin=1.0, samples=1000, subgroup_margin=0.05)
    assert wide.promote and wide.subgroup_margin == 1.0


def test_equal_models_pass_every_subgroup_and_study_ids_must_cover_the_set():
    champion, _, *_ = _vendor_set()
    same = gate(champion, champion.model_copy(update={"name": "again"}), samples=300)
    assert same.promote and all(g.difference.value == 0 and g.difference.low == 0 for g in same.subgroups)
    broken = champion.model_copy(update={"study_ids": champion.study_ids[:-1]})
    with pytest.raises(ValueError, match="study ids"):
        gate(broken, broken, samples=100)


def test_attributes_from_a_manifest():
    rows = pd.DataFrame({"manufacturer": ["Acme", "", None], "view_position": ["PA", "AP", "PA"],
                         "photometric_interpretation": ["MONOCHROME1", "MONOCHROME2", "MONOCHROME2"],
                         "transfer_syntax": ["1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1", "1.2.3"]})
    got = subgroup_attributes(rows)
    assert got["manufacturer"] == ["Acme", NOT_RECORDED, NOT_RECORDED]
    assert got["transfer_syntax_family"] == ["jpeg2000", "native", "other"]
    assert "site" not in got and "modality" not in got  # only what the manifest has
    assert "view_position" not in subgroup_attributes(rows.assign(view_position=["", None, " "]))  # recorded nowhere
    assert transfer_syntax_family("") == NOT_RECORDED and transfer_syntax_family("1.2.840.10008.1.2.5") == "rle"


@pytest.fixture(scope="module")
def vendor_data(tmp_path_factory):
    """A tiny dataset whose manifest records two vendors and two transfer syntaxes, two test images a study."""
    from xrayops.train import FinetuneConfig, finetune

    root = tmp_path_factory.mktemp("subgroups")
    tiny = make_data_dir(root / "data", n_per_class=20, n_unknown=0, seed=5)
    manifest = pd.read_parquet(tiny.data_dir / "manifest.parquet")
    ok = manifest["status"] == "ok"
    position = np.arange(len(manifest))
    manifest.loc[ok, "manufacturer"] = np.where(position[ok] % 3 == 0, "VendorB", "VendorA")
    manifest.loc[ok, "transfer_syntax"] = np.where(position[ok] % 2 == 0, "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1")
    manifest.loc[ok, "study_id"] = [f"s{k // 10}" for k in position[ok]]  # the split takes every 5th: two a study
    manifest.to_parquet(tiny.data_dir / "manifest.parquet", index=False)
    bundle = finetune(tiny.data_dir, random_backbone(root / "backbone.pt"), root / "bundle",
                      FinetuneConfig(epochs=3, batch_size=64))
    return tiny, bundle


def test_the_gate_scores_subgroups_from_the_manifest(vendor_data):
    tiny, bundle = vendor_data
    scored = score_bundle(bundle, tiny.data_dir, "md5-x")
    # view_position is empty in every row of this manifest: no subgroup attribute then
    assert len(scored.study_ids) == len(scored.image_ids) and set(scored.subgroups) == {
        "manufacturer", "transfer_syntax_family"}
    assert set(scored.subgroups["manufacturer"]) == {"VendorA", "VendorB"}
    side = GateModel(bundle_dir=str(bundle), ref=str(bundle))
    decision = run_gate(side, side, tiny.data_dir, "md5-x", GatePolicy(promote=False, samples=200, subgroup_min_n=5))
    assert decision.promote and decision.n == len(scored.image_ids) and decision.n_studies < decision.n
    by_attribute: dict[str, int] = {}
    for g in decision.subgroups:
        by_attribute[g.attribute] = by_attribute.get(g.attribute, 0) + g.n
    assert set(by_attribute.values()) == {decision.n}  # every attribute partitions the test set
    assert {g.value for g in decision.subgroups if g.attribute == "transfer_syntax_family"} == {"jpeg2000", "native"}


def test_the_evaluation_report_breaks_results_down_by_subgroup(vendor_data, tmp_path):
    from xrayops.evaluate.report import evaluate_bundle

    tiny, bundle = vendor_data
    result = evaluate_bundle(bundle, tiny.data_dir, tmp_path, "test", tiny.truth, gradcam_per_group=0)
    typed = read_evaluation(result.metrics_path)
    table = typed.vs_truth
    vendors = {g.value: g for g in table.subgroups if g.attribute == "manufacturer"}
    assert set(vendors) == {"VendorA", "VendorB"} and sum(g.n for g in vendors.values()) == table.n
    rows = pd.read_parquet(tiny.data_dir / "manifest.parquet")
    test = rows[(rows["status"] == "ok") & (rows["split"] == "test")]
    assert vendors["VendorB"].n == int((test["manufacturer"] == "VendorB").sum())
    for g in vendors.values():
        assert g.accuracy.low <= g.accuracy.value <= g.accuracy.high
    assert table.intervals.n_studies == test["study_id"].nunique() and table.intervals.n_images == table.n
    # Flat interval keys for MLflow beside the existing headline keys, which keep their meaning.
    m = json.loads(result.metrics_path.read_text())
    assert m["truth_accuracy"] == table.accuracy and m["truth_accuracy_ci_low"] <= m["truth_accuracy"] <= m["truth_accuracy_ci_high"]
    page = result.html_path.read_text()
    assert "Subgroups" in page and "VendorB" in page and "jpeg2000" in page
    assert f"{table.accuracy:.3f} [{table.intervals.accuracy.low:.3f}, {table.intervals.accuracy.high:.3f}]" in page

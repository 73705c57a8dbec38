"""Out-of-domain detection: how well the bundle's OOD score separates in-domain radiographs from
images that are not radiographs of the 14 regions, and how often it raises false alarms.

The real path: a bundle from `xrayops finetune` (or one given with --bundle) is loaded with
`load_bundle` and every image goes through `predict_arrays`, so the served `ood_score` and
`ood` flag are what is measured. Beside the served detector, the alternatives are refitted on
the same training embeddings (labelled training images, as finetune does) and scored the same
way: the energy of the logits (Liu et al. 2020; the old served score), Mahalanobis with class
means and a Ledoit-Wolf-shrunk shared covariance (Lee et al. 2018) on the region embedding
(stage 4) and on pooled ResNet stages 2-4 and 1-4 concatenated, its relative form (minus the
distance to one background Gaussian; Ren et al. 2021) on stages 2-4, both also on features
averaged over test-time views (eight turns and mirror images at zoom 1.0 alone, and at zooms
1.0, 1.2 and 0.85; `xrayops.models.ood_features`), and kNN distance on L2-normalised region
embeddings for several k (Sun et al. 2022). Each threshold is the 95th
percentile of the validation split's labelled images, as finetune sets it. AUROC intervals
resample in-domain and out-of-domain images apart (`auroc_ci`); rates resample their images.

Method choice uses validation data only: in-domain val images (synth truth) against a fresh
synth batch of out-of-domain images (--ood-val) and the val split's own out-of-domain images.
Reported, with percentile-bootstrap 95 % CIs (Efron 1979):
  (a) synth: in-domain test images against the test split's out-of-domain images and a second
      fresh out-of-domain batch (--ood-test, another seed);
  (b) real non-radiographs: every CT/MR/US/NM/SC/OT file of --other-dicom (modality from its
      MANIFEST.tsv), preprocessed with the bundle's spec as if admitted (files that fail to
      decode are counted and skipped), against the same in-domain test images.
AUROC (OOD positive), the false-alarm rate on in-domain test images and the detection rate on
out-of-domain ones at the threshold.

Usage (see benchmarks/README.md, "Out-of-domain detection", for the full commands):
  .venv/bin/python benchmarks/bench_ood.py --backbone B.pt --data-dir D --truth truth.csv \
      --ood-val OODVAL/dicom --ood-test OODTEST/dicom --other-dicom DIR --out results/ood.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from xrayops.bundle import load_bundle
from xrayops.data.dataset import load_images, read_ok_rows
from xrayops.data.truth import read_truth
from xrayops.dicom.decode import DicomError, read_dicom
from xrayops.dicom.pixels import preprocess
from xrayops.evaluate.metrics import auroc_ci, bootstrap_ci, roc_auc
from xrayops.evaluate.report import evaluate_bundle
from xrayops.inference import predict_arrays
from xrayops.data.dataset import to_unit_float
from xrayops.models.backbone import stage_features
from xrayops.models.heads import energy_score
from xrayops.models.ood import fit_ood_detector, ood_scores
from xrayops.models.ood_features import DEFAULT_ZOOMS, view_features

NON_RADIOGRAPH = ("CT", "MR", "US", "NM", "SC", "OT")
KNN_KS = (1, 5, 10, 20, 50)


def dicom_images(paths: list[Path], spec) -> tuple[list[np.ndarray], list[str], dict[str, str]]:
    """Preprocessed images of the files that decode, their names, and {name: reason} of the rest."""
    images, names, failed = [], [], {}
    for path in paths:
        try:
            images.append(preprocess(read_dicom(path), spec))
            names.append(path.name)
        except DicomError as exc:
            failed[path.name] = f"{exc.reason}: {exc.detail}"[:200]
        except Exception as exc:  # a sample the pipeline should have turned into a DicomError
            failed[path.name] = f"unexpected {type(exc).__name__}: {exc}"[:200]
    return images, names, failed


def other_files(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """The non-radiograph files of a sample folder and their modality, from its MANIFEST.tsv (a
    Secondary Capture without a Modality tag counts as SC)."""
    manifest = pd.read_csv(folder / "MANIFEST.tsv", sep="\t", dtype=str).fillna("")
    by_name = {
        Path(p).name: m or ("SC" if sop.startswith("Secondary Capture") else "")
        for p, m, sop in zip(manifest["path"], manifest["Modality"], manifest["SOPClass"])
    }
    files = sorted(p for p in folder.iterdir() if by_name.get(p.name, "") in NON_RADIOGRAPH)
    return files, {p.name: by_name[p.name] for p in files}


def truth_by_source_name(path: Path, source_names) -> dict[str, str]:
    """source_name -> true region: truth.csv's file names where the manifest names files plainly,
    else through the dataset's pseudonyms (`read_truth`, the configured de-identification key)."""
    frame = pd.read_csv(path)
    by_file = dict(zip(frame["file"].astype(str), frame["true_region"].astype(str)))
    return by_file if set(source_names) & set(by_file) else read_truth(path)


def ood_kinds(dicom_dir: Path, names: list[str]) -> np.ndarray:
    """synth's out-of-domain kind of each file, from the truth.csv beside its dicom folder."""
    path = dicom_dir.parent / "truth.csv"
    if not path.is_file():
        return np.array([""] * len(names))
    frame = pd.read_csv(path, dtype=str).fillna("")
    by_name = {Path(f).name: k for f, k in zip(frame["file"], frame["ood_kind"])}
    return np.array([by_name.get(n, "") for n in names])


def split_images(data_dir: Path, split: str) -> tuple[pd.DataFrame, np.ndarray]:
    rows = read_ok_rows(data_dir, split)
    return rows, load_images(data_dir, rows)


def with_ci(statistic, arrays, n_boot: int, seed: int = 0) -> dict:
    value = statistic(*arrays)
    low, high = bootstrap_ci(statistic, arrays, n_boot=n_boot, seed=seed)
    return {"value": value, "ci": [low, high]}


def separation(in_scores: np.ndarray, out_scores: np.ndarray, threshold: float, n_boot: int) -> dict:
    """AUROC (out-of-domain positive), false alarms on in-domain and detections on out-of-domain
    images at `threshold`, each with a bootstrap 95 % CI."""
    y = np.r_[np.zeros(len(in_scores), bool), np.ones(len(out_scores), bool)]
    s = np.r_[in_scores, out_scores]
    return {
        "n_in_domain": int(len(in_scores)),
        "n_out_of_domain": int(len(out_scores)),
        "auroc": {"value": roc_auc(y, s), "ci": list(auroc_ci(y, s, n_boot=n_boot))},
        "false_alarm_rate": with_ci(lambda v: float((v > threshold).mean()), [in_scores], n_boot),
        "detection_rate": with_ci(lambda v: float((v > threshold).mean()), [out_scores], n_boot) if len(out_scores) else None,
    }


def served_cost(bundle, images: list[np.ndarray], repeats: int = 3) -> dict:
    """Seconds per image of predict_arrays as served, against the same bundle scoring the region
    pass's own features (no test-time views): the price of the views, as a ratio in one run."""
    from dataclasses import replace

    variants = {"served": bundle, "region_pass_features": replace(bundle, meta=bundle.meta.model_copy(update={"ood_zooms": []}))}
    best = {name: float("inf") for name in variants}
    for _ in range(repeats):  # interleaved, best of `repeats`
        for name, b in variants.items():
            started = time.perf_counter()
            predict_arrays(b, images)
            best[name] = min(best[name], (time.perf_counter() - started) / len(images))
    return {"seconds_per_image": best, "ratio": best["served"] / best["region_pass_features"],
            "n_images": len(images), "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", type=Path, help="backbone.pt: fine-tune a bundle on --data-dir first")
    parser.add_argument("--bundle", type=Path, help="an existing bundle instead of --backbone")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--truth", type=Path, required=True, help="truth.csv of the synth export behind --data-dir")
    parser.add_argument("--ood-val", type=Path, required=True, help="folder of synth out-of-domain DICOM (method choice)")
    parser.add_argument("--ood-test", type=Path, required=True, help="another such folder (reported)")
    parser.add_argument("--other-dicom", type=Path, required=True, help="folder of non-radiograph DICOM with MANIFEST.tsv")
    parser.add_argument("--finetune-epochs", type=int, default=100)  # the demo's
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ood.json"))
    parser.add_argument("--cost-only", action="store_true", help="with --bundle: only the served path's cost, to --out")
    args = parser.parse_args()
    if args.cost_only:
        if args.bundle is None:
            parser.error("--cost-only needs --bundle")
        cost = served_cost(load_bundle(args.bundle), list(split_images(args.data_dir, "test")[1]))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"bundle": str(args.bundle), "cost": cost}, indent=2))
        print(json.dumps(cost))
        return
    if (args.backbone is None) == (args.bundle is None):
        parser.error("give exactly one of --backbone and --bundle")
    started = time.perf_counter()

    bundle_dir = args.bundle
    if bundle_dir is None:
        from xrayops.train.finetune import FinetuneConfig, finetune

        bundle_dir = finetune(args.data_dir, args.backbone, Path(tempfile.mkdtemp(prefix="bench-ood-")) / "bundle",
                              FinetuneConfig(epochs=args.finetune_epochs, seed=0))
    bundle = load_bundle(bundle_dir)
    meta, classes = bundle.meta, list(bundle.meta.classes)
    truth = truth_by_source_name(args.truth, read_ok_rows(args.data_dir, "train")["source_name"].astype(str))

    def served(images) -> dict:
        """Served ood_score and ood flag, and region embeddings, through predict_arrays; plus the
        pooled outputs of ResNet stages 1-3 (rotation-averaged as the region embedding is) for the
        multi-stage alternative."""
        responses, embeddings = predict_arrays(bundle, list(images))
        return {"score": np.array([r.ood_score for r in responses]), "flag": np.array([bool(r.ood) for r in responses]),
                "emb": embeddings, "early": early_stages(images), "views": zoom_views(images)}

    zooms = tuple(meta.ood_zooms) or DEFAULT_ZOOMS

    @torch.inference_mode()
    def zoom_views(images) -> np.ndarray:
        """(n, zooms, 896) pooled stages 2-4 averaged over the eight views at each zoom apart (their
        mean over zooms is view_features over all zooms: every zoom has eight views)."""
        chunks = []
        for start in range(0, len(images), 64):
            x = to_unit_float(torch.as_tensor(np.stack(images[start : start + 64]))).unsqueeze(1)
            chunks.append(torch.stack([view_features(bundle.model.backbone, x, ("layer2", "layer3", "layer4"), (z,))
                                       for z in zooms], 1).numpy())
        return np.concatenate(chunks) if chunks else np.zeros((0, len(zooms), 896), np.float32)

    @torch.inference_mode()
    def early_stages(images) -> np.ndarray:
        chunks = []
        for start in range(0, len(images), 128):
            x = to_unit_float(torch.as_tensor(np.stack(images[start : start + 128]))).unsqueeze(1)
            turns = range(4) if meta.rotation_average else range(1)
            turned = torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in turns])
            pooled = stage_features(bundle.model.backbone, turned, ("layer1", "layer2", "layer3"))
            chunks.append(pooled.view(len(turns), len(x), -1).mean(0).numpy())
        return np.concatenate(chunks) if chunks else np.zeros((0, 448), np.float32)

    sets: dict[str, dict] = {}
    for split in ("train", "val", "test"):
        rows, images = split_images(args.data_dir, split)
        true = np.array([truth.get(n, "") for n in rows["source_name"].astype(str)])
        sets[split] = {"rows": rows, "true": true, **served(list(images)),
                       "labelled": np.isin(rows["region"].astype(str).to_numpy(), classes)}
    failures: dict[str, dict[str, str]] = {}
    for key, folder in (("ood_val", args.ood_val), ("ood_test", args.ood_test)):
        images, names, failures[key] = dicom_images(sorted(Path(folder).rglob("*.dcm")), meta.preprocessing)
        sets[key] = {**served(images), "kind": ood_kinds(Path(folder), names)}
    files, modality = other_files(args.other_dicom)
    images, names, failures["other"] = dicom_images(files, meta.preprocessing)
    sets["other"] = {**served(images), "names": names}

    # Every method scored on the same images; the bundle's own detector is one of them.
    train = sets["train"]
    train_y = train["rows"]["region"].astype(str).to_numpy()[train["labelled"]]
    head = bundle.model.head.cpu()

    def energy(s: dict) -> np.ndarray:
        with torch.no_grad():
            return energy_score(head(torch.from_numpy(s["emb"]).float()), meta.temperature).numpy()

    features = {  # the region embedding (stage 4), and pooled stages concatenated with it
        "": lambda s: s["emb"],
        "_stages234": lambda s: np.concatenate([s["early"][:, 64:], s["emb"]], axis=1),
        "_stages1234": lambda s: np.concatenate([s["early"], s["emb"]], axis=1),
        "_stages234_views_zoom1": lambda s: s["views"][:, list(zooms).index(1.0)] if 1.0 in zooms else None,
        "_stages234_views": lambda s: s["views"].mean(1),
    }
    scorers = {"energy": energy}
    for suffix, feature in features.items():
        if feature(train) is None:
            continue
        methods = ("mahalanobis",) if suffix in ("", "_stages1234") else ("mahalanobis", "relative_mahalanobis")
        for method in methods:
            detector = fit_ood_detector(feature(train)[train["labelled"]], train_y, method)
            scorers[method + suffix] = lambda s, d=detector, f=feature: ood_scores(d, f(s))
    for k in KNN_KS:
        detector = fit_ood_detector(train["emb"][train["labelled"]], train_y, "knn", k=k)
        scorers[f"knn_k{k}"] = lambda s, d=detector: ood_scores(d, s["emb"])

    val, test = sets["val"], sets["test"]
    val_in = np.isin(val["true"], classes)
    val_out = (val["true"] != "") & ~val_in
    test_in = np.isin(test["true"], classes)
    test_out = (test["true"] != "") & ~test_in
    results: dict = {}
    for name, scorer in scorers.items():
        score = {key: scorer(s) for key, s in sets.items()}
        threshold = float(np.percentile(score["val"][val["labelled"]], 95))  # as finetune sets it
        ood_val = np.r_[score["ood_val"], score["val"][val_out]]
        results[name] = {
            "threshold": threshold,
            "validation": separation(score["val"][val_in], ood_val, threshold, args.n_boot),
            "synth_test_split": separation(score["test"][test_in], score["test"][test_out], threshold, args.n_boot),
            "synth_fresh_batch": separation(score["test"][test_in], score["ood_test"], threshold, args.n_boot),
            "real_non_radiographs": separation(score["test"][test_in], score["other"], threshold, args.n_boot),
            "synth_fresh_batch_by_kind": {
                kind: separation(score["test"][test_in], score["ood_test"][sets["ood_test"]["kind"] == kind], threshold, 200)
                for kind in sorted(set(sets["ood_test"]["kind"]))},
            # Where each real file falls among the in-domain test images' scores (1.0: above them all).
            "real_percentile_among_in_domain": {
                n: float((score["test"][test_in] < v).mean()) for n, v in zip(sets["other"]["names"], score["other"])},
            "real_scores": {n: float(v) for n, v in zip(sets["other"]["names"], score["other"])},
        }
    chosen = max(results, key=lambda m: results[m]["validation"]["auroc"]["value"])

    # The served score must be one of the rows above, bit for bit where the method matches.
    suffix = "_stages" + "".join(stage.removeprefix("layer") for stage in meta.ood_stages) if meta.ood_stages else ""
    suffix += "_views" if meta.ood_zooms else ""
    served_name = meta.ood_method + suffix if meta.ood_method in ("mahalanobis", "relative_mahalanobis") else {
        "energy": "energy", "knn": f"knn_k{meta.ood_k}"}[meta.ood_method]
    served_check = float(np.abs(sets["test"]["score"] - scorers[served_name](sets["test"])).max())
    report = {
        "bundle": str(bundle_dir),
        "served_method": served_name,
        "served_threshold": meta.ood_threshold,
        "served_matches_refit_max_abs_diff": served_check,
        "served_false_alarm_rate_test": float(sets["test"]["flag"][test_in].mean()),
        "served_detection_rate_other": float(sets["other"]["flag"].mean()) if len(sets["other"]["flag"]) else None,
        "chosen_on_validation": chosen,
        "n_images": {"train_labelled": int(train["labelled"].sum()), "val_in_domain": int(val_in.sum()),
                     "val_out_of_domain": int(val_out.sum()) + len(sets["ood_val"]["score"]),
                     "test_in_domain": int(test_in.sum()), "test_split_out_of_domain": int(test_out.sum()),
                     "fresh_out_of_domain": len(sets["ood_test"]["score"]), "real_non_radiographs": len(names)},
        "real_modalities": {n: modality[n] for n in names},
        "decode_failures": failures,
        "methods": results,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch_threads": torch.get_num_threads()},
    }
    report["cost"] = served_cost(bundle, list(split_images(args.data_dir, "test")[1]))
    # What the evaluation report (the demo's evaluate step) shows for this bundle on the test split.
    evaluation = evaluate_bundle(bundle_dir, args.data_dir, Path(tempfile.mkdtemp(prefix="bench-ood-eval-")), "test",
                                 truth, gradcam_per_group=0).metrics
    report["evaluation_report"] = {k: evaluation.get(k) for k in (
        "ood_method", "ood_auroc", "ood_auroc_ci_low", "ood_auroc_ci_high", "ood_false_alarm_rate", "ood_detection_rate",
        "n_truth_out_of_domain", "truth_accuracy")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))

    def cell(m: dict) -> str:
        return f"{m['value']:.3f} [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]"

    print(f"served: {served_name} (refit differs by {served_check:.2e}); chosen on validation: {chosen}")
    print("method | val AUROC | synth test-split AUROC | synth fresh AUROC | real AUROC | false alarms (test) | real detected")
    for name, r in results.items():
        print(" | ".join([name, cell(r["validation"]["auroc"]), cell(r["synth_test_split"]["auroc"]),
                          cell(r["synth_fresh_batch"]["auroc"]), cell(r["real_non_radiographs"]["auroc"]),
                          cell(r["real_non_radiographs"]["false_alarm_rate"]),
                          cell(r["real_non_radiographs"]["detection_rate"])]))
    e = report["evaluation_report"]
    print(f"evaluation report: {e['ood_method']} AUROC {e['ood_auroc']:.3f} [{e['ood_auroc_ci_low']:.3f}, "
          f"{e['ood_auroc_ci_high']:.3f}] on {e['n_truth_out_of_domain']} out-of-domain test images")
    c = report["cost"]
    print(f"cost: {1000 * c['seconds_per_image']['served']:.1f} ms/image served vs "
          f"{1000 * c['seconds_per_image']['region_pass_features']:.1f} without views (x{c['ratio']:.2f})")
    print(f"decode failures: { {k: len(v) for k, v in failures.items()} }; wrote {args.out}")


if __name__ == "__main__":
    main()

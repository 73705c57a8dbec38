"""Langer et al. 2024's recipe end to end on an ingested dataset: pretrain SimCLR, BYOL and SupCon
backbones, fit a linear region head (plus the Baltruschat et al. 2018 orientation head when angles are
known) on each frozen backbone, and evaluate each member and their softmax-average ensemble.

    XRAYOPS_PROGRESS=0 .venv/bin/python benchmarks/ensemble_recipe.py --data-dir D --truth truth.csv \
        --epochs 200 --out outputs/recipe

Writes OUT/<method>/{pretrain,bundle,evaluation}, OUT/ensemble/ (report.html, metrics.json) and
OUT/recipe_summary.json with the headline numbers of every member and the ensemble.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from xrayops.data.dataset import read_truth_angles
from xrayops.data.truth import read_truth
from xrayops.evaluate.report import evaluate_bundle, evaluate_ensemble
from xrayops.train import FinetuneConfig, PretrainConfig, finetune, pretrain

HEADLINE = (
    "accuracy", "truth_accuracy", "truth_balanced_accuracy", "truth_macro_f1", "truth_cohen_kappa", "truth_mcc",
    "truth_ece", "truth_ece_uncalibrated", "ood_auroc", "orientation_mae_deg", "orientation_within_4deg",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--truth", type=Path, help="truth.csv: true regions and angles")
    parser.add_argument("--out", type=Path, default=Path("outputs/recipe"))
    parser.add_argument("--methods", nargs="+", default=["simclr", "byol", "supcon"])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--finetune-epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    truth = read_truth(args.truth) if args.truth else None
    angles = read_truth_angles(args.truth) if args.truth else None
    summary: dict = {"config": {k: str(v) for k, v in vars(args).items()}, "members": {}}
    bundles = []
    for method in args.methods:
        started = time.perf_counter()
        cfg = PretrainConfig(method=method, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        result = pretrain(args.data_dir, args.out / method / "pretrain", cfg, progress=False)
        bundle = finetune(args.data_dir, result.backbone_path, args.out / method / "bundle",
                          FinetuneConfig(epochs=args.finetune_epochs, seed=args.seed), angles=angles)
        evaluation = evaluate_bundle(bundle, args.data_dir, args.out / method / "evaluation", "test", truth, angles)
        bundles.append(bundle)
        summary["members"][method] = {
            "pretrain_seconds": round(result.seconds, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
            "first_loss": result.losses[0],
            "last_loss": result.losses[-1],
            **{k: evaluation.metrics[k] for k in HEADLINE if k in evaluation.metrics},
        }
        print(json.dumps({method: summary["members"][method]}), flush=True)
    if len(bundles) > 1:
        ensemble = evaluate_ensemble(bundles, args.data_dir, args.out / "ensemble", "test", truth, angles)
        summary["ensemble"] = {k: ensemble.metrics[k] for k in HEADLINE if k in ensemble.metrics}
        print(json.dumps({"ensemble": summary["ensemble"]}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recipe_summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

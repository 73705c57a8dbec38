"""Label-noise detection: how well the confident-learning audit finds wrong PACS tags, and
what cleanlab costs at scale.

Part 1 (detection), the real path end to end:
  synth (--mislabel-rate, no out-of-domain images so "wrong tag" is unambiguous)
  -> ingest -> SimCLR pretrain -> out-of-fold linear heads on frozen embeddings -> cleanlab
  -> precision / recall of the flagged images (the audit's default rule: out-of-fold
  probability of the tag < 0.1) against synth's truth.csv, and of cleanlab's
  confident-learning filter beside it. Also: the best recall reachable at precision >= 0.8
  by cutting the label-quality ranking (the worklist order) where the truth says is best
  (an upper bound, not an operating point), and the out-of-fold accuracy of the heads.
Part 2 (cost): cleanlab find_label_issues + label-quality scores + health score over
  --timing-n random-but-structured probabilities (14 classes, 5 % flipped labels), as a ratio
  against the baseline "argmax disagrees with the label" (cleanlab's find_predicted_neq_given)
  on the same arrays.

Writes benchmarks/results/label_noise.json. Usage:
  .venv/bin/python benchmarks/bench_label_noise.py --n 700 --epochs 4
or, auditing an ingested synth set with backbones pretrained elsewhere (repeat --backbone
for an ensemble):
  .venv/bin/python benchmarks/bench_label_noise.py --backbone B.pt --data-dir D --truth truth.csv
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

from xrayops.contracts import PreprocessingSpec
from xrayops.data.synth import synthesize
from xrayops.ingest import ingest
from xrayops.monitor.label_audit import AuditConfig, audit_labels, flagged_vs_truth, score_labels
from xrayops.train.pretrain import PretrainConfig, pretrain


def best_recall_at_precision(scores: pd.DataFrame, wrong: np.ndarray, min_precision: float,
                             column: str = "label_quality") -> dict:
    """Walk the ranking by `column` (most doubtful first): the largest recall whose precision
    is still >= min_precision, and where that cut falls."""
    order = np.argsort(scores[column].to_numpy(), kind="stable")
    hits = np.cumsum(wrong[order])
    k = np.arange(1, len(order) + 1)
    precision, recall = hits / k, hits / max(int(wrong.sum()), 1)
    ok = precision >= min_precision
    if not ok.any():
        return {"min_precision": min_precision, "recall": 0.0, "flagged": 0}
    best = int(np.argmax(np.where(ok, recall, -1)))
    return {"min_precision": min_precision, "recall": round(float(recall[best]), 4),
            "precision": round(float(precision[best]), 4), "flagged": best + 1}


def detection(args, work: Path) -> dict:
    t0 = time.perf_counter()
    if args.backbone:  # an existing ingested synth set and a backbone pretrained on it
        data_dir, backbone, truth_path, pretrain_epochs = args.data_dir, args.backbone, args.truth, "given"
        n_images = len(pd.read_csv(truth_path))
        t_data = t_pretrain = time.perf_counter()
    else:
        synth = synthesize(work / "synth", n=args.n, seed=args.seed, size=args.synth_size,
                           mislabel_rate=args.mislabel_rate, ood_rate=0.0)
        ingest(synth.dicom_dir, work / "data", PreprocessingSpec(size=args.image_size), "bench-key", workers=args.workers)
        t_data = time.perf_counter()
        result = pretrain(work / "data", work / "pretrain",
                          PretrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed),
                          progress=False)
        t_pretrain = time.perf_counter()
        data_dir, backbone, truth_path, pretrain_epochs = work / "data", result.backbone_path, synth.truth_path, args.epochs
        n_images = args.n
    cfg = AuditConfig(n_folds=args.folds, flag_below=args.flag_below or None, pool_studies=not args.no_pool_studies)
    audit = audit_labels(data_dir, backbone, work / "audit", cfg)
    t_audit = time.perf_counter()
    scores = pd.read_parquet(audit.scores_path)
    truth = pd.read_csv(truth_path)
    measured = flagged_vs_truth(scores, truth)
    joined = scores.join(truth.set_index("file")[["true_region"]], on="source_name")
    wrong = (joined["true_region"].astype(str) != joined["given_region"].astype(str)).to_numpy()
    return {
        "images": n_images, "audited": audit.n_images, "pretrain_epochs": pretrain_epochs,
        "oof_accuracy_vs_given": round(audit.oof_accuracy, 4),
        "oof_accuracy_vs_truth": round(float((joined["suggested_region"] == joined["true_region"]).mean()), 4),
        "label_health_score": round(audit.label_health_score, 4),
        "backbones": [str(b) for b in audit.backbones], "stages": audit.config.stages,
        "flag_below": audit.config.flag_below,
        "flags": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in measured.items()},
        "cleanlab_filter_flags": {k: (round(v, 4) if isinstance(v, float) else v)
                                  for k, v in flagged_vs_truth(scores, truth, "cleanlab_issue").items()},
        "pool_studies": audit.config.pool_studies,
        "ranking_at_precision_0.8": best_recall_at_precision(scores, wrong, 0.8),
        # the same heads judging every image alone (the per-image rule), for comparison
        "image_flags": None if audit.config.flag_below is None else {
            k: (round(v, 4) if isinstance(v, float) else v) for k, v in flagged_vs_truth(
                scores.assign(image_issue=scores["image_quality"] < audit.config.flag_below), truth,
                "image_issue").items()},
        "image_ranking_at_precision_0.8": best_recall_at_precision(scores, wrong, 0.8, "image_quality"),
        "seconds": {"synth_ingest": round(t_data - t0, 1), "pretrain": round(t_pretrain - t_data, 1),
                    "audit": round(t_audit - t_pretrain, 1)},
    }


def structured_probabilities(n: int, k: int, flip: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels with `flip` of them wrong, and probabilities peaked on the true class with
    confusions between neighbouring classes (as spine levels are confused)."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), true] += rng.uniform(1.5, 5.0, n)
    logits[np.arange(n), (true + 1) % k] += rng.uniform(0.0, 2.5, n)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = true.copy()
    flipped = rng.random(n) < flip
    labels[flipped] = (true[flipped] + rng.integers(1, k, flipped.sum())) % k
    return labels, probs


def cost(args) -> dict:
    from cleanlab.filter import find_predicted_neq_given

    labels, probs = structured_probabilities(args.timing_n, 14, 0.05, args.seed)
    t0 = time.perf_counter()
    find_predicted_neq_given(labels, probs)
    baseline_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = score_labels(labels, probs)
    cleanlab_s = time.perf_counter() - t0
    return {
        "samples": args.timing_n, "classes": 14,
        "baseline_argmax_disagreement_s": round(baseline_s, 4),
        "cleanlab_audit_s": round(cleanlab_s, 3),
        "cleanlab_over_baseline": round(cleanlab_s / max(baseline_s, 1e-9), 1),
        "flagged": int(scores.is_issue.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=700)
    parser.add_argument("--mislabel-rate", type=float, default=0.05)
    parser.add_argument("--synth-size", type=int, default=160)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing-n", type=int, default=50_000)
    parser.add_argument("--skip-detection", action="store_true")
    parser.add_argument("--backbone", type=Path, action="append",
                        help="audit with this backbone.pt (skips synth, ingest, pretrain); repeat for an ensemble")
    parser.add_argument("--flag-below", type=float, default=0.1,
                        help="flag when the tag's out-of-fold probability is below this (0: cleanlab's filter)")
    parser.add_argument("--no-pool-studies", action="store_true",
                        help="judge every image alone, not a study's images with the same tag together")
    parser.add_argument("--data-dir", type=Path, help="with --backbone: the ingested synth data")
    parser.add_argument("--truth", type=Path, help="with --backbone: that synth set's truth.csv")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "label_noise.json")
    args = parser.parse_args()
    if args.backbone and not (args.data_dir and args.truth):
        parser.error("--backbone needs --data-dir and --truth")

    result = {
        "command": "python benchmarks/bench_label_noise.py " + " ".join(
            f"--{k.replace('_', '-')} {item}" for k, v in vars(args).items() if k not in ("out", "skip_detection",
            "no_pool_studies") and v is not None for item in (v if isinstance(v, list) else [v]))
            + (" --no-pool-studies" if args.no_pool_studies else ""),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
    }
    try:
        import torch

        result["accelerator"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except Exception:  # a benchmark reports what it can
        result["accelerator"] = "unknown"
    if not args.skip_detection:
        with tempfile.TemporaryDirectory() as tmp:
            result["detection"] = detection(args, Path(tmp))
    result["cost"] = cost(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

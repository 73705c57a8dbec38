"""Few labels (Langer et al. 2024, Fig. 2): a linear head on the frozen SSL backbone vs a ResNet18
trained from scratch, each with the same share of labelled training images.

Two more columns beside Langer et al. 2024's pair: the audit's probe (logistic regression on the pooled
ResNet stages 2-4 of the same frozen backbone, `xrayops.monitor.label_audit`), and the SSL
backbone fine-tuned end to end exactly as the from-scratch network is trained (same steps,
augmentation, optimiser), which isolates what the pretrained initialisation is worth.

Langer et al. 2024: at 1 % of the labels (310 images) SimCLR + linear head reaches 92.2 %, the supervised
ResNet18 from scratch 57.1 %. Here the same comparison runs on an ingested dataset and an
existing backbone.pt; accuracy is scored on the test split against the true regions when a
truth.csv is given (else against the PACS tags).

    XRAYOPS_PROGRESS=0 .venv/bin/python benchmarks/few_label.py --data-dir D --backbone B.pt \
        --truth truth.csv --out benchmarks/results/few_label

`--subset-seeds K` refits the frozen heads (seconds each) on K labelled subsets per fraction
and reports mean and sd (`--spread-scratch`: the from-scratch network too, minutes each);
`--scratch-from` takes the from-scratch column from an earlier run on the same data, since it
does not depend on the backbone (for comparing backbones).

Labelled subsets: a fraction f of the labelled train images, at least one per class present
(at f = 1 % of a small dataset that floor dominates; the table gives the image counts). The
validation split is subsampled at the same fraction for model selection, so no method sees
more labels than its fraction. Both methods train with the same number of optimiser steps
at every fraction, so small fractions are not just under-trained.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch.nn import functional as F

from xrayops.data.augment import LINEAR_AUG, make_linear_transform
from xrayops.data.dataset import ImageDataset, to_unit_float
from xrayops.data.truth import read_truth
from xrayops.models.backbone import build_backbone, load_backbone
from xrayops.models.heads import RegionClassifier, linear_head
from xrayops.monitor.label_audit import AuditConfig, embed_stored_images
from xrayops.regions import REGION_INDEX, REGIONS
from xrayops.train.finetune import FinetuneConfig, embed_images, train_linear_head
from xrayops.train.runtime import configure_threads, resolve_device, seed_everything, step_generator


def labelled_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of a random `fraction` of the images, at least one per class present."""
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    n = max(int(round(fraction * len(y))), 1)
    first = [int(rng.choice(np.flatnonzero(y == c))) for c in np.unique(y)]
    rest = rng.permutation(np.setdiff1d(np.arange(len(y)), first))
    return torch.as_tensor(np.sort(np.concatenate([first, rest[: max(n - len(first), 0)]])).astype(np.int64))


def scored_labels(test: ImageDataset, truth: dict[str, str] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of scored test images, their labels): the true region if known, else the tag."""
    if truth:
        regions = [truth.get(name, "") for name in test.rows["source_name"].astype(str)]
        labels = torch.tensor([REGION_INDEX.get(r, -1) for r in regions])
    else:
        labels = test.labels
    keep = torch.nonzero(labels >= 0).squeeze(1)
    return keep, labels[keep]


def linear_probe(train_x, train_y, val_x, val_y, test_x, steps: int, seed: int) -> torch.Tensor:
    """Langer et al. 2024's linear evaluation (Adam 5e-2, cosine, no weight decay) on standardised
    frozen embeddings; returns test predictions."""
    mean, std = train_x.mean(0), train_x.std(0, correction=0).clamp_min(1e-6)
    batch = min(64, len(train_x))
    epochs = max(1, round(steps / -(-len(train_x) // batch)))
    cfg = FinetuneConfig(epochs=epochs, batch_size=batch, seed=seed)
    torch.manual_seed(seed)  # the head's initial weights: else they follow whatever ran before
    head, _, _ = train_linear_head(
        (train_x - mean) / std, train_y, (val_x - mean) / std, val_y, linear_head(train_x.shape[1], len(REGIONS)), cfg
    )
    with torch.no_grad():
        return head((test_x - mean) / std).argmax(1)


def stage_probe(train_x: np.ndarray, train_y, test_x: np.ndarray, seed: int) -> torch.Tensor:
    """The label audit's head: standardised multinomial logistic regression (its default C) on
    pooled ResNet stages 2-4; returns test predictions over REGIONS."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cfg = AuditConfig()
    model = make_pipeline(StandardScaler(), LogisticRegression(C=cfg.C, max_iter=cfg.max_iter, random_state=seed))
    model.fit(train_x, np.asarray(train_y))
    return torch.as_tensor(model.predict(test_x))


def train_end_to_end(
    train: ImageDataset, index: torch.Tensor, val_images, val_y, test_images, steps: int, seed: int, device,
    init: Path | None = None,
) -> torch.Tensor:
    """A ResNet18 trained end to end with cross-entropy on the labelled subset, from random weights
    or (with `init`) from a pretrained backbone.pt; Langer et al. 2024's linear-head augmentations (Table 1)
    turned over the full circle (our images come at any angle); Adam 3e-4 cosine; the step with
    the best validation accuracy (checked every tenth of training) is kept. Returns test predictions."""
    torch.manual_seed(seed)
    backbone, dim = build_backbone() if init is None else load_backbone(init)[:2]
    model = RegionClassifier(backbone, dim, n_classes=len(REGIONS)).to(device)
    augment = make_linear_transform(train.size, LINEAR_AUG.model_copy(update={"full_rotation": True}))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    images, labels = train.images[index], train.labels[index]
    generator = torch.Generator().manual_seed(seed)
    batch = min(32, len(index))

    def predict(stack) -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            out = torch.cat([model(to_unit_float(stack[i : i + 256]).unsqueeze(1).to(device)).argmax(1).cpu()
                             for i in range(0, len(stack), 256)])
        model.train()
        return out

    best, best_state = -1.0, None
    check_every = max(steps // 10, 1)
    model.train()
    for step in range(steps):
        pick = torch.randint(len(index), (batch,), generator=generator)
        x = augment(to_unit_float(images[pick]).unsqueeze(1).to(device), step_generator(device, seed, step))
        loss = F.cross_entropy(model(x), labels[pick].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % check_every == 0:
            accuracy = float((predict(val_images) == val_y).float().mean())
            if accuracy > best:
                best, best_state = accuracy, {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return predict(test_images)


def read_scratch(path: Path) -> dict[float, dict]:
    with open(path, newline="") as handle:
        return {round(float(r["fraction"]), 6): r for r in csv.DictReader(handle)}


def reused_scratch(earlier: dict[float, dict], fraction: float, n_labelled: int, path: Path) -> float:
    """The earlier run's from-scratch accuracy at `fraction`; refuses a run on another subset."""
    row = earlier.get(round(fraction, 6))
    if row is None or int(row["labelled_train_images"]) != n_labelled:
        raise SystemExit(f"{path} has no from-scratch figure for {fraction:.0%} with {n_labelled} labelled images: "
                         "it was run on other data, fractions or seed")
    return float(row["supervised_scratch_accuracy"])


def subset_spread(k: int, seed: int, fraction: float, first: dict, heads, scratch=None) -> dict:
    """Mean and sample sd of the heads' accuracies over `k` labelled subsets (seeds seed..seed+k-1).

    `first` holds the seed's own accuracies (already measured); `heads(s)` gives the frozen heads'
    accuracies on subset s, `scratch(s)` (optional, minutes each) the from-scratch network's.
    At 1 % the subset drawn moves a head's accuracy by points, more than some gaps in the table."""
    if k < 2 or fraction >= 1.0:
        return {}
    runs = [first]
    for s in range(seed + 1, seed + k):
        run = heads(s)
        if scratch is not None:
            run["supervised_scratch"] = scratch(s)
        runs.append(run)
    out: dict = {"subset_seeds": k}
    for name in runs[0]:
        values = [r[name] for r in runs if name in r]
        if len(values) == k:
            out[f"{name}_mean"] = round(float(np.mean(values)), 4)
            out[f"{name}_sd"] = round(float(np.std(values, ddof=1)), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--backbone", type=Path, required=True, help="backbone.pt from pretraining")
    parser.add_argument("--truth", type=Path, help="truth.csv: score against the true regions")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/few_label"))
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--linear-steps", type=int, default=1500)
    parser.add_argument("--supervised-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-ssl-finetune", action="store_true", help="leave out the SSL-initialised fine-tune")
    parser.add_argument("--scratch-from", type=Path,
                        help="few_label.csv of an earlier run on the same data, fractions, seed and steps: take the "
                             "from-scratch column from it (it does not depend on the backbone) instead of retraining")
    parser.add_argument("--subset-seeds", type=int, default=1,
                        help="also fit the frozen heads on this many labelled subsets per fraction below 100 %% "
                             "(seeds seed..seed+K-1) and report their mean and sd; the heads take seconds")
    parser.add_argument("--spread-scratch", action="store_true",
                        help="with --subset-seeds: train the from-scratch network on every subset too (minutes each)")
    args = parser.parse_args()
    earlier = read_scratch(args.scratch_from) if args.scratch_from else None

    device = resolve_device(args.device)
    configure_threads()
    seed_everything(args.seed)
    train = ImageDataset(args.data_dir, "train", labelled_only=True)
    val = ImageDataset(args.data_dir, "val", labelled_only=True)
    test = ImageDataset(args.data_dir, "test")
    truth = read_truth(args.truth) if args.truth else None
    test_index, test_y = scored_labels(test, truth)
    test_images = test.images[test_index]

    backbone, dim, info = load_backbone(args.backbone, device)
    frozen = RegionClassifier(backbone, dim, len(REGIONS), rotation_average=True).to(device)
    started = time.perf_counter()
    train_x, val_x = embed_images(frozen, train.images, device), embed_images(frozen, val.images, device)
    test_x = embed_images(frozen, test_images, device)
    stages = AuditConfig().stages
    train_s, test_s = (embed_stored_images(im.numpy(), args.backbone, True, str(device), stages)
                       for im in (train.images, test_images))

    def accuracy(pred: torch.Tensor) -> float:
        return round(float((pred == test_y).float().mean()), 4)

    def subsets(fraction: float, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        return labelled_subset(train.labels, fraction, s), labelled_subset(val.labels, fraction, s + 1)

    def heads(fraction: float, s: int) -> dict:
        index, val_index = subsets(fraction, s)
        linear = linear_probe(train_x[index], train.labels[index], val_x[val_index], val.labels[val_index], test_x,
                              args.linear_steps, s)
        probe = stage_probe(train_s[index.numpy()], train.labels[index].numpy(), test_s, s)
        return {"ssl_linear": accuracy(linear), "stage_probe": accuracy(probe)}

    def scratch_on(fraction: float, s: int) -> float:
        index, val_index = subsets(fraction, s)
        return accuracy(train_end_to_end(train, index, val.images[val_index], val.labels[val_index], test_images,
                                         args.supervised_steps, s, device))

    rows = []
    for fraction in args.fractions:
        index, val_index = subsets(fraction, args.seed)
        t0 = time.perf_counter()
        ssl_pred = linear_probe(train_x[index], train.labels[index], val_x[val_index], val.labels[val_index],
                                test_x, args.linear_steps, args.seed)
        t1 = time.perf_counter()
        if earlier is None:
            sup_pred = train_end_to_end(train, index, val.images[val_index], val.labels[val_index], test_images,
                                        args.supervised_steps, args.seed, device)
            scratch = accuracy(sup_pred)
        else:
            scratch = reused_scratch(earlier, fraction, len(index), args.scratch_from)
        t2 = time.perf_counter()
        probe_pred = stage_probe(train_s[index.numpy()], train.labels[index].numpy(), test_s, args.seed)
        t3 = time.perf_counter()
        tuned_pred = None if args.skip_ssl_finetune else train_end_to_end(
            train, index, val.images[val_index], val.labels[val_index], test_images, args.supervised_steps,
            args.seed, device, init=args.backbone)
        t4 = time.perf_counter()
        rows.append({
            "fraction": fraction,
            "labelled_train_images": len(index),
            "ssl_linear_accuracy": accuracy(ssl_pred),
            "supervised_scratch_accuracy": scratch,
            "ssl_stage_probe_accuracy": accuracy(probe_pred),
            "ssl_finetune_accuracy": None if tuned_pred is None else accuracy(tuned_pred),
            "ssl_seconds": round(t1 - t0, 1),
            "supervised_seconds": round(t2 - t1, 1),
            "stage_probe_seconds": round(t3 - t2, 1),
            "ssl_finetune_seconds": round(t4 - t3, 1),
        })
        rows[-1].update(subset_spread(
            args.subset_seeds, args.seed, fraction,
            {"ssl_linear": rows[-1]["ssl_linear_accuracy"], "stage_probe": rows[-1]["ssl_stage_probe_accuracy"],
             **({"supervised_scratch": scratch} if args.spread_scratch else {})},
            lambda s: heads(fraction, s), (lambda s: scratch_on(fraction, s)) if args.spread_scratch else None))
        print(json.dumps(rows[-1]), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "few_label.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    scored = "true regions" if truth else "PACS tags"
    chance = max(float((test_y == c).float().mean()) for c in test_y.unique())
    lines = [
        f"Backbone: {args.backbone} ({info['arch']}, {info['ssl_method']}); test images scored: {len(test_y)} "
        f"(vs {scored}); majority-class chance {chance:.3f}; {time.perf_counter() - started:.0f} s in all.",
        "",
        "| labels | labelled train images | SSL + linear head | SSL + audit probe (stages 2-4) "
        "| SSL fine-tuned end to end | supervised from scratch |",
        "|---|---|---|---|---|---|",
        *(f"| {r['fraction']:.0%} | {r['labelled_train_images']} | {r['ssl_linear_accuracy']:.3f} | "
          f"{r['ssl_stage_probe_accuracy']:.3f} | "
          f"{'-' if r['ssl_finetune_accuracy'] is None else format(r['ssl_finetune_accuracy'], '.3f')} | "
          f"{r['supervised_scratch_accuracy']:.3f} |" for r in rows),
    ]
    spread = [r for r in rows if "subset_seeds" in r]
    if spread:
        names = [n for n in ("ssl_linear", "stage_probe", "supervised_scratch") if f"{n}_mean" in spread[0]]
        lines += ["", f"Over {spread[0]['subset_seeds']} labelled subsets (mean ± sd):", "",
                  "| labels | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
                  *("| " + f"{r['fraction']:.0%} | " + " | ".join(
                      f"{r[n + '_mean']:.3f} ± {r[n + '_sd']:.3f}" for n in names) + " |" for r in spread)]
    if earlier is not None:
        lines += ["", f"From-scratch column taken from {args.scratch_from} (same data, subsets and steps)."]
    (args.out / "few_label.md").write_text("\n".join(lines) + "\n")
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    x = [r["fraction"] * 100 for r in rows]
    ax.plot(x, [r["ssl_linear_accuracy"] for r in rows], "o-", label=f"{info['ssl_method']} + linear head (frozen)")
    ax.plot(x, [r["ssl_stage_probe_accuracy"] for r in rows], "^-", label="audit probe, stages 2-4 (frozen)")
    if rows[0]["ssl_finetune_accuracy"] is not None:
        ax.plot(x, [r["ssl_finetune_accuracy"] for r in rows], "d-", label=f"{info['ssl_method']} init, fine-tuned")
    ax.plot(x, [r["supervised_scratch_accuracy"] for r in rows], "s--", label="ResNet18 from scratch")
    ax.axhline(chance, color="grey", lw=0.8, label="majority class")
    ax.set_xscale("log")
    ax.set_xlabel("labelled training images (%)")
    ax.set_ylabel(f"test accuracy (vs {scored})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "few_label.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

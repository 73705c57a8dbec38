"""Evaluate a model bundle on one split of an ingested dataset: metrics.json,
confusion_matrix.png and a self-contained report.html.

Accuracy is measured against the PACS tags (noisy, what a hospital has) and, when a truth
table is given (the synthetic sidecar), against the true regions too; the gap between the
two is the label noise the model sees through (paper 000, label audit).
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # pyplot-free: renders with Agg, never opens a display
from pydantic import BaseModel

from xrayops.bundle import load_bundle
from xrayops.data.dataset import DatasetError, load_images, read_ok_rows, read_preprocessing
from xrayops.evaluate.metrics import classification_metrics
from xrayops.inference import predict_arrays

SCALAR_KEYS = (
    "n", "accuracy", "balanced_accuracy", "macro_f1", "cohen_kappa", "mcc", "ece", "nll",
    "chance_uniform", "chance_majority",
)


class EvaluationResult(BaseModel):
    """`metrics` holds flat scalars at the top (vs the PACS tags unprefixed, vs truth as
    `truth_*`, for lineage and MLflow) and the full tables under `vs_pacs` / `vs_truth`."""

    split: str
    metrics: dict
    metrics_path: Path
    confusion_png: Path
    truth_confusion_png: Path | None = None
    html_path: Path


def plot_confusion(cm: list[list[int]], classes: list[str], title: str, path: Path, ylabel: str = "label") -> Path:
    """Draw the rows/columns of classes that occur, with counts; rows = truth."""
    cm_a = np.asarray(cm)
    keep = np.flatnonzero(cm_a.sum(0) + cm_a.sum(1))
    cm_a = cm_a[np.ix_(keep, keep)]
    names = [classes[i] for i in keep]
    side = max(4.0, 0.55 * len(names) + 2.5)
    fig = Figure(figsize=(side, side * 0.9))
    ax = fig.subplots()
    ax.imshow(cm_a, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    for (i, j), count in np.ndenumerate(cm_a):
        if count:
            colour = "white" if count > cm_a.max() / 2 else "black"
            ax.text(j, i, str(count), ha="center", va="center", color=colour)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def evaluate_predictions(rows, responses, classes: list[str], truth: dict[str, str] | None) -> dict:
    """Metrics of predictions against the PACS tags and, optionally, the true regions."""
    predicted = np.array([r.region for r in responses])
    probs = np.array([[r.probabilities[c] for c in classes] for r in responses])
    ood = np.array([bool(r.ood) for r in responses])
    flagged = np.array([r.label_disagreement for r in responses])
    pacs = rows["region"].to_numpy().astype(str)
    labelled = np.isin(pacs, classes)
    metrics: dict = {
        "n_images": int(len(rows)),
        "n_pacs_labelled": int(labelled.sum()),
        "ood_rate": float(ood.mean()),
        "label_disagreement_rate": float(flagged.mean()),
    }
    if labelled.any():
        metrics["vs_pacs"] = classification_metrics(pacs[labelled], predicted[labelled], classes, probs[labelled])
        metrics.update(scalar_metrics(metrics["vs_pacs"]))
    if truth:
        true = np.array([truth.get(name, "") for name in rows["source_name"].astype(str)])
        known = true != ""
        in_domain = known & np.isin(true, classes)
        out_of_domain = known & ~in_domain
        metrics["n_truth_known"] = int(known.sum())
        if in_domain.any():
            scores = classification_metrics(true[in_domain], predicted[in_domain], classes, probs[in_domain])
            metrics["vs_truth"] = scores
            metrics.update(scalar_metrics(metrics["vs_truth"], "truth_"))
            metrics["ood_false_alarm_rate"] = float(ood[in_domain].mean())
        if out_of_domain.any():
            metrics["n_truth_out_of_domain"] = int(out_of_domain.sum())
            metrics["ood_detection_rate"] = float(ood[out_of_domain].mean())
        both = in_domain & labelled
        if both.any():
            wrong_tag = pacs[both] != true[both]
            metrics["pacs_label_error_rate"] = float(wrong_tag.mean())
            if flagged[both].any():  # of the images flagged as mislabelled, how many really were
                metrics["label_disagreement_precision"] = float(wrong_tag[flagged[both]].mean())
            if wrong_tag.any():
                metrics["label_disagreement_recall"] = float(flagged[both][wrong_tag].mean())
    return metrics


def scalar_metrics(scores: dict, prefix: str = "") -> dict[str, float]:
    """The headline numbers of one classification_metrics dict, flat and prefixed.

    chance_accuracy is the better trivial baseline: always answering the commonest class.
    """
    flat = {f"{prefix}{k}": scores[k] for k in SCALAR_KEYS if k in scores}
    flat[f"{prefix}chance_accuracy"] = max(scores["chance_uniform"], scores["chance_majority"])
    return flat


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def render_report(metrics: dict, meta_name: str, split: str, images: list[Path]) -> str:
    """A self-contained HTML page: summary, per-class table, embedded confusion matrices."""
    sources = [k for k in ("vs_pacs", "vs_truth") if k in metrics]
    titles = {"vs_pacs": "vs PACS tags", "vs_truth": "vs true regions"}
    summary = _table(
        ["metric", *(titles[s] for s in sources)],
        [[k, *(_fmt(metrics[s].get(k)) for s in sources)] for k in SCALAR_KEYS],
    )
    scored = set(SCALAR_KEYS) | {"chance_accuracy"}
    rest = {k: v for k, v in metrics.items() if not isinstance(v, dict) and k.removeprefix("truth_") not in scored}
    other = _table(["quantity", "value"], [[k, _fmt(v)] for k, v in rest.items()])
    classes = metrics[sources[0]]["classes"] if sources else []
    per_class_rows = []
    for c in classes:
        cells = [(metrics[s]["support"][c], metrics[s]["per_class_accuracy"].get(c)) for s in sources]
        if any(n for n, _ in cells):
            per_class_rows.append([c, *(f"{_fmt(acc)} (n={n})" if n else "" for n, acc in cells)])
    per_class = _table(["class", *(titles[s] for s in sources)], per_class_rows)
    figures = "".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{html.escape(p.stem.replace('_', ' '))}</figcaption></figure>"
        for p in images
    )
    style = (
        "body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:60rem;color:#222}"
        "table{border-collapse:collapse;margin:1rem 0}"
        "td,th{border:1px solid #ccc;padding:.3rem .7rem;text-align:right}"
        "th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}figure{display:inline-block;margin:1rem}"
        "img{max-width:28rem}"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>xrayops evaluation</title>"
        f"<style>{style}</style></head><body>"
        f"<h1>{html.escape(meta_name)}: evaluation on split “{html.escape(split)}”</h1>"
        "<p>Chance levels: uniform guessing (chance_uniform) and always answering the most frequent "
        "class (chance_majority).</p>"
        f"<h2>Summary</h2>{summary}<h2>Detection and labels</h2>{other}"
        f"<h2>Per class (accuracy = recall)</h2>{per_class}<h2>Confusion matrices</h2>{figures}</body></html>"
    )


def evaluate_bundle(
    bundle_dir: Path,
    data_dir: Path,
    out_dir: Path,
    split: str = "test",
    truth: dict[str, str] | None = None,
) -> EvaluationResult:
    """Predict every ok image of `split` and report; `truth` maps source_name -> true region."""
    bundle = load_bundle(bundle_dir)
    spec = read_preprocessing(data_dir)
    if spec != bundle.meta.preprocessing:
        raise DatasetError(
            f"{data_dir} was preprocessed with {spec.model_dump()}, "
            f"but the model expects {bundle.meta.preprocessing.model_dump()}"
        )
    rows = read_ok_rows(data_dir, split)
    if rows.empty:
        raise DatasetError(f"no ok images in split {split!r} of {data_dir}")
    images = load_images(data_dir, rows)
    responses, _ = predict_arrays(bundle, list(images), rows["region"].astype(str).tolist())
    classes = list(bundle.meta.classes)
    metrics = {"split": split, "model": bundle.meta.name, "weights_sha256": bundle.meta.weights_sha256}
    metrics.update(evaluate_predictions(rows, responses, classes, truth))
    scored = [k for k in ("vs_pacs", "vs_truth") if k in metrics]
    if not scored:
        raise DatasetError(f"split {split!r} of {data_dir} has no PACS region labels and no truth: nothing to score")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=2))
    pngs = {}
    figures = {"vs_pacs": ("confusion_matrix.png", "PACS tag"), "vs_truth": ("confusion_matrix_truth.png", "true region")}
    for key, (file_name, against) in figures.items():
        if key in metrics:
            title = f"{split}: predicted vs {against}"
            pngs[key] = plot_confusion(metrics[key]["confusion_matrix"], classes, title, out_dir / file_name, against)
    html_path = out_dir / "report.html"
    html_path.write_text(render_report(metrics, bundle.meta.name, split, list(pngs.values())))
    return EvaluationResult(
        split=split,
        metrics=metrics,
        metrics_path=metrics_path,
        confusion_png=pngs.get("vs_pacs", pngs.get("vs_truth")),
        truth_confusion_png=pngs.get("vs_truth"),
        html_path=html_path,
    )

"""Evaluate a model bundle (or an ensemble of bundles) on one split of an ingested dataset:
metrics.json, confusion_matrix.png, Grad-CAM overlays and a self-contained report.html.

Beside the classification metrics (Langer et al. 2024; kappa and MCC as Acitores 2022; Ghalyan et al. report them):
ECE before and after temperature scaling, out-of-domain AUROC against the truth's `unknown`
images with a percentile-bootstrap 95 % CI (the served `ood_score`: the bundle's relative Mahalanobis,
Mahalanobis or kNN detector, or the energy of older bundles), and orientation MAE / share within +-4 deg
(Baltruschat et al. 2018) where angles are known.

Accuracy is measured against the PACS tags (noisy, what a hospital has) and, when a truth
table is given (the synthetic sidecar), against the true regions too; the gap between the
two is the label noise the model sees through (Langer et al. 2024, label audit).

Every headline metric and each class's recall carries a 95 % interval from a bootstrap over
studies, stratified by class (xrayops.evaluate.intervals), and accuracy is broken down by the
acquisition subgroups the manifest records (xrayops.evaluate.subgroups). metrics.json keeps its
flat keys and validates as xrayops.evaluate.metrics.EvaluationMetrics.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # pyplot-free: renders with Agg, never opens a display
from pydantic import BaseModel

from xrayops.bundle import load_bundle
from xrayops.ensemble import check_members, combine_responses
from xrayops.data.dataset import DatasetError, load_images, read_ok_rows, read_preprocessing
from xrayops.evaluate.intervals import HEADLINE, classification_intervals
from xrayops.evaluate.metrics import (
    EvaluationMetrics,
    auroc_ci,
    binary_metrics_with_ci,
    classification_metrics,
    expected_calibration_error,
    orientation_metrics,
    roc_auc,
)
from xrayops.evaluate.subgroups import subgroup_accuracies, subgroup_attributes
from xrayops.evaluate.study import RULES, aggregate_binary, aggregate_region
from xrayops.evaluate.gradcam_figures import gradcam_figures
from xrayops.inference import predict_arrays

SCALAR_KEYS = (
    "n", "accuracy", "balanced_accuracy", "macro_f1", "cohen_kappa", "mcc", "ece", "ece_uncalibrated", "nll",
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
    gradcam_pngs: list[Path] = []


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


def uncalibrated(probs: np.ndarray, temperature: float | None) -> np.ndarray | None:
    """softmax(logits) from the calibrated softmax(logits / T): softmax(T * log p) is the same."""
    if temperature is None:
        return None
    scaled = temperature * np.log(np.clip(probs, 1e-30, None))
    scaled -= scaled.max(1, keepdims=True)
    e = np.exp(scaled)
    return e / e.sum(1, keepdims=True)


# Bootstrap replicates behind every interval of the report (study-level, stratified by class).
BOOTSTRAP_SAMPLES = 2000


def _scores(y_true, predicted, classes, probs, raw, studies, attributes: dict[str, list[str]]) -> dict:
    """classification_metrics plus study-bootstrap intervals (`intervals`) and the accuracy per
    acquisition subgroup (`subgroups`), all against the same reference labels."""
    scores = classification_metrics(y_true, predicted, classes, probs)
    index = {c: i for i, c in enumerate(classes)}
    t = [index[str(v)] for v in y_true]
    if raw is not None:  # ECE before temperature scaling, beside `ece` after it
        scores["ece_uncalibrated"] = expected_calibration_error(t, raw)
    p = [index[str(v)] for v in predicted]
    scores["intervals"] = classification_intervals(t, p, len(classes), classes, studies,
                                                   samples=BOOTSTRAP_SAMPLES).model_dump(mode="json")
    correct = np.asarray(y_true, dtype=str) == np.asarray(predicted, dtype=str)
    scores["subgroups"] = [g.model_dump(mode="json") for g in subgroup_accuracies(
        correct, studies, np.asarray(y_true, dtype=str), attributes, samples=BOOTSTRAP_SAMPLES)]
    return scores


def _studies(rows) -> np.ndarray:
    """Each row's study (the bootstrap's unit); a manifest without study ids: each image its own."""
    column = "study_id" if "study_id" in rows.columns else "image_id"
    return rows[column].astype(str).to_numpy()


def evaluate_predictions(
    rows,
    responses,
    classes: list[str],
    truth: dict[str, str] | None,
    temperature: float | None = None,
    truth_angles: dict[str, float] | None = None,
) -> dict:
    """Metrics of predictions against the PACS tags and, optionally, the true regions.

    `temperature` (the bundle's) adds ECE before calibration; `truth_angles` (source_name ->
    degrees) adds orientation metrics for responses that carry orientation_deg.
    """
    predicted = np.array([r.region for r in responses])
    probs = np.array([[r.probabilities[c] for c in classes] for r in responses])
    raw = uncalibrated(probs, temperature)
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
    studies = _studies(rows)
    attributes = {name: np.asarray(values) for name, values in subgroup_attributes(rows).items()}

    def score_against(reference, mask):
        return _scores(reference[mask], predicted[mask], classes, probs[mask], None if raw is None else raw[mask],
                       studies[mask], {name: values[mask].tolist() for name, values in attributes.items()})

    if labelled.any():
        metrics["vs_pacs"] = score_against(pacs, labelled)
        metrics.update(scalar_metrics(metrics["vs_pacs"]))
    if truth:
        true = np.array([truth.get(name, "") for name in rows["source_name"].astype(str)])
        known = true != ""
        in_domain = known & np.isin(true, classes)
        out_of_domain = known & ~in_domain
        metrics["n_truth_known"] = int(known.sum())
        if in_domain.any():
            metrics["vs_truth"] = score_against(true, in_domain)
            metrics.update(scalar_metrics(metrics["vs_truth"], "truth_"))
            metrics["ood_false_alarm_rate"] = float(ood[in_domain].mean())
        if out_of_domain.any():
            metrics["n_truth_out_of_domain"] = int(out_of_domain.sum())
            metrics["ood_detection_rate"] = float(ood[out_of_domain].mean())
            scored = np.array([r.ood_score is not None for r in responses])
            if in_domain.any() and scored.all():  # how well the served score separates the two
                score = np.array([r.ood_score for r in responses])
                y, s = out_of_domain[known], score[known]
                metrics["ood_auroc"] = roc_auc(y, s)
                # Few out-of-domain images in a test split: the interval says how little that pins down.
                metrics["ood_auroc_ci_low"], metrics["ood_auroc_ci_high"] = auroc_ci(y, s, n_boot=1000)
        both = in_domain & labelled
        if both.any():
            wrong_tag = pacs[both] != true[both]
            metrics["pacs_label_error_rate"] = float(wrong_tag.mean())
            if flagged[both].any():  # of the images flagged as mislabelled, how many really were
                metrics["label_disagreement_precision"] = float(wrong_tag[flagged[both]].mean())
            if wrong_tag.any():
                metrics["label_disagreement_recall"] = float(flagged[both][wrong_tag].mean())
    if "study_id" in rows.columns:  # de Cid Rodríguez 2021: one answer per study (majority of its images)
        if labelled.any():
            metrics.update(study_accuracy(rows["study_id"].to_numpy()[labelled], probs[labelled], classes, pacs[labelled]))
        if truth and in_domain.any():
            metrics.update(study_accuracy(rows["study_id"].to_numpy()[in_domain], probs[in_domain], classes,
                                          true[in_domain], "truth_"))
    if truth_angles:
        names = rows["source_name"].astype(str).to_numpy()
        true_angle = np.array([truth_angles.get(name, np.nan) for name in names], dtype=float)
        estimate = np.array([np.nan if r.orientation_deg is None else r.orientation_deg for r in responses], dtype=float)
        usable = np.isfinite(true_angle) & np.isfinite(estimate)
        if truth:  # anatomy only: an out-of-domain object has no "upright"
            usable &= np.isin(np.array([truth.get(name, "") for name in names]), classes)
        if usable.any():
            metrics.update(orientation_metrics(estimate[usable], true_angle[usable]))
    return metrics


def study_accuracy(study_ids, probs: np.ndarray, classes: list[str], reference, prefix: str = "") -> dict:
    """Study-level region accuracy: the study's prediction is the argmax of its images' mean
    probabilities, its reference the commonest reference label of its images."""
    predicted = aggregate_region(study_ids, probs, classes).set_index("study_id")["region"]
    expected = pd.Series(np.asarray(reference, dtype=str)).groupby(np.asarray(study_ids, dtype=str)).agg(
        lambda labels: labels.value_counts().index[0]
    )
    return {f"{prefix}n_studies": int(len(predicted)),
            f"{prefix}study_accuracy": float((predicted.sort_index() == expected.sort_index()).mean())}


def binary_head_metrics(rows, probabilities: dict[str, np.ndarray], n_boot: int = 1000) -> dict:
    """For each binary head whose manifest column has labels here: AUC, sensitivity and
    specificity with bootstrap 95 % CIs (Acitores 2022) per image and per study, by the "at least
    one" and majority rules (de Cid Rodríguez 2021)."""
    out: dict = {}
    for name, p in probabilities.items():
        if name not in rows.columns:
            continue
        y = rows[name].astype(float).to_numpy()
        known = np.isfinite(y)
        if not known.any():
            continue
        entry = {"image": binary_metrics_with_ci(y[known], p[known], n_boot=n_boot)}
        for rule in RULES:
            studies = aggregate_binary(rows["study_id"].astype(str).to_numpy()[known], p[known], y[known], rule)
            entry[f"study_{rule}"] = {
                "n_studies": int(len(studies)),
                **binary_metrics_with_ci(studies["label"].to_numpy(), studies["score"].to_numpy(), n_boot=n_boot),
            }
        out[name] = entry
    return out


def finding_probabilities(responses) -> dict[str, np.ndarray]:
    """P(positive) per binary head, one value per image, from the responses' `findings`
    (`predict_arrays` scores every head the bundle has)."""
    names = sorted({name for r in responses for name in r.findings})
    return {name: np.array([r.findings[name] for r in responses], dtype=np.float32) for name in names}


def binary_section(rows, probabilities: dict[str, np.ndarray]) -> dict:
    """{"binary": per-head tables, plus flat `<head>_auc/sensitivity/specificity`} (empty if none)."""
    binary = binary_head_metrics(rows, probabilities)
    if not binary:
        return {}
    out: dict = {"binary": binary}
    for name, levels in binary.items():  # flat headline numbers for lineage and MLflow
        out.update({f"{name}_{k}": levels["image"][k] for k in ("auc", "sensitivity", "specificity")})
    return out


def scalar_metrics(scores: dict, prefix: str = "") -> dict[str, float]:
    """The headline numbers of one classification_metrics dict, flat and prefixed.

    chance_accuracy is the better trivial baseline: always answering the commonest class.
    """
    flat = {f"{prefix}{k}": scores[k] for k in SCALAR_KEYS if k in scores}
    flat[f"{prefix}chance_accuracy"] = max(scores["chance_uniform"], scores["chance_majority"])
    for name in HEADLINE:  # the study-bootstrap interval beside each headline number
        ci = (scores.get("intervals") or {}).get(name) or {}
        if ci.get("low") is not None:
            flat[f"{prefix}{name}_ci_low"], flat[f"{prefix}{name}_ci_high"] = ci["low"], ci["high"]
    return flat


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _ci_cell(ci: dict | None, digits: int = 3) -> str:
    """"value [low, high]" of a MetricCI dict ("" without one)."""
    if not ci or ci.get("value") is None:
        return ""
    text = f"{ci['value']:.{digits}f}"
    return text + (f" [{ci['low']:.{digits}f}, {ci['high']:.{digits}f}]" if ci.get("low") is not None else "")


OOD_KEYS = ("ood_method", "ood_features", "ood_auroc", "ood_auroc_ci_low", "ood_auroc_ci_high", "ood_false_alarm_rate",
            "ood_detection_rate", "n_truth_out_of_domain")
TITLES = {"vs_pacs": "vs PACS tags", "vs_truth": "vs true regions"}


def ood_table(metrics: dict) -> dict | None:
    """Out-of-domain detection against the truth: AUROC with its bootstrap CI, and the rates at
    the bundle's threshold (None without out-of-domain images in the truth)."""
    if "ood_auroc" not in metrics:
        return None
    n_in = metrics.get("vs_truth", {}).get("n", "")
    rows = [
        ["score", str(metrics.get("ood_method", "combined members' margins"))
         + (f" on {metrics['ood_features']}" if metrics.get("ood_features") else "")],
        ["AUROC (out of domain positive), 95 % bootstrap CI",
         f"{_fmt(metrics['ood_auroc'])} [{_fmt(metrics['ood_auroc_ci_low'])}, {_fmt(metrics['ood_auroc_ci_high'])}]"],
        ["false-alarm rate at the threshold (in-domain images)", f"{_fmt(metrics.get('ood_false_alarm_rate'))} (n={n_in})"],
        ["detection rate at the threshold (out-of-domain images)",
         f"{_fmt(metrics.get('ood_detection_rate'))} (n={metrics.get('n_truth_out_of_domain', '')})"],
    ]
    return {"header": ["measure", "value"], "rows": rows}


def summary_table(metrics: dict, sources: list[str]) -> dict:
    """The headline metrics per reference; those with a study-bootstrap interval as "value [low, high]"."""
    rows = []
    for key in SCALAR_KEYS:
        cells = []
        for s in sources:
            ci = (metrics[s].get("intervals") or {}).get(key)
            cells.append(_ci_cell(ci) if ci else _fmt(metrics[s].get(key)))
        rows.append([key, *cells])
    return {"header": ["metric", *(TITLES[s] for s in sources)], "rows": rows}


def per_class_table(metrics: dict, sources: list[str]) -> dict:
    classes = metrics[sources[0]]["classes"] if sources else []
    rows = []
    for c in classes:
        cells = []
        for s in sources:
            n = metrics[s]["support"][c]
            ci = ((metrics[s].get("intervals") or {}).get("per_class_recall") or {}).get(c)
            value = _ci_cell(ci) if ci else _fmt(metrics[s]["per_class_accuracy"].get(c))
            cells.append(f"{value} (n={n})" if n else "")
        if any(cells):
            rows.append([c, *cells])
    return {"header": ["class", *(TITLES[s] for s in sources)], "rows": rows}


def subgroup_tables(metrics: dict, sources: list[str]) -> list[dict]:
    """One table per attribute: each value's images, studies and accuracy with its interval, per reference."""
    tables: dict[str, dict[str, dict[str, dict]]] = {}
    for s in sources:
        for g in metrics[s].get("subgroups") or []:
            tables.setdefault(g["attribute"], {}).setdefault(g["value"], {})[s] = g
    out = []
    for attribute, values in tables.items():
        rows = []
        for value, by_source in values.items():
            first = next(iter(by_source.values()))
            rows.append([value, str(first["n"]), str(first["n_studies"]),
                         *(_ci_cell(by_source[s]["accuracy"]) if s in by_source else "" for s in sources)])
        out.append({"title": attribute.replace("_", " "), "text_columns": [0],
                    "header": [attribute, "images", "studies", *(f"accuracy {TITLES[s]}" for s in sources)],
                    "rows": rows})
    return out


def render_report(metrics: dict, meta_name: str, split: str, images: list[Path]) -> str:
    """A self-contained HTML page: summary with intervals, per-class and subgroup tables,
    embedded confusion matrices (xrayops/templates/evaluation_report.html.j2)."""
    from xrayops.templating import render

    sources = [k for k in ("vs_pacs", "vs_truth") if k in metrics]
    scored = set(SCALAR_KEYS) | {"chance_accuracy"} | {f"{k}_ci_{end}" for k in HEADLINE for end in ("low", "high")}
    ood = ood_table(metrics)
    shown = set(OOD_KEYS) if ood else set()
    rest = {k: v for k, v in metrics.items()
            if not isinstance(v, (dict, list)) and k.removeprefix("truth_") not in scored and k not in shown}
    comparison = None
    if metrics.get("members"):  # ensemble report: each member beside the ensemble
        columns = {**metrics["members"], "ensemble": metrics}
        keys = [k for k in ("accuracy", "balanced_accuracy", "macro_f1", "cohen_kappa", "mcc", "ece", "truth_accuracy",
                            "truth_balanced_accuracy", "truth_macro_f1", "ood_auroc", "orientation_mae_deg",
                            "study_accuracy", "truth_study_accuracy", "abnormal_auc", "implant_auc")
                if any(k in c for c in columns.values())]
        comparison = {"header": ["metric", *columns], "rows": [[k, *(_fmt(c.get(k)) for c in columns.values())] for k in keys]}
    binary_rows = []
    for name, levels in (metrics.get("binary") or {}).items():
        for level, m in levels.items():
            binary_rows.append([f"{name} ({level.replace('_', ' ')})", *(
                f"{_fmt(m[k])} [{_fmt(m[k + '_ci'][0])}, {_fmt(m[k + '_ci'][1])}]" for k in ("auc", "sensitivity", "specificity")
            ), f"{m['n_positive']} / {m['n_negative']}"])
    binary = {"header": ["head", "AUC", "sensitivity", "specificity", "positives / negatives"],
              "rows": binary_rows} if binary_rows else None
    confidence = next((metrics[s]["intervals"]["confidence"] for s in sources if metrics[s].get("intervals")), 0.95)
    figures = [{"alt": p.stem, "caption": p.stem.replace("_", " "),
                "src": f"data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}"} for p in images]
    return render(
        "evaluation_report.html.j2", title="xrayops evaluation", model=meta_name, split=split,
        confidence_pct=f"{confidence * 100:g}", summary=summary_table(metrics, sources), comparison=comparison,
        binary=binary, ood=ood, other={"header": ["quantity", "value"], "rows": [[k, _fmt(v)] for k, v in rest.items()]},
        per_class=per_class_table(metrics, sources), subgroups=subgroup_tables(metrics, sources), figures=figures,
    )


def _load_split(bundle_meta, data_dir: Path, split: str):
    spec = read_preprocessing(data_dir)
    if spec != bundle_meta.preprocessing:
        raise DatasetError(
            f"{data_dir} was preprocessed with {spec.model_dump()}, "
            f"but the model expects {bundle_meta.preprocessing.model_dump()}"
        )
    rows = read_ok_rows(data_dir, split)
    if rows.empty:
        raise DatasetError(f"no ok images in split {split!r} of {data_dir}")
    return rows, load_images(data_dir, rows)


def _write_outputs(metrics: dict, classes: list[str], split: str, out_dir: Path, name: str, extra_pngs: list[Path]):
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.json"
    EvaluationMetrics.model_validate(metrics)  # the typed document readers get back (read_evaluation)
    metrics_path.write_text(json.dumps(metrics, indent=2))
    pngs = {}
    figures = {"vs_pacs": ("confusion_matrix.png", "PACS tag"), "vs_truth": ("confusion_matrix_truth.png", "true region")}
    for key, (file_name, against) in figures.items():
        if key in metrics:
            title = f"{split}: predicted vs {against}"
            pngs[key] = plot_confusion(metrics[key]["confusion_matrix"], classes, title, out_dir / file_name, against)
    html_path = out_dir / "report.html"
    html_path.write_text(render_report(metrics, name, split, [*pngs.values(), *extra_pngs]))
    return metrics_path, pngs, html_path


def evaluate_bundle(
    bundle_dir: Path,
    data_dir: Path,
    out_dir: Path,
    split: str = "test",
    truth: dict[str, str] | None = None,
    truth_angles: dict[str, float] | None = None,
    gradcam_per_group: int = 4,
) -> EvaluationResult:
    """Predict every ok image of `split` and report; `truth` maps source_name -> true region,
    `truth_angles` source_name -> orientation in degrees. Grad-CAM overlays are drawn for up
    to `gradcam_per_group` right and wrong predictions (vs truth where known, else the tags)."""
    bundle = load_bundle(bundle_dir)
    rows, images = _load_split(bundle.meta, data_dir, split)
    responses, _ = predict_arrays(bundle, list(images), rows["region"].astype(str).tolist())
    classes = list(bundle.meta.classes)
    metrics = {"split": split, "model": bundle.meta.name, "weights_sha256": bundle.meta.weights_sha256,
               "ood_method": bundle.meta.ood_method,
               "ood_features": ("+".join(bundle.meta.ood_stages) or ("" if bundle.ood is None else "region embedding"))
               + (f" over 8 views at zooms {', '.join(f'{z:g}' for z in bundle.meta.ood_zooms)}" if bundle.meta.ood_zooms else "")}
    metrics.update(evaluate_predictions(rows, responses, classes, truth, bundle.meta.temperature, truth_angles))
    metrics.update(binary_section(rows, finding_probabilities(responses)))
    scored = [k for k in ("vs_pacs", "vs_truth") if k in metrics]
    if not scored:
        raise DatasetError(f"split {split!r} of {data_dir} has no PACS region labels and no truth: nothing to score")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gradcams: list[Path] = []
    if gradcam_per_group > 0:
        names = rows["source_name"].astype(str).tolist()
        reference = [truth.get(n, "") for n in names] if truth else rows["region"].astype(str).tolist()
        keep = np.array([r in classes for r in reference])
        if keep.any():
            index = np.flatnonzero(keep)
            gradcams = gradcam_figures(
                bundle.model, images[index], [responses[i].region for i in index], [reference[i] for i in index],
                out_dir, gradcam_per_group, device=bundle.device,
            )
    return _write_result(metrics, classes, split, out_dir, bundle.meta.name, gradcams)


def _write_result(metrics: dict, classes, split: str, out_dir: Path, name: str, gradcams: list) -> EvaluationResult:
    metrics_path, pngs, html_path = _write_outputs(metrics, classes, split, out_dir, name, gradcams)
    return EvaluationResult(
        split=split,
        metrics=metrics,
        metrics_path=metrics_path,
        confusion_png=pngs.get("vs_pacs", pngs.get("vs_truth")),
        truth_confusion_png=pngs.get("vs_truth"),
        html_path=html_path,
        gradcam_pngs=gradcams,
    )


def evaluate_ensemble(
    bundle_dirs: list[Path],
    data_dir: Path,
    out_dir: Path,
    split: str = "test",
    truth: dict[str, str] | None = None,
    truth_angles: dict[str, float] | None = None,
) -> EvaluationResult:
    """Evaluate each member and their softmax-average ensemble (Langer et al. 2024: SimCLR + BYOL +
    SupCon) on one split. metrics.json holds the ensemble's metrics on top (as evaluate_bundle
    writes them) and each member's under `members`; the report compares them side by side."""
    if len(bundle_dirs) < 2:
        raise ValueError(f"an ensemble needs at least 2 bundles, got {len(bundle_dirs)}")
    bundles = [load_bundle(d) for d in bundle_dirs]
    check_members([b.meta for b in bundles])  # before minutes of prediction
    first = bundles[0].meta
    rows, images = _load_split(first, data_dir, split)
    tags = rows["region"].astype(str).tolist()
    classes = list(first.classes)
    member_responses, members = [], {}
    for directory, bundle in zip(bundle_dirs, bundles):
        responses, _ = predict_arrays(bundle, list(images), tags)
        member_responses.append(responses)
        key = f"{bundle.meta.ssl_method}:{Path(directory).name}"
        members[key] = evaluate_predictions(rows, responses, classes, truth, bundle.meta.temperature, truth_angles)
        members[key].update(binary_section(rows, finding_probabilities(responses)))
    # Combined exactly as serving combines them (xrayops.ensemble), so the report scores what is served.
    responses = combine_responses(member_responses, [b.meta for b in bundles], "ensemble", "")
    metrics = {
        "split": split,
        "model": "ensemble(" + ", ".join(members) + ")",
        "weights_sha256": ",".join(b.meta.weights_sha256 for b in bundles),
    }
    metrics.update(evaluate_predictions(rows, responses, classes, truth, None, truth_angles))
    # Binary heads: combine_responses averaged the members that have each head.
    metrics.update(binary_section(rows, finding_probabilities(responses)))
    metrics["members"] = members
    return _write_result(metrics, classes, split, Path(out_dir), metrics["model"], [])

"""Study-level aggregation (de Cid Rodríguez 2021): a study is one or more views of one examination, and
the clinical answer is per study. Two rules:

- "at least one": the study is positive when any of its images is (score = max probability);
- majority: the study is positive when most of its images are (score = median probability;
  median >= threshold exactly when at least half of the images are >= threshold, and for an
  even split the two middle probabilities decide).

The study's true label is positive when any of its images is labelled positive.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

Rule = Literal["at_least_one", "majority"]
RULES: tuple[Rule, ...] = ("at_least_one", "majority")


def aggregate_binary(
    study_ids: Sequence[str], scores: Sequence[float], labels: Sequence[float] | None = None, rule: Rule = "at_least_one"
) -> pd.DataFrame:
    """One row per study (sorted by id): `score` by `rule`, `n_images`, and `label` (max) if given."""
    if rule not in RULES:
        raise ValueError(f"unknown study rule {rule!r}; choose one of {RULES}")
    frame = pd.DataFrame({"study_id": np.asarray(study_ids, dtype=str), "score": np.asarray(scores, dtype=float)})
    if len(frame) == 0:
        raise ValueError("no images to aggregate")
    if labels is not None:
        frame["label"] = np.asarray(labels, dtype=float)
    grouped = frame.groupby("study_id", sort=True)
    out = pd.DataFrame({"score": grouped["score"].max() if rule == "at_least_one" else grouped["score"].median()})
    out["n_images"] = grouped.size()
    if labels is not None:
        out["label"] = grouped["label"].max()
    return out.reset_index()


def aggregate_region(study_ids: Sequence[str], probabilities: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """Majority rule for the region: the study's class is the argmax of its images' mean
    probabilities (a soft majority vote). One row per study with `region` and `confidence`."""
    probabilities = np.asarray(probabilities, dtype=float)
    ids = np.asarray(study_ids, dtype=str)
    if probabilities.shape != (len(ids), len(classes)):
        raise ValueError(f"probabilities must be ({len(ids)}, {len(classes)}), got {probabilities.shape}")
    studies, inverse = np.unique(ids, return_inverse=True)
    sums = np.zeros((len(studies), len(classes)))
    np.add.at(sums, inverse, probabilities)
    mean = sums / np.bincount(inverse, minlength=len(studies))[:, None]
    best = mean.argmax(1)
    return pd.DataFrame(
        {"study_id": studies, "region": [classes[i] for i in best], "confidence": mean[np.arange(len(studies)), best]}
    )

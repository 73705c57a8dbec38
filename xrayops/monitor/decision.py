"""The retrain decision: data drift, the online label-noise rate and the out-of-domain rate,
each against its threshold from `Settings`."""
from __future__ import annotations

import pandas as pd
from pydantic import BaseModel, Field

from xrayops.config import Settings, get_settings
from xrayops.monitor.drift import DriftResult
from xrayops.monitor.label_noise import label_noise_report


class RetrainDecision(BaseModel):
    retrain: bool
    reasons: list[str] = Field(default_factory=list)
    drift_share: float | None = None
    drifted_columns: list[str] = Field(default_factory=list)
    label_noise_rate: float | None = None
    ood_rate: float | None = None
    thresholds: dict[str, float] = Field(default_factory=dict)


def label_noise_rate(log_df: pd.DataFrame, min_confidence: float) -> float | None:
    """Share of confident predictions whose own PACS region tag is known and disagrees.

    Langer et al. 2024: 116 of its 328 test errors were wrong PACS labels, and for 98 of those the
    model was right; so a confident prediction is the reference the tag is checked against.
    Images with an unknown tag cannot disagree and are not counted. None when nothing qualifies.
    """
    if log_df.empty:
        return None
    return label_noise_report(log_df, min_confidence, groupings=()).rate


def ood_rate(log_df: pd.DataFrame, ood_threshold: float) -> float | None:
    """Share of scored images above the bundle's out-of-domain threshold (higher = further out,
    as in `xrayops.inference`). None when no image has a score."""
    scores = log_df["ood_score"].dropna() if "ood_score" in log_df.columns else pd.Series(dtype=float)
    if scores.empty:
        return None
    return float((scores > ood_threshold).mean())


def decide_retrain(
    drift: DriftResult | None,
    label_noise_rate: float | None = None,
    ood_rate: float | None = None,
    settings: Settings | None = None,
) -> RetrainDecision:
    """Retrain when any signal reaches its threshold; every reason names its number.

    A signal that could not be measured (None) never triggers a retrain on its own.
    """
    settings = settings or get_settings()
    thresholds = {
        "drift_share": settings.drift_share_threshold,
        "label_noise_rate": settings.label_noise_threshold,
        "ood_rate": settings.ood_rate_threshold,
    }
    reasons = []
    if drift is not None and drift.drift_share >= thresholds["drift_share"]:
        reasons.append(
            f"data drift: {len(drift.drifted_columns)} of {len(drift.columns)} columns drifted "
            f"(share {drift.drift_share:.2f} >= {thresholds['drift_share']:.2f}): {', '.join(drift.drifted_columns)}"
        )
    if label_noise_rate is not None and label_noise_rate >= thresholds["label_noise_rate"]:
        reasons.append(
            f"label noise: {label_noise_rate:.1%} of confident predictions disagree with the PACS region tag "
            f"(>= {thresholds['label_noise_rate']:.1%})"
        )
    if ood_rate is not None and ood_rate >= thresholds["ood_rate"]:
        reasons.append(f"out of domain: {ood_rate:.1%} of images are out of domain (>= {thresholds['ood_rate']:.1%})")
    return RetrainDecision(
        retrain=bool(reasons),
        reasons=reasons,
        drift_share=drift.drift_share if drift is not None else None,
        drifted_columns=list(drift.drifted_columns) if drift is not None else [],
        label_noise_rate=label_noise_rate,
        ood_rate=ood_rate,
        thresholds=thresholds,
    )

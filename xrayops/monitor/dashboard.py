"""The quality officers' dashboard: Evidently project panels over the monitoring windows.

Defined in code (Evidently 0.7 dashboard API) so every workspace gets the same panels; each
panel plots the `XrayopsSignal` series that `xrayops.monitor.workspace` logs per window, plus
Evidently's own embedding drift. `ensure_dashboard` is idempotent: it adds missing panels by
title and leaves panels a user added in the UI alone.
"""
from __future__ import annotations

from xrayops.regions import REGIONS

TAB = "Quality"
SIGNAL_METRIC = "evidently:metric_v2:XrayopsSignal"
EMBEDDINGS_METRIC = "evidently:metric_v2:EmbeddingsDrift"

DRIFT_SHARE = "Data drift share"
LABEL_NOISE = "Label-noise rate"
OOD = "Out-of-domain rate"
PREDICTION_MIX = "Prediction mix (share per region)"
VOLUME = "Request volume"
EMBEDDING_DRIFT = "Embedding drift (domain-classifier ROC AUC)"
PANEL_TITLES = (DRIFT_SHARE, LABEL_NOISE, OOD, PREDICTION_MIX, VOLUME, EMBEDDING_DRIFT)


def _signal(signal: str, legend: str, **labels: str):
    from evidently.sdk.models import PanelMetric

    return PanelMetric(legend=legend, metric=SIGNAL_METRIC, metric_labels={"signal": signal, **labels})


def dashboard_panels() -> list:
    """The panels, in display order."""
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import bar_plot_panel, line_plot_panel

    return [
        line_plot_panel(DRIFT_SHARE, [_signal("drift_share", "drift share")], size="half",
                        description="Share of monitored columns (metadata, image statistics, tag and prediction mix) "
                                    "Evidently finds drifted against the training manifest"),
        line_plot_panel(LABEL_NOISE, [_signal("label_noise_rate", "label-noise rate")], size="half",
                        description="Confident predictions whose known PACS region tag disagrees (Langer et al. 2024: "
                                    "116 of 328 test errors were wrong PACS labels)"),
        line_plot_panel(OOD, [_signal("ood_rate", "out-of-domain rate")], size="half",
                        description="Images above the served bundle's out-of-domain threshold"),
        bar_plot_panel(VOLUME, [_signal("n_images", "images"), _signal("n_requests", "requests")], size="half",
                       description="Images scored and requests served in the window"),
        bar_plot_panel(PREDICTION_MIX, [_signal("prediction_share", region, region=region) for region in REGIONS],
                       stacked=True, description="Share of the window's images per predicted region"),
        line_plot_panel(EMBEDDING_DRIFT, [PanelMetric(legend="ROC AUC", metric=EMBEDDINGS_METRIC)],
                        description="0.5: the window's embeddings cannot be told from the model version's "
                                    "baseline window; above 0.55 Evidently calls it drift"),
    ]


def ensure_dashboard(project) -> list[str]:
    """Add the panels the project's dashboard lacks (by title); returns the titles added."""
    have = {panel.title for panel in project.dashboard.model().panels}
    added = []
    for panel in dashboard_panels():
        if panel.title not in have:
            project.dashboard.add_panel(panel, tab=TAB)
            added.append(panel.title)
    return added

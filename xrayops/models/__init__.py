"""Backbones, heads and self-supervised objectives."""
from xrayops.models.backbone import ARCHS, build_backbone, load_backbone, save_backbone
from xrayops.models.heads import RegionClassifier, energy_score, fit_temperature, fold_standardization, linear_head
from xrayops.models.ssl import SSL_METHODS, SimCLRModel, build_ssl_model

__all__ = [
    "ARCHS",
    "SSL_METHODS",
    "RegionClassifier",
    "SimCLRModel",
    "build_backbone",
    "build_ssl_model",
    "energy_score",
    "fit_temperature",
    "fold_standardization",
    "linear_head",
    "load_backbone",
    "save_backbone",
]

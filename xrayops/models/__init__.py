"""Backbones, heads and self-supervised objectives."""
from xrayops.models.backbone import ARCHS, build_backbone, load_backbone, save_backbone
from xrayops.models.heads import (
    RegionClassifier,
    angle_to_vector,
    angular_error,
    energy_score,
    fit_temperature,
    fold_standardization,
    linear_head,
    orientation_head,
    orientation_loss,
    vector_to_angle,
)
from xrayops.models.ssl import SSL_METHODS, BYOLModel, SimCLRModel, SSLModel, SupConLoss, SupConModel, build_ssl_model

__all__ = [
    "ARCHS",
    "SSL_METHODS",
    "BYOLModel",
    "RegionClassifier",
    "SSLModel",
    "SimCLRModel",
    "SupConLoss",
    "SupConModel",
    "angle_to_vector",
    "angular_error",
    "build_backbone",
    "build_ssl_model",
    "energy_score",
    "fit_temperature",
    "fold_standardization",
    "linear_head",
    "load_backbone",
    "orientation_head",
    "orientation_loss",
    "save_backbone",
    "vector_to_angle",
]

"""Typed, versioned contracts between stages (docs/architecture.md, "Contracts").

Every stage reads and writes these models; nothing crosses a stage boundary untyped.
"""
from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from xrayops.dicom.admission import AdmissionPolicy

CONTRACT_VERSION = "1"
# ManifestRow's optional binary label columns, each of which can train a binary head.
BINARY_LABEL_COLUMNS = ("abnormal", "implant")


class PreprocessingSpec(BaseModel):
    """Exact parameters that turn a decoded DICOM into a model tensor.

    Stored with the dataset (data/preprocessing.json) and inside every model bundle;
    serving calls the same `xrayops.dicom.pixels.preprocess` with it.
    """

    model_config = ConfigDict(frozen=True)

    version: str = CONTRACT_VERSION
    size: int = 64  # output is size x size
    apply_modality_lut: bool = True
    apply_voi_lut: bool = True
    # Robust window when the file has neither a VOI LUT nor window centre/width.
    percentile_window: tuple[float, float] = (0.5, 99.5)
    invert_monochrome1: bool = True
    remove_border: bool = True
    border_threshold: float = 0.92  # fraction of full scale treated as "burnt-in white border"
    keep_aspect: bool = True  # de Cid Rodríguez 2021: padding beat plain resizing
    pad_value: float = 0.0
    output_dtype: Literal["uint8", "uint16"] = "uint8"
    # Multi-frame files: one frame (first/middle), every frame as its own image ("all"; single-image
    # callers such as serving then use the middle one), or quarantine ("reject").
    multiframe: Literal["first", "middle", "all", "reject"] = "middle"
    # Work at 2-4x the output size as early as possible (xrayops.dicom.pixels.decode_for_spec):
    # 3-10x faster on full-size radiographs; False gives full-resolution windowing.
    reduce_early: bool = True
    # The early reduction's filter, the same for every transfer syntax: JPEG 2000's reversible 5/3
    # low-pass band (lossless JPEG 2000 decoded at reduced resolution, the rest computed). Specs
    # written before this field box-averaged non-JPEG 2000 images; they read back with this filter.
    reduction_filter: Literal["wavelet_5_3"] = "wavelet_5_3"
    # Which instances are images at all for this model (xrayops.dicom.admission): ingestion
    # quarantines what it refuses, serving answers it as not applicable. Older specs: the default.
    admission: AdmissionPolicy = Field(default_factory=AdmissionPolicy)


class ManifestRow(BaseModel):
    """One row of data/manifest.parquet: one image. Never carries PHI."""

    image_id: str  # HMAC pseudonym of SOPInstanceUID
    study_id: str  # HMAC pseudonym of StudyInstanceUID
    patient_id: str  # HMAC pseudonym of PatientID
    # Keyed HMAC-SHA256 of the file's bytes (xrayops.dicom.deid.keyed_hash): same file, same value
    # under one key; unkeyed, anyone holding the file could find its row. The name is historical.
    source_sha256: str
    # `src-` + keyed HMAC of the file's path relative to the source root (+ .dcm): never a folder or
    # file name, which hold patient names, IDs and dates (xrayops.dicom.deid.source_pseudonym).
    source_name: str
    modality: str = ""
    photometric_interpretation: str = ""
    transfer_syntax: str = ""
    bits_stored: int = 0
    body_part_raw: str = ""  # raw BodyPartExamined free text
    region: str = "unknown"  # normalised from the raw tags, or "unknown"
    # Where `region` came from and what matched (xrayops.dicom.labels.RegionMatch); "" in older manifests.
    region_source: Literal["anatomic_region_code", "body_part_examined", "description", "none", ""] = ""
    region_match: str = ""  # vocabulary term ("knie"; "~ankle" for a typo) or code ("SCT:72696002"), never tag text
    view_position: str = ""
    laterality: str = ""
    manufacturer: str = ""
    pixel_spacing: float | None = None
    original_rows: int = 0
    original_cols: int = 0
    shard: str = ""  # shard file name under data/shards/, empty if quarantined
    shard_index: int = -1
    status: Literal["ok", "quarantined"] = "ok"
    reason: str = ""
    split: Literal["train", "val", "test", ""] = ""
    # Image statistics of the preprocessed pixels, for drift monitoring.
    pixel_mean: float | None = None
    pixel_std: float | None = None
    # Later fields: older manifests read back with these defaults.
    frame: int = 0  # frame of a multi-frame file this row holds (0 for single-frame files)
    pixel_sha256: str = ""  # keyed HMAC-SHA256 of the decoded frame: duplicate pixels under another SOP UID
    quality_flags: str = ""  # comma-separated: tiny, extreme_aspect, low_contrast
    burned_in_annotation: str = ""  # BurnedInAnnotation as found (YES/NO/""): text in the pixels may be PHI
    # Lossy compressed now or before (LossyImageCompression 01, or a lossy transfer syntax): of two
    # copies of one instance ingestion keeps the lossless one.
    lossy_compression: bool = False
    # Optional binary labels, 1.0 / 0.0, empty where unknown; a binary head is trained
    # when a column has both values: abnormality/fracture (de Cid Rodríguez 2021; Ghalyan et al.), implant (Acitores 2022).
    abnormal: float | None = None
    implant: float | None = None


class DatasetVersion(BaseModel):
    path: str
    md5: str  # DVC content hash of the tracked directory
    remote: str
    n_files: int = 0


class Lineage(BaseModel):
    dataset_md5: str = ""
    git_commit: str = ""
    pipeline_run: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)


class ModelBundleMeta(BaseModel):
    """bundle.json, next to weights.pt inside a model bundle directory."""

    version: str = CONTRACT_VERSION
    name: str = "xrayops-region"
    arch: str = "resnet18"
    ssl_method: str = "simclr"
    embedding_dim: int = 512
    classes: list[str]
    preprocessing: PreprocessingSpec
    temperature: float = 1.0
    # The served ood_score and its threshold (ood = score > threshold). "energy" of the logits
    # (Liu et al. 2020) in older bundles; "mahalanobis" (Lee et al. 2018), "relative_mahalanobis"
    # (Ren et al. 2021) or "knn" (Sun et al. 2022) on frozen features, their arrays in weights.pt
    # (xrayops.models.ood).
    ood_method: Literal["energy", "mahalanobis", "relative_mahalanobis", "knn"] = "energy"
    ood_threshold: float | None = None
    ood_k: int = 0  # knn: the neighbour whose distance is the score
    # ResNet stages whose pooled outputs, concatenated, the detector scores (xrayops.models.
    # ood_features); empty: the region embedding.
    ood_stages: list[str] = Field(default_factory=list)
    # Zooms at which those features are averaged over the eight turns and mirror images of the
    # image (xrayops.models.ood_features.view_features); empty: taken from the region pass.
    ood_zooms: list[float] = Field(default_factory=list)
    # The in-domain validation scores' 95th minus 50th percentile: an ensemble averages its
    # members' margins over their thresholds in these units (None: raw margins).
    ood_scale: float | None = None
    confidence_threshold: float = 0.9  # for label_disagreement
    # The embedding is the mean over the four right-angle rotations of the image
    # (xrayops.models.heads.RegionClassifier), so the region does not depend on orientation.
    rotation_average: bool = False
    # Orientation head (Baltruschat et al. 2018): (cos, sin) regression on the upright (not rotation-averaged)
    # embedding; `orientation_source` says where its labels came from ("truth" angles, or
    # "upright" images turned by known amounts). Older bundles have none.
    orientation: bool = False
    orientation_source: str = ""
    # Binary heads (logistic, on the region embedding) trained from manifest label columns
    # (BINARY_LABEL_COLUMNS); a probability >= 0.5 means positive. Older bundles have none.
    binary_heads: list[str] = Field(default_factory=list)
    lineage: Lineage = Field(default_factory=Lineage)
    weights_sha256: str = ""
    created_at: datetime | None = None


class RegionPrediction(BaseModel):
    region: str
    confidence: float
    probabilities: dict[str, float]


class InferenceResponse(BaseModel):
    """What hospital IT get back for one image.

    An image the model's admission policy refuses (a CT, a colour photograph, a secondary capture...)
    is answered with `applicable: false`, the reason code and its detail, and no region.
    """

    region: str | None
    confidence: float | None
    probabilities: dict[str, float] = Field(default_factory=dict)
    orientation_deg: float | None = None
    ood_score: float | None = None
    ood: bool | None = None
    dicom_region: str = "unknown"  # normalised from the file's own BodyPartExamined
    label_disagreement: bool = False
    # P(positive) of each binary head the model has (abnormality: de Cid Rodríguez 2021; Ghalyan et al.; implant: Acitores 2022).
    findings: dict[str, float] = Field(default_factory=dict)
    model_name: str = ""
    model_version: str = ""
    applicable: bool = True
    refusal_reason: str = ""  # xrayops.dicom.admission reason code, when not applicable
    refusal_detail: str = ""  # one line: "modality CT", "photometric interpretation RGB", ...


class InferenceLogRecord(BaseModel):
    """Written by serving, read by monitoring (one per predicted image)."""

    timestamp: datetime
    request_id: str
    model_name: str
    model_version: str
    image_id: str = ""  # pseudonym; never the raw UID
    # The hospital site that served the image (Settings.site_id): the online label-noise rate is
    # tracked per site and per vendor. Logs written before it read back as "".
    site: str = ""
    manufacturer: str = ""
    photometric_interpretation: str = ""
    pixel_spacing: float | None = None
    pixel_mean: float
    pixel_std: float
    region: str
    confidence: float
    dicom_region: str = "unknown"
    label_disagreement: bool = False
    ood_score: float | None = None
    embedding: list[float] = Field(default_factory=list)

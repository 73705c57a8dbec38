"""Runtime configuration. Every field is settable as an env var XRAYOPS_<FIELD>."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from xrayops.dicom.admission import AdmissionPolicy


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="XRAYOPS_", env_file=".env", extra="ignore")

    # Where things live (embedded default).
    data_dir: Path = Path("data")
    output_dir: Path = Path("outputs")
    dvc_remote_url: str = Field(
        default="", description="DVC default remote; empty means <output_dir>/dvc-remote"
    )
    s3_endpoint_url: str = Field(default="", description="S3-compatible endpoint for DVC remotes")
    mlflow_tracking_uri: str = Field(default="", description="empty means sqlite under output_dir")
    registered_model_name: str = "xrayops-region"

    # De-identification: the HMAC key of every pseudonym and content hash (xrayops.dicom.deid).
    # No default: read only through xrayops.dicom.deid.require_key, which refuses to run without
    # one (or with one under 16 bytes). XRAYOPS_DEID_KEY holds it, or XRAYOPS_DEID_KEY_FILE names
    # a file holding it (a mounted Kubernetes Secret); `xrayops keygen` makes one.
    deid_key: SecretStr | None = None
    deid_key_file: Path | None = None
    # What `xrayops listen` and DICOMweb fetches land: private tags and overlay (60xx) / curve (50xx)
    # groups are dropped unless a site needs them kept in its landing folder (never in a dataset).
    landing_keep_private: bool = False

    # Container image every KFP component and the KServe pods run (built from infra/).
    image: str = "ghcr.io/xrayops/xrayops:0.1.0"

    # A site's own BodyPartExamined synonyms (JSON/YAML), merged over the built-in table.
    body_part_synonyms: Path | None = None

    # Admission (xrayops.dicom.admission): what ingestion lets into a dataset. Serving applies the
    # policy stored in the model's bundle instead. Lists are JSON in env, e.g. '["CR","DX","RG"]'.
    admit_modalities: list[str] = Field(default_factory=lambda: list(AdmissionPolicy().modalities))
    admit_sop_classes: list[str] = Field(default_factory=lambda: list(AdmissionPolicy().sop_classes))
    admit_localizers: bool = False
    admit_secondary: bool = False
    # Only a site that removes burned-in text upstream (PS3.15 Clean Pixel Data) may set this.
    admit_pixels_cleaned: bool = False

    # Compute.
    device: str = "auto"  # auto | cpu | cuda
    num_workers: int = 0
    seed: int = 0

    # Serving.
    serve_host: str = "127.0.0.1"
    serve_http_port: int = 8080
    serve_grpc_port: int = 8081
    inference_log_path: Path | None = None
    # Largest REST body / gRPC message; gRPC never below 30 MB (an uncompressed radiograph is ~10-25 MB).
    serve_max_request_mb: int = Field(default=64, ge=1, le=2047)
    # Rejected from the DICOM header before decoding: 40 Mpx is above a 4664x3064 mammogram.
    serve_max_image_pixels: int = Field(default=40_000_000, ge=1)
    serve_max_frames: int = Field(default=1, ge=1, description="more frames (a cine) is rejected")
    # Micro-batching across concurrent requests (serving.batcher).
    serve_max_batch_size: int = Field(default=32, ge=1)
    serve_max_batch_latency_ms: float = Field(default=5.0, ge=0)
    # The local inference log: one parquet part per this many records, or when the oldest waited this long.
    serve_log_flush_records: int = Field(default=512, ge=1)
    serve_log_flush_seconds: float = Field(default=10.0, gt=0)
    # Ensemble members (Langer et al. 2024: SimCLR, BYOL, SupCon) as bundle folders or models:/ refs; JSON list in env.
    serve_models: list[str] = Field(default_factory=list)

    # Monitoring thresholds.
    # Share of monitored columns (acquisition metadata, image statistics, tag mix) drifting at once;
    # a third already means the input population changed (a new vendor moves spacing and maker).
    drift_share_threshold: float = 0.3
    label_noise_threshold: float = 0.15
    ood_rate_threshold: float = 0.2
    # Retraining triggers (xrayops.monitor.trigger): a label-noise JUMP is the window's online rate
    # minus the reference window's; cooldown and dedup keep one cause from launching a run storm.
    label_noise_jump_threshold: float = 0.05
    retrain_cooldown_hours: float = 24.0
    kfp_host: str = Field(default="", description="KFP API endpoint for retraining runs; empty means kfp.local")
    # Champion/challenger gate (xrayops.evaluate.gate): the challenger may be at most this much
    # less accurate (lower bound of the paired-bootstrap CI of the difference) to be promoted.
    gate_margin: float = 0.01
    gate_bootstrap_samples: int = 2000
    gate_confidence: float = 0.95
    # ...and in every acquisition subgroup (site, manufacturer, view, photometric, transfer syntax) of
    # at least this many test images, at most this much less accurate (never tighter than gate_margin).
    gate_subgroup_min_n: int = Field(default=30, ge=1)
    gate_subgroup_margin: float = Field(default=0.05, ge=0)
    # Serving releases (xrayops.release): where the InferenceService's members are published, and which
    # InferenceService `xrayops release` points at them.
    release_storage_uri: str = Field(default="s3://xrayops-models/region", description="serving storage for releases")
    inference_service: str = "xrayops-region"
    serving_namespace: str = "xrayops"
    # Whether the retraining runs the monitor CronJob submits release a promoted challenger to serving
    # (pipeline parameter `release`); off: a person releases with `xrayops release publish`.
    release_on_promotion: bool = False
    # A release goes live (publish, the pipeline's release step, rollback to another release) only once
    # a person approved it (`xrayops release approve`); on for the cluster overlays.
    release_requires_approval: bool = False
    # The hash-chained audit log of approvals and rejections; empty: <output_dir>/release/audit.jsonl.
    release_audit_log: Path | None = None
    # The quality dashboard (the Evidently UI's monitoring project) that change records link to.
    dashboard_url: str = ""
    # Feature store (xrayops.features): Feast repo; sqlite online store by default, redis or postgres on a cluster.
    feature_repo_dir: Path | None = None
    feast_project: str = "xrayops"
    feast_online_store: str = "sqlite"
    feast_online_connection: str = ""
    # This deployment's site id, stamped on every inference-log record (label-noise rate per site).
    site_id: str = ""
    # Evidently workspace for monitoring snapshots shown by `evidently ui`; empty: <output_dir>/evidently.
    evidently_workspace: Path | None = None

    # The DICOM routing node (`xrayops route`, xrayops.route): C-STORE in, the endpoint with sr=true,
    # the SRs C-STOREd to the PACS. The bearer token is XRAYOPS_ROUTE_TOKEN or a file holding it.
    route_host: str = "127.0.0.1"
    route_port: int = Field(default=11113, ge=1, le=65535)
    route_ae_title: str = Field(default="XRAYOPS_ROUTE", min_length=1, max_length=16)
    route_endpoint: str = Field(default="http://127.0.0.1:8080", description="REST base URL, or host:port for gRPC")
    route_protocol: Literal["rest", "grpc"] = "rest"
    route_model_name: str = Field(default="", description="empty: registered_model_name")
    route_token: SecretStr | None = None
    route_token_file: Path | None = None
    route_study_quiet_seconds: float = Field(default=10.0, gt=0, description="a study is complete after this long without a new instance")
    route_sr_per: Literal["study", "image"] = "study"
    route_max_images_per_request: int = Field(default=32, ge=1, le=256)
    route_timeout_seconds: float = Field(default=120.0, gt=0)
    route_pacs_host: str = "127.0.0.1"
    route_pacs_port: int = Field(default=104, ge=1, le=65535)
    route_pacs_ae_title: str = Field(default="PACS", min_length=1, max_length=16)
    route_max_pending_instances: int = Field(default=2000, ge=1, description="held while grouping; beyond: C-STORE out of resources")
    route_max_pending_mb: int = Field(default=1024, ge=1, description="the same bound in bytes of the held instances")
    route_max_queued_studies: int = Field(default=16, ge=1)
    route_max_associations: int = Field(default=8, ge=1)
    route_workers: int = Field(default=2, ge=1)
    route_retry_attempts: int = Field(default=5, ge=1)
    route_retry_base_seconds: float = Field(default=1.0, ge=0)
    route_retry_max_seconds: float = Field(default=60.0, ge=0)
    route_dead_letter_dir: Path = Path("outputs/route-dead-letter")
    route_health_port: int = Field(default=8095, ge=0, le=65535, description="HTTP /healthz and /metrics; 0: off")

    log_level: str = "INFO"
    log_json: bool = False


    def tracking_uri(self) -> str:
        """MLflow tracking URI: the configured server, else sqlite under output_dir (embedded default)."""
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{(self.output_dir / 'mlflow' / 'mlflow.db').resolve()}"

    def admission_policy(self) -> AdmissionPolicy:
        """The admission policy these settings describe (ingestion's; serving reads the bundle's)."""
        return AdmissionPolicy(
            modalities=tuple(m.strip().upper() for m in self.admit_modalities),
            sop_classes=tuple(u.strip() for u in self.admit_sop_classes),
            refuse_localizers=not self.admit_localizers,
            refuse_secondary=not self.admit_secondary,
            pixels_cleaned=self.admit_pixels_cleaned,
        )

    def audit_log_path(self) -> Path:
        """The release audit log (approvals and rejections, hash-chained)."""
        return self.release_audit_log or self.output_dir / "release" / "audit.jsonl"

    def dvc_remote(self) -> str:
        return self.dvc_remote_url or str((self.output_dir / "dvc-remote").resolve())


def get_settings(**overrides) -> Settings:
    return Settings(**overrides)

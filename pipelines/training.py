"""The whole loop as one KFP pipeline: synth -> ingest -> version -> pretrain -> finetune
-> evaluate -> register, a label audit of the training tags on the frozen backbone, plus a
drift check of a shifted batch against the training data."""

from kfp import dsl, kubernetes

from components import (
    audit_labels_op,
    evaluate_op,
    finetune_op,
    ingest_op,
    monitor_op,
    pretrain_op,
    register_op,
    synth_op,
    version_dataset_op,
)

from pipelines.gpu_pool import GpuPool

PIPELINE_NAME = "xrayops-training"


# On a cluster every task reads the non-secret settings (XRAYOPS_*; infra/k8s/base) and the S3
# credentials; only the ingest tasks, which pseudonymise, get the de-identification key.
CLUSTER_CONFIG_MAP = "xrayops-config"
CLUSTER_CONFIG_KEYS = ("XRAYOPS_S3_ENDPOINT_URL", "XRAYOPS_DVC_REMOTE_URL", "XRAYOPS_MLFLOW_TRACKING_URI", "AWS_DEFAULT_REGION",
                       "XRAYOPS_RELEASE_STORAGE_URI", "XRAYOPS_INFERENCE_SERVICE", "XRAYOPS_SERVING_NAMESPACE")
S3_SECRET, S3_SECRET_KEYS = "xrayops-s3", ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# Secret xrayops-deid holds the key under `key` (as infra/k8s/base/serving reads it).
DEID_SECRET, DEID_SECRET_KEY = "xrayops-deid", "key"
# The monitoring volume (infra/k8s/base/monitor/volume.yaml) and the workspace the Evidently UI
# serves from it, so the pipeline's monitor step shows on the quality officers' dashboard.
MONITORING_PVC, MONITORING_MOUNT = "xrayops-monitoring", "/monitoring"
ISTIO_INJECT, S3_EGRESS_LABEL = "sidecar.istio.io/inject", "xrayops.io/egress-s3"
CLUSTER_EVIDENTLY_WORKSPACE = f"{MONITORING_MOUNT}/evidently"


def _with_cluster_env(task: dsl.PipelineTask, deid: bool) -> None:
    """Settings from the xrayops-config ConfigMap (keys an overlay leaves out stay unset) and
    credentials from Secrets created out of band (docs/cluster.md); nothing secret in the YAML."""
    kubernetes.use_config_map_as_env(task, CLUSTER_CONFIG_MAP, {k: k for k in CLUSTER_CONFIG_KEYS}, optional=True)
    kubernetes.use_secret_as_env(task, S3_SECRET, {k: k for k in S3_SECRET_KEYS})
    # The step joins the mesh (STRICT mTLS: MLflow and Feast admit the runner's identity only;
    # KFP defaults its pods to no sidecar) and may reach the object store (infra/k8s/base/network).
    kubernetes.add_pod_annotation(task, ISTIO_INJECT, "true")
    kubernetes.add_pod_label(task, S3_EGRESS_LABEL, "true")
    if deid:
        kubernetes.use_secret_as_env(task, DEID_SECRET, {DEID_SECRET_KEY: "XRAYOPS_DEID_KEY"})


# One function: the pipeline graph reads top to bottom as the DAG it compiles to.
def build_pipeline(
    gpu: bool = False,
    gpu_node_pool: str = "gpu",
    gpu_count: int = 1,
    cluster: bool = False,
    gpu_pool: GpuPool | None = None,
):
    """Return the pipeline function; `gpu` adds GPU node-pool scheduling to the training steps,
    `cluster` wires the cluster's ConfigMap and Secrets into every task's environment.

    The GPU scheduling is `gpu_pool` when given (a cluster's own labels, taints and accelerator),
    else the default pool with node label xrayops.io/pool=`gpu_node_pool` and `gpu_count` GPUs.
    """
    if gpu_pool is None:
        gpu_pool = GpuPool.labelled(gpu_node_pool, gpu_count)

    # One function: its parameters are the run form, its body the DAG, top to bottom.
    @dsl.pipeline(name=PIPELINE_NAME, description="xrayops: DICOM to registered, monitored region model")
    def training_pipeline(
        n_images: int = 700,
        seed: int = 0,
        synth_size: int = 160,
        image_size: int = 64,
        mislabel_rate: float = 0.05,
        ood_rate: float = 0.03,
        drift_images: int = 200,
        drift_seed: int = 1,
        drift_shift: float = 0.8,
        pretrain_epochs: int = 8,
        ssl_method: str = "simclr",
        batch_size: int = 128,
        finetune_epochs: int = 60,
        ingest_workers: int = 1,
        dvc_remote_url: str = "",
        s3_endpoint_url: str = "",
        mlflow_tracking_uri: str = "",
        model_name: str = "xrayops-region",
        alias: str = "champion",
        evidently_workspace: str = CLUSTER_EVIDENTLY_WORKSPACE if cluster else "",
        label_flag_below: float = 0.1,
        label_pool_studies: bool = True,
    ):
        data = synth_op(
            n=n_images, seed=seed, size=synth_size, mislabel_rate=mislabel_rate, shift=0.0, ood_rate=ood_rate
        ).set_display_name("synth")
        ingested = ingest_op(dicom=data.outputs["dicom"], image_size=image_size, workers=ingest_workers).set_display_name(
            "ingest"
        )
        version = version_dataset_op(
            dataset=ingested.outputs["dataset"], remote_url=dvc_remote_url, s3_endpoint_url=s3_endpoint_url
        ).set_display_name("version")
        pre = pretrain_op(
            dataset=ingested.outputs["dataset"], epochs=pretrain_epochs, batch_size=batch_size, seed=seed,
            method=ssl_method,
        ).set_display_name("pretrain")
        head = finetune_op(
            dataset=ingested.outputs["dataset"],
            backbone=pre.outputs["backbone"],
            dicom=data.outputs["dicom"],  # truth.csv angles train the orientation head (Baltruschat et al. 2018)
            dataset_md5=version.outputs["md5"],
            epochs=finetune_epochs,
            seed=seed,
            pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        ).set_display_name("finetune")
        # Langer et al. 2024 keeps the backbone frozen so the training tags can be re-checked with it.
        audit = audit_labels_op(
            dataset=ingested.outputs["dataset"], backbone=pre.outputs["backbone"], flag_below=label_flag_below,
            pool_studies=label_pool_studies,
        ).set_display_name("audit-labels")
        evaluation = evaluate_op(
            dataset=ingested.outputs["dataset"], bundle=head.outputs["bundle"], dicom=data.outputs["dicom"]
        ).set_display_name("evaluate")
        registered = register_op(
            bundle=head.outputs["bundle"],
            tracking_uri=mlflow_tracking_uri,
            model_name=model_name,
            alias=alias,
            dataset_md5=version.outputs["md5"],
            accuracy=evaluation.outputs["Output"],
            pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        ).set_display_name("register")

        shifted = synth_op(
            n=drift_images, seed=drift_seed, size=synth_size, mislabel_rate=mislabel_rate, shift=drift_shift, ood_rate=ood_rate
        ).set_display_name("synth-shifted")
        current = ingest_op(
            dicom=shifted.outputs["dicom"], image_size=image_size, workers=ingest_workers
        ).set_display_name("ingest-shifted")
        drift = monitor_op(
            reference=ingested.outputs["dataset"], current=current.outputs["dataset"], workspace_dir=evidently_workspace
        ).set_display_name("monitor")

        if gpu:
            for task in (pre, head):
                gpu_pool.apply(task)
        if cluster:
            for task in (data, version, pre, head, audit, evaluation, registered, shifted, drift):
                _with_cluster_env(task, deid=False)
            for task in (ingested, current):
                _with_cluster_env(task, deid=True)
            kubernetes.mount_pvc(drift, MONITORING_PVC, MONITORING_MOUNT)

    return training_pipeline

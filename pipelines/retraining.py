"""Retraining on a site's own data: what the monitor's trigger launches on a cluster.

    ingestion (plan ─▶ ParallelFor ingest-part ─▶ merge) ─▶ version (DVC push: the new version)
    champion (MLflow models:/NAME@champion: bundle + backbone)
        ─▶ pretrain (0 epochs: the champion's frozen backbone; N: warm-started SSL on the new version)
        ─▶ finetune ─▶ evaluate ─▶ register (alias challenger) ─▶ gate (same test split, paired
           bootstrap, per subgroup; promotion moves the champion alias)
        ─▶ change-record (what changed, why, the evidence, the approval block: an HTML artifact)
        ─▶ release (optional, when promoted: publish to the serving storage, roll the InferenceService;
           with XRAYOPS_RELEASE_REQUIRES_APPROVAL it stops at "awaiting approval")
        ─▶ audit-labels (cleanlab over the new version's tags on the challenger's backbone)

Langer et al. 2024 keeps the backbone frozen so that training images can be re-checked for label errors,
so by default only the heads are retrained; `pretrain_epochs` > 0 continues the champion's
self-supervised pretraining on the new data first (`xrayops pretrain --init-from`).

`release` is off by default: a site decides whether a promoted model reaches patients' studies
without a person's sign-off. On, a promotion publishes the new version as a serving release and
points the InferenceService at it (`xrayops release publish`); `xrayops release rollback` undoes it.
"""
from kfp import dsl, kubernetes

from components import (
    audit_labels_op,
    champion_op,
    change_record_op,
    evaluate_op,
    finetune_op,
    gate_op,
    pretrain_op,
    register_op,
    release_op,
    version_dataset_op,
)
from pipelines.gpu_pool import GpuPool
from pipelines.ingestion import SOURCE_MOUNT, build_ingestion_pipeline
from pipelines.training import CLUSTER_CONFIG_MAP, _with_cluster_env
from xrayops.config import get_settings

PIPELINE_NAME = "xrayops-retraining"
# Settings the gate, change-record and release steps read from xrayops-config (an overlay may leave them out).
APPROVAL_CONFIG_KEYS = ("XRAYOPS_RELEASE_REQUIRES_APPROVAL", "XRAYOPS_DASHBOARD_URL", "XRAYOPS_GATE_SUBGROUP_MIN_N",
                        "XRAYOPS_GATE_SUBGROUP_MARGIN")


# One function: the pipeline graph reads top to bottom as the DAG it compiles to.
def build_retraining_pipeline(
    gpu: bool = False, cluster: bool = False, gpu_pool: GpuPool | None = None, source_pvc: str = ""
):
    """The pipeline function. `gpu` puts pretrain and finetune on the GPU pool (`gpu_pool`, else the
    default pool), `cluster` wires the ConfigMap/Secrets, `source_pvc` mounts the DICOM archive."""
    gpu_pool = gpu_pool or GpuPool()
    settings = get_settings()
    ingestion = build_ingestion_pipeline(cluster=cluster, source_pvc=source_pvc, version=False)

    # One function: its parameters are the run form, its body the DAG, top to bottom.
    @dsl.pipeline(name=PIPELINE_NAME, description="xrayops: retrain on the site's DICOM archive, gate against the champion")
    def retraining_pipeline(
        source_dir: str = SOURCE_MOUNT,
        files_per_batch: int = 2000,
        ingest_workers: int = 2,
        dvc_remote_url: str = "",
        s3_endpoint_url: str = "",
        mlflow_tracking_uri: str = "",
        model_name: str = "xrayops-region",
        champion_alias: str = "champion",
        pretrain_epochs: int = 0,
        batch_size: int = 128,
        finetune_epochs: int = 60,
        orientation_assume_upright: bool = False,
        labels_from_store: bool = False,
        seed: int = 0,
        gate_margin: float = settings.gate_margin,
        gate_bootstrap_samples: int = settings.gate_bootstrap_samples,
        gate_confidence: float = settings.gate_confidence,
        promote: bool = True,
        label_flag_below: float = 0.1,
        label_pool_studies: bool = True,
        release: bool = False,
        release_storage_uri: str = "",
        inference_service: str = settings.inference_service,
        serving_namespace: str = settings.serving_namespace,
        inference_service_manifest: str = "",
        trigger_window: str = "",
        trigger_reasons: str = "",
        trigger_log: str = "",
    ) -> dsl.Artifact:
        champion = champion_op(
            tracking_uri=mlflow_tracking_uri, model_name=model_name, alias=champion_alias
        ).set_display_name("champion")
        # The alias moves when a run promotes: never reuse a cached champion.
        champion.set_caching_options(False)
        # Ingested with the champion's preprocessing, so the gate scores both models on the same pixels.
        data = ingestion(
            source_dir=source_dir, files_per_batch=files_per_batch, image_size=champion.outputs["image_size"],
            workers=ingest_workers,
        ).set_display_name("ingestion")
        dataset = data.output
        version = version_dataset_op(
            dataset=dataset, remote_url=dvc_remote_url, s3_endpoint_url=s3_endpoint_url
        ).set_display_name("version")
        pre = pretrain_op(
            dataset=dataset, epochs=pretrain_epochs, batch_size=batch_size, seed=seed,
            method=champion.outputs["ssl_method"], arch=champion.outputs["arch"], init_from=champion.outputs["backbone"],
        ).set_display_name("pretrain")
        head = finetune_op(
            dataset=dataset, backbone=pre.outputs["backbone"], dataset_md5=version.outputs["md5"], epochs=finetune_epochs,
            seed=seed, pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, orientation_assume_upright=orientation_assume_upright,
            labels_from_store=labels_from_store,
        ).set_display_name("finetune")
        evaluation = evaluate_op(dataset=dataset, bundle=head.outputs["bundle"]).set_display_name("evaluate")
        registered = register_op(
            bundle=head.outputs["bundle"], tracking_uri=mlflow_tracking_uri, model_name=model_name, alias="challenger",
            dataset_md5=version.outputs["md5"], accuracy=evaluation.outputs["Output"],
            pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        ).set_display_name("register")
        decision = gate_op(
            dataset=dataset, champion=champion.outputs["bundle"], champion_uri=champion.outputs["model_uri"],
            challenger=head.outputs["bundle"], challenger_uri=registered.output, test_set=version.outputs["md5"],
            tracking_uri=mlflow_tracking_uri, margin=gate_margin, bootstrap_samples=gate_bootstrap_samples,
            confidence=gate_confidence, promote=promote, alias=champion_alias,
        ).set_display_name("gate")
        decision.set_caching_options(False)
        # Why this run, what changed and the evidence: the page a quality officer approves from.
        record = change_record_op(
            dataset=dataset, champion=champion.outputs["bundle"], champion_uri=champion.outputs["model_uri"],
            challenger=head.outputs["bundle"], challenger_uri=registered.output, test_set=version.outputs["md5"],
            decision=decision.outputs["decision"], dvc_remote_url=dvc_remote_url, s3_endpoint_url=s3_endpoint_url,
            labels_from_store=labels_from_store, trigger_window=trigger_window, trigger_reasons=trigger_reasons,
            trigger_log=trigger_log,
        ).set_display_name("change-record")
        record.set_caching_options(False)
        # The run's switch outside, the gate's answer inside: kfp.local resolves a condition on a
        # named task output only inside a sub-DAG (kfp 2.17), a cluster either way.
        with dsl.If(release == True, name="release-enabled"):  # noqa: E712 (a pipeline condition)
            with dsl.If(decision.outputs["promoted"] == True, name="promoted"):  # noqa: E712
                rollout = release_op(
                    model_uris=[registered.output], tracking_uri=mlflow_tracking_uri, storage_uri=release_storage_uri,
                    s3_endpoint_url=s3_endpoint_url, inference_service=inference_service, namespace=serving_namespace,
                    manifest=inference_service_manifest,
                ).set_display_name("release")
                rollout.set_caching_options(False)
                rollout.after(record)  # the evidence is written before anything is published
        audit = audit_labels_op(
            dataset=dataset, backbone=pre.outputs["backbone"], flag_below=label_flag_below, pool_studies=label_pool_studies,
        ).set_display_name("audit-labels")

        if gpu:
            for task in (pre, head):
                gpu_pool.apply(task)
        if cluster:
            for task in (version, champion, pre, head, evaluation, registered, decision, record, rollout, audit):
                _with_cluster_env(task, deid=False)
            for task in (decision, record, rollout):  # the site's approval and gate settings
                kubernetes.use_config_map_as_env(task, CLUSTER_CONFIG_MAP, {k: k for k in APPROVAL_CONFIG_KEYS},
                                                 optional=True)
        return decision.outputs["decision"]

    return retraining_pipeline


def store_arguments(settings) -> dict:
    """The pipeline arguments a site's Settings fix for every pipeline over its archive (stores,
    registry), for local launches; on a cluster the tasks read the same from xrayops-config."""
    return {
        "dvc_remote_url": settings.dvc_remote(), "s3_endpoint_url": settings.s3_endpoint_url,
        "mlflow_tracking_uri": settings.tracking_uri(), "model_name": settings.registered_model_name,
    }


def settings_arguments(settings) -> dict:
    """store_arguments plus the gate's settings: what a local retraining launch takes from Settings."""
    return {
        **store_arguments(settings), "gate_margin": settings.gate_margin,
        "gate_bootstrap_samples": settings.gate_bootstrap_samples, "gate_confidence": settings.gate_confidence,
    }


def compile_retraining(out, **options):
    """Compile to YAML (what a cluster runs); options as for build_retraining_pipeline."""
    from pipelines.run import compile_to

    return compile_to(build_retraining_pipeline(**options), out)


def run_retraining_local(pipeline_root, log_path=None, **params):
    """Run the graph with kfp.local's SubprocessRunner in this environment (pipelines/run.py;
    `log_path` takes the stages' output); the task's output is the gate's decision (JSON)."""
    from pathlib import Path

    from pipelines.run import run_pipeline_locally

    return run_pipeline_locally(build_retraining_pipeline(), Path(pipeline_root).resolve(), log_path, **params)

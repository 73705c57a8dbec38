"""The first models on a site's own archive: Langer et al. 2024's ensemble, one member per SSL method.

    ingestion (plan ─▶ ParallelFor ingest-part ─▶ merge) ─▶ version (DVC push)
    ParallelFor method in ssl_methods (SimCLR, BYOL, SupCon: Langer et al. 2024):
        pretrain (from random init) ─▶ finetune (linear head, frozen backbone) ─▶ evaluate
        ─▶ register as NAME-METHOD (alias champion)
    evaluate-ensemble (softmax average beside every member, Langer et al. 2024)
    ─▶ release (optional: all members as one serving release, the InferenceService rolled to it)

Each member is its own registered model, so the retraining pipeline (model_name=NAME-METHOD)
retrains and gates one member, and its release replaces that member only. The members are given
the alias directly: this is how a site gets its first champions. A run refuses, before any
training, to move an alias a member already holds (later models pass retraining's gate), unless
replace_champions is set.
"""
from typing import List

from kfp import dsl

from components import (
    evaluate_ensemble_op,
    evaluate_op,
    finetune_op,
    no_champions_op,
    pretrain_op,
    register_op,
    release_op,
    version_dataset_op,
)
from pipelines.gpu_pool import GpuPool
from pipelines.ingestion import SOURCE_MOUNT, build_ingestion_pipeline
from pipelines.training import _with_cluster_env
from xrayops.config import get_settings

PIPELINE_NAME = "xrayops-site-training"
# The three pretraining methods whose softmax-averaged ensemble Langer et al. 2024 report.
ENSEMBLE_METHODS = ["simclr", "byol", "supcon"]


# One function: the pipeline graph reads top to bottom as the DAG it compiles to.
def build_site_training_pipeline(
    gpu: bool = False, cluster: bool = False, gpu_pool: GpuPool | None = None, source_pvc: str = "",
    parallelism: int = 0,
):
    """The pipeline function. `gpu` puts every member's pretrain and finetune on the GPU pool,
    `cluster` wires the ConfigMap/Secrets, `source_pvc` mounts the DICOM archive, `parallelism`
    caps the members trained at once (0: all, each on its own GPU node)."""
    gpu_pool = gpu_pool or GpuPool()
    settings = get_settings()
    ingestion = build_ingestion_pipeline(cluster=cluster, source_pvc=source_pvc, version=False)

    @dsl.pipeline(name=PIPELINE_NAME, description="xrayops: Langer et al. 2024's ensemble trained on the site's DICOM archive")
    def site_training_pipeline(
        source_dir: str = SOURCE_MOUNT,
        files_per_batch: int = 2000,
        ingest_workers: int = 2,
        image_size: int = 224,
        ssl_methods: List[str] = ENSEMBLE_METHODS,
        arch: str = "resnet18",
        pretrain_epochs: int = 100,
        batch_size: int = 256,
        finetune_epochs: int = 60,
        orientation_assume_upright: bool = False,
        seed: int = 0,
        dvc_remote_url: str = "",
        s3_endpoint_url: str = "",
        mlflow_tracking_uri: str = "",
        model_name: str = settings.registered_model_name,
        alias: str = "champion",
        replace_champions: bool = False,
        release: bool = False,
        release_storage_uri: str = "",
        inference_service: str = settings.inference_service,
        serving_namespace: str = settings.serving_namespace,
        inference_service_manifest: str = "",
    ) -> float:
        # First, before hours of GPU work: members that already have champions are retrained, not replaced.
        preflight = no_champions_op(
            tracking_uri=mlflow_tracking_uri, model_name=model_name, ssl_methods=ssl_methods, alias=alias,
            replace=replace_champions,
        ).set_display_name("no-champions")
        preflight.set_caching_options(False)
        data = ingestion(
            source_dir=source_dir, files_per_batch=files_per_batch, image_size=image_size, workers=ingest_workers,
        ).set_display_name("ingestion").after(preflight)
        dataset = data.output
        version = version_dataset_op(
            dataset=dataset, remote_url=dvc_remote_url, s3_endpoint_url=s3_endpoint_url
        ).set_display_name("version")
        # Inside the loop the dataset version travels as the dvc_file artifact, not the md5 string:
        # kfp.local (2.17) replaces every task-output parameter entering a ParallelFor with the loop item.
        with dsl.ParallelFor(ssl_methods, name="members", parallelism=parallelism) as method:
            pre = pretrain_op(
                dataset=dataset, epochs=pretrain_epochs, batch_size=batch_size, seed=seed, method=method, arch=arch,
            ).set_display_name("pretrain")
            head = finetune_op(
                dataset=dataset, backbone=pre.outputs["backbone"], dataset_md5="",
                dataset_version=version.outputs["dvc_file"], epochs=finetune_epochs, seed=seed, pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                orientation_assume_upright=orientation_assume_upright,
            ).set_display_name("finetune")
            evaluation = evaluate_op(dataset=dataset, bundle=head.outputs["bundle"]).set_display_name("evaluate")
            registered = register_op(
                bundle=head.outputs["bundle"], tracking_uri=mlflow_tracking_uri, model_name=model_name, alias=alias,
                dataset_md5="", dataset_version=version.outputs["dvc_file"], accuracy=evaluation.outputs["Output"],
                pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, name_suffix=method,
            ).set_display_name("register")
        ensemble = evaluate_ensemble_op(
            dataset=dataset, bundles=dsl.Collected(head.outputs["bundle"])
        ).set_display_name("evaluate-ensemble")
        with dsl.If(release == True, name="release-enabled"):  # noqa: E712 (a pipeline condition)
            rollout = release_op(
                model_uris=dsl.Collected(registered.output), tracking_uri=mlflow_tracking_uri,
                storage_uri=release_storage_uri, s3_endpoint_url=s3_endpoint_url, inference_service=inference_service,
                namespace=serving_namespace, manifest=inference_service_manifest, replace_all=True,
            ).set_display_name("release")
            rollout.set_caching_options(False)

        if gpu:
            for task in (pre, head):
                gpu_pool.apply(task)
        if cluster:
            for task in (preflight, version, pre, head, evaluation, registered, ensemble, rollout):
                _with_cluster_env(task, deid=False)
        return ensemble.outputs["Output"]

    return site_training_pipeline


def compile_site_training(out, **options):
    """Compile to YAML (what a cluster runs); options as for build_site_training_pipeline."""
    from pipelines.run import compile_to

    return compile_to(build_site_training_pipeline(**options), out)


def run_site_training_local(pipeline_root, log_path=None, **params):
    """Run the graph with kfp.local's SubprocessRunner here; the task's output is the ensemble's accuracy.
    One machine trains the members one after another: they would share its cores, and a sqlite
    registry does not take concurrent first registrations."""
    from pathlib import Path

    from pipelines.run import run_pipeline_locally

    return run_pipeline_locally(build_site_training_pipeline(parallelism=1), Path(pipeline_root).resolve(), log_path,
                                **params)

"""Ingestion on a cluster: plan batches, ingest them in parallel (dsl.ParallelFor), merge, version.

    plan ──▶ ParallelFor(batch) { ingest-part } ──▶ merge (dsl.Collected) ──▶ version (DVC push)

`source_dir` is a folder every pod sees: on a cluster a PersistentVolumeClaim (`source_pvc`,
e.g. the landing volume `xrayops listen` writes to) mounted at SOURCE_MOUNT; with kfp.local any
local path. Each batch is a contiguous slice of the sorted file list (xrayops.ingest.slice_for_part),
and the merge re-applies the dataset-wide rules (xrayops.data.merge), so the result matches a
serial `xrayops ingest` row for row. Within a pod, `workers` processes decode in parallel.
"""
from kfp import dsl, kubernetes

from components import ingest_part_op, merge_ingest_op, plan_ingest_op, version_dataset_op
from pipelines.training import _with_cluster_env

PIPELINE_NAME = "xrayops-ingestion"
SOURCE_MOUNT = "/mnt/dicom"


def build_ingestion_pipeline(
    cluster: bool = False, source_pvc: str = "", parallelism: int = 0, version: bool = True, part_cpu: int = 2
):
    """The pipeline function. `cluster` wires the ConfigMap/Secrets (the de-identification key only
    into the ingest tasks), `source_pvc` mounts the DICOM volume, `parallelism` caps concurrent
    batches (0: no cap), `version` adds the DVC push of the merged dataset, `part_cpu` is each
    batch pod's CPU request (match the `workers` parameter)."""

    @dsl.pipeline(name=PIPELINE_NAME, description="xrayops: DICOM folder to a versioned dataset, fanned out over batches")
    def ingestion_pipeline(
        source_dir: str = SOURCE_MOUNT,
        files_per_batch: int = 2000,
        image_size: int = 64,
        workers: int = 2,
        dvc_remote_url: str = "",
        s3_endpoint_url: str = "",
    ) -> dsl.Dataset:
        plan = plan_ingest_op(source_dir=source_dir, files_per_batch=files_per_batch).set_display_name("plan")
        # The folder's content changes under the same path: a cached plan or batch would be stale.
        plan.set_caching_options(False)
        with dsl.ParallelFor(plan.output, parallelism=parallelism) as batch:
            part = ingest_part_op(
                source_dir=source_dir,
                part_index=batch.part_index,
                n_parts=batch.n_parts,
                image_size=image_size,
                workers=workers,
            ).set_display_name("ingest-part")
            part.set_caching_options(False)
            # memory per pod is flat in the batch size (xrayops.ingest): a fixed request fits any batch
            part.set_cpu_request(str(part_cpu)).set_memory_request("2G").set_memory_limit("4G")
        merged = merge_ingest_op(parts=dsl.Collected(part.outputs["dataset"])).set_display_name("merge")
        tasks = [plan, part, merged]
        if version:
            versioned = version_dataset_op(
                dataset=merged.outputs["dataset"], remote_url=dvc_remote_url, s3_endpoint_url=s3_endpoint_url
            ).set_display_name("version")
            tasks.append(versioned)
        if source_pvc:
            for task in (plan, part):
                kubernetes.mount_pvc(task, pvc_name=source_pvc, mount_path=SOURCE_MOUNT)
        if cluster:
            for task in tasks:
                _with_cluster_env(task, deid=task is part)
        return merged.outputs["dataset"]

    return ingestion_pipeline


def compile_ingestion(out, **options):
    """Compile to YAML (what a cluster runs); options as for build_ingestion_pipeline."""
    from pipelines.run import compile_to

    return compile_to(build_ingestion_pipeline(**options), out)


def run_ingestion_local(pipeline_root, version: bool = False, **params):
    """Run the graph with kfp.local's SubprocessRunner in this environment (see pipelines/run.py)."""
    from pathlib import Path

    from pipelines.run import run_pipeline_locally

    return run_pipeline_locally(build_ingestion_pipeline(version=version), Path(pipeline_root).resolve(), **params)

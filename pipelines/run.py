"""Compile the pipeline to YAML, or run it end to end with kfp.local."""
from __future__ import annotations

from pathlib import Path

from kfp import compiler, local

from pipelines.gpu_pool import GpuPool
from pipelines.training import build_pipeline


def compile_pipeline(
    out: Path,
    gpu: bool = False,
    gpu_node_pool: str = "gpu",
    gpu_count: int = 1,
    cluster: bool = False,
    gpu_pool: GpuPool | None = None,
) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    pipeline = build_pipeline(gpu=gpu, gpu_node_pool=gpu_node_pool, gpu_count=gpu_count, cluster=cluster, gpu_pool=gpu_pool)
    compiler.Compiler().compile(pipeline, package_path=str(out))
    return out


def run_local(pipeline_root: Path, **params) -> dict:
    """Run every stage as a subprocess in this Python environment (kfp.local SubprocessRunner).

    use_venv=False: the stages import the installed xrayops rather than pip-installing per task.
    """
    pipeline_root = Path(pipeline_root).resolve()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    pipeline = build_pipeline(gpu=False)
    task = pipeline(**params)
    return {"pipeline_root": str(pipeline_root), "outputs": {k: str(v) for k, v in (task.outputs or {}).items()}}

"""Compile the pipeline to YAML, or run it end to end with kfp.local."""
from __future__ import annotations

import contextlib
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
    pipeline = build_pipeline(gpu=gpu, gpu_node_pool=gpu_node_pool, gpu_count=gpu_count, cluster=cluster, gpu_pool=gpu_pool)
    return compile_to(pipeline, out)


def compile_to(pipeline, out) -> Path:
    """Compile a pipeline function to KFP v2 YAML at `out` (what a cluster runs)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, package_path=str(out))
    return out


def run_local(pipeline_root: Path, log_path: Path | None = None, **params) -> dict:
    """Run every stage as a subprocess in this Python environment (kfp.local SubprocessRunner).

    use_venv=False: the stages import the installed xrayops rather than pip-installing per task.
    `log_path` takes the stages' output (kfp.local prints it, executor JSON included, to stdout)
    and kfp.local's own warnings (display names and the image are ignored by a local runner).
    """
    pipeline_root = Path(pipeline_root).resolve()
    task = run_pipeline_locally(build_pipeline(gpu=False), pipeline_root, log_path, **params)
    return {"pipeline_root": str(pipeline_root), "outputs": {k: str(v) for k, v in (task.outputs or {}).items()}}


def run_pipeline_locally(pipeline, pipeline_root: Path, log_path: Path | None = None, **params):
    """kfp.local (SubprocessRunner, this environment) run of `pipeline`; returns its task.
    With `log_path`, the stages' output goes there instead of stdout."""
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    if log_path is None:
        return pipeline(**params)
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            return pipeline(**params)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc} (stage output: {log_path})") from exc

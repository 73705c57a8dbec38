"""The KFP pipeline: compiled YAML (what a cluster runs) and a kfp.local run of the same graph."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.run import compile_pipeline, run_local

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"synth", "ingest", "version", "pretrain", "finetune", "evaluate", "register", "monitor"}


def _load(path: Path) -> list[dict]:
    return list(yaml.safe_load_all(path.read_text()))


def test_compiled_yaml_has_every_stage_on_one_image(tmp_path):
    # Through the CLI in a fresh process, since the image name is read from XRAYOPS_IMAGE at import.
    out = tmp_path / "p.yaml"
    env = {**os.environ, "XRAYOPS_IMAGE": "registry.example/xrayops:9.9"}
    subprocess.run(
        [sys.executable, "-m", "xrayops.cli", "pipeline", "compile", "--out", str(out)], check=True, env=env, cwd=ROOT
    )
    spec = _load(out)[0]
    tasks = spec["root"]["dag"]["tasks"]
    names = {t["taskInfo"]["name"] for t in tasks.values()}
    assert STAGES <= names and {"synth-shifted", "ingest-shifted"} <= names
    executors = spec["deploymentSpec"]["executors"].values()
    images = {e["container"]["image"] for e in executors}
    assert images == {"registry.example/xrayops:9.9"}
    # The image already holds kfp and xrayops: no pip install at run time.
    assert not any("pip install" in " ".join(e["container"].get("command", [])) for e in executors)
    # finetune consumes the DVC hash, so lineage is wired through the graph.
    finetune = next(t for t in tasks.values() if t["taskInfo"]["name"] == "finetune")
    assert finetune["inputs"]["parameters"]["dataset_md5"]["taskOutputParameter"]["producerTask"] == "version-dataset-op"


def test_gpu_flag_schedules_training_on_the_gpu_pool(tmp_path):
    docs = _load(compile_pipeline(tmp_path / "gpu.yaml", gpu=True, gpu_node_pool="a100"))
    spec, platform = docs[0], docs[1]
    gpu_executors = {
        name
        for name, e in spec["deploymentSpec"]["executors"].items()
        if e["container"].get("resources", {}).get("accelerator", {}).get("resourceType") == "nvidia.com/gpu"
    }
    assert gpu_executors == {"exec-pretrain-op", "exec-finetune-op"}
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in gpu_executors:
        assert k8s[name]["nodeSelector"]["labels"] == {"xrayops.io/pool": "a100"}
        assert k8s[name]["tolerations"][0]["key"] == "nvidia.com/gpu"
    cpu_docs = _load(compile_pipeline(tmp_path / "cpu.yaml"))
    assert len(cpu_docs) == 1  # no platform spec without --gpu


@pytest.mark.slow
def test_kfp_local_runs_the_whole_graph(tmp_path):
    root = tmp_path / "kfp"
    run_local(
        root,
        n_images=84,
        synth_size=64,
        image_size=32,
        pretrain_epochs=1,
        batch_size=32,
        finetune_epochs=5,
        drift_images=28,
        dvc_remote_url=str(tmp_path / "remote"),
        mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    outputs = {p.parent.name: p for p in root.rglob("*") if p.is_file()}
    run_dirs = {p.name.split("-")[0] for p in root.iterdir()} if root.exists() else set()
    assert run_dirs, "kfp.local wrote no run folder"
    manifest = next(root.rglob("manifest.parquet"))
    assert manifest.stat().st_size > 0
    assert next(root.rglob("weights.pt")).stat().st_size > 1_000_000
    assert (tmp_path / "remote").is_dir() and any((tmp_path / "remote").rglob("*"))
    metrics = next(p for p in root.rglob("metrics") if p.is_file())
    assert "accuracy" in json.loads(metrics.read_text()) or metrics.read_text()
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_model_version_by_alias("xrayops-region", "champion").version == "1"
    assert outputs

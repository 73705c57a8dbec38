"""The KFP pipeline: compiled YAML (what a cluster runs) and a kfp.local run of the same graph."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipelines.run import compile_pipeline, run_local

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"synth", "ingest", "version", "pretrain", "finetune", "audit-labels", "evaluate", "register", "monitor"}


def _load(path: Path) -> list[dict]:
    return list(yaml.safe_load_all(path.read_text()))


def test_compiled_yaml_has_every_stage_on_one_image(tmp_path):
    # Through the CLI in a fresh process, since the image name is read from XRAYOPS_IMAGE at import.
    out = tmp_path / "p.yaml"
    env = {**os.environ, "XRAYOPS_IMAGE": "registry.example/xrayops:9.9"}
    subprocess.run(
        [sys.executable, "-m", "xrayops.app.cli", "pipeline", "compile", "--out", str(out)], check=True, env=env, cwd=ROOT
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
    # The orientation head (paper 004) learns from the synthetic truth angles next to the DICOM.
    assert finetune["inputs"]["artifacts"]["dicom"]["taskOutputArtifact"]["producerTask"] == "synth-op"
    pretrain = next(t for t in tasks.values() if t["taskInfo"]["name"] == "pretrain")
    assert pretrain["inputs"]["parameters"]["method"]["componentInputParameter"] == "ssl_method"
    assert spec["root"]["inputDefinitions"]["parameters"]["ssl_method"]["defaultValue"] == "simclr"


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
def test_kfp_local_runs_the_whole_graph(tmp_path, capsys):
    root = tmp_path / "kfp"
    run_local(
        root,
        log_path=tmp_path / "kfp-local.log",
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
    # The stages' output (executor JSON included) went to the log, not to the caller's stdout.
    assert "parameterValues" not in capsys.readouterr().out
    assert "parameterValues" in (tmp_path / "kfp-local.log").read_text()
    (run,) = list(root.iterdir())  # one run folder, one sub-folder per task
    tasks = {p.name: json.loads((p / "executor_output.json").read_text()) for p in run.iterdir()}
    assert set(tasks) == {
        "synth-op", "synth-op-2", "ingest-op", "ingest-op-2", "version-dataset-op",
        "pretrain-op", "finetune-op", "audit-labels-op", "evaluate-op", "register-op", "monitor-op",
    }
    assert (run / "ingest-op" / "dataset" / "manifest.parquet").stat().st_size > 0
    assert (run / "finetune-op" / "bundle" / "weights.pt").stat().st_size > 1_000_000
    md5 = tasks["version-dataset-op"]["parameterValues"]["md5"]
    assert md5.endswith(".dir") and any((tmp_path / "remote").rglob(md5.removesuffix(".dir")[2:] + "*"))
    metrics = tasks["evaluate-op"]["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["n"] > 0
    assert tasks["register-op"]["parameterValues"]["Output"] == "models:/xrayops-region/1"
    # The training tags are audited on the frozen backbone: every labelled train/val image scored.
    audit = tasks["audit-labels-op"]["artifacts"]["issues"]["artifacts"][0]["metadata"]
    scores = pd.read_parquet(run / "audit-labels-op" / "issues" / "label_scores.parquet")
    assert audit["n_images"] == len(scores) > 0 and set(scores["split"]) <= {"train", "val"}
    assert audit["n_issues"] == int(scores["is_issue"].sum())
    assert tasks["audit-labels-op"]["parameterValues"]["n_issues"] == audit["n_issues"]
    assert (run / "audit-labels-op" / "worklist").read_text().startswith("<!")
    # The shifted batch comes from another vendor: the monitor step must call for retraining.
    assert tasks["monitor-op"]["parameterValues"]["retrain"] is True
    # ... and adds the window to an Evidently workspace inside its output artifact.
    evidently = tasks["monitor-op"]["artifacts"]["evidently"]["artifacts"][0]["metadata"]
    assert evidently["snapshot_id"] and any((run / "monitor-op" / "evidently").rglob(f"*{evidently['snapshot_id']}*"))
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    version = client.get_model_version_by_alias("xrayops-region", "champion")
    assert client.get_run(version.run_id).data.tags["xrayops.dataset_md5"] == md5

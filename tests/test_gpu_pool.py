"""GPU node-pool settings are configurable per cluster and land in the compiled pipeline YAML."""
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from pipelines.gpu_pool import GpuPool
from pipelines.run import compile_pipeline
from xrayops.app.cli import app

GKE = {
    "accelerator_type": "NVIDIA_TESLA_A100",
    "accelerator_limit": 4,
    "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100", "team": "radiology"},
    "tolerations": [
        {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"},
        {"key": "spot", "operator": "Exists", "effect": None},
    ],
}


def _gpu_tasks(path: Path) -> tuple[dict, dict]:
    spec, platform = list(yaml.safe_load_all(path.read_text()))
    executors = spec["deploymentSpec"]["executors"]
    resources = {name: e["container"].get("resources", {}) for name, e in executors.items()}
    placement = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return {n: r for n, r in resources.items() if r.get("accelerator")}, placement


def test_a_clusters_own_pool_is_in_the_compiled_yaml(tmp_path):
    pool_file = tmp_path / "gke.yaml"
    pool_file.write_text(yaml.safe_dump(GKE))
    pool = GpuPool.from_file(pool_file)
    resources, placement = _gpu_tasks(compile_pipeline(tmp_path / "p.yaml", gpu=True, gpu_pool=pool))
    assert set(resources) == {"exec-pretrain-op", "exec-finetune-op"}
    for name, r in resources.items():
        assert r["accelerator"]["resourceType"] == "NVIDIA_TESLA_A100"
        assert int(r["accelerator"]["resourceCount"]) == 4
        assert placement[name]["nodeSelector"]["labels"] == GKE["node_selector"]
        assert placement[name]["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"},
            {"key": "spot", "operator": "Exists"},
        ]
    # Only the training tasks are placed on the GPU pool.
    assert not {"exec-evaluate-op", "exec-ingest-op", "exec-register-op"} & set(placement)


def test_default_pool_matches_the_infra_labels_and_the_cli_reads_a_pool_file(tmp_path):
    default = GpuPool()
    assert default.accelerator_type == "nvidia.com/gpu" and default.accelerator_limit == 1
    assert default.node_selector == {"xrayops.io/pool": "gpu"}
    assert [t.model_dump() for t in default.tolerations] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "value": None, "effect": "NoSchedule"}
    ]
    pool_file = tmp_path / "pool.json"
    pool_file.write_text('{"accelerator_limit": 2, "node_selector": {"pool": "h100"}}')
    out = tmp_path / "cli.yaml"
    result = CliRunner().invoke(app, ["pipeline", "compile", "--out", str(out), "--gpu-pool", str(pool_file)])
    assert result.exit_code == 0, result.output
    resources, placement = _gpu_tasks(out)
    assert {int(r["accelerator"]["resourceCount"]) for r in resources.values()} == {2}
    assert {str(placement[n]["nodeSelector"]["labels"]) for n in resources} == {"{'pool': 'h100'}"}
    with pytest.raises(ValidationError):
        GpuPool.model_validate({"accelerator_limit": 0})
    with pytest.raises(ValidationError):
        GpuPool.model_validate({"node_selectors": {}})  # a typo is an error, not a silent default

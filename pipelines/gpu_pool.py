"""GPU node-pool scheduling of the training tasks, configurable per cluster.

Clusters differ in how GPU nodes are named and tainted (GKE: cloud.google.com/gke-accelerator
and nvidia.com/gpu=present:NoSchedule; EKS: a nodegroup label; on-prem: anything), so every
piece is a setting. The defaults match infra/k8s (label xrayops.io/pool, taint nvidia.com/gpu).
A cluster's file (JSON or YAML) holds a GpuPool; `xrayops pipeline compile --gpu-pool FILE`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from kfp import dsl, kubernetes
from pydantic import BaseModel, ConfigDict, Field


class Toleration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = "NoSchedule"


class GpuPool(BaseModel):
    """Where and with what a GPU task runs: resources via kfp, placement via kfp-kubernetes."""

    model_config = ConfigDict(extra="forbid")

    accelerator_type: str = "nvidia.com/gpu"  # kfp set_accelerator_type (the resource name)
    accelerator_limit: int = Field(1, ge=1)  # GPUs per task (torchrun --nproc_per_node)
    node_selector: dict[str, str] = Field(default_factory=lambda: {"xrayops.io/pool": "gpu"})
    tolerations: list[Toleration] = Field(default_factory=lambda: [Toleration(key="nvidia.com/gpu")])
    # CPU and memory of a GPU step (data loading, augmentation): requested so the scheduler places
    # it, limited so one step cannot starve the node's other pods.
    cpu_request: str = "4"
    cpu_limit: str = "8"
    memory_request: str = "16G"
    memory_limit: str = "32G"

    @classmethod
    def from_file(cls, path: Path) -> "GpuPool":
        text = Path(path).read_text()
        data = json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)
        return cls.model_validate(data or {})

    @classmethod
    def labelled(cls, node_pool: str = "gpu", count: int = 1) -> "GpuPool":
        """The default pool (infra/k8s): nodes labelled xrayops.io/pool=`node_pool`, `count` GPUs a task."""
        return cls(accelerator_limit=count, node_selector={"xrayops.io/pool": node_pool})

    def apply(self, task: dsl.PipelineTask) -> dsl.PipelineTask:
        task.set_accelerator_type(self.accelerator_type).set_accelerator_limit(self.accelerator_limit)
        # A GPU the step cannot use fails it with the driver it needs, never a CPU run (xrayops.train.runtime).
        task.set_env_variable("XRAYOPS_DEVICE", "cuda")
        task.set_cpu_request(self.cpu_request).set_cpu_limit(self.cpu_limit)
        task.set_memory_request(self.memory_request).set_memory_limit(self.memory_limit)
        for key, value in self.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for t in self.tolerations:
            kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value, effect=t.effect)
        return task

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
        for key, value in self.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for t in self.tolerations:
            kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value, effect=t.effect)
        return task

"""Device selection never runs on the CPU while the container holds a GPU it cannot use: a GPU
asked for (XRAYOPS_DEVICE=cuda, or one handed over by the NVIDIA device plugin) with an unusable
CUDA is an error naming the driver the torch build needs."""
from __future__ import annotations

import pytest
import torch

from xrayops.train import runtime
from xrayops.train.runtime import DeviceError, driver_requirement, gpu_requested, installed_driver, resolve_device


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(runtime, "installed_driver", lambda path=runtime.DRIVER_VERSION_FILE: "535.104.05")


def test_auto_without_a_gpu_runs_on_the_cpu(no_cuda, monkeypatch):
    monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("XRAYOPS_DEVICE", "cpu")
    assert resolve_device("auto") == torch.device("cpu")
    for nothing in ("void", "none", "", "NONE"):
        monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", nothing)
        assert resolve_device("auto") == torch.device("cpu"), nothing


def test_auto_with_a_gpu_handed_over_and_no_cuda_fails_naming_the_driver(no_cuda, monkeypatch):
    monkeypatch.delenv("XRAYOPS_DEVICE", raising=False)
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "GPU-3f9c2a1e-0000-1111-2222-333344445555")
    with pytest.raises(DeviceError) as caught:
        resolve_device("auto")
    message = str(caught.value)
    assert "NVIDIA_VISIBLE_DEVICES=GPU-3f9c2a1e" in message
    assert "CUDA 12.8, which needs NVIDIA driver >= 570.26" in message
    assert "the node's driver is 535.104.05" in message
    assert "refusing to fall back to the CPU" in message
    assert isinstance(caught.value, RuntimeError)  # serving keeps the pod not-ready with this reason


def test_cuda_asked_for_explicitly_fails_the_same_way(no_cuda, monkeypatch):
    monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("XRAYOPS_DEVICE", raising=False)
    with pytest.raises(DeviceError, match=r"device 'cuda' requested but CUDA is not available.*>= 570\.26"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="device 'cuda:1' requested"):
        resolve_device("cuda:1")


def test_pod_env_asking_for_cuda_makes_auto_strict(no_cuda, monkeypatch):
    """The GPU steps and predictors of the gpu-cloud overlay set XRAYOPS_DEVICE=cuda; code that
    resolves "auto" (pretraining's config) still refuses the CPU there."""
    monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("XRAYOPS_DEVICE", "cuda")
    with pytest.raises(DeviceError, match=r"XRAYOPS_DEVICE=cuda is set but CUDA is not available"):
        resolve_device("auto")


def test_cuda_present_is_used(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "all")
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


def test_driver_requirement_for_known_unknown_and_cpu_builds(monkeypatch):
    assert driver_requirement("13.0").endswith("needs NVIDIA driver >= 580.65.06 (Linux)")
    assert driver_requirement("12.4.1").endswith(">= 550.54.14 (Linux)")
    unknown = driver_requirement("12.7")
    assert "CUDA 12.7" in unknown and "at least 525.60.13" in unknown
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "has no CUDA support" in driver_requirement()


def test_gpu_requested_reads_the_device_plugin_variable():
    assert gpu_requested({"NVIDIA_VISIBLE_DEVICES": "0,1"})
    assert gpu_requested({"XRAYOPS_DEVICE": "cuda:0"}) and not gpu_requested({"XRAYOPS_DEVICE": "auto"})
    assert gpu_requested({"NVIDIA_VISIBLE_DEVICES": "all"})
    assert not gpu_requested({"NVIDIA_VISIBLE_DEVICES": "void"})
    assert not gpu_requested({})


def test_installed_driver_reads_the_kernel_module_version(tmp_path):
    version = tmp_path / "version"
    version.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC 2024\n"
                       "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    assert installed_driver(str(version)) == "550.54.14"
    assert installed_driver(str(tmp_path / "absent")) is None

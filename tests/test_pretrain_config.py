"""Paper 000's pretraining hyperparameters are the defaults, every one reaches the objects it
configures, bf16 autocast is chosen as documented, and a seed fixes a run."""
import pytest
import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import BYOLProjectionHead, SimCLRProjectionHead
from tiny_dataset import make_data_dir

from xrayops.models.backbone import load_backbone
from xrayops.train import PretrainConfig, pretrain
from xrayops.train.pretrain import autocast_dtype, build_training, train_step
from xrayops.train.runtime import Distributed

torch.set_num_threads(1)
CPU = torch.device("cpu")


def test_defaults_are_paper_000():
    cfg = PretrainConfig()
    assert (cfg.arch, cfg.lr, cfg.weight_decay, cfg.temperature, cfg.tau_base) == ("resnet18", 3e-4, 1e-4, 0.5, 0.9995)
    model, _, optimizer, scheduler = build_training(cfg, CPU, Distributed(), total_steps=10)
    assert isinstance(model.criterion, NTXentLoss) and model.criterion.temperature == 0.5
    assert isinstance(model.projection, SimCLRProjectionHead)
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]["lr"] == 3e-4 and optimizer.param_groups[0]["weight_decay"] == 1e-4
    assert isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) and scheduler.T_max == 10


def test_every_hyperparameter_is_configurable():
    cfg = PretrainConfig(method="byol", arch="resnet50", lr=1e-3, weight_decay=0.05, tau_base=0.99,
                         proj_hidden_dim=64, proj_out_dim=16)
    model, _, optimizer, _ = build_training(cfg, CPU, Distributed(), total_steps=100)
    assert model.backbone.fc.__class__.__name__ == "Identity" and model.backbone.layer4[0].conv3 is not None  # ResNet50
    assert isinstance(model.projection, BYOLProjectionHead)
    assert model.projection.layers[0].in_features == 2048 and model.projection.layers[-1].out_features == 16
    assert model.tau_base == 0.99 and model.momentum(0, 100) == pytest.approx(0.99) and model.momentum(100, 100) == 1.0
    assert optimizer.param_groups[0]["lr"] == 1e-3 and optimizer.param_groups[0]["weight_decay"] == 0.05
    simclr, *_ = build_training(PretrainConfig(temperature=0.2), CPU, Distributed(), 1)
    supcon, *_ = build_training(PretrainConfig(method="supcon", temperature=0.07), CPU, Distributed(), 1)
    assert simclr.criterion.temperature == 0.2 and supcon.criterion.temperature == 0.07


def test_bf16_autocast_where_documented_and_a_cpu_bf16_step_trains():
    assert autocast_dtype(CPU, PretrainConfig()) is None  # fp32 on CPU unless asked
    assert autocast_dtype(CPU, PretrainConfig(cpu_bf16=True)) == torch.bfloat16
    cfg = PretrainConfig(cpu_bf16=True, proj_hidden_dim=32, proj_out_dim=8)
    model, loss_module, optimizer, scheduler = build_training(cfg, CPU, Distributed(), 2)
    before = model.backbone.conv1.weight.detach().clone()
    views = torch.rand(2, 8, 1, 32, 32)
    loss = train_step(loss_module, optimizer, scheduler, views[0], views[1], None, torch.bfloat16)
    assert torch.isfinite(loss) and loss.dtype == torch.float32  # the loss is computed in fp32
    assert model.backbone.conv1.weight.dtype == torch.float32  # master weights stay fp32
    assert not torch.equal(before, model.backbone.conv1.weight)


def test_the_seed_fixes_the_run(tmp_path):
    data = make_data_dir(tmp_path / "data", n_per_class=4, n_unknown=0, size=32)
    cfg = PretrainConfig(epochs=1, batch_size=8, proj_hidden_dim=32, proj_out_dim=8)
    a = pretrain(data.data_dir, tmp_path / "a", cfg, progress=False)
    b = pretrain(data.data_dir, tmp_path / "b", cfg, progress=False)
    c = pretrain(data.data_dir, tmp_path / "c", cfg.model_copy(update={"seed": 1}), progress=False)
    assert a.losses == b.losses and a.losses != c.losses
    weights = [load_backbone(r.backbone_path)[0].conv1.weight for r in (a, b, c)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_the_cli_passes_every_hyperparameter(monkeypatch, tmp_path):
    import importlib

    from typer.testing import CliRunner

    from xrayops.app.cli import app

    module = importlib.import_module("xrayops.train.pretrain")  # the module, not the function
    monkeypatch.setattr(module, "pretrain", lambda data_dir, out, cfg: cfg)  # echo the config as JSON
    args = ["pretrain", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--method", "byol", "--arch",
            "resnet50", "--lr", "0.001", "--weight-decay", "0.01", "--temperature", "0.1", "--tau-base", "0.99",
            "--checkpoint-every", "7"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    cfg = PretrainConfig.model_validate_json(result.output)
    assert (cfg.method, cfg.arch, cfg.lr, cfg.weight_decay, cfg.temperature, cfg.tau_base, cfg.checkpoint_every_steps) == (
        "byol", "resnet50", 1e-3, 0.01, 0.1, 0.99, 7)

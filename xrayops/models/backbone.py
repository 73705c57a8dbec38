"""ResNet backbones for grey-scale radiographs, and their on-disk form (backbone.pt)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet18, resnet50

# Langer et al. 2024: torchvision ResNet18, fc removed -> 512-d embedding; ResNet50 was no better.
ARCHS = {"resnet18": (resnet18, 512), "resnet50": (resnet50, 2048)}


def build_backbone(arch: str = "resnet18", in_chans: int = 1) -> tuple[nn.Module, int]:
    """A randomly initialised ResNet (Langer et al. 2024: no ImageNet weights) returning embeddings.

    The first convolution takes `in_chans` channels (radiographs are grey-scale) and the
    classifier is replaced by Identity, so `backbone(x)` is `(batch, embedding_dim)`.
    Nothing is downloaded.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown backbone arch {arch!r}; choose one of {sorted(ARCHS)}")
    factory, embedding_dim = ARCHS[arch]
    model = factory(weights=None)
    model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision does
    model.fc = nn.Identity()
    return model, embedding_dim


def save_backbone(path: Path, backbone: nn.Module, arch: str, ssl_method: str, in_chans: int = 1) -> Path:
    """Write backbone.pt: the backbone's state_dict plus what is needed to rebuild it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    torch.save({"arch": arch, "in_chans": in_chans, "ssl_method": ssl_method, "state_dict": state}, path)
    return path


def load_backbone(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, int, dict]:
    """Rebuild a backbone from backbone.pt -> (module, embedding_dim, info with arch/ssl_method)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone file not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        arch, state = blob["arch"], blob["state_dict"]
    except Exception as exc:  # torch raises many types for a damaged file
        raise ValueError(f"{path} is not a backbone.pt written by save_backbone: {exc}") from exc
    backbone, embedding_dim = build_backbone(arch, blob.get("in_chans", 1))
    backbone.load_state_dict(state)
    info = {"arch": arch, "ssl_method": blob.get("ssl_method", ""), "in_chans": blob.get("in_chans", 1)}
    return backbone.to(device), embedding_dim, info


STAGES = ("layer1", "layer2", "layer3", "layer4")


def stage_features(backbone: nn.Module, x: torch.Tensor, stages: tuple[str, ...] | list[str] = ("layer4",)) -> torch.Tensor:
    """Global-average-pooled outputs of the named ResNet stages, concatenated: (batch, sum of widths).

    ("layer4",) is exactly `backbone(x)`. Earlier stages keep finer texture and shape cues
    that a contrastive objective partly discards in the last stage, which a linear probe can
    use (multi-scale probes; measured in benchmarks/README.md, label noise).
    """
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ValueError(f"stages must be a non-empty subset of {STAGES}, got {list(stages)}")
    h = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
    pooled = {}
    for name in STAGES[: max(STAGES.index(s) for s in stages) + 1]:
        h = getattr(backbone, name)(h)
        if name in stages:
            pooled[name] = torch.flatten(backbone.avgpool(h), 1)
    return torch.cat([pooled[s] for s in STAGES if s in stages], dim=1)

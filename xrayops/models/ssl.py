"""Self-supervised pretraining objectives. Each method maps two views of a batch to a loss.

`SSL_METHODS` is the registry that `xrayops.train.pretrain` builds from; BYOL and SupCon
(paper 000) slot in as further entries with the same `loss(view_a, view_b)` interface.
"""
from __future__ import annotations

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import nn


class SimCLRModel(nn.Module):
    """SimCLR (Chen et al. 2020) as in paper 000: backbone -> 2-layer MLP head with BN and ReLU
    -> NT-Xent with temperature 0.5."""

    def __init__(
        self,
        backbone: nn.Module,
        embedding_dim: int,
        hidden_dim: int = 512,
        out_dim: int = 128,
        temperature: float = 0.5,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = SimCLRProjectionHead(embedding_dim, hidden_dim, out_dim, num_layers=2, batch_norm=True)
        self.criterion = NTXentLoss(temperature=temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.backbone(x))

    def loss(self, view_a: torch.Tensor, view_b: torch.Tensor) -> torch.Tensor:
        # One forward over both views, so batch norm sees the whole 2N batch, as in SimCLR.
        z = self(torch.cat([view_a, view_b]))
        z_a, z_b = z.float().chunk(2)  # the loss in fp32 even under bf16 autocast
        return self.criterion(z_a, z_b)


SSL_METHODS: dict[str, type[nn.Module]] = {"simclr": SimCLRModel}


def build_ssl_model(
    method: str,
    backbone: nn.Module,
    embedding_dim: int,
    hidden_dim: int = 512,
    out_dim: int = 128,
    temperature: float = 0.5,
) -> nn.Module:
    if method not in SSL_METHODS:
        raise ValueError(f"unknown SSL method {method!r}; available: {sorted(SSL_METHODS)}")
    return SSL_METHODS[method](backbone, embedding_dim, hidden_dim, out_dim, temperature)

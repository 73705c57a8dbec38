"""Self-supervised (and supervised-contrastive) pretraining objectives of Langer et al. 2024.

Every method has the same interface, which `xrayops.train.pretrain` drives:
`loss(view_a, view_b, labels) -> scalar` on two augmented views of one batch, and
`after_step(step, total_steps)` for per-step bookkeeping (BYOL's momentum update).
`labels` are class ids, -1 for unlabelled images; only SupCon uses them.

Losses and heads come from lightly 1.6 (NTXentLoss, NegativeCosineSimilarity, the BYOL and
SimCLR heads, update_momentum, cosine_schedule). lightly 1.6 has no supervised contrastive
loss, so `SupConLoss` is written here (Khosla et al. 2020).
"""
from __future__ import annotations

import copy

import torch
from lightly.loss import NegativeCosineSimilarity, NTXentLoss
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead, SimCLRProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils import dist as lightly_dist
from lightly.utils.scheduler import cosine_schedule
from torch import distributed as dist
from torch import nn
from torch.nn import functional as F


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SSLModel(nn.Module):
    """Base: a backbone whose embedding is what pretraining produces (backbone.pt)."""

    needs_labels = False

    def loss(self, view_a: torch.Tensor, view_b: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after each optimiser step (`step` = steps done so far)."""


class SimCLRModel(SSLModel):
    """SimCLR (Chen et al. 2020) as in Langer et al. 2024: backbone -> 2-layer MLP head with BN and ReLU
    -> NT-Xent with temperature 0.5."""

    def __init__(
        self,
        backbone: nn.Module,
        embedding_dim: int,
        hidden_dim: int = 512,
        out_dim: int = 128,
        temperature: float = 0.5,
        **_: object,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = SimCLRProjectionHead(embedding_dim, hidden_dim, out_dim, num_layers=2, batch_norm=True)
        # Under DDP the negatives of every rank take part, as in a single large batch.
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=_distributed())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.backbone(x))

    def loss(self, view_a: torch.Tensor, view_b: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        # One forward over both views, so batch norm sees the whole 2N batch, as in SimCLR.
        z = self(torch.cat([view_a, view_b]))
        z_a, z_b = z.float().chunk(2)  # the loss in fp32 even under bf16 autocast
        return self.criterion(z_a, z_b)


class BYOLModel(SSLModel):
    """BYOL (Grill et al. 2020), Langer et al. 2024: online network (backbone, projection, prediction)
    regresses the momentum (target) network's projection of the other view; the target's
    momentum follows a cosine schedule from tau_base = 0.9995 to 1 (Langer et al. 2024)."""

    def __init__(
        self,
        backbone: nn.Module,
        embedding_dim: int,
        hidden_dim: int = 512,
        out_dim: int = 128,
        tau_base: float = 0.9995,
        **_: object,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = BYOLProjectionHead(embedding_dim, hidden_dim, out_dim)
        self.prediction = BYOLPredictionHead(out_dim, hidden_dim, out_dim)
        # The target network is part of state_dict, so checkpoints carry it.
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_momentum = copy.deepcopy(self.projection)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_momentum)
        self.tau_base = tau_base
        self.criterion = NegativeCosineSimilarity()

    def loss(self, view_a: torch.Tensor, view_b: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        both = torch.cat([view_a, view_b])
        p_a, p_b = self.prediction(self.projection(self.backbone(both))).float().chunk(2)
        with torch.no_grad():
            z_a, z_b = self.projection_momentum(self.backbone_momentum(both)).float().chunk(2)
        # Symmetrised: each view's prediction regresses the other view's target projection.
        return 0.5 * (self.criterion(p_a, z_b) + self.criterion(p_b, z_a))

    def momentum(self, step: int, total_steps: int) -> float:
        return cosine_schedule(min(step, total_steps), max(total_steps, 1), self.tau_base, 1.0)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        m = self.momentum(step, total_steps)
        update_momentum(self.backbone, self.backbone_momentum, m)
        update_momentum(self.projection, self.projection_momentum, m)


class SupConLoss(nn.Module):
    """Supervised contrastive loss, L^sup_out of Khosla et al. 2020 ("Supervised Contrastive
    Learning", NeurIPS, eq. 2): for anchor i among the 2N views, with positives P(i) = the other
    views of the same class,

        L_i = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / tau) / sum_{a != i} exp(z_i.z_a / tau) )

    averaged over anchors. Unlabelled images (label -1) are their own class, so for them only
    the other view is positive and the term is SimCLR's NT-Xent. Under DDP the anchors are the
    local views and the contrast set is every rank's views (as lightly's NTXentLoss does).
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n = len(z_a)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        rank = lightly_dist.rank() if _distributed() else 0
        # Unlabelled images get a class of their own, unique across ranks.
        ids = torch.arange(n, device=labels.device) + rank * n
        classes = torch.where(labels >= 0, labels, -1 - ids)
        anchors = F.normalize(torch.cat([z_a, z_b]), dim=1)
        anchor_classes = torch.cat([classes, classes])
        if _distributed():
            gathered_a = torch.cat(lightly_dist.gather(z_a))
            gathered_b = torch.cat(lightly_dist.gather(z_b))
            contrast = F.normalize(torch.cat([gathered_a, gathered_b]), dim=1)
            all_classes = [torch.empty_like(classes) for _ in range(dist.get_world_size())]
            dist.all_gather(all_classes, classes)
            contrast_classes = torch.cat([torch.cat(all_classes)] * 2)
            world = dist.get_world_size()
            # Index of anchor j in the contrast set: view a block, then view b block.
            local = torch.arange(n, device=z_a.device) + rank * n
            self_index = torch.cat([local, local + world * n])
        else:
            contrast, contrast_classes = anchors, anchor_classes
            self_index = torch.arange(2 * n, device=z_a.device)
        logits = anchors @ contrast.T / self.temperature
        not_self = torch.ones_like(logits, dtype=torch.bool)
        not_self[torch.arange(2 * n, device=logits.device), self_index] = False
        positive = (anchor_classes[:, None] == contrast_classes[None, :]) & not_self
        log_prob = logits - torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), dim=1, keepdim=True)
        per_anchor = -(log_prob * positive).sum(1) / positive.sum(1).clamp_min(1)
        return per_anchor.mean()


class SupConModel(SimCLRModel):
    """SupCon (Langer et al. 2024: "the positives are all views of the same class"); SimCLR's
    projection head, and the PACS region tags as classes."""

    needs_labels = True

    def __init__(self, backbone: nn.Module, embedding_dim: int, temperature: float = 0.5, **kwargs: object) -> None:
        super().__init__(backbone, embedding_dim, temperature=temperature, **kwargs)
        self.criterion = SupConLoss(temperature)

    def loss(self, view_a: torch.Tensor, view_b: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            raise ValueError("SupCon needs labels (class ids, -1 for unlabelled images)")
        z_a, z_b = self.projection(self.backbone(torch.cat([view_a, view_b]))).float().chunk(2)
        return self.criterion(z_a, z_b, labels)


SSL_METHODS: dict[str, type[SSLModel]] = {"simclr": SimCLRModel, "byol": BYOLModel, "supcon": SupConModel}


def build_ssl_model(
    method: str,
    backbone: nn.Module,
    embedding_dim: int,
    hidden_dim: int = 512,
    out_dim: int = 128,
    temperature: float = 0.5,
    tau_base: float = 0.9995,
) -> SSLModel:
    if method not in SSL_METHODS:
        raise ValueError(f"unknown SSL method {method!r}; available: {sorted(SSL_METHODS)}")
    return SSL_METHODS[method](
        backbone, embedding_dim, hidden_dim=hidden_dim, out_dim=out_dim, temperature=temperature, tau_base=tau_base
    )

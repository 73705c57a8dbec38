"""Classification heads on a backbone, plus their calibration and out-of-domain score."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def linear_head(embedding_dim: int, n_classes: int) -> nn.Linear:
    # Langer et al. 2024, linear evaluation: a single fully connected layer on the frozen backbone.
    return nn.Linear(embedding_dim, n_classes)


def orientation_head(embedding_dim: int) -> nn.Linear:
    # Baltruschat et al. 2018, "off-the-shelf": a linear layer with 2 outputs, (cos theta, sin theta).
    return nn.Linear(embedding_dim, 2)


def angle_to_vector(angle_deg: torch.Tensor) -> torch.Tensor:
    """Angles in degrees (n,) -> their points on the unit circle (n, 2) = (cos, sin)."""
    radians = torch.deg2rad(angle_deg.float())
    return torch.stack([torch.cos(radians), torch.sin(radians)], dim=-1)


def vector_to_angle(vector: torch.Tensor) -> torch.Tensor:
    """(n, 2) (cos, sin) estimates -> angles in degrees in [0, 360). The norm does not matter."""
    return torch.rad2deg(torch.atan2(vector[..., 1], vector[..., 0])) % 360.0


def orientation_loss(predicted: torch.Tensor, angle_deg: torch.Tensor) -> torch.Tensor:
    """Baltruschat et al. 2018, eq. for E: mean over images of ||z(theta) - prediction||^2 with
    z(theta) = (cos theta, sin theta). Plain MSE on the angle is wrong at the 0/360 wrap."""
    return (predicted.float() - angle_to_vector(angle_deg)).pow(2).sum(-1).mean()


def angular_error(predicted_deg, true_deg):
    """Absolute angle difference in degrees on the circle, in [0, 180] (tensors or arrays)."""
    diff = (predicted_deg - true_deg) % 360.0
    return 180.0 - abs(180.0 - diff)


def fold_standardization(head: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> nn.Linear:
    """The single linear layer computing head((x - mean) / std) on raw embeddings x.

    Linear probes train better on standardised features (MAE, He et al. 2022, puts a
    BatchNorm without affine parameters before the probe); folding it into the weights keeps
    Langer et al. 2024's "one fully connected layer".
    """
    folded = nn.Linear(head.in_features, head.out_features)
    with torch.no_grad():
        weight = head.weight / std
        folded.weight.copy_(weight)
        folded.bias.copy_(head.bias - weight @ mean)
    return folded


class RegionClassifier(nn.Module):
    """Backbone + linear head. Input: float (batch, 1, S, S) in [0, 1]; output: logits.

    With `rotation_average`, the embedding is the mean of the backbone's embeddings of the
    image turned by 0, 90, 180 and 270 degrees. Langer et al. 2024 straightens every image while
    cleaning; unsorted PACS exports (and our synthetic ones) come at any angle, and a
    linear head on orientation-dependent features would have to learn every class at every
    angle. Averaging makes the head blind to right-angle turns at 4x the inference cost.
    """

    def __init__(
        self,
        backbone: nn.Module,
        embedding_dim: int,
        n_classes: int,
        rotation_average: bool = False,
        orientation: bool = False,
        binary: tuple[str, ...] | list[str] = (),
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = linear_head(embedding_dim, n_classes)
        self.rotation_average = rotation_average
        # Baltruschat et al. 2018: a 2-unit linear regression of (cos, sin) of the orientation angle.
        self.orientation_head = orientation_head(embedding_dim) if orientation else None
        # Binary heads (abnormality: de Cid Rodríguez 2021; Ghalyan et al.; implant: Acitores 2022): one logistic unit
        # each on the region embedding. Empty by default, so older weights load unchanged.
        self.binary_heads = nn.ModuleDict({name: nn.Linear(embedding_dim, 1) for name in binary})

    def binary_probabilities(self, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        """P(positive) per binary head, (batch,) each, from region embeddings."""
        return {name: torch.sigmoid(head(embedding).squeeze(-1)) for name, head in self.binary_heads.items()}

    def turned_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """(4, batch, D): the backbone's embeddings of x turned by 0, 90, 180, 270 degrees
        (torch.rot90, counter-clockwise on screen)."""
        turned = torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)])
        return self.backbone(turned).view(4, x.shape[0], -1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rotation_average:
            return self.backbone(x)
        return self.turned_embeddings(x).mean(0)

    def embed_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(region embedding, upright embedding): the orientation head needs the plain,
        orientation-dependent features, which rotation averaging throws away."""
        if not self.rotation_average:
            embedding = self.backbone(x)
            return embedding, embedding
        turned = self.turned_embeddings(x)
        return turned.mean(0), turned[0]

    def forward_with_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.embed(x)
        return self.head(embedding), embedding

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(logits, region embedding, orientation (cos, sin) or None), one backbone pass."""
        embedding, upright = self.embed_both(x)
        orientation = self.orientation_head(upright) if self.orientation_head is not None else None
        return self.head(embedding), embedding, orientation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising NLL of softmax(logits / T).

    Fitted on held-out (validation) logits; it changes confidences, never the argmax.
    Optimised in log T so T stays positive.
    """
    if len(logits) == 0:
        raise ValueError("fit_temperature needs at least one labelled example")
    logits = logits.detach().float().cpu()
    labels = labels.detach().long().cpu()
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    # Bounded: perfectly separated logits push T towards 0 without limit.
    return min(max(float(log_t.detach().exp()), 1e-3), 1e3)


def energy_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Out-of-domain score: the free energy -T * logsumexp(logits / T) (Liu et al. 2020).

    Higher means more out-of-domain: in-domain images get large logits and so low energy.
    """
    return -temperature * torch.logsumexp(logits.float() / temperature, dim=-1)

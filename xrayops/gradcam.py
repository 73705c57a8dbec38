"""Grad-CAM (Selvaraju et al. 2017) saliency for region predictions: which part of the image
drove the predicted class. Acitores 2022 proposes saliency maps for quality assurance.

A forward hook on the backbone's last convolutional stage (`layer4` of the ResNet) keeps its
activations A (n, k, h, w); the gradient of the class logit y_c with respect to A gives per-channel
weights alpha_k = mean_{h,w} dy_c/dA_k; the map is ReLU(sum_k alpha_k A_k), upsampled to the
input and scaled to [0, 1] per image. With a rotation-averaged model (the backbone sees the
image turned by 0/90/180/270 degrees) each turned map is turned back and the four are averaged.
"""
from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F


def target_layer(model: nn.Module) -> nn.Module:
    """The last convolutional stage of the model's ResNet backbone."""
    backbone = getattr(model, "backbone", model)
    layer = getattr(backbone, "layer4", None)
    if layer is None:
        raise ValueError(f"{type(backbone).__name__} has no layer4; Grad-CAM needs a ResNet backbone")
    return layer


def _class_logits(output) -> torch.Tensor:
    # A model with extra heads (orientation) may return a tuple; the class logits come first.
    return output[0] if isinstance(output, (tuple, list)) else output


def grad_cam(model: nn.Module, images: torch.Tensor, class_indices: Sequence[int]) -> np.ndarray:
    """Heatmaps (n, S, S) float32 in [0, 1] for `images` (n, 1, S, S) and one class per image."""
    if images.ndim != 4:
        raise ValueError(f"expected images (n, 1, S, S), got shape {tuple(images.shape)}")
    n = images.shape[0]
    if len(class_indices) != n:
        raise ValueError(f"{n} images but {len(class_indices)} class indices")
    captured: list[torch.Tensor] = []
    handle = target_layer(model).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.inference_mode(False), torch.enable_grad():
            x = images.detach().clone().requires_grad_(True)  # keeps a graph even if weights are frozen
            logits = _class_logits(model(x))
            index = torch.as_tensor(list(class_indices), device=logits.device).long().view(-1, 1)
            score = logits.gather(1, index).sum()
            activations = captured[-1]
            (gradients,) = torch.autograd.grad(score, activations)
    finally:
        handle.remove()
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cams = F.relu((weights * activations).sum(dim=1)).detach()  # (n or 4n, h, w)
    if cams.shape[0] == 4 * n and n > 0 and getattr(model, "rotation_average", False):
        # RegionClassifier.embed stacks rot90(x, k) for k = 0..3; turn each map back.
        cams = torch.stack([torch.rot90(cams[k * n : (k + 1) * n], -k, dims=(-2, -1)) for k in range(4)]).mean(0)
    size = images.shape[-2:]
    cams = F.interpolate(cams.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False).squeeze(1)
    flat = cams.reshape(n, -1)
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    scaled = (flat - low) / (high - low).clamp_min(1e-12)
    return scaled.reshape(n, *size).cpu().numpy().astype(np.float32)


def heatmap_png(heatmap: np.ndarray) -> bytes:
    """A (S, S) map in [0, 1] as an 8-bit grey PNG (small: a few hundred bytes at 64x64)."""
    if heatmap.ndim != 2:
        raise ValueError(f"expected a 2-D heatmap, got shape {heatmap.shape}")
    pixels = (np.clip(np.nan_to_num(heatmap), 0.0, 1.0) * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def heatmap_png_base64(heatmap: np.ndarray) -> str:
    return base64.b64encode(heatmap_png(heatmap)).decode("ascii")


def png_to_heatmap(data: bytes) -> np.ndarray:
    """The inverse of `heatmap_png`, up to 8-bit rounding: float32 in [0, 1]."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float32) / 255.0

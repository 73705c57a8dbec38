"""Grad-CAM (Selvaraju et al. 2017) of the region classifier, and overlay figures for the report.

Acitores 2022 proposes saliency maps for quality assurance; here they show what the frozen
backbone looked at for a sample of right and wrong predictions, computed by captum's
LayerGradCam on the backbone's last stage (layer4). With rotation averaging the model
sees each image turned four ways; each turn's map is turned back and the four are summed,
which is the Grad-CAM of the averaged model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from captum.attr import LayerGradCam
from matplotlib.figure import Figure
from torch.nn import functional as F

from xrayops.models.heads import RegionClassifier


def grad_cam(model: RegionClassifier, images: torch.Tensor, class_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Maps (batch, S, S) in [0, 1] for float images (batch, 1, S, S) in [0, 1].

    captum's LayerGradCam on the backbone's layer4 (ReLU of the gradient-weighted channel sum).
    `class_ids` default to the predicted classes. The model is left unchanged (eval mode, no
    gradients kept on its parameters).
    """
    model.eval()
    try:
        with torch.enable_grad(), torch.inference_mode(False):
            x = images.detach().clone().float().requires_grad_(True)  # a graph even if weights are frozen
            if class_ids is None:
                with torch.no_grad():
                    class_ids = model(x).argmax(1)
            cams = LayerGradCam(model, model.backbone.layer4).attribute(
                x, target=class_ids.to(x.device), relu_attributions=True
            )
            cams = cams.detach().squeeze(1)  # (turns * batch, h, w)
    finally:
        model.zero_grad(set_to_none=True)
    batch = images.shape[0]
    if model.rotation_average:
        turns = cams.view(4, batch, *cams.shape[-2:])
        cams = sum(torch.rot90(turns[k], -k, dims=(-2, -1)) for k in range(4))
    cams = F.interpolate(cams.unsqueeze(1), size=images.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
    peak = cams.flatten(1).max(1).values.clamp_min(1e-12).view(-1, 1, 1)
    return (cams / peak).cpu()


def pick_examples(correct: np.ndarray, n_each: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Up to n_each indices of correct and of wrong predictions, drawn reproducibly."""
    rng = np.random.default_rng(seed)
    right, wrong = np.flatnonzero(correct), np.flatnonzero(~correct)
    return (
        np.sort(rng.choice(right, min(n_each, len(right)), replace=False)),
        np.sort(rng.choice(wrong, min(n_each, len(wrong)), replace=False)),
    )


def overlay_figure(images: np.ndarray, cams: np.ndarray, captions: list[str], title: str, path: Path) -> Path:
    """One row of image + heat-map overlays with captions; written as PNG."""
    n = max(len(images), 1)
    fig = Figure(figsize=(2.2 * n, 2.6))
    axes = np.atleast_1d(fig.subplots(1, n))
    for ax in axes:
        ax.axis("off")
    for ax, image, cam, caption in zip(axes, images, cams, captions):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        ax.imshow(cam, cmap="jet", alpha=0.4, vmin=0, vmax=1)
        ax.set_title(caption, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def gradcam_figures(
    model: RegionClassifier,
    images: np.ndarray,
    predicted: list[str],
    reference: list[str],
    out_dir: Path,
    n_each: int = 4,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[Path]:
    """gradcam_correct.png and gradcam_wrong.png for a sample of stored images (n, S, S) in [0, 1],
    captioned "predicted / reference". Returns the files written (none for an empty group)."""
    from xrayops.data.dataset import to_unit_float

    correct = np.array([p == r for p, r in zip(predicted, reference)])
    paths = []
    for name, index in zip(("correct", "wrong"), pick_examples(correct, n_each, seed)):
        if len(index) == 0:
            continue
        batch = to_unit_float(images[index]).unsqueeze(1).to(device)
        cams = grad_cam(model, batch).numpy()
        captions = [f"{predicted[i]} / {reference[i]}" for i in index]
        title = f"Grad-CAM, {name} predictions (predicted / label)"
        paths.append(overlay_figure(batch.squeeze(1).cpu().numpy(), cams, captions, title, Path(out_dir) / f"gradcam_{name}.png"))
    return paths

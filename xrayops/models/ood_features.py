"""The features an out-of-domain detector scores: global-average-pooled outputs of several ResNet
stages, concatenated, taken from the same backbone pass that gives the region embedding.

Lee et al. 2018 score features from several layers, not only the last: earlier stages keep the
texture and contrast cues that a contrastive objective partly trains the last stage to ignore
(benchmarks/README.md, "Out-of-domain detection": stages 2-4 beat stage 4 alone on validation
for both backbones measured). ("layer4",) alone is the region embedding itself.

Test-time views (`view_features`): the features averaged over the eight turns and mirror images
of the image at several zooms (a centre crop enlarged, the whole image shrunk into a black
border). A radiograph's features barely move between its views; an image the backbone has no
good description for moves more, and the average keeps what is stable. On validation, three
zooms x eight views beat the four turns the region embedding averages, for both backbones
measured.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xrayops.models.backbone import STAGES, stage_features

DEFAULT_ZOOMS: tuple[float, ...] = (1.0, 1.2, 0.85)


def check_stages(stages) -> None:
    """Refuse anything but a non-empty subset of the ResNet stages (a ValueError naming them)."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ValueError(f"OOD stages must be a non-empty subset of {STAGES}, got {list(stages)}")


def stages_width(backbone: nn.Module, stages: tuple[str, ...] | list[str]) -> int:
    """Channels of the named stages' outputs, summed: the width of their pooled features (the
    last batch norm of a ResNet stage normalises its output)."""
    check_stages(stages)
    widths = [[m for m in getattr(backbone, s).modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features
              for s in stages]
    return int(sum(widths))


class StageCapture:
    """While open, every forward of `backbone` records the pooled outputs of `stages`
    (torch forward hooks, so nothing is computed twice); `features` returns them per image."""

    def __init__(self, backbone: nn.Module, stages: tuple[str, ...] | list[str]) -> None:
        check_stages(stages)
        self.backbone = backbone
        self.stages = [s for s in STAGES if s in stages]
        self.pooled: dict[str, list[torch.Tensor]] = {s: [] for s in self.stages}
        self._handles: list = []

    def _hook(self, stage: str):
        def record(_module, _inputs, output: torch.Tensor) -> None:
            self.pooled[stage].append(torch.flatten(self.backbone.avgpool(output), 1).float().cpu())

        return record

    def __enter__(self) -> StageCapture:
        self._handles = [getattr(self.backbone, s).register_forward_hook(self._hook(s)) for s in self.stages]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def features(self, batch: int, rotation_average: bool) -> torch.Tensor:
        """(batch, width) features of the `batch` images the last forward saw, then forget them.

        RegionClassifier with rotation averaging passes the four turns of the batch through the
        backbone at once (4 * batch rows), and averages them as it averages the embedding."""
        rows = torch.cat([torch.cat(self.pooled[s]) for s in self.stages], dim=1)
        for s in self.stages:
            self.pooled[s].clear()
        if rotation_average and len(rows) == 4 * batch:
            return rows.view(4, batch, -1).mean(0)
        if len(rows) == batch:
            return rows
        raise RuntimeError(f"the backbone saw {len(rows)} rows for {batch} images; expected {batch} or 4 x {batch}")


def zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """(B, 1, H, W) images enlarged about their centre (factor > 1: the central 1/factor, resized
    back) or shrunk into a black border (factor < 1); same size out."""
    if factor <= 0:
        raise ValueError(f"a zoom must be positive, got {factor}")
    height, width = x.shape[-2:]
    if factor == 1.0:
        return x
    if factor > 1.0:
        h, w = max(1, round(height / factor)), max(1, round(width / factor))
        top, left = (height - h) // 2, (width - w) // 2
        return F.interpolate(x[..., top : top + h, left : left + w], size=(height, width), mode="bilinear",
                             align_corners=False)
    h, w = max(1, round(height * factor)), max(1, round(width * factor))
    small = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (height - h) // 2, (width - w) // 2
    return F.pad(small, (left, width - w - left, top, height - h - top))


def dihedral_views(x: torch.Tensor, zooms: tuple[float, ...] | list[float], skip_plain_turns: bool = False) -> torch.Tensor:
    """(8 * len(zooms) * B, 1, H, W): at each zoom the four right-angle turns and their mirror
    images (the dihedral group of the square), view-major. `skip_plain_turns` leaves out the four
    turns at zoom 1.0 (the region pass has them): 4 * B rows fewer."""
    if not zooms:
        raise ValueError("test-time views need at least one zoom")
    if skip_plain_turns and 1.0 not in zooms:
        raise ValueError(f"no plain turns to leave out: zoom 1.0 is not among {list(zooms)}")
    views, skipped = [], False
    for factor in zooms:
        zoomed = zoom(x, float(factor))
        turns = [torch.rot90(zoomed, k, dims=(-2, -1)) for k in range(4)]
        mirrors = [torch.flip(t, dims=(-1,)) for t in turns]
        if skip_plain_turns and factor == 1.0 and not skipped:
            views += mirrors
            skipped = True
        else:
            views += turns + mirrors
    return torch.cat(views)


def view_features(
    backbone: nn.Module, x: torch.Tensor, stages, zooms, chunk: int = 512, plain_turns: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, width) pooled `stages` features of (B, 1, H, W) images, averaged over their test-time
    views; at most `chunk` views go through the backbone at once.

    `plain_turns`: the (B, width) mean features of the four turns at zoom 1.0 when a pass has
    them already (the rotation-averaged region pass, through StageCapture); they are then not
    computed again, which saves 4 of the 8 * len(zooms) views."""
    check_stages(stages)
    views = dihedral_views(x, zooms, skip_plain_turns=plain_turns is not None)
    pooled = torch.cat([stage_features(backbone, views[i : i + chunk], stages) for i in range(0, len(views), chunk)])
    n_views = len(views) // len(x)
    if plain_turns is None:
        return pooled.view(n_views, len(x), -1).mean(0)
    return (pooled.view(n_views, len(x), -1).sum(0) + 4 * plain_turns.to(pooled)) / (n_views + 4)

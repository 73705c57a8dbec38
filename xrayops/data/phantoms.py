"""Procedural radiograph phantoms for the 14 regions of Langer et al. 2024, plus out-of-domain images.

Images are attenuation-like: float32 in [0, 1], air dark, bone bright. Every bone and soft-tissue
envelope is a projected cylinder (`Tube`) or ellipsoid (`Blob`), evaluated analytically on the
pixel grid. Rotation and mirroring move the sampling grid, never the pixels, so a rotated image
is as sharp as an upright one and `angle_deg` is exact.

Phantom coordinates: the upright field of view spans [-1, 1] on both axes, x to the right and
y downwards (row order), head / fingers / toes up.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from xrayops.regions import REGIONS

Point = tuple[float, float]

OOD_KINDS: tuple[str, ...] = ("soft_tissue", "paper_form", "test_pattern", "unknown_object")


def shell_profile(u: np.ndarray, hollow: float, medulla: float) -> np.ndarray:
    """Projected thickness of a bone with a dense cortex, at normalised radius `u` (0 centre, 1 edge).

    A solid cylinder projects as sqrt(1 - u^2). A bone is that cylinder minus a less dense
    medullary cylinder of relative radius `hollow`, so the rim (cortex) ends up brighter than the
    middle (medulla). Peak normalised to 1; 0 outside.
    """
    outer = np.sqrt(np.maximum(1.0 - u * u, 0.0))
    if hollow <= 0.0:
        return outer
    v = u / hollow
    inner = hollow * np.sqrt(np.maximum(1.0 - v * v, 0.0))
    peak = max(math.sqrt(1.0 - hollow * hollow), 1.0 - (1.0 - medulla) * hollow)
    return (outer - (1.0 - medulla) * inner) / peak


@dataclass(frozen=True)
class Tube:
    """A capsule from p0 to p1 whose radius goes linearly from r0 to r1 (long bones, ribs, digits)."""

    p0: Point
    p1: Point
    r0: float
    r1: float
    hollow: float = 0.0
    fill: float | None = None  # density inside the hollow; None: the canvas' marrow density

    def bbox(self) -> tuple[float, float, float, float]:
        r = max(self.r0, self.r1)
        xs, ys = (self.p0[0], self.p1[0]), (self.p0[1], self.p1[1])
        return min(xs) - r, max(xs) + r, min(ys) - r, max(ys) + r

    def profile(self, x: np.ndarray, y: np.ndarray, medulla: float) -> np.ndarray:
        (x0, y0), (x1, y1) = self.p0, self.p1
        dx, dy = x1 - x0, y1 - y0
        length2 = dx * dx + dy * dy
        if length2 == 0:
            t = np.zeros_like(x)
        else:  # position of the closest point along the axis, clamped to the segment
            t = np.minimum(np.maximum(((x - x0) * dx + (y - y0) * dy) / length2, 0.0), 1.0)
        d = np.hypot(x - (x0 + t * dx), y - (y0 + t * dy))
        r = self.r0 + t * (self.r1 - self.r0)
        return shell_profile(d / r, self.hollow, medulla if self.fill is None else self.fill)


@dataclass(frozen=True)
class Blob:
    """A super-ellipse (power 2: ellipse; 4: rounded box) rotated by `rot` degrees: carpals, heads, bodies."""

    center: Point
    ax: float
    ay: float
    rot: float = 0.0
    hollow: float = 0.0
    power: float = 2.0
    fill: float | None = None  # density inside the hollow; None: the canvas' marrow density

    def bbox(self) -> tuple[float, float, float, float]:
        r = math.hypot(self.ax, self.ay) if self.rot else None
        rx, ry = (r, r) if r else (self.ax, self.ay)
        cx, cy = self.center
        return cx - rx, cx + rx, cy - ry, cy + ry

    def profile(self, x: np.ndarray, y: np.ndarray, medulla: float) -> np.ndarray:
        c, s = math.cos(math.radians(self.rot)), math.sin(math.radians(self.rot))
        xr = (x - self.center[0]) * c + (y - self.center[1]) * s
        yr = -(x - self.center[0]) * s + (y - self.center[1]) * c
        p = self.power
        u = (np.abs(xr / self.ax) ** p + np.abs(yr / self.ay) ** p) ** (1.0 / p)
        return shell_profile(u, self.hollow, medulla if self.fill is None else self.fill)


Part = Tube | Blob


def path(points: Sequence[Point], r: float, hollow: float = 0.0, r_end: float | None = None) -> list[Tube]:
    """A curved bone (rib, clavicle, mandible) as a chain of tubes along `points`."""
    r_end = r if r_end is None else r_end
    n = len(points) - 1
    radii = [r + (r_end - r) * i / n for i in range(n + 1)]
    return [Tube(points[i], points[i + 1], radii[i], radii[i + 1], hollow) for i in range(n)]


def bezier(p0: Point, p1: Point, p2: Point, n: int = 10) -> list[Point]:
    """Points on a quadratic Bezier curve (rib arcs)."""
    out = []
    for i in range(n + 1):
        t = i / n
        a, b, c = (1 - t) ** 2, 2 * (1 - t) * t, t * t
        out.append((a * p0[0] + b * p1[0] + c * p2[0], a * p0[1] + b * p1[1] + c * p2[1]))
    return out


def _unit(deg: float) -> Point:
    """Direction `deg` degrees clockwise from straight up (y grows downwards)."""
    r = math.radians(deg)
    return math.sin(r), -math.cos(r)


def _step(p: Point, deg: float, length: float) -> Point:
    u = _unit(deg)
    return p[0] + u[0] * length, p[1] + u[1] * length


class Canvas:
    """A pixel grid that samples phantom coordinates through zoom, offset, mirror and rotation.

    Forward map (phantom -> image, both in [-1, 1] units): image = Rot(Mirror(zoom * q + offset)):
    the upright picture is framed, optionally flipped left/right, then turned counter-clockwise by
    `angle_deg` as seen on screen.
    """

    def __init__(self, size: int, zoom: float = 1.0, offset: Point = (0.0, 0.0),
                 angle_deg: float = 0.0, mirror: bool = False, medulla: float = 0.45,
                 tissue_only: bool = False) -> None:
        self.size = size
        self.tissue_only = tissue_only  # framing probes need the body outline only
        self.zoom = zoom
        self.offset = offset
        self.mirror = mirror
        self.medulla = medulla
        theta = math.radians(angle_deg)
        self.c, self.s = math.cos(theta), math.sin(theta)
        self.tissue = np.zeros((size, size), np.float64)
        self.bone = np.zeros((size, size), np.float64)
        self._x: np.ndarray | None = None
        self._y: np.ndarray | None = None

    def frame_on(self, point: Point, factor: float) -> None:
        """Zoom in by `factor` and centre the field on `point` (wrist on the carpus, hip on the head)."""
        self.zoom *= factor
        self.offset = (self.offset[0] - point[0] * self.zoom, self.offset[1] - point[1] * self.zoom)
        self._x = self._y = None

    def _to_image(self, x: float, y: float) -> Point:
        u, v = self.zoom * x + self.offset[0], self.zoom * y + self.offset[1]
        u = -u if self.mirror else u
        return u * self.c + v * self.s, -u * self.s + v * self.c

    def _box(self, part: Part) -> tuple[int, int, int, int] | None:
        x0, x1, y0, y1 = part.bbox()
        corners = [self._to_image(x, y) for x in (x0, x1) for y in (y0, y1)]
        half = self.size / 2.0
        cols = [(p[0] + 1.0) * half for p in corners]
        rows = [(p[1] + 1.0) * half for p in corners]
        r0, r1 = max(int(math.floor(min(rows))), 0), min(int(math.ceil(max(rows))) + 1, self.size)
        c0, c1 = max(int(math.floor(min(cols))), 0), min(int(math.ceil(max(cols))) + 1, self.size)
        return (r0, r1, c0, c1) if r0 < r1 and c0 < c1 else None

    def _grid(self, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Phantom coordinates of the pixel centres inside `box` (rows r0:r1, cols c0:c1)."""
        if self._x is None:  # computed once per canvas, after regions have set zoom/offset
            step = 2.0 / self.size
            centres = (np.arange(self.size) + 0.5) * step - 1.0
            xi, yi = centres[None, :], centres[:, None]
            u = xi * self.c - yi * self.s  # undo the rotation,
            v = xi * self.s + yi * self.c
            u = -u if self.mirror else u  # the mirroring,
            self._x = (u - self.offset[0]) / self.zoom  # then offset and zoom
            self._y = (v - self.offset[1]) / self.zoom
        r0, r1, c0, c1 = box
        return self._x[r0:r1, c0:c1], self._y[r0:r1, c0:c1]

    def _union(self, parts: Sequence[Part]) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
        """Max-combine the parts of one structure so its own pieces do not double up."""
        boxes = [(p, self._box(p)) for p in parts]
        boxes = [(p, b) for p, b in boxes if b is not None]
        if not boxes:
            return None
        r0 = min(b[0] for _, b in boxes)
        r1 = max(b[1] for _, b in boxes)
        c0 = min(b[2] for _, b in boxes)
        c1 = max(b[3] for _, b in boxes)
        buf = np.zeros((r1 - r0, c1 - c0))
        for part, (a0, a1, b0, b1) in boxes:
            x, y = self._grid((a0, a1, b0, b1))
            sub = buf[a0 - r0:a1 - r0, b0 - c0:b1 - c0]
            np.maximum(sub, part.profile(x, y, self.medulla), out=sub)
        return (r0, r1, c0, c1), buf

    def add_bone(self, parts: Sequence[Part], weight: float = 1.0) -> None:
        """Add one bone (its parts merged); overlapping bones add up like real projections."""
        if self.tissue_only:
            return
        hit = self._union(parts)
        if hit is not None:
            (r0, r1, c0, c1), buf = hit
            self.bone[r0:r1, c0:c1] += weight * buf

    def add_tissue(self, parts: Sequence[Part], weight: float = 1.0) -> None:
        """Add a soft-tissue envelope (parts merged); negative weight carves air (lungs, gas)."""
        hit = self._union(parts)
        if hit is not None:
            (r0, r1, c0, c1), buf = hit
            self.tissue[r0:r1, c0:c1] += weight * buf


@dataclass(frozen=True)
class Body:
    """Per-image anatomical variation, drawn independently of the region."""

    bone_scale: float  # cortical thickness / bone width factor
    tissue_scale: float  # soft-tissue girth factor
    jitter: float  # size of small pose perturbations


def _jit(rng: np.random.Generator, body: Body, p: Point, scale: float = 0.03) -> Point:
    return p[0] + rng.normal(0.0, scale * body.jitter), p[1] + rng.normal(0.0, scale * body.jitter)


def _long_bone(p0: Point, p1: Point, r: float, end0: float = 1.5, end1: float = 1.5,
               hollow: float = 0.62) -> list[Part]:
    """Shaft plus widened epiphyses at both ends (the joint surfaces)."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    rot = math.degrees(math.atan2(dy, dx))
    parts: list[Part] = [Tube(p0, p1, r, r, hollow)]
    length = math.hypot(dx, dy)
    for p, k, sign in ((p0, end0, 1.0), (p1, end1, -1.0)):
        if k > 0:
            ay = r * k * 0.7
            shift = min(ay, 0.45 * length) * sign / max(length, 1e-9)
            c = (p[0] + dx * shift, p[1] + dy * shift)
            parts.append(Blob(c, ay, r * k, rot=rot, hollow=0.72))
    return parts


def _digit(cv: Canvas, base: Point, deg: float, lengths: Sequence[float], radii: Sequence[float],
           rng: np.random.Generator, body: Body, gap: float = 0.022, flex: float = 5.0) -> Point:
    """A ray of bones (metacarpal/metatarsal then phalanges) separated by joint spaces; returns the tip."""
    p = base
    for length, r in zip(lengths, radii):
        deg = deg + rng.normal(0.0, flex * body.jitter)
        end = _step(p, deg, length)
        cv.add_bone(_long_bone(p, end, r * body.bone_scale, 1.35, 1.25))
        p = _step(end, deg, gap)
    return p


def _vertebra(cv: Canvas, c: Point, w: float, h: float, body: Body, rot: float = 0.0,
              pedicles: bool = True, lateral: bool = False) -> None:
    """A vertebral body (rounded box, dense endplates) with pedicle rings or posterior elements."""
    bs = body.bone_scale
    cv.add_bone([Blob(c, w * bs, h, rot=rot, hollow=0.78, power=4.0)])
    if lateral:
        # posterior elements: articular pillar and spinous process pointing back (+x)
        cv.add_bone([Blob((c[0] + w * 1.45, c[1]), w * 0.35, h * 0.7, hollow=0.6)], 0.8)
        cv.add_bone([Tube((c[0] + w * 1.6, c[1]), (c[0] + w * 2.6, c[1] + h * 1.2), h * 0.28 * bs, h * 0.22 * bs,
                          0.5)], 0.8)
    elif pedicles:
        for sx in (-1.0, 1.0):
            cv.add_bone([Blob((c[0] + sx * w * 0.62, c[1] - h * 0.1), w * 0.2, h * 0.38, hollow=0.55)], 0.7)
        cv.add_bone([Blob((c[0], c[1] + h * 0.35), w * 0.12, h * 0.42, hollow=0.4)], 0.6)


def _rib(cv: Canvas, start: Point, side: float, drop: float, reach: float, r: float,
         rng: np.random.Generator, body: Body, weight: float = 0.85) -> None:
    """A posterior rib: leaves the spine, arches out, then curves down along the chest wall."""
    p0 = start
    p1 = (start[0] + side * reach * 0.75, start[1] - 0.12 + rng.normal(0, 0.02 * body.jitter))
    p2 = (start[0] + side * reach, start[1] + drop)
    cv.add_bone(path(bezier(p0, p1, p2, 6), r * body.bone_scale, 0.55, r * 0.8 * body.bone_scale), weight)


def _ribcage(cv: Canvas, spine_x: float, y_top: float, n: int, spacing: float, reach: float,
             sides: Sequence[float], rng: np.random.Generator, body: Body, weight: float = 0.8) -> None:
    for i in range(n):
        y = y_top + i * spacing
        for side in sides:
            start = (spine_x + side * 0.09, y)
            _rib(cv, start, side, 0.3 + 0.02 * i, reach * (0.75 + 0.25 * math.sin(math.pi * min(i + 2, n) / (n + 2))),
                 0.028, rng, body, weight)
            # faint anterior rib running back down towards the sternum
            a0 = (spine_x + side * reach * 0.92, y + 0.3)
            a2 = (spine_x + side * reach * 0.35, y + 0.52)
            cv.add_bone(path(bezier(a0, (spine_x + side * reach * 0.7, y + 0.33), a2, 4), 0.02 * body.bone_scale,
                             0.3), 0.35)


# --- the 14 regions ---------------------------------------------------------------------------


def _hand_model(cv: Canvas, rng: np.random.Generator, body: Body, forearm_to: float = 1.6) -> None:
    """PA hand: distal radius/ulna, 8 carpals, 5 metacarpals, 14 phalanges, in soft tissue."""
    ts, bs = body.tissue_scale, body.bone_scale
    spread = rng.uniform(0.6, 1.3)
    # (metacarpal base, ray angle, [metacarpal, proximal, middle, distal], radii)
    rays = [
        ((-0.18, 0.32), -42.0 * spread, [0.22, 0.2, 0.13], [0.043, 0.037, 0.03]),  # thumb
        ((-0.095, 0.22), -10.0 * spread, [0.36, 0.24, 0.14, 0.1], [0.036, 0.034, 0.029, 0.024]),
        ((-0.02, 0.21), -2.0 * spread, [0.35, 0.27, 0.16, 0.11], [0.037, 0.035, 0.03, 0.024]),
        ((0.055, 0.22), 6.0 * spread, [0.33, 0.25, 0.15, 0.1], [0.035, 0.032, 0.028, 0.023]),
        ((0.13, 0.25), 14.0 * spread, [0.29, 0.2, 0.11, 0.09], [0.032, 0.029, 0.024, 0.022]),
    ]
    tissue: list[Part] = [Blob((-0.01, 0.05), 0.31 * ts, 0.32),
                          Tube((0.0, 0.45), (0.0, forearm_to), 0.27 * ts, 0.32 * ts)]
    tips = []
    for base, deg, lengths, radii in rays:
        base = _jit(rng, body, base, 0.01)
        tip = _digit(cv, base, deg, lengths, radii, rng, body)
        tips.append(tip)
        mc_head = _step(base, deg, lengths[0])
        tissue.append(Tube(mc_head, tip, 0.07 * ts, 0.056 * ts))
    tissue.append(Tube((-0.18, 0.32), _step((-0.18, 0.32), rays[0][1], 0.22), 0.1 * ts, 0.08 * ts))
    cv.add_tissue(tissue)
    # carpus: two rows of four small bones
    for row_y, xs in ((0.42, (-0.13, -0.05, 0.03, 0.11)), (0.3, (-0.14, -0.055, 0.025, 0.1))):
        for x in xs:
            c = _jit(rng, body, (x, row_y), 0.006)
            cv.add_bone([Blob(c, rng.uniform(0.035, 0.048) * bs, rng.uniform(0.035, 0.05), rng.uniform(0, 180), 0.62)])
    radius_end, ulna_end = (-0.09, 0.52), (0.12, 0.55)
    cv.add_bone(_long_bone((-0.08, forearm_to), radius_end, 0.07 * bs, 0.0, 1.6))
    cv.add_bone(_long_bone((0.12, forearm_to), ulna_end, 0.045 * bs, 0.0, 1.3))


def _draw_hand(cv: Canvas, rng: np.random.Generator, body: Body) -> None:
    cv.frame_on((0.0, -0.05), 1.0)  # centre between finger tips and distal forearm
    _hand_model(cv, rng, body)


def _draw_wrist(cv: Canvas, rng: np.random.Generator, body: Body) -> None:
    """PA wrist: the same anatomy framed on the carpus, ~2x closer, so finger tips are out of view
    (Acitores 2022's boundary rule: hand shows all finger tips, wrist does not)."""
    cv.frame_on((0.0, 0.42), rng.uniform(1.9, 2.3))
    _hand_model(cv, rng, body, forearm_to=2.4)


def _draw_foot(cv: Canvas, rng: np.random.Generator, body: Body) -> None:
    """Dorsoplantar foot: heel, tarsals, five long wide metatarsals and short toe rays, broad forefoot."""
    ts, bs = body.tissue_scale, body.bone_scale
    cv.frame_on((0.02, 0.16), 0.9)
    splay = rng.uniform(0.7, 1.3)
    rays = [  # (metatarsal base, angle, [metatarsal, phalanges...], radii, soft-tissue girth)
        ((-0.17, 0.12), -8.0 * splay, [0.36, 0.17, 0.13], [0.056, 0.046, 0.04], 0.095),  # hallux
        ((-0.07, 0.1), -3.0 * splay, [0.46, 0.1, 0.055, 0.045], [0.036, 0.027, 0.023, 0.02], 0.06),
        ((0.02, 0.11), 2.0 * splay, [0.43, 0.09, 0.05, 0.042], [0.034, 0.026, 0.022, 0.019], 0.058),
        ((0.1, 0.14), 8.0 * splay, [0.4, 0.08, 0.045, 0.04], [0.033, 0.025, 0.021, 0.018], 0.055),
        ((0.18, 0.18), 14.0 * splay, [0.37, 0.075, 0.04, 0.036], [0.037, 0.024, 0.02, 0.017], 0.052),
    ]
    tissue: list[Part] = [Tube((0.05, 0.8), (-0.1, -0.2), 0.2 * ts, 0.19 * ts),  # medial column
                          Tube((0.1, 0.8), (0.2, -0.12), 0.18 * ts, 0.15 * ts),  # lateral column
                          Blob((0.03, -0.14), 0.34 * ts, 0.2)]
    for base, deg, lengths, radii, girth in rays:
        base = _jit(rng, body, base, 0.008)
        tip = _digit(cv, base, deg, lengths, radii, rng, body, gap=0.02, flex=3.0)
        tissue.append(Tube(_step(base, deg, lengths[0]), tip, girth * ts, girth * 0.85 * ts))
    cv.add_tissue(tissue)
    cv.add_bone([Blob((0.08, 0.78), 0.16 * bs, 0.22, hollow=0.8)], 0.9)  # calcaneus (heel)
    cv.add_bone([Blob((-0.02, 0.52), 0.13 * bs, 0.12, hollow=0.72)])  # talar head and neck
    cv.add_bone([Blob((-0.1, 0.33), 0.14 * bs, 0.06, rot=-15, hollow=0.7)])  # navicular
    cv.add_bone([Blob((0.15, 0.36), 0.09 * bs, 0.1, hollow=0.7)])  # cuboid
    for x in (-0.17, -0.07, 0.03):
        cv.add_bone([Blob(_jit(rng, body, (x, 0.21), 0.005), 0.05 * bs, 0.07, hollow=0.68)])  # cuneiforms


def _draw_ankle(cv: Canvas, rng: np.random.Generator, body: Body) -> None:
    """Ankle, AP or lateral: tibia and fibula over the talus, calcaneus below/behind."""
    ts, bs = body.tissue_scale, body.bone_scale
    if rng.random() < 0.6:  # AP (mortise)
        cv.add_tissue([Tube((0.0, -1.5), (0.0, 0.3), 0.38 * ts, 0.34 * ts), Blob((0.0, 0.62), 0.46 * ts, 0.4)])
        cv.add_bone(_long_bone((-0.05, -1.5), (-0.05, 0.0), 0.16 * bs, 0.0, 1.55))
        cv.add_bone([Tube((-0.24, -0.05), (-0.27, 0.2), 0.055 * bs, 0.04 * bs, 0.5)])  # medial malleolus
        cv.add_bone(_long_bone((0.27, -1.5), (0.3, 0.28), 0.055 * bs, 0.0, 1.6))  # fibula + lateral malleolus
        cv.add_bone([Blob((0.0, 0.27), 0.22 * bs, 0.12, hollow=0.75)], 1.0)  # talar dome
        cv.add_bone([Blob((0.03, 0.56), 0.24 * bs, 0.15, hollow=0.8)], 0.8)  # calcaneus
    else:  # lateral: foot points to -x, heel to +x
        cv.add_tissue([Tube((0.0, -1.5), (0.0, 0.2), 0.36 * ts, 0.32 * ts),
                       Tube((0.3, 0.55), (-1.4, 0.65), 0.3 * ts, 0.22 * ts)])
        cv.add_bone(_long_bone((0.0, -1.5), (0.0, 0.05), 0.15 * bs, 0.0, 1.5))
        cv.add_bone(_long_bone((0.08, -1.5), (0.1, 0.15), 0.05 * bs, 0.0, 1.4), 0.7)
        cv.add_bone([Blob((0.0, 0.27), 0.2 * bs, 0.14, hollow=0.75)])  # talus
        cv.add_bone([Blob((0.22, 0.58), 0.28 * bs, 0.15, rot=-12, hollow=0.8)])  # calcaneus, heel behind
        cv.add_bone([Blob((-0.28, 0.45), 0.11 * bs, 0.1, hollow=0.7)])  # navicular
        for i in range(3):
            cv.add_bone([Tube((-0.42 - 0.05 * i, 0.5 + 0.05 * i), (-1.3, 0.55 + 0.07 * i), 0.04 * bs, 0.03 * bs,
                              0.55)], 0.8)


def _draw_knee(cv: Canvas, rng: np.random.Generator, body: Body) -> None:
    """Knee, AP or lateral: femoral condyles, tibial plateau, fibular head, patella."""
    ts, bs = body.tissue_scale, body.bone_scale
    if rng.random() < 0.6:  # AP
        cv.add_tissue([Tube((0.0, -1.5), (0.0, 0.0), 0.55 * ts, 0.5 * ts),
                       Tube((0.0, 0.0), (0.0, 1.5), 0.5 * ts, 0.42 * ts)])
        cv.add_bone([Tube((0.0, -1.5), (0.0, -0.3), 0.14 * bs, 0.16 * bs, 0.62),
                     Blob((0.0, -0.17), 0.28 * bs, 0.16, hollow=0.8),
                     Blob((-0.17, -0.02), 0.16 * bs, 0.12, hollow=0.75),
                     Blob((0.17, -0.02), 0.16 * bs, 0.12, hollow=0.75)])
        cv.add_bone([Blob((0.0, 0.19), 0.32 * bs, 0.09, hollow=0.8, power=3.0),
                     Blob((0.0, 0.33), 0.24 * bs, 0.12, hollow=0.78),
                     Tube((0.0, 0.35), (0.02, 1.5), 0.14 * bs, 0.12 * bs, 0.62)])
        cv.add_bone([Blob((0.3, 0.34), 0.07 * bs, 0.06, hollow=0.7),
                     Tube((0.3, 0.38), (0.33, 1.5), 0.045 * bs, 0.04 * bs, 0.5)])
        cv.add_bone([Blob((0.02, -0.12), 0.13 * bs, 0.16, hollow=0.72)], 0.7)  # patella over the femur
    else:  # lateral, anterior to -x, flexed by a random angle
        flex = rng.uniform(0.0, 35.0)
        cv.add_tissue([Tube((0.0, -1.5), (0.0, 0.0), 0.5 * ts, 0.46 * ts),
                       Tube((0.0, 0.0), _step((0.0, 0.0), 180 + flex, 1.5), 0.46 * ts, 0.36 * ts)])
        cv.add_bone([Tube((0.05, -1.5), (0.05, -0.25), 0.14 * bs, 0.16 * bs, 0.62),
                     Blob((0.05, -0.08), 0.2 * bs, 0.17, hollow=0.8)])
        knee = (0.03, 0.15)
        shaft_end = _step(knee, 180 + flex, 1.4)
        cv.add_bone([Blob(knee, 0.24 * bs, 0.09, rot=flex, hollow=0.8, power=3.0),
                     Tube(knee, shaft_end, 0.16 * bs, 0.12 * bs, 0.62),
                     # tibial tuberosity
                     Blob(_step((knee[0] - 0.17, knee[1]), 180 + flex, 0.22), 0.05 * bs, 0.07, hollow=0.6)])
        # fibular head
        cv.add_bone([Blob(_step((knee[0] + 0.15, knee[1] + 0.1), 180 + flex, 0.1), 0.06 * bs, 0.07, hollow=0.6)], 0.6)
        cv.add_bone([Blob((-0.3, -0.1), 0.07 * bs, 0.17, rot=10, hollow=0.7)])  # patella in front


def _draw_elbow(cv: Canvas, rng: np.random.Generator, body: Body) -> None:
    """Elbow, AP or lateral: humerus with epicondyles, radial head, ulna with olecranon."""
    ts, bs = body.tissue_scale, body.bone_scale
    if rng.random() < 0.5:  # AP, extended
        cv.add_tissue([Tube((0.0, -1.5), (0.0, 0.0), 0.38 * ts, 0.4 * ts),
                       Tube((0.0, 0.0), (0.05, 1.5), 0.4 * ts, 0.3 * ts)])
        cv.add_bone([Tube((0.0, -1.5), (0.0, -0.25), 0.1 * bs, 0.11 * bs, 0.6),
                     Blob((0.0, -0.1), 0.3 * bs, 0.11, hollow=0.78),
                     Blob((-0.1, 0.03), 0.1 * bs, 0.08, hollow=0.7), Blob((0.12, 0.02), 0.09 * bs, 0.08, hollow=0.7)])
        # ulna
        cv.add_bone([Blob((-0.09, 0.2), 0.1 * bs, 0.09, hollow=0.72),
                     Tube((-0.09, 0.22), (-0.12, 1.5), 0.065 * bs, 0.045 * bs, 0.55)])
        # radius
        cv.add_bone([Blob((0.14, 0.19), 0.085 * bs, 0.04, hollow=0.6),
                     Tube((0.14, 0.21), (0.2, 1.5), 0.045 * bs, 0.06 * bs, 0.55)])
    else:  # lateral, forearm flexed towards -x
        flex = rng.uniform(65.0, 115.0)
        joint = (0.05, 0.05)
        fore = _step(joint, 180 + flex, 1.5)
        cv.add_tissue([Tube((0.05, -1.5), joint, 0.36 * ts, 0.38 * ts), Tube(joint, fore, 0.38 * ts, 0.28 * ts)])
        cv.add_bone([Tube((0.05, -1.5), (0.05, -0.15), 0.1 * bs, 0.11 * bs, 0.6),
                     Blob(joint, 0.13 * bs, 0.13, hollow=0.78)])
        cv.add_bone([Blob((joint[0] + 0.14, joint[1] - 0.02), 0.08 * bs, 0.11, hollow=0.7),  # olecranon
                     Tube((joint[0] + 0.08, joint[1] + 0.05), _step(joint, 180 + flex, 1.5), 0.06 * bs, 0.045 * bs,
                          0.55)], 0.9)
        r0 = _step((joint[0] - 0.05, joint[1] + 0.12), 180 + flex, 0.05)
        cv.add_bone([Blob(r0, 0.07 * bs, 0.05, rot=flex, hollow=0.6),
                     Tube(r0, _step(r0, 180 + flex - 3, 1.45), 0.045 * bs, 0.06 * bs, 0.55)], 0.9)


def _draw_shoulder(cv: Canvas, rng: np.random.Generator, body: Body) -> None:
    """AP shoulder: humeral head against the glenoid, acromion above, scapula and upper ribs medially."""
    ts, bs = body.tissue_scale, body.bone_scale
    cv.add_tissue([Blob((-0.6, 0.4), 1.1 * ts, 1.4), Blob((0.3, -0.05), 0.5 * ts, 0.5),
                   Tube((0.35, 0.0), (0.45, 1.6), 0.34 * ts, 0.3 * ts)])
    cv.add_tissue([Blob((-0.75, 0.45), 0.45, 0.75)], -0.35)  # lung apex: less tissue in the beam
    _ribcage(cv, -1.05, -0.65, 7, 0.24, 0.95, (1.0,), rng, body, 0.6)
    # scapular body (thin plate)
    cv.add_bone([Blob((-0.2, 0.38), 0.22 * bs, 0.45, rot=18, hollow=0.9, fill=0.25)], 0.45)
    cv.add_bone([Tube((0.0, 0.05), (-0.22, 0.85), 0.035 * bs, 0.03 * bs, 0.5)], 0.7)  # lateral border
    cv.add_bone([Blob((0.02, -0.02), 0.055 * bs, 0.15, hollow=0.55)])  # glenoid rim
    head = _jit(rng, body, (0.26, -0.03), 0.02)
    cv.add_bone([Blob(head, 0.22 * bs, 0.22, hollow=0.82),
                 Blob((head[0] + 0.17, head[1] + 0.04), 0.09 * bs, 0.09, hollow=0.7),
                 Tube((head[0] + 0.06, head[1] + 0.15), (0.38, 1.6), 0.12 * bs, 0.11 * bs, 0.6)])
    # spine + acromion
    cv.add_bone(path([(-0.65, -0.28), (-0.3, -0.32), (0.02, -0.36), (0.36, -0.33)], 0.04 * bs, 0.5, 0.055 * bs))
    cv.add_bone([Tube((0.02, -0.16), (0.13, -0.21), 0.04 * bs, 0.035 * bs, 0.5)], 0.8)  # coracoid
    # lateral clavicle
    cv.add_bone(path([(-1.5, -0.62), (-0.9, -0.5), (-0.4, -0.44), (0.02, -0.42)], 0.055 * bs, 0.6, 0.05 * bs))


def _draw_clavicle(cv: Canvas, rng: np.random.Generator, body: Body) -> None:
    """AP clavicle: an S-shaped bone spanning the field, over posterior rib arcs."""
    ts, bs = body.tissue_scale, body.bone_scale
    cv.add_tissue([Blob((0.0, 0.5), 1.6 * ts, 1.6)])
    cv.add_tissue([Blob((0.0, 0.65), 0.9, 0.75)], -0.35)  # lung apex
    _ribcage(cv, -1.15, -0.7, 7, 0.26, 1.9, (1.0,), rng, body, 0.6)
    for i in range(4):
        _vertebra(cv, (-1.12, -0.7 + 0.28 * i), 0.13, 0.08, body)
    amp, tilt, y0 = rng.uniform(0.05, 0.1), rng.uniform(-0.12, 0.05), rng.uniform(-0.12, 0.08)
    pts = [(x, y0 + tilt * x + amp * math.sin(math.pi * (x + 0.85) / 0.9)) for x in np.linspace(-0.85, 0.85, 13)]
    cv.add_bone(path(pts, 0.06 * bs, 0.62, 0.045 * bs) + [Blob(pts[0], 0.07 * bs, 0.075, hollow=0.7),
                                                          Blob(pts[-1], 0.09 * bs, 0.05, rot=-20, hollow=0.7)])
    cv.add_bone([Blob((1.05, pts[-1][1] + 0.05), 0.14 * bs, 0.06, hollow=0.6)], 0.8)  # acromion at the edge
    cv.add_bone([Blob((1.15, pts[-1][1] + 0.35), 0.24 * bs, 0.24, hollow=0.82)], 0.8)  # humeral head, mostly cut off


def _draw_rib(cv: Canvas, rng: np.random.Generator, body: Body) -> None:
    """Unilateral ribs: many arcs over a dark lung field, spine at the medial edge."""
    ts, bs = body.tissue_scale, body.bone_scale
    cv.add_tissue([Blob((-0.4, 0.0), 1.5 * ts, 1.7)])
    cv.add_tissue([Blob((0.05, -0.05), 0.68, 0.92)], -0.45)  # lung
    n = int(rng.integers(9, 12))
    spacing = 1.75 / n
    _ribcage(cv, -0.8, -0.95, n, spacing, 1.5, (1.0,), rng, body, 0.85)
    for i in range(n):
        _vertebra(cv, (-0.82, -0.95 + i * spacing), 0.14, spacing * 0.36, body)
    cv.add_tissue([Blob((0.1, 1.05), 0.85, 0.2)], 0.3)  # diaphragm dome


def _draw_skull(cv: Canvas, rng: np.random.Generator, body: Body) -> None:
    """Skull, AP or lateral: the vault ellipse (dense tables) plus the face and mandible."""
    ts, bs = body.tissue_scale, body.bone_scale
    vault, brain = rng.uniform(0.7, 1.2), rng.uniform(0.02, 0.25)  # table density; diploe and brain inside
    if rng.random() < 0.55:  # AP
        cv.add_tissue([Blob((0.0, -0.05), 0.86 * ts, 1.0), Tube((0.0, 0.6), (0.0, 1.6), 0.4 * ts, 0.45 * ts)])
        cv.add_bone([Blob((0.0, -0.15), 0.78, 0.82, hollow=1.0 - 0.09 * bs, fill=brain)], vault)
        for sx in (-1.0, 1.0):
            cv.add_bone([Blob((sx * 0.25, 0.15), 0.15, 0.13, hollow=0.72)], 0.7)  # orbit
            cv.add_bone([Tube((sx * 0.6, 0.3), (sx * 0.12, 0.02), 0.045 * bs, 0.03 * bs, 0.4)], 0.7)  # petrous ridge
        cv.add_bone([Tube((0.0, 0.12), (0.0, 0.42), 0.02 * bs, 0.02 * bs)], 0.5)  # nasal septum
        for x in np.linspace(-0.24, 0.24, 8):
            cv.add_bone([Blob((float(x), 0.55 + 0.25 * float(x) ** 2), 0.027, 0.05, hollow=0.4)], 0.9)  # teeth
        jaw = [(-0.55, 0.3), (-0.5, 0.62), (-0.32, 0.8), (0.0, 0.86), (0.32, 0.8), (0.5, 0.62), (0.55, 0.3)]
        cv.add_bone(path(jaw, 0.055 * bs, 0.55))
    else:  # lateral, face to -x
        cv.add_tissue([Blob((0.0, -0.1), 1.0 * ts, 0.85), Blob((-0.6, 0.35), 0.4 * ts, 0.45),
                       Tube((0.35, 0.5), (0.4, 1.6), 0.42 * ts, 0.45 * ts)])
        cv.add_bone([Blob((0.08, -0.2), 0.86, 0.68, hollow=1.0 - 0.09 * bs, fill=brain)], vault)
        cv.add_bone([Blob((-0.6, 0.0), 0.13, 0.13, hollow=0.75)], 0.6)  # orbit
        cv.add_bone([Blob((0.05, 0.12), 0.06, 0.045, hollow=0.5)], 0.7)  # sella turcica
        cv.add_bone([Tube((-0.25, 0.25), (0.5, 0.3), 0.05 * bs, 0.04 * bs, 0.5)], 0.6)  # skull base
        cv.add_bone(path([(0.25, 0.3), (0.27, 0.72), (-0.1, 0.8), (-0.65, 0.68)], 0.055 * bs, 0.55))  # mandible
        for x in np.linspace(-0.68, -0.2, 7):
            cv.add_bone([Blob((float(x), 0.52), 0.03, 0.06, hollow=0.4)], 0.9)  # teeth
        for i in range(2):
            _vertebra(cv, (0.45, 0.6 + 0.22 * i), 0.1, 0.07, body, lateral=True)


def _draw_pelvis_hip(cv: Canvas, rng: np.random.Generator, body: Body) -> None:
    """AP pelvis (ring, sacrum, both femoral heads) or one hip framed closer."""
    ts, bs = body.tissue_scale, body.bone_scale
    if rng.random() < 0.4:  # unilateral hip: zoom onto the right femoral head
        cv.frame_on((0.55, 0.15), rng.uniform(1.5, 1.9))
    cv.add_tissue([Blob((0.0, 0.1), 1.35 * ts, 1.2), Tube((-0.8, 0.5), (-0.95, 1.8), 0.42 * ts, 0.38 * ts),
                   Tube((0.8, 0.5), (0.95, 1.8), 0.42 * ts, 0.38 * ts)])
    _vertebra(cv, (0.0, -0.85), 0.24, 0.12, body)
    cv.add_bone([Blob((0.0, -0.28), 0.22 * bs, 0.32, hollow=0.75, power=2.5)], 0.7)  # sacrum
    for sx in (-1.0, 1.0):
        cv.add_bone([Blob((sx * 0.5, -0.35), 0.38 * bs, 0.34, rot=sx * 22, hollow=0.9, fill=0.25)], 0.6)  # iliac wing
        ring = [(sx * 0.15, -0.1), (sx * 0.45, 0.02), (sx * 0.5, 0.28), (sx * 0.3, 0.47), (sx * 0.05, 0.48)]
        cv.add_bone(path(ring, 0.04 * bs, 0.5))  # pelvic brim to pubis
        cv.add_bone([Blob((sx * 0.26, 0.42), 0.15, 0.11, hollow=0.62)], 0.7)  # obturator ring (pubic rami)
        head = (sx * 0.57, 0.13)
        cv.add_bone([Blob(head, 0.16 * bs, 0.16, hollow=0.8), Tube(head, (sx * 0.78, 0.36), 0.085 * bs, 0.1 * bs, 0.6),
                     Blob((sx * 0.86, 0.3), 0.1 * bs, 0.12, hollow=0.72),
                     Tube((sx * 0.8, 0.4), (sx * 0.92, 1.8), 0.12 * bs, 0.11 * bs, 0.6)])
        # acetabular roof
        cv.add_bone(path([(sx * 0.42, 0.0), (sx * 0.6, -0.06), (sx * 0.76, 0.04)], 0.035 * bs, 0.4), 0.8)


def _spine_tissue(cv: Canvas, body: Body, width: float) -> None:
    cv.add_tissue([Blob((0.0, 0.0), width * body.tissue_scale, 1.7)])


def _draw_cervical_spine(cv: Canvas, rng: np.random.Generator, body: Body) -> None:
    """C-spine: small bodies, skull base and mandible on top, the neck with air on both sides."""
    ts, bs = body.tissue_scale, body.bone_scale
    n = int(rng.integers(6, 8))
    spacing = rng.uniform(0.19, 0.23)
    if rng.random() < 0.6:  # lateral, face to -x
        cv.add_tissue([Tube((0.05, -1.3), (0.05, 1.2), 0.48 * ts, 0.52 * ts), Blob((0.1, -1.3), 1.0, 0.55),
                       Blob((0.1, 1.45), 1.3, 0.45)])
        cv.add_tissue([Tube((-0.28, -0.6), (-0.25, 1.3), 0.05, 0.05)], -0.25)  # airway
        cv.add_bone([Blob((0.2, -1.4), 0.9, 0.55, hollow=0.9, fill=0.1)], 1.0)  # occiput / skull base
        cv.add_bone(path([(-0.3, -1.1), (-0.28, -0.72), (-0.55, -0.66), (-1.1, -0.62)], 0.055 * bs, 0.55))  # mandible
        for i in range(n):
            y = -0.62 + i * spacing
            x = -0.02 - 0.06 * math.sin(math.pi * (i + 0.5) / n)  # lordosis
            _vertebra(cv, (x, y), 0.1, spacing * 0.33 * (1.5 if i == 0 else 1.0), body, lateral=True)
        cv.add_bone([Blob((-0.06, -0.83), 0.04 * bs, 0.05, hollow=0.5)], 0.8)  # anterior arch of C1
    else:  # AP: mandible projects over the upper bodies, clavicles at the bottom
        cv.add_tissue([Tube((0.0, -1.3), (0.0, 1.2), 0.5 * ts, 0.55 * ts), Blob((0.0, 1.45), 1.4, 0.5),
                       Blob((0.0, -1.3), 0.9, 0.55)])
        cv.add_tissue([Tube((0.0, -0.5), (0.0, 1.3), 0.06, 0.06)], -0.25)  # trachea
        cv.add_bone(path([(-0.6, -1.2), (-0.5, -0.75), (0.0, -0.55), (0.5, -0.75), (0.6, -1.2)], 0.06 * bs, 0.55))
        for i in range(n):
            _vertebra(cv, (0.0, -0.5 + i * spacing), 0.15, spacing * 0.32, body)
        for sx in (-1.0, 1.0):
            cv.add_bone(path([(sx * 0.15, 1.2), (sx * 0.6, 1.1), (sx * 1.2, 1.0)], 0.05 * bs, 0.6))  # medial clavicles


def _draw_thoracic_spine(cv: Canvas, rng: np.random.Generator, body: Body) -> None:
    """T-spine: ten or more medium bodies with ribs leaving each level, lungs either side."""
    ts = body.tissue_scale
    n = int(rng.integers(10, 13))
    spacing = 2.1 / n
    _spine_tissue(cv, body, 1.7)
    if rng.random() < 0.6:  # AP
        for sx in (-1.0, 1.0):
            cv.add_tissue([Blob((sx * 0.6, -0.1), 0.42, 1.0)], -0.4)  # lungs
        cv.add_tissue([Tube((0.0, -1.2), (0.0, 1.2), 0.2 * ts, 0.3 * ts)], 0.15)  # mediastinum
        _ribcage(cv, 0.0, -1.05 + spacing * 0.3, n, spacing, 1.0, (-1.0, 1.0), rng, body, 0.55)
        for i in range(n):
            _vertebra(cv, (0.0, -1.05 + i * spacing), 0.13 + 0.005 * i, spacing * 0.33, body)
    else:  # lateral, kyphosis, anterior to -x
        cv.add_tissue([Blob((-0.55, -0.1), 0.5, 1.0)], -0.4)  # lung in front of the spine
        for i in range(n):
            y = -1.05 + i * spacing
            x = 0.1 + 0.1 * math.sin(math.pi * (i + 0.5) / n)
            _vertebra(cv, (x, y), 0.14 + 0.005 * i, spacing * 0.34, body, lateral=True)
            cv.add_bone(path(bezier((x + 0.3, y), (x + 0.6, y + 0.1), (x + 0.2, y + 0.6), 6),
                             0.025 * body.bone_scale, 0.5), 0.4)


def _draw_lumbar_spine(cv: Canvas, rng: np.random.Generator, body: Body) -> None:
    """L-spine: five big bodies, transverse processes, the iliac crests and sacrum below."""
    bs = body.bone_scale
    spacing = rng.uniform(0.3, 0.34)
    _spine_tissue(cv, body, 1.6)
    if rng.random() < 0.6:  # AP
        y0 = -0.95
        for i in range(5):
            y = y0 + i * spacing
            _vertebra(cv, (0.0, y), 0.21 + 0.01 * i, spacing * 0.36, body)
            for sx in (-1.0, 1.0):
                cv.add_bone([Tube((sx * 0.2, y), (sx * (0.36 + 0.03 * (i == 2)), y + 0.02), 0.03 * bs, 0.022 * bs,
                                  0.4)], 0.7)
        cv.add_bone([Tube((-0.2, y0 - 0.05), (-0.75, y0 + 0.1), 0.03 * bs, 0.025 * bs, 0.5),
                     Tube((0.2, y0 - 0.05), (0.75, y0 + 0.1), 0.03 * bs, 0.025 * bs, 0.5)], 0.6)  # 12th ribs
        top = y0 + 5 * spacing
        cv.add_bone([Blob((0.0, top + 0.25), 0.24 * bs, 0.3, hollow=0.75, power=2.5)], 0.7)  # sacrum
        for sx in (-1.0, 1.0):
            crest = bezier((sx * 0.25, top + 0.05), (sx * 0.7, top - 0.45), (sx * 1.05, top + 0.1), 8)
            cv.add_bone(path(crest, 0.045 * bs, 0.5))  # iliac crest (pelvis rim)
            cv.add_bone([Blob((sx * 0.7, top + 0.2), 0.35 * bs, 0.35, rot=sx * 20, hollow=0.9, fill=0.25)], 0.5)
    else:  # lateral, lordosis, anterior to -x
        for i in range(5):
            y = -0.95 + i * spacing
            x = -0.05 - 0.1 * math.sin(math.pi * (i + 0.5) / 5)
            _vertebra(cv, (x, y), 0.22 + 0.01 * i, spacing * 0.36, body, lateral=True)
        top = -0.95 + 5 * spacing
        cv.add_bone([Blob((0.05, top + 0.25), 0.2 * bs, 0.32, rot=-35, hollow=0.75, power=2.5)], 0.8)  # sacrum
        cv.add_bone([Blob((0.3, top + 0.05), 0.5 * bs, 0.35, hollow=0.9, fill=0.25)], 0.45)  # iliac wings superimposed


_DRAW: dict[str, Callable[[Canvas, np.random.Generator, Body], None]] = {
    "clavicle": _draw_clavicle,
    "shoulder": _draw_shoulder,
    "skull": _draw_skull,
    "rib": _draw_rib,
    "elbow": _draw_elbow,
    "knee": _draw_knee,
    "wrist": _draw_wrist,
    "hand": _draw_hand,
    "foot": _draw_foot,
    "ankle": _draw_ankle,
    "pelvis_hip": _draw_pelvis_hip,
    "cervical_spine": _draw_cervical_spine,
    "thoracic_spine": _draw_thoracic_spine,
    "lumbar_spine": _draw_lumbar_spine,
}
assert tuple(_DRAW) == REGIONS


def _random_canvas(rng: np.random.Generator, size: int, angle_deg: float, mirror: bool,
                   tissue_only: bool = False) -> tuple[Canvas, Body]:
    """Framing and body habitus, drawn the same way for every region (no class cue in them)."""
    zoom = float(np.exp(rng.uniform(math.log(0.78), math.log(1.22))))
    offset = (float(rng.uniform(-0.1, 0.1)), float(rng.uniform(-0.1, 0.1)))
    cv = Canvas(size, zoom, offset, angle_deg, mirror, float(rng.uniform(0.3, 0.55)), tissue_only)
    body = Body(bone_scale=float(rng.uniform(0.8, 1.25)), tissue_scale=float(rng.uniform(0.85, 1.3)),
                jitter=float(rng.uniform(0.5, 1.5)))
    return cv, body


def _compose(cv: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Tissue + bone attenuation with random densities, softly compressed into [0, 1]."""
    tissue = np.clip(cv.tissue, 0.0, None)
    a = rng.uniform(0.15, 0.45) * tissue + rng.uniform(0.4, 0.7) * cv.bone
    k = 1.2
    out = (1.0 - np.exp(-k * a)) / (1.0 - math.exp(-k * 1.4))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


# Framing: how much of the field the body fills is drawn first, the same way for every region, and
# the zoom is solved to match it (within limits that keep the anatomy recognisable). Without this
# a hand (mostly air) and a lumbar spine (all body) differ in their histograms alone.
COVERAGE_RANGE = (0.35, 0.9)
_FRAMING_LIMITS = (0.6, 1.5)
# Finger and toe tips must stay in view: they are what tells hand from wrist and foot from ankle
# (Acitores 2022's boundary rule).
_MAX_FRAMING = {"hand": 1.15, "foot": 1.1}
_PROBE_SIZE = 24


def _render(region: str, rng: np.random.Generator, size: int, angle_deg: float, mirror: bool,
            framing: float, tissue_only: bool = False) -> Canvas:
    cv, body = _random_canvas(rng, size, angle_deg, mirror, tissue_only)
    cv.zoom *= framing
    _DRAW[region](cv, rng, body)
    return cv


def _framing(region: str, rng: np.random.Generator, angle_deg: float, mirror: bool, target: float) -> float:
    """Zoom factor whose body coverage is closest to `target` (bisection on a tiny probe render)."""
    lo, hi = math.log(_FRAMING_LIMITS[0]), math.log(_MAX_FRAMING.get(region, _FRAMING_LIMITS[1]))
    for _ in range(4):
        mid = 0.5 * (lo + hi)
        cv = _render(region, copy.deepcopy(rng), _PROBE_SIZE, angle_deg, mirror, math.exp(mid), tissue_only=True)
        covered = float(np.mean(cv.tissue > 0.05))
        lo, hi = (mid, hi) if covered < target else (lo, mid)
    return math.exp(0.5 * (lo + hi))


def draw_region(region: str, rng: np.random.Generator, size: int, angle_deg: float = 0.0,
                mirror: bool = False) -> np.ndarray:
    """Attenuation-like phantom of `region`: float32 (size, size) in [0, 1], bone bright.

    Upright by default; `angle_deg` turns it counter-clockwise on screen and `mirror` flips
    left/right (the other side of the body). Framing, position, bone and tissue thickness and
    densities vary per call, drawn the same way for every region.
    """
    if region not in _DRAW:
        raise ValueError(f"unknown region {region!r}; expected one of {', '.join(REGIONS)}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    target = float(rng.uniform(*COVERAGE_RANGE))
    framing = _framing(region, rng, angle_deg, mirror, target)
    cv = _render(region, rng, size, angle_deg, mirror, framing)
    return _compose(cv, rng)


# --- out of domain ------------------------------------------------------------------------------


def _soft_tissue(rng: np.random.Generator, size: int, angle_deg: float) -> np.ndarray:
    """Abdomen- or chest-like: a trunk of soft tissue with organs and gas, no skeleton."""
    cv, _ = _random_canvas(rng, size, angle_deg, bool(rng.random() < 0.5))
    cv.add_tissue([Blob((0.0, 0.0), rng.uniform(0.9, 1.5), rng.uniform(1.1, 1.6))])
    for _ in range(int(rng.integers(2, 6))):
        c = (float(rng.uniform(-0.7, 0.7)), float(rng.uniform(-0.7, 0.7)))
        cv.add_tissue([Blob(c, rng.uniform(0.15, 0.5), rng.uniform(0.15, 0.5), rng.uniform(0, 180))],
                      rng.uniform(0.15, 0.4))
    for _ in range(int(rng.integers(3, 12))):
        c = (float(rng.uniform(-0.8, 0.8)), float(rng.uniform(-0.8, 0.8)))
        cv.add_tissue([Blob(c, rng.uniform(0.04, 0.18), rng.uniform(0.04, 0.12), rng.uniform(0, 180))],
                      -rng.uniform(0.2, 0.5))
    return _compose(cv, rng)


def _unknown_object(rng: np.random.Generator, size: int, angle_deg: float) -> np.ndarray:
    """A thing that is no body part: random struts and rings, some solid metal, maybe in a soft case."""
    cv, _ = _random_canvas(rng, size, angle_deg, False)
    if rng.random() < 0.6:
        cv.add_tissue([Blob((0.0, 0.0), rng.uniform(0.4, 0.9), rng.uniform(0.4, 0.9), rng.uniform(0, 180),
                            power=rng.uniform(2, 6))])
    for _ in range(int(rng.integers(2, 9))):
        c = (float(rng.uniform(-0.6, 0.6)), float(rng.uniform(-0.6, 0.6)))
        if rng.random() < 0.5:
            end = _step(c, float(rng.uniform(0, 360)), float(rng.uniform(0.2, 0.9)))
            r = float(rng.uniform(0.01, 0.08))
            cv.add_bone([Tube(c, end, r, r, float(rng.uniform(0.0, 0.8)))], rng.uniform(0.5, 1.5))
        else:
            cv.add_bone([Blob(c, rng.uniform(0.03, 0.25), rng.uniform(0.03, 0.25), rng.uniform(0, 180),
                              float(rng.uniform(0.0, 0.9)), rng.uniform(2, 8))], rng.uniform(0.5, 1.5))
    return _compose(cv, rng)


def bitmap_font() -> ImageFont.ImageFont:
    # PIL's built-in bitmap font: identical on every machine, so images stay reproducible.
    loader = getattr(ImageFont, "load_default_imagefont", None)
    return loader() if loader else ImageFont.load_default()


def _paper_form(rng: np.random.Generator, size: int, angle_deg: float) -> np.ndarray:
    """A scanned paper form (requisition, consent) stored as a secondary capture: lines of text."""
    small = max(size // 2, 32)
    page = Image.new("F", (small, small), float(rng.uniform(0.0, 0.1)))
    draw = ImageDraw.Draw(page)
    margin = int(small * rng.uniform(0.04, 0.12))
    draw.rectangle([margin, margin, small - margin, small - margin], fill=float(rng.uniform(0.75, 0.95)))
    font = bitmap_font()
    ink = float(rng.uniform(0.05, 0.3))
    y = margin + 3
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 :./-"
    while y < small - margin - 12:
        if rng.random() < 0.15:
            draw.line([margin + 3, y + 5, small - margin - 3, y + 5], fill=ink, width=1)
        else:
            text = "".join(rng.choice(list(letters), int(rng.integers(5, 40))))
            draw.text((margin + 3 + int(rng.integers(0, 8)), y), text, fill=ink, font=font)
        y += int(rng.integers(11, 16))
    page = page.rotate(angle_deg, resample=Image.Resampling.BILINEAR, fillcolor=0.05)
    page = page.resize((size, size), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(page, np.float32), 0.0, 1.0)


def _test_pattern(rng: np.random.Generator, size: int, angle_deg: float) -> np.ndarray:
    """Detector QA images: gradients, line pairs, checkerboards, or plain noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size * 2.0 - 1.0
    theta = math.radians(angle_deg)
    u = xx * math.cos(theta) - yy * math.sin(theta)
    v = xx * math.sin(theta) + yy * math.cos(theta)
    kind = int(rng.integers(0, 4))
    if kind == 0:
        img = (u + 1.0) / 2.0 if rng.random() < 0.5 else np.hypot(u, v) / math.sqrt(2.0)
    elif kind == 1:
        freq = rng.uniform(3.0, 20.0)
        img = 0.5 + 0.5 * np.sign(np.sin(math.pi * freq * u * (1.0 + 0.8 * (v + 1.0))))
    elif kind == 2:
        n = rng.uniform(2.0, 10.0)
        img = ((np.floor((u + 1) * n) + np.floor((v + 1) * n)) % 2).astype(np.float64)
    else:
        img = rng.random((size, size))
    lo, hi = sorted(rng.uniform(0.0, 1.0, 2))
    img = lo + (hi - lo + 0.05) * img + rng.normal(0.0, rng.uniform(0.0, 0.05), (size, size))
    return np.clip(img, 0.0, 1.0).astype(np.float32)


_OOD: dict[str, Callable[[np.random.Generator, int, float], np.ndarray]] = {
    "soft_tissue": _soft_tissue,
    "paper_form": _paper_form,
    "test_pattern": _test_pattern,
    "unknown_object": _unknown_object,
}
assert tuple(_OOD) == OOD_KINDS


def draw_out_of_domain(rng: np.random.Generator, size: int, kind: str | None = None,
                       angle_deg: float = 0.0) -> np.ndarray:
    """An image that is not a radiograph of the 14 regions: float32 (size, size) in [0, 1].

    `kind` is one of OOD_KINDS; None picks one at random.
    """
    if kind is None:
        kind = OOD_KINDS[int(rng.integers(0, len(OOD_KINDS)))]
    if kind not in _OOD:
        raise ValueError(f"unknown out-of-domain kind {kind!r}; expected one of {', '.join(OOD_KINDS)}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    return _OOD[kind](rng, size, angle_deg)

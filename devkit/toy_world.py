"""A procedural video world with exact optical flow: a toy world for models trained here.

Nothing here is real footage and nothing is downloaded: scenes are drawn from a seed. A scene is a
textured background (sand, grass, water, brick) with objects on it, each with a shape, a colour and a
pattern, and a caption in words ("a red striped circle on sand"; every attribute is a word, "plain"
included, several objects joined with "and"). A clip moves every layer (the background and each
object) by its own similarity transform per frame: a translation, a little scale and rotation.
Objects overlap each other and leave the frame, so there is occlusion between objects and by the
frame edge.

Rendering is by inverse mapping: pixel ``p`` of frame ``t`` (pixel ``x`` at coordinate ``x``, the
``align_corners=True`` convention of ``metric/warp_error.py``) is mapped into each layer's own
continuous coordinates and the layer's textures are evaluated there, so the flow is exact: the
layer visible at ``p`` in frame ``i`` maps ``p`` to ``q`` in its coordinates, and ``q`` lies at
``p + flow_fwd(p)`` in frame ``i+1``. Occlusion is exact too: pixel ``p`` of frame ``i`` is occluded
when its target leaves the frame or another layer covers the target in frame ``i+1``.

Layout of the outputs (ComfyUI's IMAGE layout for pictures, metric/warp_error's for flows):
frames (N, H, W, 3) float32 in [0, 1]; flow_fwd[i] (2, H, W) frame i -> i+1 on frame i's pixels and
flow_bwd[i] (2, H, W) frame i+1 -> i on frame i+1's pixels, in pixels, channel 0 = x;
occlusion[i] (H, W) pixels of frame i not visible in frame i+1; object masks are the VISIBLE part
of each object (the layer drawn at that pixel), in the order of ``objects`` (later ones on top).

Splits: seeds in ``TRAIN_SEEDS`` are for training, seeds in ``HELDOUT_SEEDS`` for evaluation (the
two ranges are disjoint). Independently, the ``split`` argument picks the attribute combinations:
"train" never draws (and refuses to render) a combination in ``HELDOUT_COMBOS``; "heldout" draws
only from them, to measure generalisation to unseen combinations. Scenes are defined in units of the
frame, so one seed gives the same picture at every size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
PATTERNS = ("plain", "striped", "dotted")
BACKGROUNDS = ("sand", "grass", "water", "brick")
SPLITS = ("train", "heldout")

TRAIN_SEEDS = range(0, 1_000_000)
HELDOUT_SEEDS = range(1_000_000, 1_010_000)

_RGB = {"red": (0.86, 0.12, 0.10), "green": (0.10, 0.72, 0.18), "blue": (0.12, 0.28, 0.92),
        "yellow": (0.98, 0.86, 0.08)}
# The pattern's second colour: dark enough to read on every colour, light enough to differ from black.
_PATTERN_INK = torch.tensor((0.06, 0.05, 0.08))
_SQUARE_HALF = 0.86  # half side of the square in object units: about the circle's area
_EDGE_PX = 1.0  # anti-aliasing ramp width in pixels


@dataclass(frozen=True)
class ToyObject:
    shape: str
    colour: str
    pattern: str


HELDOUT_COMBOS: tuple[ToyObject, ...] = (
    ToyObject("circle", "blue", "striped"),
    ToyObject("square", "yellow", "dotted"),
    ToyObject("triangle", "red", "plain"),
    ToyObject("square", "green", "striped"),
)
_ALL_COMBOS = tuple(ToyObject(s, c, p) for s in SHAPES for c in COLOURS for p in PATTERNS)
_TRAIN_COMBOS = tuple(o for o in _ALL_COMBOS if o not in HELDOUT_COMBOS)


@dataclass
class ToyScene:
    image: torch.Tensor  # (H, W, 3) float32 in [0, 1]
    masks: torch.Tensor  # (n_obj, H, W) bool, visible part
    objects: list[ToyObject]
    background: str
    caption: str


@dataclass
class ToyClip:
    frames: torch.Tensor  # (N, H, W, 3) float32 in [0, 1]
    flow_fwd: torch.Tensor  # (N-1, 2, H, W) frame i -> i+1, on frame i's pixels
    flow_bwd: torch.Tensor  # (N-1, 2, H, W) frame i+1 -> i, on frame i+1's pixels
    occlusion: torch.Tensor  # (N-1, H, W) bool: pixels of frame i not visible in frame i+1
    object_masks: torch.Tensor  # (N, n_obj, H, W) bool, visible part
    objects: list[ToyObject]
    background: str
    caption: str


def caption(objects: Sequence[ToyObject], background: str) -> str:
    """'a red striped circle on sand'; several objects joined with 'and'."""
    things = " and ".join(f"a {o.colour} {o.pattern} {o.shape}" for o in objects)
    return f"{things} on {background}"


def sample_objects(rng: np.random.Generator, n_objects: int, split: str = "train") -> list[ToyObject]:
    """``n_objects`` attribute combinations drawn uniformly from the split's combinations."""
    pool = _combos(split)
    return [pool[int(i)] for i in rng.integers(0, len(pool), size=n_objects)]


def _combos(split: str) -> tuple[ToyObject, ...]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return _TRAIN_COMBOS if split == "train" else HELDOUT_COMBOS


def _check_objects(objects: Sequence[ToyObject], background: str, split: str) -> None:
    for o in objects:
        if o.shape not in SHAPES or o.colour not in COLOURS or o.pattern not in PATTERNS:
            raise ValueError(f"unknown object {o}: shape in {SHAPES}, colour in {COLOURS}, pattern in {PATTERNS}")
        if split == "train" and o in HELDOUT_COMBOS:
            raise ValueError(f"{o} is a held-out combination: render it with split='heldout'")
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")


# ------------------------------------------------------------------ motion


@dataclass
class _Layer:
    """A layer's similarity transform over time: frame point u = centre + scale * R(angle) q."""
    centre: np.ndarray  # (N, 2) in frame units (x, y)
    scale: np.ndarray  # (N,)
    angle: np.ndarray  # (N,)

    def to_layer(self, u: torch.Tensor, t: int) -> torch.Tensor:
        """u (..., 2) frame units -> the layer's coordinates q (..., 2) at frame t."""
        c, s = math.cos(self.angle[t]), math.sin(self.angle[t])
        d = (u - torch.as_tensor(self.centre[t], dtype=u.dtype)) / float(self.scale[t])
        return torch.stack((c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1]), dim=-1)

    def to_frame(self, q: torch.Tensor, t: int) -> torch.Tensor:
        c, s = math.cos(self.angle[t]), math.sin(self.angle[t])
        x = c * q[..., 0] - s * q[..., 1]
        y = s * q[..., 0] + c * q[..., 1]
        return torch.stack((x, y), dim=-1) * float(self.scale[t]) + torch.as_tensor(self.centre[t], dtype=q.dtype)


def _trajectory(rng: np.random.Generator, n_frames: int, centre0: np.ndarray, speed: float,
                scale0: float, scale_rate: float, spin: float) -> _Layer:
    t = np.arange(n_frames, dtype=np.float64)
    heading = rng.uniform(0, 2 * math.pi)
    velocity = speed * np.array([math.cos(heading), math.sin(heading)])
    centre = centre0[None] + t[:, None] * velocity[None]
    scale = scale0 * (1.0 + rng.uniform(-scale_rate, scale_rate)) ** t
    angle = rng.uniform(-math.pi, math.pi) + rng.uniform(-spin, spin) * t
    return _Layer(centre, scale, angle)


def _background_layer(rng: np.random.Generator, n_frames: int) -> _Layer:
    layer = _trajectory(rng, n_frames, np.array([0.5, 0.5]), rng.uniform(0.002, 0.008), 1.0, 0.004, 0.004)
    layer.angle = layer.angle - layer.angle[0]  # start upright: brick rows stay horizontal-ish
    return layer


def _object_layers(rng: np.random.Generator, n_frames: int, n_objects: int) -> list[_Layer]:
    """Objects start apart enough that each is mostly visible in the first frame; motion may then overlap them."""
    low, high = (0.16, 0.22) if n_objects == 1 else (0.11, 0.17)
    radii = rng.uniform(low, high, size=n_objects)
    span = (0.3, 0.7) if n_objects == 1 else (0.2, 0.8)
    for _ in range(100):
        centres = rng.uniform(*span, size=(n_objects, 2))
        apart = all(np.hypot(*(centres[i] - centres[j])) >= 1.2 * max(radii[i], radii[j])
                    for i in range(n_objects) for j in range(i))
        if apart:
            break
    return [_trajectory(rng, n_frames, centres[k], rng.uniform(0.004, 0.02), radii[k], 0.012, 0.03)
            for k in range(n_objects)]


# ------------------------------------------------------------------ textures


def _value_noise(q: torch.Tensor, grid: torch.Tensor, cell: float) -> torch.Tensor:
    """Smooth periodic value noise: a continuous function of q (..., 2), values of ``grid`` (G, G)."""
    g = grid.shape[0]
    x, y = q[..., 0] / cell, q[..., 1] / cell
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    ix, iy = x0.long() % g, y0.long() % g
    jx, jy = (ix + 1) % g, (iy + 1) % g
    top = grid[iy, ix] * (1 - fx) + grid[iy, jx] * fx
    bottom = grid[jy, ix] * (1 - fx) + grid[jy, jx] * fx
    return top * (1 - fy) + bottom * fy


def _background_colour(kind: str, q: torch.Tensor, tex: torch.Generator) -> torch.Tensor:
    """RGB (..., 3) of a background kind at layer coordinates q (frame units)."""
    grids = [torch.rand(64, 64, generator=tex, dtype=torch.float64).to(q.dtype) for _ in range(3)]
    coarse, fine, extra = (_value_noise(q, grids[0], 0.12), _value_noise(q, grids[1], 0.04),
                           _value_noise(q, grids[2], 0.05))
    if kind == "sand":
        base, spread = torch.tensor((0.83, 0.72, 0.50)), 0.10 * (coarse - 0.5) + 0.14 * (fine - 0.5)
        return (base + spread[..., None]).clamp(0, 1)
    if kind == "grass":
        blades = _value_noise(torch.stack((q[..., 0] * 3.0, q[..., 1] * 0.5), -1), grids[2], 0.05)
        shade = 0.55 + 0.25 * (coarse - 0.5) + 0.45 * (blades - 0.5)
        return (torch.tensor((0.32, 0.55, 0.22)) * shade[..., None] * 1.2).clamp(0, 1)
    if kind == "water":
        wave = torch.sin(2 * math.pi * (q[..., 1] * 7.0 + 0.8 * coarse + 0.3 * q[..., 0]))
        level = 0.5 + 0.18 * wave + 0.16 * (fine - 0.5)
        return (torch.tensor((0.20, 0.50, 0.72)) + (level[..., None] - 0.5) * 0.5).clamp(0, 1)
    # brick: staggered rows of bricks with mortar lines, each brick tinted by the noise
    rows = q[..., 1] / 0.1
    row = torch.floor(rows)
    cols = q[..., 0] / 0.2 + 0.5 * torch.remainder(row, 2)
    fy, fx = rows - row, cols - torch.floor(cols)
    mortar_dist = torch.minimum(torch.minimum(fy, 1 - fy) * 0.1, torch.minimum(fx, 1 - fx) * 0.2)
    brick = (mortar_dist / 0.016).clamp(0, 1)  # smooth mortar edge: ramp over 0.016 frame units
    tint = 0.85 + 0.3 * (extra - 0.5) + 0.12 * (fine - 0.5)
    brick_rgb = torch.tensor((0.62, 0.26, 0.18)) * tint[..., None]
    mortar_rgb = torch.tensor((0.78, 0.76, 0.70)).expand_as(brick_rgb)
    return (brick[..., None] * brick_rgb + (1 - brick[..., None]) * mortar_rgb).clamp(0, 1)


def _signed_distance(shape: str, q: torch.Tensor) -> torch.Tensor:
    """Distance (object units, negative inside) to the shape's outline; circle radius 1."""
    x, y = q[..., 0], q[..., 1]
    if shape == "circle":
        return torch.sqrt(x * x + y * y) - 1.0
    if shape == "square":
        return torch.maximum(x.abs(), y.abs()) - _SQUARE_HALF
    # equilateral triangle, vertex up, centroid at the origin, inradius 0.6
    edges = [(-y), (math.sqrt(3) / 2 * x + 0.5 * y), (-math.sqrt(3) / 2 * x + 0.5 * y)]
    return torch.stack(edges).amax(0) - 0.6


def _pattern_ink(pattern: str, q: torch.Tensor, px_per_unit: float) -> torch.Tensor:
    """Share of ink (0..1) the pattern puts at object coordinates q: anti-aliased over about a pixel."""
    if pattern == "plain":
        return torch.zeros(q.shape[:-1], dtype=q.dtype)
    if pattern == "striped":  # stripes of period 0.5 object units, half of them inked
        d = (torch.remainder(q[..., 0] / 0.5, 1.0) - 0.5).abs() - 0.25
        return (0.5 - d * 0.5 * px_per_unit).clamp(0, 1)
    cell = torch.remainder(q / 0.5, 1.0) - 0.5  # dots: radius 0.15 on a 0.5 grid
    d = torch.sqrt((cell * cell).sum(-1)) * 0.5 - 0.15
    return (0.5 - d * px_per_unit).clamp(0, 1)


# ------------------------------------------------------------------ rendering


def _pixel_points(size: int) -> torch.Tensor:
    """(H, W, 2) frame-unit coordinates of the pixels (x, y): pixel k at (k + 0.5) / size."""
    k = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    ys, xs = torch.meshgrid(k, k, indexing="ij")
    return torch.stack((xs, ys), -1)


def _cover(objects: Sequence[ToyObject], layers: Sequence[_Layer], u: torch.Tensor, t: int) -> torch.Tensor:
    """(...) long: the top layer whose outline covers u at frame t (0 background, k + 1 object k)."""
    label = torch.zeros(u.shape[:-1], dtype=torch.long)
    for k, (obj, layer) in enumerate(zip(objects, layers)):
        label[_signed_distance(obj.shape, layer.to_layer(u, t)) < 0] = k + 1
    return label


def _render_frame(objects: Sequence[ToyObject], background: str, layers: Sequence[_Layer], u: torch.Tensor,
                  t: int, size: int, tex_seed: int) -> torch.Tensor:
    tex = torch.Generator().manual_seed(tex_seed)
    rgb = _background_colour(background, layers[0].to_layer(u, t), tex)
    for obj, layer in zip(objects, layers[1:]):
        q = layer.to_layer(u, t)
        px_per_unit = float(layer.scale[t]) * size
        alpha = (0.5 - _signed_distance(obj.shape, q) * px_per_unit / _EDGE_PX).clamp(0, 1)
        ink = _pattern_ink(obj.pattern, q, px_per_unit)[..., None]
        colour = torch.tensor(_RGB[obj.colour], dtype=u.dtype) * (1 - ink) + _PATTERN_INK.to(u.dtype) * ink
        rgb = rgb * (1 - alpha[..., None]) + colour * alpha[..., None]
    return rgb


def _flow(layers: Sequence[_Layer], label: torch.Tensor, u: torch.Tensor, t_from: int, t_to: int,
          size: int) -> torch.Tensor:
    """(H, W, 2) frame units: where each pixel's visible layer point lies at frame t_to, minus u."""
    target = torch.zeros_like(u)
    for k, layer in enumerate(layers):
        sel = label == k
        if bool(sel.any()):
            target[sel] = layer.to_frame(layer.to_layer(u[sel], t_from), t_to)
    return target


def _inside(target: torch.Tensor, size: int) -> torch.Tensor:
    pix = target * size - 0.5
    return (pix >= 0).all(-1) & (pix <= size - 1).all(-1)


def _generate(seed: int, n_frames: int, size: int, n_objects: int, objects: Optional[Sequence[ToyObject]],
              background: Optional[str], split: str, with_flow: bool,
              texture_seed: Optional[int], texture_per_frame: bool) -> dict:
    if n_frames < 1 or size < 8:
        raise ValueError(f"n_frames must be >= 1 and size >= 8, got n_frames={n_frames}, size={size}")
    rng = np.random.default_rng(seed)
    objects = list(objects) if objects is not None else sample_objects(rng, n_objects, split)
    if objects is not None and len(objects) == 0:
        raise ValueError("objects must hold at least one ToyObject")
    pick = BACKGROUNDS[int(rng.integers(0, len(BACKGROUNDS)))]
    background = background if background is not None else pick
    _check_objects(objects, background, split)
    tex_seed = int(rng.integers(0, 2**31)) if texture_seed is None else texture_seed
    layers = [_background_layer(rng, n_frames)] + _object_layers(rng, n_frames, len(objects))
    u = _pixel_points(size)
    labels = [_cover(objects, layers[1:], u, t) for t in range(n_frames)]
    frames = torch.stack([_render_frame(objects, background, layers, u, t, size,
                                        tex_seed + (t if texture_per_frame else 0)) for t in range(n_frames)])
    masks = torch.stack([torch.stack([lab == k + 1 for k in range(len(objects))]) for lab in labels])
    out = {"frames": frames.float().clamp(0, 1), "masks": masks, "objects": objects, "background": background,
           "caption": caption(objects, background)}
    if with_flow and n_frames > 1:
        fwd, bwd, occ = [], [], []
        for t in range(n_frames - 1):
            target = _flow(layers, labels[t], u, t, t + 1, size)
            back = _flow(layers, labels[t + 1], u, t + 1, t, size)
            covered = _cover(objects, layers[1:], target, t + 1)
            occ.append(~_inside(target, size) | (covered != labels[t]))
            fwd.append(((target - u) * size).permute(2, 0, 1))
            bwd.append(((back - u) * size).permute(2, 0, 1))
        out.update(flow_fwd=torch.stack(fwd).float(), flow_bwd=torch.stack(bwd).float(), occlusion=torch.stack(occ))
    return out


def render_scene(seed: int, size: int, n_objects: int = 1, objects: Optional[Sequence[ToyObject]] = None,
                 background: Optional[str] = None, split: str = "train", texture_seed: Optional[int] = None) -> ToyScene:
    """One still scene: the first frame of ``render_clip`` with the same arguments."""
    g = _generate(seed, 1, size, n_objects, objects, background, split, False, texture_seed, False)
    return ToyScene(g["frames"][0], g["masks"][0], g["objects"], g["background"], g["caption"])


def render_clip(seed: int, n_frames: int, size: int, n_objects: int = 1, objects: Optional[Sequence[ToyObject]] = None,
                background: Optional[str] = None, split: str = "train", texture_seed: Optional[int] = None,
                texture_per_frame: bool = False) -> ToyClip:
    """A clip with its exact flows, occlusion and object masks (see the module docstring for layouts).

    ``texture_seed`` overrides the background texture's seed; ``texture_per_frame`` gives frame t the
    texture seed + t, a flickering stand-in for editing each frame on its own (the flows stay the source's).
    """
    g = _generate(seed, n_frames, size, n_objects, objects, background, split, True, texture_seed, texture_per_frame)
    if n_frames == 1:
        empty = torch.zeros(0, 2, size, size)
        g.update(flow_fwd=empty, flow_bwd=empty.clone(), occlusion=torch.zeros(0, size, size, dtype=torch.bool))
    return ToyClip(g["frames"], g["flow_fwd"], g["flow_bwd"], g["occlusion"], g["masks"], g["objects"],
                   g["background"], g["caption"])

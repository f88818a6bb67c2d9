"""Tables, summary lines and the strip picture of the quality benchmark (a toy world trained here)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import torch

from _quality_edit import METHOD_LABELS
from _quality_metrics import mean_and_spread

METRICS = ("warp", "fidelity", "iou", "bg_psnr")
HEADERS = {"warp": "warp error (x1e-3)", "fidelity": "fidelity", "iou": "structure IoU", "bg_psnr": "bg PSNR (dB)"}
REFERENCE_LABELS = {"source": "source (AE round trip): the floor", "ideal": "ideal edit (rendered, AE round trip)"}


def fmt(values: list[float], digits: int = 3) -> str:
    mean, spread = mean_and_spread(values)
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {spread:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def markdown_table(model: str, results: dict, workload) -> list[str]:
    """One model's table: the reference rows, then every editor's methods (mean ± sample std over seeds)."""
    lines = [f"#### {model} (a toy world trained here; {workload.seeds} held-out clip(s) of {workload.frames} frames "
             f"at {workload.size}x{workload.size} px, mean ± std over clips)", "",
             "| editor | method | " + " | ".join(HEADERS[m] for m in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for key, label in REFERENCE_LABELS.items():
        lines.append(f"| - | {label} | " + " | ".join(fmt(results["reference"][key][m]) for m in METRICS) + " |")
    for editor, methods in results["editors"].items():
        for method, metrics in methods.items():
            lines.append(f"| {editor} | {METHOD_LABELS[method]} | "
                         + " | ".join(fmt(metrics[m]) for m in METRICS) + " |")
    return lines


def mean(values: Iterable[float]) -> float:
    return mean_and_spread(list(values))[0]


def summary_line(model: str, editor: str, results: dict) -> str:
    """The benchmark's last line for one model and editor (means over seeds)."""
    methods, source = results["editors"][editor], results["reference"]["source"]
    return (f"quality model={model} editor={editor} tokenflow_warp={mean(methods['tokenflow']['warp']):.3f} "
            f"perframe_warp={mean(methods['perframe']['warp']):.3f} joint_warp={mean(methods['joint']['warp']):.3f} "
            f"source_warp={mean(source['warp']):.3f} fidelity={mean(methods['tokenflow']['fidelity']):.3f} "
            f"perframe_fidelity={mean(methods['perframe']['fidelity']):.3f} "
            f"structure={mean(methods['tokenflow']['iou']):.3f}")


def margin_line(model: str, editor: str, results: dict) -> str:
    """The spread the tests' margins come from: per seed, per-frame editing's warp error minus TokenFlow's
    (x1e-3), its mean and two sample standard deviations; TokenFlow's fidelity, likewise."""
    methods = results["editors"][editor]
    gaps = [p - t for p, t in zip(methods["perframe"]["warp"], methods["tokenflow"]["warp"])]
    gap_mean, gap_spread = mean_and_spread(gaps)
    fid_mean, fid_spread = mean_and_spread(methods["tokenflow"]["fidelity"])
    return (f"margins model={model} editor={editor} warp_gap={gap_mean:.3f} warp_gap_2sigma={2 * gap_spread:.3f} "
            f"fidelity={fid_mean:.3f} fidelity_2sigma={2 * fid_spread:.3f} seeds={len(gaps)}")


def save_strip(path: Path, rows: list[tuple[str, torch.Tensor]], frames: int = 6, scale: int = 2) -> Path:
    """A PNG strip: one row per (label, (N, H, W, 3) frames), ``frames`` evenly spaced frames each, upscaled
    ``scale`` x by nearest neighbour so the toy frames are visible; the labels are written beside it."""
    from PIL import Image

    n = rows[0][1].shape[0]
    picks = sorted({round(i * (n - 1) / max(frames - 1, 1)) for i in range(min(frames, n))})
    gap = 2
    tiles = [[images[i] for i in picks] for _, images in rows]
    h, w = tiles[0][0].shape[:2]
    canvas = torch.ones(len(rows) * (h + gap) - gap, len(picks) * (w + gap) - gap, 3)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            canvas[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tile[..., :3].float()
    array = (canvas.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(array).resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path

#!/usr/bin/env python
"""Warp-error table (the TokenFlow paper's temporal-consistency metric) for several edits of one source video.

Usage::

    python scripts/consistency_report.py --source wolf.mp4 \\
        per-frame=out/pnp_per_frame.mp4 joint=out/joint_only/ tokenflow=out/tokenflow.mp4

Each edited video is a video file or a folder of frames, optionally prefixed with ``label=``; both
are read by the pack's decoder (``data/video_decode.py``, as TokenFlow Load Video reads them: a
folder's images in the order of the last number in their names, sides rounded to a multiple of 8).
Optical flow (OpenCV DIS, ``--flow``) is computed on the source video, resized to each edit's
resolution when they differ, and the source is cut to the edit's frame count. The table is printed as Markdown: warp error x1e-3 (lower = more
consistent; the paper reports TokenFlow 3.0, per-frame 11.3, VAE round trip 2.0 with RAFT flow)
and the fraction of pixels masked as occluded / leaving the frame. The ``source`` row is the
source scored against itself: the floor set by the flow estimator.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "devkit"))
import pack_import  # noqa: E402  (devkit/pack_import.py: the pack as the package comfyui_tokenflow)

pack_import.import_pack()
from comfyui_tokenflow.data import video_decode  # noqa: E402  (no ComfyUI needed)
from comfyui_tokenflow.metric import flow_estimation, warp_error as we  # noqa: E402

logger = logging.getLogger("consistency_report")
SIZE_MULTIPLE = 8  # the decoder's finest rounding: TokenFlow's frames are multiples of 8 already


def load_video(path: Path, max_frames: int | None = None, start: int = 0, step: int = 1) -> torch.Tensor:
    """(N, H, W, 3) float frames in [0, 1] from a video file or a folder of images, read as TokenFlow Load Video does."""
    try:
        return video_decode.load_video(str(path), frame_load_cap=max_frames or 0, skip_first_frames=start,
                                       select_every_nth=step, size_multiple=SIZE_MULTIPLE).images
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{path}: {e}") from None


def resize(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if frames.shape[1:3] == (height, width):
        return frames
    out = [np.asarray(Image.fromarray((f.numpy() * 255).round().astype(np.uint8)).resize((width, height), Image.BICUBIC))
           for f in frames]
    return torch.from_numpy(np.stack(out)).float() / 255.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("edited", nargs="+", help="[label=]path of an edited video (mp4 or frame folder)")
    parser.add_argument("--source", required=True, type=Path, help="source video (mp4 or frame folder)")
    parser.add_argument("--flow", default="medium", help="ultrafast | fast | medium (DIS) or a cached RAFT model")
    parser.add_argument("--max-frames", type=int, default=None, help="use at most this many frames")
    parser.add_argument("--source-start", type=int, default=0, help="first source frame (match the loader settings)")
    parser.add_argument("--source-step", type=int, default=1, help="source frame step (match the loader settings)")
    parser.add_argument("--no-source-row", action="store_true", help="omit the source-vs-itself floor row")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    source = load_video(args.source, args.max_frames, args.source_start, args.source_step)
    entries = [("source", args.source)] if not args.no_source_row else []
    for item in args.edited:
        label, sep, path = item.partition("=")
        entries.append((label, Path(path)) if sep else (Path(item).stem, Path(item)))

    flows: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    rows = []
    for label, path in entries:
        edited = source if path == args.source else load_video(path, args.max_frames)
        count = min(edited.shape[0], source.shape[0])
        if count < 2:
            raise SystemExit(f"{label}: need at least 2 frames, got {count}")
        if edited.shape[0] != source.shape[0]:
            logger.warning("%s has %d frames, source %d: using the first %d", label, edited.shape[0], source.shape[0], count)
        height, width = edited.shape[1:3]
        key = (count, height, width)
        if key not in flows:
            if source.shape[1:3] != (height, width):
                logger.warning("resizing the source to %dx%d for %s", width, height, label)
            logger.info("estimating %s flow on %d source frames at %dx%d", args.flow, count, width, height)
            flows[key] = flow_estimation.estimate_flows(resize(source[:count], height, width), args.flow)
        result = we.warp_error(edited[:count, ..., :3].movedim(-1, 1), *flows[key])
        rows.append((label, count, f"{width}x{height}", result.scaled, result.mean_excluded))

    print(f"\nwarp error on source-video {args.flow} flow (DIS unless RAFT named), lower is more consistent\n")
    print("| video | frames | size | warp error (x1e-3) | masked fraction |")
    print("|---|---:|---:|---:|---:|")
    for label, count, size, error, excluded in rows:
        print(f"| {label} | {count} | {size} | {error:.3f} | {excluded:.3f} |")


if __name__ == "__main__":
    main()

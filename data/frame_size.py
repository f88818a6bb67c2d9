"""Frame-size and frame-count rules of the TokenFlow loader, in plain Python (no torch, no PyAV, no ComfyUI).

The loader (``video_decode``) applies them to the frames it decodes; the headless runner
(``scripts/runner_checks.py``) applies the same rules to the command line before the host loads, so a size
TokenFlow cannot edit is refused at once, with advice computed from these rules.
"""
from __future__ import annotations

import math
import os
import re

VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".gif"})
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp"})
MAX_SIZE = 8192
MIN_MULTIPLE, MAX_MULTIPLE = 8, 128
# The smallest frame side TokenFlow edits: the SD UNet downsamples a latent (px / 8) three times.
MIN_SIDE = 64


def natural_key(name: str) -> list:
    """Sort key that orders embedded numbers numerically (frame_2 before frame_10)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def list_image_files(folder: str) -> list[str]:
    """Image files of ``folder`` sorted by the last number in their name, then naturally."""
    names = [n for n in os.listdir(folder)
             if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS and os.path.isfile(os.path.join(folder, n))]

    def key(name: str) -> tuple:
        numbers = re.findall(r"\d+", os.path.splitext(name)[0])
        return (0, int(numbers[-1])) if numbers else (1, 0), natural_key(name)

    return [os.path.join(folder, n) for n in sorted(names, key=key)]


def is_video_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS


def check_size_args(width: int, height: int, multiple: int) -> None:
    """Raise ValueError for an invalid size_multiple or an absurd width/height request."""
    if not (MIN_MULTIPLE <= multiple <= MAX_MULTIPLE and multiple % 8 == 0):
        raise ValueError(f"size_multiple={multiple} is invalid: use a multiple of 8 between "
                         f"{MIN_MULTIPLE} and {MAX_MULTIPLE} (64 is the usual choice for Stable Diffusion).")
    for name, value in (("width", width), ("height", height)):
        if value < 0 or value > MAX_SIZE:
            raise ValueError(f"{name}={value} is out of range: use 0 (keep aspect ratio) or 1..{MAX_SIZE}.")
        if 0 < value < multiple:
            raise ValueError(f"{name}={value} is smaller than size_multiple={multiple}: the frames would "
                             f"be rounded to nothing. Use {name} >= {multiple}, 0, or a smaller size_multiple.")


def compute_output_size(src_w: int, src_h: int, width: int, height: int, multiple: int) -> tuple[int, int]:
    """Target (width, height): a 0 side follows the source aspect ratio, both 0 keep the source size;
    both sides are then rounded to the nearest multiple of ``multiple`` (at least one multiple)."""
    check_size_args(width, height, multiple)
    if src_w <= 0 or src_h <= 0:
        raise ValueError(f"The source reports an invalid frame size {src_w}x{src_h}.")
    if width == 0 and height == 0:
        w, h = float(src_w), float(src_h)
    elif width == 0:
        w, h = height * src_w / src_h, float(height)
    elif height == 0:
        w, h = float(width), width * src_h / src_w
    else:
        w, h = float(width), float(height)
    out_w, out_h = (max(multiple, int(math.floor(v / multiple + 0.5)) * multiple) for v in (w, h))
    if out_w > MAX_SIZE or out_h > MAX_SIZE:
        raise ValueError(f"The output size {out_w}x{out_h} (source {src_w}x{src_h}, width={width}, "
                         f"height={height}) exceeds {MAX_SIZE} px: set a smaller width or height.")
    return out_w, out_h


def expected_kept(total: int, skip: int, nth: int, cap: int) -> int:
    """Number of frames kept from ``total`` by skip / every-nth / cap."""
    kept = max(0, -(-(total - skip) // nth))
    return min(kept, cap) if cap > 0 else kept

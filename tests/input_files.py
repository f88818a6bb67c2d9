"""Files the tests hand to ComfyUI, the headless runner or the video loader.

* :func:`write_test_clip`: the first frames of ``$TOKENFLOW_TEST_VIDEOS/wolf.mp4`` (default
  ``/work/shared/videos``) as a small H.264 mp4, or a synthetic clip when that file is missing;
* :func:`write_frames` / :func:`write_mp4`: a folder of PNG frames and a small random mp4;
* :func:`write_tiny_model_files` / :func:`write_tiny_flux_files`: the tiny checkpoint and ControlNet FILES
  and the tiny all-in-one Flux checkpoint of ``tests/stand_in_nodes/tiny_files.py``.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VIDEO_DIR = Path(os.environ.get("TOKENFLOW_TEST_VIDEOS", Path(__file__).resolve().parents[2] / "shared" / "videos"))
CLIP_FRAMES, CLIP_SIZE, CLIP_FPS = 6, 64, 20


def write_test_clip(path: Path, frames: int = CLIP_FRAMES, size: int = CLIP_SIZE, fps: int = CLIP_FPS) -> None:
    """The first ``frames`` frames of wolf.mp4 at ``size``x``size`` (synthetic frames if it is missing)."""
    import av
    import numpy as np
    from PIL import Image

    images = []
    source = VIDEO_DIR / "wolf.mp4"
    if source.is_file():
        with av.open(str(source)) as container:
            for frame in container.decode(video=0):
                images.append(frame.to_image().convert("RGB").resize((size, size), Image.BICUBIC))
                if len(images) == frames:
                    break
    while len(images) < frames:  # moving gradient + square
        i = len(images)
        yy, xx = np.mgrid[0:size, 0:size]
        rgb = np.stack([(xx * 4 + i * 9) % 256, (yy * 4) % 256, np.full_like(xx, 120)], -1).astype(np.uint8)
        rgb[20 + i:40 + i, 10 + 2 * i:30 + 2 * i] = (230, 230, 40)
        images.append(Image.fromarray(rgb))
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for image in images:
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _tiny_files():
    """``tests/stand_in_nodes/tiny_files.py`` as a module (it registers nothing; the stand-in pack is not imported)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tokenflow_harness_tiny_files",
                                                  REPO / "tests" / "stand_in_nodes" / "tiny_files.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_tiny_model_files(models_dir: Path) -> dict:
    """The tiny checkpoint and ControlNet FILES of ``tests/stand_in_nodes/tiny_files.py`` (see there), plus their
    names (``checkpoint_name``, ``controlnet_name``); needs comfy importable (the test process has it)."""
    module = _tiny_files()
    files = module.write_tiny_model_files(models_dir)
    files.update(checkpoint_name=module.CHECKPOINT_NAME, controlnet_name=module.CONTROLNET_NAME)
    return files


def write_tiny_sd3_files(models_dir: Path) -> dict:
    """The tiny all-in-one SD3 checkpoint of ``tiny_files.write_tiny_sd3_files``, plus ``checkpoint_name``."""
    module = _tiny_files()
    files = module.write_tiny_sd3_files(models_dir)
    files.update(checkpoint_name=module.SD3_CHECKPOINT_NAME)
    return files


def write_tiny_flux_files(models_dir: Path) -> dict:
    """The tiny all-in-one Flux checkpoint of ``tiny_files.write_tiny_flux_files`` and its extra_model_paths.yaml,
    plus ``checkpoint_name``."""
    module = _tiny_files()
    files = module.write_tiny_flux_files(models_dir)
    files.update(checkpoint_name=module.FLUX_CHECKPOINT_NAME)
    return files


def write_frames(folder: Path, n: int, size: int = 64, seed: int = 0) -> Path:
    """``n`` PNG frames of a random image panned one pixel per frame, in ``folder``."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size, size + n, 3), dtype=np.uint8)
    for i in range(n):
        Image.fromarray(np.ascontiguousarray(base[:, i:i + size])).save(folder / f"frame_{i:03d}.png")
    return folder


def write_mp4(path: Path, n: int = 8, size: int = 64, faststart: bool = False) -> Path:
    """A small H.264 mp4 with its index (moov) at the end, as most cameras and encoders write it; ``faststart``:
    first, as streaming encoders write it (cut mid-file, its first frames still decode)."""
    import av
    import numpy as np

    frames = np.random.default_rng(1).integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("libx264", rate=20)
        stream.height = stream.width = size
        stream.pix_fmt = "yuv420p"
        for a in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path

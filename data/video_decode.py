"""Streaming video / image-sequence decoding for the TokenFlow loader (no ComfyUI imports).

Frames are decoded one at a time with PyAV (or PIL for a folder of numbered images); only the
selected frames (``skip_first_frames``, ``select_every_nth``, ``frame_load_cap``) are converted,
resized right away and written into a preallocated ``(N, H, W, 3)`` float32 buffer, so the
whole decoded video never exists in memory. Before decoding, the size of that buffer is
estimated and compared with the available RAM.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import av
import numpy as np
import psutil
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .frame_size import (IMAGE_EXTENSIONS, MAX_MULTIPLE, MAX_SIZE, MIN_MULTIPLE, VIDEO_EXTENSIONS,  # noqa: F401
                         check_size_args, compute_output_size, expected_kept, is_video_file, list_image_files,
                         natural_key)

log = logging.getLogger(__name__)

# Refuse a load whose frame buffer needs more than this share of the available RAM.
MEMORY_FRACTION = 0.75
# Optional hard ceiling in bytes (lowers the limit, e.g. for tests); the env var wins if set.
MAX_BYTES: int | None = None
MAX_BYTES_ENV = "TOKENFLOW_VIDEO_MAX_BYTES"
# width = height = 0 (keep the source size) warns above this side, in px.
LARGE_SOURCE_SIDE = 1024
# A folder of images carries no frame rate; this one is reported for it.
FOLDER_FPS = 24.0

ProgressFn = Callable[[int, int], None]  # (frames kept so far, expected kept frames or 0)


@dataclass
class LoadedVideo:
    images: torch.Tensor  # (N, H, W, 3) float32 in [0, 1]
    frame_count: int
    fps: float  # source fps / select_every_nth
    source_fps: float
    source_size: tuple[int, int]  # (width, height) of the source frames


def _gib(n: float) -> float:
    return n / 1024 ** 3


def source_fingerprint(path: str) -> str:
    """mtime+size of a file, or a hash of the image listing (names, mtimes, sizes) of a folder."""
    if os.path.isdir(path):
        digest = hashlib.sha256()
        for f in list_image_files(path):
            st = os.stat(f)
            digest.update(f"{os.path.basename(f)}|{st.st_mtime_ns}|{st.st_size}\n".encode())
        return f"dir:{os.path.abspath(path)}:{digest.hexdigest()}"
    st = os.stat(path)
    return f"file:{os.path.abspath(path)}:{st.st_mtime_ns}:{st.st_size}"


def warn_if_large_source_size(out_w: int, out_h: int, width: int, height: int, path: str) -> None:
    """width = height = 0 keeps the source size: say so when that is far above what SD works at."""
    if width == 0 and height == 0 and max(out_w, out_h) > LARGE_SOURCE_SIDE:
        log.warning("TokenFlow Load Video: width and height are 0, so '%s' keeps its source size %dx%d; Stable "
                       "Diffusion works at 512-1024 px and larger frames cost much more memory and time: set width "
                       "(e.g. 512) or height to resize.", path, out_w, out_h)


def memory_limit_bytes(max_bytes: int | None = None) -> tuple[int, int]:
    """(limit, available): MEMORY_FRACTION of the available RAM, lowered by MAX_BYTES / env / argument."""
    available = int(psutil.virtual_memory().available)
    limit = int(available * MEMORY_FRACTION)
    env = os.environ.get(MAX_BYTES_ENV, "").strip()
    for ceiling in (MAX_BYTES, int(float(env)) if env else None, max_bytes):
        if ceiling is not None:
            limit = min(limit, int(ceiling))
    return limit, available


def check_memory(frames: int, width: int, height: int, max_bytes: int | None = None) -> None:
    """Raise ValueError if ``frames`` float32 RGB frames of width x height do not fit in RAM."""
    needed = frames * height * width * 3 * 4
    limit, available = memory_limit_bytes(max_bytes)
    if needed > limit:
        raise ValueError(
            f"Loading {frames} frames of {width}x{height} needs {_gib(needed):.2f} GiB of RAM as float32, "
            f"but only {_gib(limit):.2f} GiB may be used ({_gib(available):.2f} GiB available). "
            "Load fewer or smaller frames: set frame_load_cap, raise select_every_nth, "
            "or lower width/height.")


class _FrameBuffer:
    """Preallocated (N, H, W, 3) float32 storage that grows by chunks if the estimate was short."""

    def __init__(self, capacity: int, width: int, height: int):
        self.size = (height, width)
        self.chunks = [torch.empty((max(capacity, 1), height, width, 3), dtype=torch.float32)]
        self.count = 0
        self._pos = 0  # position in the last chunk

    def append(self, frame: np.ndarray) -> None:
        last = self.chunks[-1]
        if self._pos == last.shape[0]:
            last = torch.empty((max(16, self.count // 4), *self.size, 3), dtype=torch.float32)
            self.chunks.append(last)
            self._pos = 0
        t = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
        if tuple(t.shape[-2:]) != self.size:
            t = F.interpolate(t, size=self.size, mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
        last[self._pos].copy_(t[0].permute(1, 2, 0))
        self._pos += 1
        self.count += 1

    def result(self) -> torch.Tensor:
        if len(self.chunks) == 1:
            first = self.chunks[0]
            return first if self.count == first.shape[0] else first[: self.count].clone()
        parts = self.chunks[:-1] + [self.chunks[-1][: self._pos]]
        return torch.cat(parts, dim=0)


def _select(frames: Iterator, skip: int, nth: int, cap: int) -> Iterator[tuple[int, object]]:
    """Yield (index, item) for the selected items; stops as soon as the cap is reached."""
    kept = 0
    for index, item in enumerate(frames):
        if index < skip or (index - skip) % nth:
            continue
        yield index, item
        kept += 1
        if cap and kept >= cap:
            return


def _check_selection(frame_load_cap: int, skip_first_frames: int, select_every_nth: int) -> None:
    if frame_load_cap < 0:
        raise ValueError(f"frame_load_cap={frame_load_cap} must be >= 0 (0 loads all frames).")
    if skip_first_frames < 0:
        raise ValueError(f"skip_first_frames={skip_first_frames} must be >= 0.")
    if select_every_nth < 1:
        raise ValueError(f"select_every_nth={select_every_nth} must be >= 1.")


def _no_frames_error(path: str, decoded: int, skip: int, nth: int, error: Exception | None) -> ValueError:
    if decoded == 0:
        why = f" ({error})" if error else ""
        return ValueError(f"No frame could be decoded from '{path}': the file is empty, corrupt or "
                          f"truncated{why}. Re-export or re-download the video.")
    return ValueError(f"'{path}' has {decoded} decodable frame(s), but skip_first_frames={skip} "
                      f"(select_every_nth={nth}) leaves none. Lower skip_first_frames.")


def _stream_fps(stream) -> float:
    for rate in (stream.guessed_rate, stream.average_rate, stream.base_rate):  # guessed: ffmpeg's own pick
        if rate:
            return float(rate)
    return 0.0


def _estimate_total(container, stream, path: str) -> tuple[int, bool]:
    """(frame count, from_metadata): stream frame count, else duration x fps, else packet counting."""
    if stream.frames and stream.frames > 0:
        return int(stream.frames), True
    fps = _stream_fps(stream)
    seconds = None
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration:
        seconds = container.duration / av.time_base
    if seconds and fps:
        return int(round(seconds * fps)), True
    counter = av.open(path)
    try:
        return sum(1 for p in counter.demux(counter.streams.video[0]) if p.size), False
    finally:
        counter.close()


def _truncation(container, stream, decoded: int, last_time: float | None, fps: float,
                error: Exception | None) -> str | None:
    """Why a fully decoded stream is known to be cut short, or None.

    Evidence only, no guesses from frame-rate estimates: a decoder error, fewer frames than the
    container's own frame count, or frames ending well before the video's own duration (a
    video-only container's duration is the video's; with audio only the video stream's counts).
    """
    where = f"decoding fails at frame {decoded + 1} (frames 1-{decoded} decode" + (
        f", up to {last_time:.2f} s)" if last_time is not None else ")")
    if error is not None:
        return f"{where}: {error}"
    if stream.frames and decoded < stream.frames - 1:
        return f"{where}, but the file announces {stream.frames} frames"
    duration = None
    if stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration and len(container.streams) == 1:
        duration = container.duration / av.time_base
    if duration and last_time is not None:
        interval = 1.0 / fps if fps else 0.0
        missing = duration - (last_time + interval)
        if missing > max(0.25, 3 * interval, 0.02 * duration):
            return f"{where}, but the video lasts {duration:.2f} s"
    return None


def _load_container(path: str, cap: int, skip: int, nth: int, width: int, height: int, multiple: int,
                    max_bytes: int | None, progress: ProgressFn | None) -> LoadedVideo:
    try:
        container = av.open(path)
    except av.FFmpegError as e:
        raise ValueError(f"Cannot read '{path}' as a video: the file is corrupt, truncated or not a "
                         f"video ({e}). Use an mp4/webm/mov/gif file or a folder of images.") from None
    try:
        if not container.streams.video:
            raise ValueError(f"'{path}' contains no video stream. Choose a video file.")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        src_w, src_h = stream.codec_context.width, stream.codec_context.height
        out_w, out_h = compute_output_size(src_w, src_h, width, height, multiple)
        warn_if_large_source_size(out_w, out_h, width, height, path)
        total, from_metadata = _estimate_total(container, stream, path)
        kept_estimate = expected_kept(total, skip, nth, cap)
        check_memory(kept_estimate, out_w, out_h, max_bytes)
        source_fps = _stream_fps(stream)
        log.info("TokenFlow Load Video: '%s' %dx%d, ~%d frames at %.3f fps -> ~%d frames of %dx%d",
                    path, src_w, src_h, total, source_fps, kept_estimate, out_w, out_h)

        buffer = _FrameBuffer(kept_estimate or (cap or 16), out_w, out_h)
        decoded = 0
        last_time: float | None = None
        error: Exception | None = None

        def counted() -> Iterator:
            nonlocal decoded, last_time
            for frame in container.decode(stream):
                decoded += 1
                last_time = frame.time
                yield frame

        try:
            for _, frame in _select(counted(), skip, nth, cap):
                buffer.append(frame.to_ndarray(format="rgb24"))
                if progress is not None:
                    progress(buffer.count, kept_estimate)
        except av.FFmpegError as e:  # truncated / corrupt data after some frames
            error = e
        if buffer.count == 0:
            raise _no_frames_error(path, decoded, skip, nth, error)
        capped = cap > 0 and buffer.count >= cap
        if not capped:
            damage = _truncation(container, stream, decoded, last_time, source_fps, error)
            if damage:
                raise ValueError(
                    f"'{path}' is truncated or corrupt: {damage}. The {buffer.count} selected frame(s) before the "
                    f"damage are fine: set frame_load_cap={buffer.count} to load only them, or re-export / "
                    "re-download the video.")
            if from_metadata and decoded < total - 1:  # only an estimate (duration x fps), no evidence of damage
                log.warning("TokenFlow Load Video: '%s' was estimated at %d frames but %d were decoded; the file "
                               "may be truncated (a variable frame rate also does this).", path, total, decoded)
        images = buffer.result()
        return LoadedVideo(images, images.shape[0], source_fps / nth, source_fps, (src_w, src_h))
    finally:
        container.close()


def _open_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"Cannot read image '{path}' ({e}). Remove or replace that file.") from None


def _load_folder(folder: str, cap: int, skip: int, nth: int, width: int, height: int, multiple: int,
                 max_bytes: int | None, progress: ProgressFn | None) -> LoadedVideo:
    files = list_image_files(folder)
    if not files:
        raise ValueError(f"The folder '{folder}' contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))}). "
                         "Point path at a folder of numbered frames or at a video file.")
    try:
        with Image.open(files[0]) as first:
            src_w, src_h = ImageOps.exif_transpose(first).size
    except (OSError, ValueError) as e:
        raise ValueError(f"Cannot read image '{files[0]}' ({e}). Remove or replace that file.") from None
    out_w, out_h = compute_output_size(src_w, src_h, width, height, multiple)
    warn_if_large_source_size(out_w, out_h, width, height, folder)
    selected = [f for _, f in _select(iter(files), skip, nth, cap)]
    if not selected:
        raise _no_frames_error(folder, len(files), skip, nth, None)
    check_memory(len(selected), out_w, out_h, max_bytes)
    log.info("TokenFlow Load Video: folder '%s' with %d images of %dx%d -> %d frames of %dx%d",
                folder, len(files), src_w, src_h, len(selected), out_w, out_h)
    buffer = _FrameBuffer(len(selected), out_w, out_h)
    for f in selected:
        buffer.append(np.array(_open_image(f)))
        if progress is not None:
            progress(buffer.count, len(selected))
    images = buffer.result()
    return LoadedVideo(images, images.shape[0], FOLDER_FPS / nth, FOLDER_FPS, (src_w, src_h))


def load_video(path: str, frame_load_cap: int = 0, skip_first_frames: int = 0, select_every_nth: int = 1,
               width: int = 0, height: int = 0, size_multiple: int = 64, max_bytes: int | None = None,
               progress: ProgressFn | None = None) -> LoadedVideo:
    """Decode a video file or a folder of numbered images into (N, H, W, 3) float32 frames in [0, 1].

    Frame ``i`` (0-based, decode order) is kept when ``i >= skip_first_frames`` and
    ``(i - skip_first_frames) % select_every_nth == 0``, up to ``frame_load_cap`` frames (0 = all).
    """
    _check_selection(frame_load_cap, skip_first_frames, select_every_nth)
    check_size_args(width, height, size_multiple)
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"Video not found: '{path}'. Check the path, or pick a file from the "
                                "video list (ComfyUI input folder).")
    args = (frame_load_cap, skip_first_frames, select_every_nth, width, height, size_multiple, max_bytes, progress)
    if os.path.isdir(path):
        return _load_folder(path, *args)
    return _load_container(path, *args)


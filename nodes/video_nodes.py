"""TokenFlow Load Video: a memory-checked, streaming video / image-sequence loader node."""
from __future__ import annotations

import logging
import os
import sys

import folder_paths
from comfy_api.latest import io

from ..data import video_decode
from .common import CATEGORY, clean_path

log = logging.getLogger(__name__)


def list_input_videos() -> list[str]:
    """Video files (mp4, webm, mov, mkv, avi, m4v, gif) directly in ComfyUI's input folder."""
    input_dir = folder_paths.get_input_directory()
    try:
        names = os.listdir(input_dir)
    except OSError:
        return []
    return sorted(n for n in names
                  if video_decode.is_video_file(n) and os.path.isfile(os.path.join(input_dir, n)))


def resolve_source(video: str | None, path: str | None) -> str:
    """The file or folder to load: ``path`` when non-empty (relative paths may be inside the
    input folder), else the ``video`` chosen from the input folder."""
    resolved = clean_path(path)
    if resolved:
        if not os.path.isabs(resolved) and not os.path.exists(resolved):
            candidate = os.path.join(folder_paths.get_input_directory(), resolved)
            if os.path.exists(candidate):
                resolved = candidate
        return resolved
    if not video:
        raise ValueError("No video selected: choose or upload a file in 'video', or set 'path' to a "
                         "video file or a folder of numbered images.")
    return folder_paths.get_annotated_filepath(video)


def _comfy_hooks(total_hint: int):
    """Progress bar + interrupt check when running inside ComfyUI (modules already loaded), else None."""
    utils = sys.modules.get("comfy.utils")
    mm = sys.modules.get("comfy.model_management")
    if utils is None and mm is None:
        return None
    bar = utils.ProgressBar(max(total_hint, 1)) if utils is not None else None

    def progress(done: int, expected: int) -> None:
        if mm is not None:
            mm.throw_exception_if_processing_interrupted()
        if bar is not None:
            bar.update_absolute(done, max(expected, done, 1))

    return progress


class TokenFlowLoadVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TokenFlowLoadVideo",
            display_name="TokenFlow Load Video",
            category=CATEGORY,
            description=(
                "Loads a video (mp4, webm, mov, gif...) or a folder of numbered images as an IMAGE batch for "
                "TokenFlow. Frames are decoded one by one: only the selected frames are kept and resized "
                "immediately, and the load is refused up front if the frames would not fit in RAM."),
            inputs=[
                io.Combo.Input(
                    "video", options=list_input_videos() or [""], upload=io.UploadType.video,
                    tooltip="A video from ComfyUI's input folder (use the upload button to add one). "
                            "Ignored when 'path' is set."),
                io.String.Input(
                    "path", default="", optional=True,
                    tooltip="Optional file path of a video, or of a folder of numbered images "
                            "(png/jpg/webp, sorted by the number in the file name). Overrides 'video' when not empty."),
                io.Int.Input(
                    "frame_load_cap", default=0, min=0, max=100000,
                    tooltip="Maximum number of frames to load after skipping and striding; 0 loads all. "
                            "Decoding stops as soon as the cap is reached."),
                io.Int.Input(
                    "skip_first_frames", default=0, min=0, max=1000000,
                    tooltip="Number of frames to skip at the start of the video."),
                io.Int.Input(
                    "select_every_nth", default=1, min=1, max=1000,
                    tooltip="Keep one frame out of every n (1 keeps all). The output fps is divided by n."),
                io.Int.Input(
                    "width", default=0, min=0, max=video_decode.MAX_SIZE, step=8,
                    tooltip="Output width in pixels; 0 derives it from height and the aspect ratio "
                            "(both 0 keep the source size, with a warning above 1024 px; 512 is the paper's "
                            "size). Rounded to size_multiple."),
                io.Int.Input(
                    "height", default=0, min=0, max=video_decode.MAX_SIZE, step=8,
                    tooltip="Output height in pixels; 0 derives it from width and the aspect ratio "
                            "(both 0 keep the source size, with a warning above 1024 px; 512 is the paper's "
                            "size). Rounded to size_multiple."),
                io.Int.Input(
                    "size_multiple", default=64, min=video_decode.MIN_MULTIPLE, max=video_decode.MAX_MULTIPLE,
                    step=8,
                    tooltip="Width and height are rounded to the nearest multiple of this (at least one "
                            "multiple). 64 is the safe choice for Stable Diffusion; 8 is the minimum."),
            ],
            outputs=[
                io.Image.Output(
                    "images", display_name="IMAGE",
                    tooltip="The selected frames as an IMAGE batch (frames, height, width, 3), float 0..1."),
                io.Int.Output("frame_count", display_name="frame_count", tooltip="Number of frames loaded."),
                io.Float.Output(
                    "fps", display_name="fps",
                    tooltip=f"Frame rate of the loaded frames: the source fps divided by select_every_nth "
                            f"({video_decode.FOLDER_FPS:g} fps is assumed for an image folder)."),
            ],
        )

    @classmethod
    def execute(cls, video: str | None = None, path: str | None = "", frame_load_cap: int = 0,
                skip_first_frames: int = 0, select_every_nth: int = 1, width: int = 0, height: int = 0,
                size_multiple: int = 64) -> io.NodeOutput:
        source = resolve_source(video, path)
        expected = frame_load_cap if frame_load_cap > 0 else 0
        loaded = video_decode.load_video(
            source, frame_load_cap=frame_load_cap, skip_first_frames=skip_first_frames,
            select_every_nth=select_every_nth, width=width, height=height, size_multiple=size_multiple,
            progress=_comfy_hooks(expected))
        log.info("TokenFlow Load Video: loaded %d frames of %dx%d at %.3f fps from '%s'",
                    loaded.frame_count, loaded.images.shape[2], loaded.images.shape[1], loaded.fps, source)
        return io.NodeOutput(loaded.images, loaded.frame_count, loaded.fps)

    @classmethod
    def fingerprint_inputs(cls, video: str | None = None, path: str | None = "", **kwargs) -> str:
        if path is None:  # linked from another node: its value is unknown here
            return "linked-path"
        try:
            return video_decode.source_fingerprint(resolve_source(video, path))
        except (OSError, ValueError) as e:
            return f"unavailable:{e}"

    @classmethod
    def validate_inputs(cls, video: str | None = None, path: str | None = "") -> bool | str:
        if path is None:  # linked: checked when it runs
            return True
        try:
            source = resolve_source(video, path)
        except ValueError as e:
            return str(e)
        if not os.path.exists(source):
            which = "path" if (path or "").strip() else "video"
            return (f"{which}: '{source}' does not exist. Upload/choose an existing video, or fix the path "
                    "(a video file or a folder of numbered images).")
        return True


NODES = [TokenFlowLoadVideo]

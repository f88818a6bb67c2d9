"""The headless runner's checks before the ComfyUI host loads: arguments, frame size, paths and model-file headers.

Nothing here imports ComfyUI or torch (the pack's step-grid and frame-size rules are plain Python), so a bad command
line is refused within a fraction of a second, before the host's start-up (several seconds). Model files are
checked by their headers only: a .safetensors file's 8-byte length and JSON header, a .ckpt's zip directory.
Each problem is one line naming the option, the file and what to pass. Used by ``scripts/tokenflow_edit.py``.
"""
from __future__ import annotations

import argparse
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import model_links  # devkit/model_links.py (the runner puts devkit/ on sys.path)
import runner_messages as messages  # scripts/runner_messages.py, beside this file
import runner_models as models  # scripts/runner_models.py, beside this file
from comfyui_tokenflow.data import frame_size
from comfyui_tokenflow.tokenflow_ops import schedule

# Where ComfyUI's core loaders look for each kind of file, under the host's models/ (folder_paths; the folder
# names are checked against the host's own table by tests/test_runner_checks.py).
MODEL_FOLDERS = {"checkpoints": ("checkpoints",), "diffusion_models": ("unet", "diffusion_models"),
                 "text_encoders": ("text_encoders", "clip"), "vae": ("vae",),
                 "controlnet": ("controlnet", "t2i_adapter")}
SAFETENSORS = (".safetensors", ".sft")
PICKLED = (".ckpt", ".pt", ".pt2", ".bin", ".pth", ".pkl")  # PyTorch's zip format (or its legacy pickle)
OUTPUT_EXTENSIONS = (".mp4",)  # Save Video's format and codec: mp4, H.264
_MAX_HEADER = 100 * 1024 ** 2  # safetensors' own limit on the JSON header


@dataclass
class Source:
    """What the runner knows of the video before the host loads: its frame size and count (None: unreadable here,
    the loader then says why), and the frames the edit will have."""

    path: Path
    size: tuple[int, int] | None
    frames: int | None
    output_size: tuple[int, int] | None = None


def check_args(args: argparse.Namespace) -> str | None:
    """A one-line message for the first problem in the arguments themselves (no file read), or None."""
    problem = models.check_model_args(args)
    if problem:
        return problem
    if not args.checkpoint and not models.flux_files_given(args):
        return "error: no checkpoint given (--checkpoint). " + messages.CHECKPOINT_HELP
    if not args.video:
        return "error: no video given: pass --video /path/to/video.mp4 (or a folder of numbered images)."
    if not args.prompt:
        return "error: no edit prompt given: pass --prompt 'what the video should become'."
    try:
        # "auto" is checked here as ddim on a --checkpoint (it may hold an SD UNet: the grid rule is refused before
        # anything loads), as fixed point on Flux's files, and again for the detected family (resolve_family_settings)
        schedule.check_inversion_settings(args.steps, args.inversion_steps, args.inversion_method, args.max_iterations,
                                          args.tolerance, flow=models.flux_files_given(args), **models.INVERSION_FLAGS)
    except ValueError as e:
        return f"error: {e}."
    if args.editor == "controlnet" and not args.controlnet:
        return ("error: --editor controlnet needs --controlnet /path/to/controlnet.safetensors "
                f"(e.g. a canny ControlNet: {model_links.CANNY_CN.url}).")
    counts = (("--frames", args.frames, 0, "the number of frames to edit, or 0 for all of them"),
              ("--skip-frames", args.skip_frames, 0, "how many frames to skip at the start, 0 for none"),
              ("--every-nth", args.every_nth, 1, "1 to keep every frame, 2 for every second frame..."),
              ("--batch-size", args.batch_size, 1, "the frames per batch (one keyframe each), e.g. 8"))
    for flag, value, least, what in counts:
        if value < least:
            return f"error: {flag} {value} is below {least}: pass {what}."
    if args.threads < 0:
        return "error: --threads must be >= 0 (0: automatic)."
    return None


def check_output(args: argparse.Namespace) -> str | None:
    """--output must name an .mp4 file (what Save Video writes) that is not a folder."""
    output = Path(args.output).expanduser()
    if output.is_dir():
        return (f"error: --output {args.output} is a folder: pass --output "
                f"{output / (Path(args.video).stem + '_tokenflow.mp4')} (a file in it).")
    if output.suffix.lower() not in OUTPUT_EXTENSIONS:
        return (f"error: --output {args.output}: the runner writes H.264 video in {' / '.join(OUTPUT_EXTENSIONS)} "
                f"only: pass --output {output.with_suffix('.mp4')}.")
    if output.parent.exists() and not output.parent.is_dir():
        return f"error: --output {args.output}: {output.parent} is a file, not a folder: pass another path."
    return None


def read_source(path: Path) -> Source:
    """The source's frame size and count from its header (PyAV's container, a folder's first image): no decoding."""
    size = frames = None
    try:
        if path.is_dir():
            from PIL import Image

            files = frame_size.list_image_files(str(path))
            frames = len(files)
            if files:
                with Image.open(files[0]) as first:  # reads the header only
                    turned = first.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientations the loader turns
                    size = first.size[::-1] if turned else first.size
        else:
            import av

            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                size, frames = (int(stream.width), int(stream.height)), int(stream.frames) or None
    except Exception:  # noqa: BLE001 - the loader reads it again and says why it cannot
        pass
    return Source(path, size, frames)


def _frames_of(source: tuple[int, int], width: int, height: int, multiple: int) -> tuple[int, int] | None:
    """The loader's frame size for these options, None where it refuses them."""
    try:
        return frame_size.compute_output_size(*source, width, height, multiple)
    except ValueError:
        return None


def _editable(size: tuple[int, int] | None) -> bool:
    return size is not None and all(frame_size.MIN_SIDE <= side <= frame_size.MAX_SIZE for side in size)


def check_frame_size(args: argparse.Namespace, source: Source) -> str | None:
    """Refuse a frame size TokenFlow cannot edit, with the nearest value of the option that works (every rule:
    --size-multiple's range, the rounding, a 0 side following the aspect ratio, 64 to 8192 px); sets
    ``source.output_size``. An unreadable source is left to the loader unless both sides are given."""
    multiple = args.size_multiple
    if not (frame_size.MIN_MULTIPLE <= multiple <= frame_size.MAX_MULTIPLE and multiple % 8 == 0):
        nearest = min(max(8 * round(multiple / 8), frame_size.MIN_MULTIPLE), frame_size.MAX_MULTIPLE)
        return (f"error: --size-multiple {multiple} is not a multiple of 8 from {frame_size.MIN_MULTIPLE} to "
                f"{frame_size.MAX_MULTIPLE}: pass --size-multiple {nearest} (64, the default, suits Stable Diffusion).")
    for flag, value in (("--width", args.width), ("--height", args.height)):
        if value < 0 or value > frame_size.MAX_SIZE:
            return f"error: {flag} {value} is out of range: pass 0 (follow the aspect ratio) or 64 to {frame_size.MAX_SIZE}."
    reference = source.size or ((args.width, args.height) if args.width and args.height else None)
    if reference is None:
        return None
    source.output_size = _frames_of(reference, args.width, args.height, multiple)
    if _editable(source.output_size):
        return None
    # Change what the user set (the width when neither side is set), keeping every other option.
    flags = [flag for flag in ("width", "height") if getattr(args, flag)] or ["width"]
    advice = []
    for flag in [flag for flag in flags if not _fits(args, reference, flag, getattr(args, flag))]:
        asked = getattr(args, flag)
        # Multiples of --size-multiple only: the advised size is the frame size, not rounded again.
        fits = [v for v in range(multiple, frame_size.MAX_SIZE + 1, multiple) if _fits(args, reference, flag, v)]
        if not fits:
            return (f"error: no --{flag} gives frames of {frame_size.MIN_SIDE} to {frame_size.MAX_SIZE} px from this "
                    f"{reference[0]}x{reference[1]} source: pass both --width and --height (e.g. --width 512 "
                    "--height 512).")
        advice.append(f"--{flag} {min(fits, key=lambda v: (abs(v - asked), -v))}")
    asked = " ".join(f"--{flag} {getattr(args, flag)}" for flag in flags)
    got = f"{asked} with --size-multiple {multiple} gives frames of {source.output_size[0]}x{source.output_size[1]} px" \
        if source.output_size else f"{asked} is below --size-multiple {multiple} (it would round to nothing)"
    return (f"error: {got}; TokenFlow edits sides of {frame_size.MIN_SIDE} to {frame_size.MAX_SIZE} px: pass "
            f"{' '.join(advice)}.")


def _fits(args: argparse.Namespace, reference: tuple[int, int], flag: str, value: int) -> bool:
    """Whether ``--<flag> value`` (the other options as given) gives frames TokenFlow edits."""
    sizes = {"width": args.width, "height": args.height}
    if all(sizes.values()):  # both set: each side is rounded on its own; judge this one beside a good other side
        sizes = dict.fromkeys(sizes, max(frame_size.MIN_SIDE, args.size_multiple))
    sizes[flag] = value
    return _editable(_frames_of(reference, sizes["width"], sizes["height"], args.size_multiple))


def check_frame_count(args: argparse.Namespace, source: Source) -> str | None:
    """Refuse a selection that keeps no frame of a source whose count the header gives."""
    if source.frames and not frame_size.expected_kept(source.frames, args.skip_frames, args.every_nth, args.frames):
        return (f"error: --skip-frames {args.skip_frames} skips all {source.frames} frames of --video {args.video}: "
                f"pass --skip-frames {source.frames - 1} or less.")
    return None


def json_header(data: bytes) -> dict | None:
    try:
        header = json.loads(data)
    except ValueError:  # not JSON, or not UTF-8
        return None
    return header if isinstance(header, dict) else None


def model_file_problem(path: Path) -> str | None:
    """Why a model file cannot be what ComfyUI's loaders read, from its header alone, or None."""
    suffix = path.suffix.lower()
    size = path.stat().st_size
    if suffix in SAFETENSORS:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little") if size >= 8 else 0
            header = json_header(f.read(length)) if 2 <= length <= min(size - 8, _MAX_HEADER) else None
        if header is None and 2 <= length <= _MAX_HEADER and length > size - 8:
            return (f"incomplete .safetensors file (its header alone is {length} bytes, the file has {size}: a "
                    "download cut short): download it again")
        if header is None:
            return ("not a .safetensors file (no safetensors header in its first bytes: another file renamed, or a "
                    "damaged download): pass the model's .safetensors file, or download it again")
        ends = [entry["data_offsets"][1] for entry in header.values()
                if isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)]
        if ends and 8 + length + max(ends) > size:
            return (f"incomplete .safetensors file (its header lists {8 + length + max(ends)} bytes, the file has "
                    f"{size}: a download cut short): download it again")
        return None
    if suffix in PICKLED:
        with open(path, "rb") as f:
            legacy = f.read(1) == b"\x80"  # a pickle's PROTO opcode: PyTorch's format before its zip files
        if legacy:
            return None
        try:
            with zipfile.ZipFile(path) as archive:  # reads the central directory only
                if any(name.endswith("data.pkl") for name in archive.namelist()):
                    return None
        except (zipfile.BadZipFile, OSError):
            pass
        return (f"not a readable {suffix} file (neither PyTorch's zip format nor a pickle: damaged, cut short or "
                f"another file renamed): download it again, or pass its .safetensors version")
    return (f"not a model file ComfyUI's loaders read: pass a .safetensors file (or "
            f"{', '.join(SAFETENSORS[1:] + PICKLED)})")


def resolve_model(given: str, folder: str, host: Path) -> tuple[Path | None, str | None]:
    """(the file, None) for a path or a file name in the host's models folders of ``folder``; else (None, why)."""
    path = Path(given).expanduser()
    looked = [host / "models" / sub for sub in MODEL_FOLDERS[folder]]
    candidates = [path] + ([] if path.is_absolute() else [place / given for place in looked])
    for candidate in candidates:
        if candidate.is_dir():
            inside = sorted(p for p in candidate.iterdir() if p.suffix.lower() in SAFETENSORS + PICKLED)
            return None, ("is a folder: pass the model file in it (a .safetensors or .ckpt file"
                          f"{', e.g. ' + str(inside[0]) if inside else ''})")
        if candidate.is_file():
            problem = model_file_problem(candidate)
            return (None, problem) if problem else (candidate.resolve(), None)
    return None, f"no such file, and no file of that name in {' or '.join(str(p) for p in looked)}"


def check_model_files(args: argparse.Namespace, host: Path) -> tuple[dict[str, Path], list[str]]:
    """The model files by option (``--checkpoint``, ``--unet``..., ``--controlnet``), and one line per problem:
    every missing or unreadable file at once, each with where the core loader looks and where to download it."""
    wanted = [("--checkpoint", args.checkpoint, "checkpoints", model_links.SD21_BASE)] if args.checkpoint else \
        [(f.flag, getattr(args, f.attr), f.link.folder, f.link) for f in models.FLUX_FILES]
    if args.editor == "controlnet":
        wanted.append(("--controlnet", args.controlnet, "controlnet", model_links.CANNY_CN))
    what = {"--checkpoint": "TokenFlow's official model", "--controlnet": "a canny ControlNet"}
    files, problems = {}, []
    for flag, given, folder, link in wanted:
        path, problem = resolve_model(given, folder, host)
        if path is not None:
            files[flag] = path
            continue
        if problem.startswith("no such file") and flag in ("--checkpoint", "--controlnet"):
            problem += f": pass an existing file (e.g. {link.name}, {what[flag]}: {link.url})"
        elif problem.startswith("no such file"):
            problem += f"; download it from {link.url}"
            if link.url.startswith(model_links.FLUX_DEV_PAGE):
                problem += f" (gated: accept the license on {model_links.FLUX_DEV_PAGE} first)"
        problems.append(f"error: {flag} {given}{' ' if problem.startswith('is ') else ': '}{problem}.")
    return files, problems


def check_before_host(args: argparse.Namespace, host: Path) -> tuple[Source | None, dict[str, Path], list[str]]:
    """Every check that needs no host: (the source, the model files by option, the problems: empty when fine)."""
    problem = check_args(args)
    if problem:
        return None, {}, [problem]
    video = Path(args.video).expanduser()
    if not video.exists():
        return None, {}, [f"error: --video {args.video}: no such file or folder."]
    args.output = args.output or f"{video.stem}_tokenflow.mp4"
    source = read_source(video.resolve())
    problem = check_frame_size(args, source) or check_frame_count(args, source) or check_output(args)
    if problem:
        return source, {}, [problem]
    files, problems = check_model_files(args, host)
    return source, files, problems

"""The headless runner's messages: ComfyUI's refusals and node errors in the runner's words.

Every error names what the user typed (the option, the --video path, the file), on one line that is
never cut (the fix is at its end). Used by ``scripts/tokenflow_edit.py``.
"""
from __future__ import annotations

import argparse
import re

import model_links  # devkit/model_links.py (the runner puts devkit/ on sys.path)
from comfyui_tokenflow.data import frame_size
from comfyui_tokenflow.tokenflow_ops import schedule


CHECKPOINT_HELP = f"""\
Pass the Stable Diffusion checkpoint to edit with:

    --checkpoint /path/to/model.safetensors        (a .safetensors or .ckpt file, SD1.x / SD2.x / SDXL, or an
                                                    all-in-one Flux / SD3.x checkpoint)
    --checkpoint model.safetensors                 (a file name in ComfyUI/models/checkpoints/)
    --unet flux1-dev.safetensors --clip-l clip_l.safetensors --t5 t5xxl_fp16.safetensors --vae ae.safetensors
                                                   (Flux's separate files, names as in ComfyUI/models/)

TokenFlow's official setting uses Stable Diffusion 2.1-base, file {model_links.SD21_BASE.name} from
{model_links.SD21_BASE.url}
(any SD1.5 checkpoint works too, e.g. {model_links.SD15.url}).
Put it in ComfyUI/models/checkpoints/ or anywhere and pass its path. Example:

    bash scripts/run.sh --video wolf.mp4 --prompt "a shiny silver robotic wolf" --inversion-prompt "a wolf" \\
        --checkpoint ~/comfy/ComfyUI/models/checkpoints/v2-1_512-ema-pruned.safetensors --output robot_wolf.mp4
"""


# Graph nodes that load a file given on the command line: their errors name the option and the file.
_FILE_NODES = {"1": "--checkpoint", "13": "--controlnet", "15": "--clip-l / --t5", "16": "--vae"}
# (node id in build_prompt, input name) -> the runner's option that sets it.
_FLAGS = {
    ("1", "ckpt_name"): "--checkpoint",
    ("2", "frame_load_cap"): "--frames", ("2", "skip_first_frames"): "--skip-frames",
    ("2", "select_every_nth"): "--every-nth", ("2", "width"): "--width", ("2", "height"): "--height",
    ("2", "size_multiple"): "--size-multiple", ("2", "video"): "--video", ("2", "path"): "--video",
    ("4", "text"): "--inversion-prompt", ("5", "text"): "--prompt", ("6", "text"): "--negative",
    ("7", "steps"): "--steps", ("7", "inversion_steps"): "--inversion-steps", ("7", "frame_batch"): "--frame-batch",
    ("7", "method"): "--inversion-method", ("7", "max_iterations"): "--max-iterations", ("7", "tolerance"): "--tolerance",
    ("8", "editor"): "--editor", ("8", "cfg"): "--cfg", ("8", "batch_size"): "--batch-size", ("8", "seed"): "--seed",
    ("13", "control_net_name"): "--controlnet", ("14", "strength"): "--controlnet-strength",
    ("1", "unet_name"): "--unet", ("15", "clip_name1"): "--clip-l", ("15", "clip_name2"): "--t5",
    ("16", "vae_name"): "--vae", ("18", "guidance"): "--guidance", ("19", "guidance"): "--guidance",
    ("17", "width"): "--width", ("17", "height"): "--height",
}  # the editors' settings (--pnp-attn-t, ...) come from their declarations (editor_flags)


def _flag_of(node_id: str, name: str, editor_flags: dict[str, str]) -> str | None:
    """The runner's option that sets input ``name`` of graph node ``node_id`` (``editor_flags``: the sampler's
    editor inputs -> their flags, from the editors' declarations)."""
    if node_id == "8" and name in editor_flags:
        return editor_flags[name]
    return _FLAGS.get((node_id, name))
# The loader's input names in its messages -> the runner's options (longest first).
_LOADER_WORDS = (("frame_load_cap", "--frames"), ("skip_first_frames", "--skip-frames"),
                 ("select_every_nth", "--every-nth"), ("size_multiple", "--size-multiple"),
                 ("width/height", "--width/--height"), ("width", "--width"), ("height", "--height"))


def flag_words(message: str) -> str:
    """The loader's advice in the runner's words: ``frame_load_cap=14`` -> ``--frames 14``, ``width`` -> ``--width``."""
    for word, flag in _LOADER_WORDS:
        message = re.sub(rf"(?<![\w-]){re.escape(word)}=", flag + " ", message)
        message = re.sub(rf"(?<![\w/-]){re.escape(word)}(?![\w/])", flag, message)
    return message


def validation_errors(error: dict, node_errors: dict | None, editor_flags: dict[str, str]) -> list[str]:
    """ComfyUI's refusal of the graph, one line per input, named by the runner's option."""
    lines = []
    for node_id, info in (node_errors or {}).items():
        for e in info.get("errors", []):
            extra = e.get("extra_info") or {}
            name = extra.get("input_name")
            flag = _flag_of(str(node_id), name, editor_flags)
            if flag is None:
                lines.append(f"error: {info.get('class_type')}: {e.get('message')}: {e.get('details')}")
                continue
            config = extra.get("input_config")
            limits = config[1] if isinstance(config, (list, tuple)) and len(config) > 1 and \
                isinstance(config[1], dict) else {}
            value = extra.get("received_value")
            if e.get("type") == "value_bigger_than_max":
                lines.append(f"error: {flag} {value} is too large: the largest value is {limits.get('max')}.")
            elif e.get("type") == "value_smaller_than_min":
                lines.append(f"error: {flag} {value} is too small: the smallest value is {limits.get('min')}.")
            else:
                lines.append(f"error: {flag}: {e.get('message')} ({e.get('details')}).")
    if not lines:
        lines.append(f"error: ComfyUI refused the graph: {error.get('message')}: {error.get('details')}")
    return lines


def size_note(args: argparse.Namespace, output_size: tuple[int, int] | None) -> str | None:
    """Say so when --width / --height are rounded to other sizes (a multiple of --size-multiple)."""
    if output_size is None or (not args.width and not args.height):
        return None
    asked = [f"--{name} {value}" for name, value, got in zip(("width", "height"), (args.width, args.height), output_size)
             if value and value != got]
    if not asked:
        return None
    return (f"note: {' and '.join(asked)} {'is' if len(asked) == 1 else 'are'} rounded: the frames will be "
            f"{output_size[0]}x{output_size[1]} (sizes are multiples of --size-multiple {args.size_multiple}).")


def inversion_words(args: argparse.Namespace, flow: bool = False) -> str:
    """What the inversion runs: DDIM steps on an SD UNet, Euler steps on a flow model's sigmas (Flux, SD3.x)."""
    if args.inversion_method == "fixed_point":
        return f"fixed point on the editing grid, at most {args.max_iterations} evaluations per step"
    return f"{args.inversion_steps} {'Euler' if flow else 'DDIM'} steps"


def inversion_title(args: argparse.Namespace, flow: bool) -> str:
    """The inversion node's line: what it runs on this family (DDIM on SD UNets, Euler on flow models)."""
    rule = "flow inversion (Euler steps up the model's sigmas)" if flow else "DDIM inversion"
    if args.inversion_method == "fixed_point":
        return (f"fixed-point {rule.split(' (')[0]} on the {args.steps} editing steps, at most {args.max_iterations} "
                "evaluations per step")
    return f"{rule}, {args.inversion_steps} steps"


def edit_steps(args: argparse.Namespace) -> int:
    """The editing steps the sampler runs (SDEdit keeps the last ones, from --sdedit-start)."""
    if args.editor == "sdedit":
        return len(schedule.sdedit_timesteps(args.steps, args.sdedit_start))
    return args.steps


def work_words(args: argparse.Namespace, source, flow: bool) -> str:
    """The work ahead, so a long run can be told from a hung one: frames, steps and model evaluations of one frame."""
    frames = frame_size.expected_kept(source.frames, args.skip_frames, args.every_nth, args.frames) \
        if source.frames else args.frames
    if not frames:
        return "the frames of the video (their count is not in its header)"
    size = f" at {source.output_size[0]}x{source.output_size[1]}" if source.output_size else ""
    if args.inversion_method == "fixed_point":
        inversion = args.steps * frames * args.max_iterations
        inverted = f"inversion: {args.steps} steps x {frames} frames x up to {args.max_iterations} = up to {inversion}"
    else:
        inversion = args.inversion_steps * frames
        inverted = f"inversion: {args.inversion_steps} steps x {frames} frames = {inversion}"
    steps, keyframes = edit_steps(args), -(-frames // args.batch_size)
    branches = 1 if args.cfg == 1 else 2  # at cfg 1 the negative prompt is skipped
    edit = steps * (frames + keyframes) * branches
    words = f"edit: {steps} steps x ({frames} frames + {keyframes} keyframes) x {branches} (prompts)"
    if args.editor == "pnp":  # the source branch runs while its features are injected
        injected = round(steps * max(args.pnp_f_t, args.pnp_attn_t))
        edit += injected * (frames + keyframes)
        words += f" + {injected} steps of the source branch"
    return (f"{frames} frames{size}; about {inversion + edit} model evaluations of one frame ({inverted}; "
            f"{words} = {edit})")


def progress_units(args: argparse.Namespace, flow: bool) -> dict:
    """What each node's progress bar counts, in words: class type -> (value, total) -> label."""
    steps = edit_steps(args)
    value_totals = [0]  # the largest total the sampler's bars have had (its frame bar: steps x frames)

    def edit(value: int, total: int) -> str | None:
        if total == steps and steps < value_totals[0]:  # the preview callback's bar: the frame bar says it already
            return None
        value_totals[0] = max(value_totals[0], total)
        if total % steps:
            return f"edit {value}/{total} frame steps"
        frames = total // steps
        step = max(1, -(-value // frames))
        return f"edit step {step}/{steps} (frame {value - (step - 1) * frames}/{frames})"

    return {"TokenFlowLoadVideo": lambda value, total: f"frame {value}/{total} loaded",
            "TokenFlowInvert": lambda value, total: f"{'Euler ' if flow else ''}inversion step {value}/{total}",
            "TokenFlowSampler": edit}


def node_error(args: argparse.Namespace, data: dict, inputs: dict | None = None) -> str:
    """One line for a node's error, the whole message: a failed model load names the file, other errors their node,
    with the user's --video path and option names instead of the temporary input file and the node's inputs."""
    kind = str(data.get("exception_type") or "Error").rsplit(".", 1)[-1]
    message = str(data.get("exception_message") or "").strip()
    for seen, given in sorted((inputs or {}).items(), key=lambda item: -len(item[0])):
        message = message.replace(seen, given)
    if not args.verbose:  # one line, nothing cut: the advice is at the end
        message = " ".join(line.strip() for line in message.splitlines() if line.strip())
    if str(data.get("node_id")) == "2":
        message = flag_words(message)
    message = message.replace("(set width/height in TokenFlow Load Video)", "(set --width/--height)")
    option = _FILE_NODES.get(str(data.get("node_id")))
    hint = "" if args.verbose else " (--verbose shows the traceback)"
    if option == "--checkpoint" and getattr(args, "unet", None):  # Flux's separate files: node 1 is UNETLoader
        option = "--unet"
    if option is not None:
        given = {"--checkpoint": args.checkpoint, "--controlnet": args.controlnet,
                 "--unet": getattr(args, "unet", None), "--vae": getattr(args, "vae", None)}.get(option) or \
            f"{getattr(args, 'clip_l', None)} / {getattr(args, 't5', None)}"
        return (f"error: {option} {given}: ComfyUI could not load it ({kind}: {message}); the file is damaged, "
                f"incomplete or not a model of that kind: download it again or pick another file{hint}.")
    return f"error in {data.get('node_type')}: {kind}: {message}{hint}"

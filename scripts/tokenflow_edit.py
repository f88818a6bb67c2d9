#!/usr/bin/env python3
"""Edit a video with TokenFlow without the ComfyUI interface (the pack's "main job").

    bash scripts/run.sh --video wolf.mp4 --prompt "a shiny silver robotic wolf" \\
        --inversion-prompt "a wolf" --checkpoint /path/to/v2-1_512-ema-pruned.safetensors \\
        --output robot_wolf.mp4

ComfyUI is imported in-process (no server, no browser): the script builds the same graph as
``example_workflows/tokenflow_pnp.json`` (Load Checkpoint -> TokenFlow Load Video -> VAE Encode ->
TokenFlow DDIM Inversion -> TokenFlow Sampler -> VAE Decode -> Create Video -> Save Video; on Flux-dev
``tokenflow_flux.json``'s, see scripts/runner_models.py: ``--checkpoint`` or ``--unet --clip-l --t5 --vae``), lets
ComfyUI validate it and runs it with ComfyUI's own executor, printing each node and its progress,
then moves the saved mp4 to ``--output``. ``--editor sdedit`` or ``--editor controlnet``
(with ``--controlnet``, canny hints from the frames) select the other editors.

The ComfyUI host is ``--comfyui``, else ``$COMFYUI_PATH``, else the ComfyUI that holds this pack in
``custom_nodes/``, else ``~/comfy/ComfyUI``. ``scripts/run.sh`` also sets up the Python environment.
Exit codes: 0 done, 2 bad arguments (nothing run), 1 the edit failed, 130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "devkit"))
import pack_import  # noqa: E402  (devkit/pack_import.py: outside ComfyUI the pack is the package comfyui_tokenflow)

pack_import.import_pack()
import runner_checks as checks  # noqa: E402  (scripts/runner_checks.py, beside this file: no ComfyUI, no torch)
import runner_messages as messages  # noqa: E402  (scripts/runner_messages.py)
import runner_models as models  # noqa: E402  (scripts/runner_models.py)
import runner_support as support  # noqa: E402  (scripts/runner_support.py)
OFFICIAL_NEGATIVE = "ugly, blurry, low res, unrealistic, unaesthetic"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tokenflow_edit.py", formatter_class=support.DefaultsFormatter,
        description="Edit a video with TokenFlow (ICLR 2024) through ComfyUI, headless.")
    p.add_argument("--video", help="source video file (mp4, webm, mov, gif...) or a folder of numbered images")
    p.add_argument("--prompt", help="edit prompt, e.g. 'a shiny silver robotic wolf'")
    p.add_argument("--inversion-prompt", default="", help="prompt describing the SOURCE video for the DDIM "
                   "inversion (the official default is empty; e.g. 'a wolf')")
    p.add_argument("--negative", default=OFFICIAL_NEGATIVE, help="negative prompt")
    p.add_argument("--checkpoint", help="SD1.x/SD2.x/SDXL or all-in-one Flux / SD3.x checkpoint: a .safetensors/"
                   ".ckpt path, or a file name in ComfyUI/models/checkpoints (or Flux's --unet --clip-l --t5 --vae)")
    models.add_arguments(p)
    p.add_argument("--output", help="output mp4 (default: <video name>_tokenflow.mp4 in the current folder)")
    editors, defaults = _pack_module("engine.editors"), _pack_module("engine.plan.settings").EditSettings()
    p.add_argument("--editor", choices=editors.editor_names(), default=defaults.editor,
                   help=_help("image editor combined with TokenFlow. " + editors.editor_tooltip()))
    schedule = _schedule()
    p.add_argument("--steps", type=int, default=50, help=f"editing (DDIM) steps, 1 to {schedule.MAX_STEPS}; must "
                   "fit --inversion-steps (see there)")
    p.add_argument("--inversion-steps", type=int, default=500, help=f"DDIM inversion steps, 1 to "
                   f"{schedule.MAX_STEPS} (1000 would pass the end of the model's schedule; {schedule.MAX_STEPS} is "
                   f"the finest grid, the paper's 1000; 50 is a fast preview). Rule: "
                   f"{schedule.step_grid_rule('--steps', '--inversion-steps')}")
    p.add_argument("--inversion-method", choices=schedule.INVERSION_METHODS,
                   default=schedule.DEFAULT_INVERSION_METHOD, help="ddim: the official code's DDIM inversion on the "
                   "grid of --inversion-steps (Euler steps on Flux / SD3.x); fixed_point: exact inversion on the "
                   "editing grid of --steps (--inversion-steps is not used), each step solved by fixed-point "
                   "iteration; auto: fixed_point on Flux / SD3.x, ddim on SD UNets (the graph names the one it "
                   "resolves to; see benchmarks/README.md for the measured cost and reconstruction)")
    p.add_argument("--max-iterations", type=int, default=schedule.DEFAULT_MAX_ITERATIONS, help="fixed_point: most "
                   f"model evaluations per editing step (1 to {schedule.MAX_ITERATIONS_LIMIT})")
    p.add_argument("--tolerance", type=float, default=schedule.DEFAULT_TOLERANCE, help="fixed_point: relative "
                   "residual that ends a step's iteration (0: always --max-iterations)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size,
                   help="frames per batch; one keyframe per batch per step")
    p.add_argument("--cfg", type=float, default=None, help=f"classifier-free guidance scale (default: 1 on Flux, "
                   f"which is guidance-distilled and then skips the negative; 4 on SD3.x; {defaults.cfg} otherwise)")
    for setting in editor_settings():  # --pnp-attn-t, --pnp-f-t, --sdedit-start, ...: the editors' declarations
        by_family = setting.name in models.FAMILY_EDITOR_DEFAULTS  # set once the model's family is known
        p.add_argument(setting.flag, type=setting.kind, default=None if by_family else setting.default,
                       help=_help(setting.tooltip + (f" (default: {models.pnp_fraction(True):g} on Flux, its default "
                                                     f"preset's published fraction; {setting.default:g} otherwise)"
                                                     if by_family else "")))
    p.add_argument("--controlnet", help="ControlNet file (path or name in ComfyUI/models/controlnet) for "
                   "--editor controlnet; hints are canny edges of each frame")
    p.add_argument("--controlnet-strength", type=float, default=1.0, help="ControlNet strength")
    p.add_argument("--frames", type=int, default=0, help="number of frames to edit (0: all)")
    p.add_argument("--skip-frames", type=int, default=0, help="frames to skip at the start")
    p.add_argument("--every-nth", type=int, default=1, help="keep one frame out of every n")
    p.add_argument("--width", type=int, default=512, help="output width (0: from --height and the aspect ratio)")
    p.add_argument("--height", type=int, default=0, help="output height (0: from --width and the aspect ratio)")
    p.add_argument("--size-multiple", type=int, default=64, help="--width and --height are rounded to the nearest "
                   "multiple of this (8 to 128, a multiple of 8; Stable Diffusion works best with 64)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the keyframe choice (the official runs use 1)")
    p.add_argument("--frame-batch", type=int, default=0, help="most frames per UNet call during inversion; 0: as many as memory allows")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (slow; for tests and machines without a GPU)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for PyTorch (default: $OMP_NUM_THREADS if set, "
                   "else half the CPUs this process may use, at least 1: on a busy 2-core machine all cores ran "
                   "the tiny and the full-size edit about 3x slower than one thread, see benchmarks/README.md)")
    p.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH, the ComfyUI holding this pack, "
                   "~/comfy/ComfyUI)")
    p.add_argument("--extra-nodes", action="append", default=[], metavar="DIR",
                   help="also load this custom node pack (repeatable), e.g. one that adds model types")
    p.add_argument("--verbose", action="store_true", help="show ComfyUI's log and the traceback of errors")
    return p


def _schedule() -> ModuleType:
    """The pack's tokenflow_ops.schedule (pure torch), where the step-grid rule and its one check live."""
    pack_import.import_pack()
    from comfyui_tokenflow.tokenflow_ops import schedule

    return schedule


def _pack_module(name: str) -> ModuleType:
    """A ComfyUI-free module of the pack (``engine.editors``, ``engine.plan.settings``), imported before the host
    through the one outside-ComfyUI name, ``comfyui_tokenflow`` (devkit/pack_import.py)."""
    pack_import.import_pack()
    return importlib.import_module(f"comfyui_tokenflow.{name}")


def editor_settings() -> list:
    """The settings the registered editors declare (the pack's own: plug-ins load with the host, after parsing)."""
    editors = _pack_module("engine.editors")
    return [d for editor in editors.usable_editors().values() for d in editor.inputs if isinstance(d, editors.EditorSetting)]


def editor_flags() -> dict[str, str]:
    """The sampler's editor inputs -> the runner's flags that set them (from the editors' declarations)."""
    return {setting.name: setting.flag for setting in editor_settings()}


def _help(text: str) -> str:
    return text.replace("%", "%%")  # argparse formats help strings with %


def build_prompt(args: argparse.Namespace, video_name: str, ckpt_name: str | None, controlnet_name: str | None,
                 prefix: str, flux_names: dict[str, str] | None = None) -> tuple[dict, str]:
    """The API-format graph and the id of its Save Video node (``flux_names``: Flux's separate files, by option)."""
    loaders, model, clip, vae = models.loader_nodes(ckpt_name, flux_names)
    prompt = {
        **loaders,
        "2": {"class_type": "TokenFlowLoadVideo", "inputs": {
            "video": video_name, "frame_load_cap": args.frames, "skip_first_frames": args.skip_frames,
            "select_every_nth": args.every_nth, "width": args.width, "height": args.height,
            "size_multiple": args.size_multiple,
            "path": ""}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": vae}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": args.inversion_prompt, "clip": clip}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": args.prompt, "clip": clip}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": args.negative, "clip": clip}},
        "7": {"class_type": "TokenFlowInvert", "inputs": {
            "model": model, "latent": ["3", 0], "conditioning": ["4", 0], "steps": args.steps,
            "inversion_steps": args.inversion_steps, "frame_batch": args.frame_batch,
            "method": args.inversion_method, "max_iterations": args.max_iterations, "tolerance": args.tolerance}},
        "8": {"class_type": "TokenFlowSampler", "inputs": {
            "model": model, "positive": ["5", 0], "negative": ["6", 0], "inversion": ["7", 0],
            "editor": args.editor, "cfg": args.cfg, "batch_size": args.batch_size, "keyframes": "random",
            "seed": args.seed, **{setting.name: getattr(args, setting.name) for setting in editor_settings()}}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": vae}},
        "10": {"class_type": "CreateVideo", "inputs": {"images": ["9", 0], "fps": ["2", 2]}},
        "11": {"class_type": "SaveVideo", "inputs": {"video": ["10", 0], "filename_prefix": prefix,
                                                     "format": "mp4", "codec": "h264"}},
    }
    for node_id, title in (("4", f"inversion prompt {args.inversion_prompt!r}"), ("5", f"edit prompt {args.prompt!r}"),
                           ("6", "negative prompt")):
        prompt[node_id]["_meta"] = {"title": title}
    if controlnet_name is not None:
        prompt.update({
            "12": {"class_type": "Canny", "inputs": {"image": ["2", 0], "low_threshold": 0.4, "high_threshold": 0.8}},
            "13": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": controlnet_name}},
            "14": {"class_type": "ControlNetApplyAdvanced", "inputs": {
                "positive": ["5", 0], "negative": ["6", 0], "control_net": ["13", 0], "image": ["12", 0],
                "strength": args.controlnet_strength, "start_percent": 0.0, "end_percent": 1.0}},
        })
        prompt["8"]["inputs"]["positive"] = ["14", 0]
        prompt["8"]["inputs"]["negative"] = ["14", 1]
    return prompt, "11"


def _run(args: argparse.Namespace, host: Path, source: checks.Source, files: dict[str, Path],
         start_up: support.StartUp) -> int:
    # Import the host exactly as ComfyUI's main.py would see it: its folder first on sys.path.
    script_dir = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p not in ("", script_dir, str(REPO))]
    sys.path.insert(0, str(host))
    support.setup_logging(args.verbose)
    print(f"ComfyUI host: {host}", flush=True)
    t0 = time.monotonic()
    from comfy.cli_args import args as comfy_args

    if not args.cpu and not support.accelerator_available():
        print("warning: no GPU found, running on the CPU (slow; pass --cpu to silence this).", file=sys.stderr)
        args.cpu = True
    if args.cpu:
        comfy_args.cpu = True
        comfy_args.use_pytorch_cross_attention = True
    import asyncio

    import folder_paths
    # As main.py does: bind ComfyUI's `utils` package before any node module can shadow it
    # (comfy_extras' imports otherwise find comfy/utils.py as `utils`).
    import utils.extra_config  # noqa: F401

    work = Path(tempfile.mkdtemp(prefix="tokenflow-edit-"))
    try:
        for sub in ("input", "output", "temp"):
            (work / sub).mkdir()
        folder_paths.set_input_directory(str(work / "input"))
        folder_paths.set_output_directory(str(work / "output"))
        folder_paths.set_temp_directory(str(work / "temp"))
        # The files the checks found (and read the headers of): their folders join the loaders' lists.
        names = {flag: support.register_model(folder, str(files[flag]), folder_paths) for flag, folder in
                 [("--checkpoint", "checkpoints"), ("--controlnet", "controlnet")] +
                 [(f.flag, f.folder) for f in models.FLUX_FILES] if flag in files}
        ckpt_name, controlnet_name = names.get("--checkpoint"), names.get("--controlnet")
        flux_names = None if ckpt_name else {f.attr: names[f.flag] for f in models.FLUX_FILES}

        video = source.path
        video_name = ""  # a folder of numbered images goes through the loader's path input
        inputs = {}  # paths ComfyUI sees -> what the user passed, for the error messages
        if video.is_file():  # a video file: linked into the input folder, chosen like an upload
            video_name = "source" + video.suffix.lower()
            os.symlink(video, work / "input" / video_name)
            inputs[str(work / "input" / video_name)] = args.video
            inputs[os.path.realpath(work / "input" / video_name)] = args.video
        inputs[str(video)] = args.video

        start_up.at("loading ComfyUI's nodes and the custom node packs")
        import execution
        import nodes

        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        for pack in [str(REPO)] + [str(Path(d).expanduser().resolve()) for d in args.extra_nodes]:
            if not asyncio.run(nodes.load_custom_node(pack)):
                print(f"error: could not load the custom node pack {pack} (run with --verbose to see why).",
                      file=sys.stderr)
                return 1
        missing = [n for n in ("TokenFlowLoadVideo", "TokenFlowInvert", "TokenFlowSampler")
                   if n not in nodes.NODE_CLASS_MAPPINGS]
        if missing:
            print(f"error: the TokenFlow nodes {missing} did not register (run with --verbose).", file=sys.stderr)
            return 1
        import comfy.model_management
        import comfy.utils

        threads, available = support.set_threads(args.threads)
        print(f"device: {comfy.model_management.get_torch_device()}; PyTorch uses {threads} CPU thread(s) of "
              f"{available} available (--threads to change); ComfyUI started in {time.monotonic() - t0:.1f} s",
              flush=True)

        start_up.at("checking the model and the graph")
        family = models.detect_family(str(files.get("--checkpoint") or files["--unet"]), ckpt_name is not None)
        problem = models.resolve_family_settings(args, family, _pack_module("engine.plan.settings").EditSettings().cfg)
        if problem:
            print(problem, file=sys.stderr)
            return 2
        prefix = f"tokenflow_{uuid.uuid4().hex[:8]}"
        prompt, save_id = build_prompt(args, video_name, ckpt_name, controlnet_name, prefix, flux_names)
        if family is not None and family.guidance_distilled:
            models.add_flux_dev_nodes(prompt, args.guidance, source.output_size)
        if not video_name:
            prompt["2"]["inputs"]["path"] = str(video)
        prompt_id = str(uuid.uuid4())
        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid:
            for line in messages.validation_errors(error, node_errors, editor_flags()):
                print(line, file=sys.stderr)
            return 2
        note = messages.size_note(args, source.output_size)
        if note:
            print(note, flush=True)
        flow = family is not None and family.flow
        prompt["7"]["_meta"] = {"title": messages.inversion_title(args, flow)}
        titles = {name: getattr(nodes, "NODE_DISPLAY_NAME_MAPPINGS", {}).get(name, name) for name in
                  {n["class_type"] for n in prompt.values()}} | {"TokenFlowInvert": "TokenFlow Inversion"}
        print(f"editing {video} -> {args.output} with {args.editor} on {family.words if family else 'the model'}, "
              f"cfg {args.cfg:g}, {args.steps} steps (inversion {messages.inversion_words(args, flow)}), batch "
              f"{args.batch_size}\nwork: {messages.work_words(args, source, flow)}", flush=True)
        start_up.at("")  # from here Ctrl-C stops the graph (StopOnCtrlC)
        with support.StopOnCtrlC() as stop:
            console = support.Console(prompt, titles, stop, messages.progress_units(args, flow))
            comfy.utils.set_progress_bar_global_hook(console.progress)
            executor = support.prompt_executor(execution, console)
            executor.execute(prompt, prompt_id, {"client_id": "tokenflow-edit"}, outputs)
        console.end_node()
        if stop.requested or any(event == "execution_interrupted" for event, _ in executor.status_messages):
            print(f"interrupted: nothing was written to {args.output}", file=sys.stderr, flush=True)
            return 130
        if not executor.success:
            for event, data in executor.status_messages:
                if event == "execution_error":  # with --verbose the executor has logged the traceback already
                    print(messages.node_error(args, data, inputs), file=sys.stderr)
            return 1
        saved = [item for item in executor.history_result.get("outputs", {}).get(save_id, {}).get("images", [])
                 if isinstance(item, dict)]
        if not saved:
            print("error: Save Video reported no file.", file=sys.stderr)
            return 1
        destination = Path(args.output).expanduser()
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(work / "output" / saved[0].get("subfolder", "") / saved[0]["filename"]), destination)
        print(f"wrote {destination} ({support.describe(destination)}) in {time.monotonic() - t0:.0f} s", flush=True)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    start_up = support.StartUp()
    try:
        args = build_parser().parse_args(argv)
        host = support.find_host(args.comfyui, REPO)
        if host is None:
            print("error: ComfyUI not found: pass --comfyui /path/to/ComfyUI or set COMFYUI_PATH "
                  "(bash scripts/run.sh finds or sets one up for you).", file=sys.stderr)
            return 2
        source, files, problems = checks.check_before_host(args, host)
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 2
        args.flux_route = models.flux_files_given(args)
        start_up.at("starting ComfyUI (importing PyTorch and the host)")
        with start_up:
            code = _run(args, host, source, files, start_up)
        if start_up.interrupted_in is not None:  # swallowed in the host after the last stage began
            raise KeyboardInterrupt
        return code
    except KeyboardInterrupt:
        print(f"\n{start_up.interrupted_message()}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

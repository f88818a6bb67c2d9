#!/usr/bin/env python
"""Edit quality of TokenFlow against per-frame editing and extended attention alone, on A TOY WORLD TRAINED HERE.

The models are the tiny ones trained on ``devkit/toy_world.py``'s procedural clips (``devkit/toy_models.py``);
nothing here measures real-weight quality. On held-out clips (seeds of ``toy_world.HELDOUT_SEEDS``, objects
of ``toy_world.HELDOUT_COMBOS``), for every trained model and editor (PnP, SDEdit), the pack's node classes
edit one attribute of the object ("a blue striped circle on sand" -> "a red striped circle on sand") four
ways (``_quality_edit.py``): per-frame editing, extended attention alone, TokenFlow on the fly and with
extracted correspondences. Metrics (``_quality_metrics.py``): edit fidelity (the world's attribute
classifier on the object region), structure (IoU of the changed region with the one a perfect edit
changes, background PSNR), temporal consistency (the paper's warp error, x1e-3, with the clip's exact
flows and occlusion masks), and the source clip's own warp error after the autoencoder round trip, the
floor. Each is the mean ± sample std over the seeds. A table per model, then one line per model and editor::

    quality model=<m> editor=<e> tokenflow_warp=<x> perframe_warp=<y> joint_warp=<z> source_warp=<s> \
fidelity=<f> perframe_fidelity=<g> structure=<i>

Run (nice'd, one thread; see benchmarks/README.md, "Quality on a toy world")::

    python benchmarks/quality.py --quick              # one small clip per model, a few minutes
    python benchmarks/quality.py --seeds 5 --json q.json
    python benchmarks/quality.py --sweep --seeds 2    # the toy-world setting tables (_quality_sweep.py)
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _host  # noqa: E402

log = logging.getLogger("quality")

ATTRIBUTES = ("colour", "pattern")


@dataclass(frozen=True)
class Workload:
    """The clips every model edits: their count, length and size, and the edited attribute."""

    seeds: int = 5
    frames: int = 12
    size: int = 64
    attribute: str = "colour"


FULL = Workload()
QUICK = Workload(seeds=1, frames=6, size=64)


def recipe_for(model_name: str, quick: bool = False):
    """The edit settings of a trained model: the flow transformer inverts with the pack's default for flows
    (``auto``: the fixed point on the editing grid), the UNet with DDIM on a finer grid."""
    from _quality_edit import EditRecipe

    flow = "flux" in model_name
    recipe = EditRecipe(steps=10 if flow else 20, inversion_steps=10 if flow else 100, cfg=3.0 if flow else 5.0)
    return replace(recipe, steps=recipe.steps // 2, inversion_steps=recipe.inversion_steps // 2) if quick else recipe


def edit_of(seed: int, attribute: str):
    """The held-out scene of ``seed`` and its edit: (source object, edited object, background)."""
    import numpy as np

    import toy_world

    rng = np.random.default_rng(seed)
    source = toy_world.HELDOUT_COMBOS[int(rng.integers(len(toy_world.HELDOUT_COMBOS)))]
    background = toy_world.BACKGROUNDS[int(rng.integers(len(toy_world.BACKGROUNDS)))]
    values = tuple(toy_world.COLOURS if attribute == "colour" else toy_world.PATTERNS)
    others = [v for v in values if v != getattr(source, attribute)]
    edited = replace(source, **{attribute: others[int(rng.integers(len(others)))]})
    return source, edited, background


def render_pair(seed: int, workload: Workload):
    """The source clip and the clip a perfect edit gives: same seed, motion and background, the edited object."""
    import toy_world

    source, edited, background = edit_of(seed, workload.attribute)
    clips = [toy_world.render_clip(seed, workload.frames, workload.size, objects=[obj], background=background,
                                   split="heldout") for obj in (source, edited)]
    return clips[0], clips[1], edited


def classifier():
    """The world's attribute classifier as ``classify(images, masks=...)``."""
    import toy_classifier

    model = toy_classifier.load_classifier()
    return lambda images, masks=None: toy_classifier.classify(model, images, masks=masks)


class ClipMeasure:
    """The metrics of any edited frames of one source clip (its exact products, the perfect edit's region)."""

    def __init__(self, source_clip, source_rt, ideal_rt, edited_object, attribute: str, classify):
        from _quality_metrics import changed_region

        self.clip, self.source_rt = source_clip, source_rt
        self.target = getattr(edited_object, attribute)
        self.attribute, self.classify = attribute, classify
        self.masks = source_clip.object_masks[:, 0]
        self.ideal_region = changed_region(ideal_rt, source_rt)

    def __call__(self, frames) -> dict[str, float]:
        import _quality_metrics as qm

        return {"warp": qm.temporal_warp_error(frames, self.clip.flow_fwd, self.clip.flow_bwd, self.clip.occlusion),
                "fidelity": qm.attribute_fidelity(self.classify, frames, self.masks, self.attribute, self.target),
                "iou": qm.mask_iou(qm.changed_region(frames, self.source_rt), self.ideal_region),
                "bg_psnr": qm.background_psnr(frames, self.clip.frames, self.masks)}


def prepare_clip(loaded, seed: int, workload: Workload, recipe, classify):
    """(editor of the clip, its measure, the source round trip, the reference rows' metrics)."""
    from _quality_edit import ClipEditor, decode_frames, encode_frames, encode_text
    import toy_world

    model, clip, vae = loaded
    source_clip, ideal_clip, edited_object = render_pair(seed, workload)
    latent = encode_frames(vae, source_clip.frames)
    source_rt = decode_frames(vae, latent)
    ideal_rt = decode_frames(vae, encode_frames(vae, ideal_clip.frames))
    measure = ClipMeasure(source_clip, source_rt, ideal_rt, edited_object, workload.attribute, classify)
    prompts = (source_clip.caption, toy_world.caption([edited_object], source_clip.background), "")
    editor = ClipEditor(model, vae, latent, *(encode_text(clip, text) for text in prompts), recipe)
    log.info("seed %d: %r -> %r", seed, prompts[0], prompts[1])
    return editor, measure, source_rt, {"source": measure(source_rt), "ideal": measure(ideal_rt)}


def empty_results(editors, methods) -> dict:
    from _quality_report import METRICS

    return {"reference": {k: {m: [] for m in METRICS} for k in ("source", "ideal")},
            "editors": {e: {method: {m: [] for m in METRICS} for method in methods} for e in editors}}


def add(into: dict, metrics: dict) -> None:
    for name, value in metrics.items():
        into[name].append(value)


def run_model(name: str, workload: Workload, editors, methods, quick: bool, classify, strip: Path | None = None) -> dict:
    """Every seed's metrics of one model: results[...][metric] is a list over seeds."""
    import toy_models
    from _quality_report import save_strip

    loaded = toy_models.load_toy_model(name)
    recipe = recipe_for(name, quick)
    results = empty_results(editors, methods)
    for seed in list(heldout_seeds())[:workload.seeds]:
        started = time.perf_counter()
        editor, measure, source_rt, reference = prepare_clip(loaded, seed, workload, recipe, classify)
        for key, metrics in reference.items():
            add(results["reference"][key], metrics)
        for editor_name in editors:
            for method in methods:
                frames = editor.edit(method, editor_name)
                add(results["editors"][editor_name][method], measure(frames))
                if strip is not None and editor_name == "pnp" and method in ("perframe", "tokenflow"):
                    results.setdefault("strip", {})[method] = frames
        if strip is not None and "strip" in results:
            rows = [("source", source_rt)] + [(m, results["strip"][m]) for m in ("perframe", "tokenflow")
                                              if m in results["strip"]]
            log.warning("strip written to %s", save_strip(strip, rows))
            results.pop("strip")
            strip = None
        log.warning("%s seed %d done in %.0f s", name, seed, time.perf_counter() - started)
    return results


def heldout_seeds():
    import toy_world

    return toy_world.HELDOUT_SEEDS


def main(argv: list[str] | None = None) -> int:
    from _quality_edit import EDITORS, METHODS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="", help="comma-separated trained models (default: every one "
                        "toy_models lists)")
    parser.add_argument("--editors", default=",".join(EDITORS), help="comma-separated editors (pnp, sdedit)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--seeds", type=int, default=None, help=f"held-out clips per model (default {FULL.seeds})")
    parser.add_argument("--frames", type=int, default=None, help=f"frames per clip (default {FULL.frames})")
    parser.add_argument("--size", type=int, default=None, help=f"frame size in pixels (default {FULL.size})")
    parser.add_argument("--attribute", choices=ATTRIBUTES, default=FULL.attribute, help="the edited attribute")
    parser.add_argument("--quick", action="store_true", help="one small clip per model, fewer steps")
    parser.add_argument("--sweep", action="store_true", help="the toy-world setting tables instead")
    parser.add_argument("--strip", type=Path, default=None, help="write the first clip's PnP strip (source, "
                        "per-frame, TokenFlow) of the first model as a PNG here")
    parser.add_argument("--json", type=Path, default=None, help="write every seed's metrics here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    _host.bootstrap("cpu", threads=args.threads)
    import toy_models

    base = QUICK if args.quick else FULL
    workload = replace(base, attribute=args.attribute, **{k: v for k, v in (("seeds", args.seeds), ("frames",
                       args.frames), ("size", args.size)) if v is not None})
    models = [m for m in args.models.split(",") if m] or list(toy_models.TOY_MODELS)
    classify = classifier()
    if args.sweep:
        from _quality_sweep import run_sweeps

        run_sweeps(models, workload, classify)
        return 0
    from _quality_report import markdown_table, summary_line

    editors = [e for e in args.editors.split(",") if e]
    methods = [m for m in args.methods.split(",") if m]
    print(f"Edit quality on a toy world trained here (not real weights): {workload}")
    everything, lines = {}, []
    for index, name in enumerate(models):
        results = run_model(name, workload, editors, methods, args.quick, classify,
                            strip=args.strip if index == 0 else None)
        everything[name] = results
        print("\n".join(markdown_table(name, results, workload.seeds)) + "\n", flush=True)
        if {"perframe", "joint", "tokenflow"} <= set(methods):
            lines += [summary_line(name, editor, results) for editor in editors]
    if args.json:
        args.json.write_text(json.dumps({"workload": workload.__dict__, "results": everything}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

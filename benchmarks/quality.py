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
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _host  # noqa: E402
from _quality_clips import ATTRIBUTES, FULL, QUICK, Workload, classifier, heldout_seeds, prepare_clip, recipe_for  # noqa: E402

log = logging.getLogger("quality")


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
    workload = workload.for_model(name)
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


def main(argv: list[str] | None = None) -> int:
    from _quality_edit import EDITORS, METHODS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="", help="comma-separated trained models (default: every one "
                        "toy_models lists)")
    parser.add_argument("--editors", default=",".join(EDITORS), help="comma-separated editors (pnp, sdedit)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--seeds", type=int, default=None, help=f"held-out clips per model (default {FULL.seeds})")
    parser.add_argument("--frames", type=int, default=None, help=f"frames per clip (default {FULL.frames})")
    parser.add_argument("--size", type=int, default=None, help="frame size in pixels (default: the size "
                        "each model was trained at)")
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
    from _quality_report import margin_line, markdown_table, summary_line

    editors = [e for e in args.editors.split(",") if e]
    methods = [m for m in args.methods.split(",") if m]
    print(f"Edit quality on a toy world trained here (not real weights): {workload}")
    everything, lines = {}, []
    for index, name in enumerate(models):
        results = run_model(name, workload, editors, methods, args.quick, classify,
                            strip=args.strip if index == 0 else None)
        everything[name] = results
        print("\n".join(markdown_table(name, results, workload.for_model(name))) + "\n", flush=True)
        if {"perframe", "tokenflow"} <= set(methods):
            print("\n".join(margin_line(name, editor, results) for editor in editors))
        if {"perframe", "joint", "tokenflow"} <= set(methods):
            lines += [summary_line(name, editor, results) for editor in editors]
    if args.json:
        args.json.write_text(json.dumps({"workload": workload.__dict__, "results": everything}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The toy-world setting tables of the quality benchmark (``quality.py --sweep``; a toy world trained here).

TokenFlow (correspondences on the fly) on the same held-out clips as the main table, one setting varied at a
time from the benchmark's recipe: the PnP injection fractions and blocks, the SDEdit strength, the keyframe
batch size and, on the flow transformer, the inversion scheme (``method`` ddim, i.e. Euler steps, against
fixed_point = the ``auto`` default on flows). These tables describe the toy models only: they do not change
the pack's defaults for real checkpoints, which follow the published methods.
"""
from __future__ import annotations

import logging
from dataclasses import replace

from _quality_edit import ClipEditor
from _quality_report import HEADERS, METRICS, fmt

log = logging.getLogger("quality")


def unet_blocks() -> list[str]:
    return ["auto", "output:8-11", "output:1-11", "none"]


def dit_blocks() -> list[str]:
    return ["auto", "stable_flow", "none"]


def settings_of(model_name: str) -> list[tuple[str, str, str, dict]]:
    """(table, row label, editor, sampler overrides) of every sweep row; the recipe's own values are marked."""
    flow = "flux" in model_name
    rows = []
    for attn, feat in ((0.2, 0.5), (0.5, 0.8), (0.8, 0.8), (0.8, 1.0)):
        rows.append(("PnP injection fraction", f"pnp_attn_t {attn}, pnp_f_t {feat}", "pnp",
                     {"pnp_attn_t": attn, "pnp_f_t": feat}))
    for blocks in (dit_blocks() if flow else unet_blocks()):
        rows.append(("PnP attention blocks", f"pnp_attention_blocks {blocks}", "pnp", {"pnp_attention_blocks": blocks}))
    if not flow:
        rows.append(("PnP attention blocks", "pnp_residual_blocks none", "pnp", {"pnp_residual_blocks": "none"}))
    for start in (0.5, 0.7, 0.9, 1.0):
        rows.append(("SDEdit strength", f"sdedit_start {start}", "sdedit", {"sdedit_start": start}))
    for batch in (2, 4, 8):
        rows.append(("keyframe batch size", f"batch_size {batch}", "pnp", {"batch_size": batch}))
    return rows


def inversion_methods(model_name: str, recipe) -> list[tuple[str, object]]:
    """The inversion schemes compared on the flow transformer: (row label, recipe)."""
    if "flux" not in model_name:
        return []
    euler = [(f"ddim (Euler), {n} steps", replace(recipe, inversion_method="ddim", inversion_steps=n))
             for n in (recipe.steps, 5 * recipe.steps)]
    return [("fixed_point (auto)", replace(recipe, inversion_method="fixed_point"))] + euler


def sweep_model(name: str, workload, classify) -> dict[str, dict[str, dict[str, list[float]]]]:
    """tables[table][row][metric] = values over seeds."""
    import _quality_clips as clips
    import toy_models

    loaded = toy_models.load_toy_model(name)
    workload = workload.for_model(name)
    recipe = clips.recipe_for(name)
    tables: dict = {}

    def record(table: str, row: str, metrics: dict) -> None:
        cells = tables.setdefault(table, {}).setdefault(row, {m: [] for m in METRICS})
        for metric, value in metrics.items():
            cells[metric].append(value)

    for seed in list(clips.heldout_seeds())[:workload.seeds]:
        editor, measure, _, _ = clips.prepare_clip(loaded, seed, workload, recipe, classify)
        for table, row, editor_name, overrides in settings_of(name):
            options = {k: v for k, v in overrides.items() if k != "batch_size"}
            run_recipe = replace(recipe, batch_size=overrides.get("batch_size", recipe.batch_size)).with_options(**options)
            record(table, row, measure(editor.edit("tokenflow", editor_name, run_recipe)))
        for row, inversion_recipe in inversion_methods(name, recipe):
            other = ClipEditor(editor.model, editor.vae, editor.latent, editor.source_cond, editor.edit_cond,
                               editor.negative, inversion_recipe)
            record("flow inversion scheme (PnP)", row, measure(other.edit("tokenflow", "pnp")))
        log.warning("sweep %s seed %d done", name, seed)
    return tables


def run_sweeps(models: list[str], workload, classify) -> dict:
    """Every model's tables, printed as Markdown."""
    everything = {}
    for name in models:
        tables = sweep_model(name, workload, classify)
        everything[name] = tables
        for table, rows in tables.items():
            print(f"\n#### {name}: {table} (TokenFlow on the fly; a toy world trained here; {workload.seeds} seed(s))\n")
            print("| setting | " + " | ".join(HEADERS[m] for m in METRICS) + " |")
            print("|---|" + "---|" * len(METRICS))
            for row, metrics in rows.items():
                print(f"| {row} | " + " | ".join(fmt(metrics[m]) for m in METRICS) + " |", flush=True)
    return everything

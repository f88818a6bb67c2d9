"""torch.compile counts of a PnP edit (on the fly) through a compiled UNet: graphs, recompiles, graph breaks.

    $PYTHON benchmarks/compile_counts.py [--backend aot_eager|eager|inductor] [--node] [--guard-filter]
                                         [--frames 6] [--steps 4] [--dtype float64|float32]

Compiles ``diffusion_model`` the way the host does (``set_torch_compile_wrapper``, or the core
``TorchCompileModel`` node's ``execute`` with ``--node``), runs the same edit eagerly and compiled,
and prints: distinct calls (the patches' ``PassContext.call_key``), UNet graphs compiled
(``counters["stats"]["unique_graphs"]``; recompiles = graphs - 1), graph breaks, frames, the largest
difference to the eager edit and the compile run's wall time. ``--guard-filter`` passes newer hosts'
``guard_filter_fn`` that drops every guard on ``transformer_options``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _host  # noqa: E402

_host.bootstrap("cpu", threads=1)

import torch._dynamo  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from comfy_api.torch_helpers import set_torch_compile_wrapper  # noqa: E402
from comfyui_tokenflow.engine.patches import contract  # noqa: E402
from tokenflow_helpers import conds, double, edit, float64_copy, invert, random_latent  # noqa: E402
import tiny_models  # noqa: E402


def skip_transformer_options(guard_entries):
    return [("transformer_options" not in entry.name) for entry in guard_entries]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="aot_eager")
    p.add_argument("--node", action="store_true", help="compile through comfy_extras' TorchCompileModel.execute")
    p.add_argument("--guard-filter", action="store_true")
    p.add_argument("--frames", type=int, default=6)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    args = p.parse_args(argv)

    model = tiny_models.make_unet_model("sd15", seed=0)
    prompts = conds(model)
    if args.dtype == "float64":
        model, prompts = float64_copy(model), [double(c) for c in prompts]
    pos, neg, src = prompts
    inversion = invert(model, random_latent(args.frames, seed=3), src, steps=args.steps, inversion_steps=2 * args.steps)
    eager = edit(model, pos, neg, inversion, editor="pnp", steps=args.steps)

    keys: set[str] = set()
    original = contract.PassContext.call_key

    def recording(self, options):
        keys.add(key := original(self, options))
        return key

    contract.PassContext.call_key = recording
    if args.node:
        from comfy_extras.nodes_torch_compile import TorchCompileModel
        compiled = TorchCompileModel.execute(model, args.backend).args[0]
    else:
        compiled = model.clone()
        options = {"guard_filter_fn": skip_transformer_options} if args.guard_filter else None
        set_torch_compile_wrapper(compiled, backend=args.backend, options=options)
    torch._dynamo.reset()
    counters.clear()
    start = time.perf_counter()
    out = edit(compiled, pos, neg, inversion, editor="pnp", steps=args.steps)
    seconds = time.perf_counter() - start
    graphs = int(counters["stats"]["unique_graphs"])
    print(json.dumps({
        "backend": args.backend, "node": args.node, "guard_filter": args.guard_filter, "dtype": args.dtype,
        "frames": args.frames, "steps": args.steps, "distinct_calls": len(keys), "graphs": graphs,
        "recompiles": max(0, graphs - 1), "graph_breaks": int(sum(counters["graph_break"].values())),
        "frames_compiled": dict(counters["frames"]), "max_abs_diff": (out - eager).abs().max().item(),
        "scale": eager.abs().max().item(), "compile_run_s": round(seconds, 1)}, indent=1))


if __name__ == "__main__":
    main()

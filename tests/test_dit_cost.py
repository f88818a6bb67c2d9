"""Cost of a TokenFlow step on Flux / SD3: model calls per step (the keyframe pass and one propagation pass), on the
fly and with extracted correspondences, and no host-device synchronisation inside a step."""
from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import comfy.patcher_extension
import tiny_dit_models
from comfyui_tokenflow.engine.plan import call_sizing
from comfyui_tokenflow.engine.patches.contract import KEY, Phase
from comfyui_tokenflow.engine.sampling_paths import run_extraction
from comfyui_tokenflow.engine.plan.settings import EditSettings
from comfyui_tokenflow.engine.flow.edit import run_edit as run_flow_edit
from comfyui_tokenflow.engine.flow.invert import run_inversion as run_flow_inversion

STEPS = 4


def _inverted(family: str):
    """A tiny Flux / SD3 model, its conditioning maker, and 6 random frames inverted in STEPS steps."""
    make = tiny_dit_models.make_flux_model if family == "flux" else tiny_dit_models.make_sd3_model
    cond = tiny_dit_models.flux_conditioning if family == "flux" else tiny_dit_models.sd3_conditioning
    model = make(seed=0)
    frames = {"samples": torch.randn(6, 16, 8, 8, generator=torch.Generator().manual_seed(0))}
    return model, cond, run_flow_inversion(model, frames, cond(1), STEPS, STEPS)


@pytest.mark.parametrize("family, cfg", [("flux", 1.0), ("sd3", 4.0)])
@pytest.mark.parametrize("editor", ["pnp", "sdedit"])
def test_two_model_calls_per_step(family, cfg, editor):
    model, cond, inversion = _inverted(family)
    batches: list[int] = []
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        run_flow_edit(model, cond(2), cond(3), inversion, EditSettings.of(editor=editor, cfg=cfg, batch_size=3))
    finally:
        handle.remove()
    steps = STEPS if editor == "pnp" else len([t for t in inversion.timesteps][int(1 - 0.9 * STEPS):])
    branches = 2 if cfg == 1.0 else 3  # source + edit (+ negative): at cfg 1 the negative branch is skipped
    assert len(batches) == 2 * steps, batches  # keyframe pass + one propagation pass per step
    assert batches == [branches * 2, branches * 6] * steps  # 2 keyframes, then all 6 frames, every branch batched


@pytest.mark.parametrize("family, cfg", [("flux", 1.0), ("sd3", 4.0)])
@pytest.mark.parametrize("editor", ["pnp", "sdedit"])
def test_extracted_correspondences_drop_the_source_branch(family, cfg, editor):
    """SDEdit extracted: no source branch at all; PnP extracted: the source only in its injection steps' keyframe pass
    (a DiT has no ResBlocks, so the propagation pass never needs the source)."""
    model, cond, inversion = _inverted(family)
    batches: list[int] = []
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        corr = run_extraction(model, inversion, 3, "random", 1)
        assert batches == [2, 6] * STEPS  # extraction: the source alone, its keyframes then every frame, each step
        batches.clear()
        run_flow_edit(model, cond(2), cond(3), inversion, EditSettings.of(editor=editor, cfg=cfg, batch_size=3),
                      correspondences=corr)
    finally:
        handle.remove()
    edit = 1 if cfg == 1.0 else 2  # edit branches: positive (+ negative)
    if editor == "sdedit":
        steps = len(inversion.timesteps[int(1 - 0.9 * STEPS):])
        assert batches == [edit * 2, edit * 6] * steps  # keyframe pass + propagation pass, no source branch
    else:
        injected = int(STEPS * 0.5)  # pnp_attn_t 0.5: the source's image values/keys in the first half
        assert batches == [(edit + 1) * 2, edit * 6] * injected + [edit * 2, edit * 6] * (STEPS - injected)


# --- Host syncs inside a step (issue 15 item 5): none in the DiT hot path ------------------------------------------
# On the CPU a device->host copy dispatches nothing (``.cpu()`` / ``.tolist()`` of a CPU tensor are no-ops), so the
# check emulates device placement: tensors that are, or derive from, the step's latents, the model's weights or data
# placed with an explicit device are "device data"; a host read of one (what a GPU would sync on) is recorded with
# its call site. ``item`` / ``bool`` / ``int`` / ``float`` of ANY tensor also show as ``aten._local_scalar_dense``
# in the dispatch count, which must be zero for the whole step.
PACK_CODE = tuple(str(Path(__file__).resolve().parents[1] / d) + "/" for d in ("engine", "tokenflow_ops"))
HOST_READS = frozenset({"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"})
DATA_DEPENDENT_SHAPES = frozenset({"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive"})


class _DeviceData(TorchFunctionMode):
    """Tags device data by provenance and records host reads / data-dependent shapes of it, by call site."""

    def __init__(self, seeds) -> None:
        super().__init__()
        self.tagged: dict[int, torch.Tensor] = {id(t): t for t in seeds}  # strong refs: ids stay unique
        self.reads: list[str] = []

    def _tag(self, tree) -> None:
        for t in pytree.tree_leaves(tree):
            if isinstance(t, torch.Tensor):
                self.tagged[id(t)] = t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = pytree.tree_leaves((args, kwargs))
        on_device = any(isinstance(t, torch.Tensor) and id(t) in self.tagged for t in leaves)
        name = getattr(func, "__name__", str(func))
        bool_mask = name == "__getitem__" and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool
                                                  for t in pytree.tree_leaves(args[1:]))
        if on_device and (name in HOST_READS or name in DATA_DEPENDENT_SHAPES or bool_mask):
            site = next((f for f in reversed(traceback.extract_stack()[:-1]) if "/torch/" not in f.filename), None)
            self.reads.append(f"{name} at {Path(site.filename).name}:{site.lineno}" if site else name)
        out = func(*args, **kwargs)
        placed = "device" in kwargs or any(isinstance(a, torch.device) for a in args)
        if placed and not on_device and not kwargs.get("non_blocking"):  # host data to the device, blocking
            site = next((f for f in reversed(traceback.extract_stack()[:-1]) if "/torch/" not in f.filename), None)
            if site is not None and site.filename.startswith(PACK_CODE):  # ComfyUI's own moves are not the pack's
                self.reads.append(f"blocking host->device {name} at {Path(site.filename).name}:{site.lineno}")
        if placed and any(out is t for t in leaves):  # a no-op move on the CPU: a device copy is a new tensor,
            out = out.detach()  # so the host tensor it came from stays host data
        if on_device or placed:
            self._tag(out)
        return out


class _Dispatches(TorchDispatchMode):
    """aten ops per pass (the phase of the model call they run in; "step" outside the model calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "step"
        self.by_phase: dict[str, Counter] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.by_phase.setdefault(self.phase, Counter())[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _count_step_syncs(family: str, cfg: float) -> tuple[list[str], dict[str, Counter], int]:
    """Host reads of device data and the dispatch counts per pass of every step of a PnP edit on the fly."""
    model, cond, inversion = _inverted(family)
    dispatches, reads, steps = _Dispatches(), [], [0]
    weights = list(model.model.diffusion_model.parameters()) + list(model.model.diffusion_model.buffers())

    def per_step(executor, x, timestep, model_options, seed):  # PREDICT_NOISE: one sampling step
        steps[0] += 1
        device_data = _DeviceData([x, timestep, *weights])
        with device_data, dispatches:
            out = executor(x, timestep, model_options, seed)
        reads.extend(device_data.reads)
        return out

    def per_pass(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        ctx = transformer_options.get(KEY)  # APPLY_MODEL: which pass the ops of this model call belong to
        dispatches.phase = ctx.phase.value if ctx is not None else "model"
        try:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            dispatches.phase = "step"

    counted = model.clone()
    counted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "test_dit_cost", per_step)
    counted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_dit_cost", per_pass)
    run_flow_edit(counted, cond(2), cond(3), inversion, EditSettings.of(editor="pnp", cfg=cfg, batch_size=3))
    return reads, dispatches.by_phase, steps[0]


@pytest.mark.parametrize("family, cfg", [("flux", 1.0), ("sd3", 4.0)])
def test_no_host_sync_in_a_dit_step(family, cfg):
    reads, by_phase, steps = _count_step_syncs(family, cfg)
    assert steps == STEPS
    # Both passes of every step ran under the counters (the keyframe pass and the propagation pass).
    assert by_phase.get(Phase.KEYFRAMES.value) and by_phase.get(Phase.FRAMES.value), sorted(by_phase)
    scalar_reads = {phase: ops["_local_scalar_dense"] for phase, ops in by_phase.items() if ops["_local_scalar_dense"]}
    assert not scalar_reads, f"host reads (.item() / bool() / int() of a tensor) per pass: {scalar_reads}"
    assert not reads, f"host reads of device data in a step: {Counter(reads)}"


def test_dit_passes_follow_the_call_sizing(monkeypatch):
    """The memory sizing of the UNet path (engine/plan/call_sizing.py) splits a DiT's propagation pass too, and the
    per-call propagation indices (nearest-neighbour fields) cover that call's frames only."""
    model = tiny_dit_models.make_flux_model(seed=0)
    cond = tiny_dit_models.flux_conditioning
    frames = {"samples": torch.randn(6, 16, 8, 8, generator=torch.Generator().manual_seed(0))}
    inversion = run_flow_inversion(model, frames, cond(1), STEPS, STEPS)
    per_frame = call_sizing.call_bytes(model.model, 2, tuple(inversion.latent_shape))  # source + edit branch
    monkeypatch.setattr(call_sizing, "CPU_BUDGET_BYTES", int(per_frame * 2.5))  # 2 frames per propagation call
    batches: list[int] = []
    field_rows: list[int] = []

    def after_call(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        ctx = transformer_options.get(KEY)
        batches.append(int(x.shape[0]))
        if ctx is not None and ctx.phase is Phase.FRAMES:
            field_rows.extend(int(f.shape[0]) for f in ctx.bank.fields.values())
        return out

    counted = model.clone()
    counted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_dit_cost", after_call)
    run_flow_edit(counted, cond(2), cond(3), inversion, EditSettings.of(editor="pnp", cfg=1.0, batch_size=3))
    # Per step: the keyframe call (2 keyframes x 2 branches fit the budget), then 3 calls of 2 frames x 2 branches.
    assert batches == [4, 4, 4, 4] * STEPS, batches
    assert field_rows and set(field_rows) == {2}, field_rows  # fields of the call's 2 frames, every block

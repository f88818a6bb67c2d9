"""The phases of the real-size dry run (``real_size.py``) through the pack's node functions, and the verdict.

Imported after the host is bootstrapped. :func:`run_phases` is the workload (inversion, extraction when asked,
plain sampling, the edit) with a :class:`_real_size_track.MemoryTracker` already active; :func:`dry_run` puts it
on fake tensors with the shims and prints the tables and the verdict.
"""
from __future__ import annotations

import functools
import gc
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

import comfy.model_management
import comfy.sample
from comfyui_tokenflow.engine.editors import stable_inputs
from comfyui_tokenflow.engine.patches.bank_transfer import HostBank
from comfyui_tokenflow.engine.plan import memory_plan
from comfyui_tokenflow.nodes.correspondence_nodes import TokenFlowExtractCorrespondences
from comfyui_tokenflow.nodes.inversion_nodes import TokenFlowInvert
from comfyui_tokenflow.nodes.sampler_nodes import TokenFlowSampler

import _real_size_models as models
import _real_size_shims as shims
from _real_size_replay import CallReplay
from _real_size_steps import StepMix
from _real_size_track import HOLDERS, MemoryTracker, StepFlops, retag

GIB = 2**30
GROWING = ("trajectory", "fields")  # holders whose bytes grow with the step count
# The core sampler's plain sampling of the same frames: the FLOP baseline the edit is compared with, run by the dry
# run and not by a TokenFlow edit, so its peak is printed but left out of the verdict.
BASELINE = "plain"
log = logging.getLogger(__name__)


@dataclass
class Workload:
    model: object
    latent: torch.Tensor
    source: list
    positive: list
    negative: list
    cfg: float
    editor: str
    extracted: bool
    run_steps: int
    controlnet: object = None
    results: dict = field(default_factory=dict)


def apply_controlnet(conditioning: list, controlnet, frames: int, size: int) -> list:
    """Apply ControlNet as the core node does: one hint image per frame at the frame size."""
    hint = torch.zeros(frames, 3, size, size)
    control = controlnet.copy().set_cond_hint(hint, 1.0, (0.0, 1.0))
    return [[c, {**d, "control": control, "control_apply_to_uncond": False}] for c, d in conditioning]


def run_phases(work: Workload, tracker: MemoryTracker, flops: StepFlops | None = None) -> None:
    """Inversion, extraction (``work.extracted``), plain sampling of the same frames and the edit, each through the
    pack's node function (plain: ComfyUI's ``comfy.sample.sample``), ``run_steps`` editing steps each (plain: one)."""
    steps = work.run_steps
    tracker.set_phase("inversion")
    inversion, _ = TokenFlowInvert.execute(work.model, {"samples": work.latent}, work.source, steps, steps).args
    work.results["inversion"] = inversion
    correspondences = None
    if work.extracted:
        tracker.set_phase("extraction")
        correspondences = TokenFlowExtractCorrespondences.execute(work.model, inversion, 8, "random", 1).args[0]
        work.results["extraction"] = correspondences
    tracker.set_phase("plain")
    noise = torch.zeros_like(work.latent)
    # Every step of plain sampling makes the same model call and keeps nothing from the one before: one step shows
    # its memory and FLOPs per step.
    comfy.sample.sample(work.model, noise, 1, work.cfg, "euler", "normal", work.positive, work.negative,
                        work.latent, denoise=1.0, seed=0)
    gc.collect()
    tracker.set_phase("edit")
    options = {d.name: d.default for d in stable_inputs()}
    out = TokenFlowSampler.execute(work.model, work.positive, work.negative, inversion, work.editor, work.cfg, 8,
                                   "random", 1, correspondences=correspondences, **options).args[0]
    work.results["edit"] = out


def scaled_peak(tracker: MemoryTracker, phase: str, device: str, ratio: float) -> tuple[int, dict[str, int]]:
    """The phase's peak with the holders that grow with the step count scaled by ``ratio`` (full / run steps)."""
    peak = tracker.peaks[phase][device]
    holders = dict(peak.holders)
    extra = 0
    for name in GROWING if device == "cpu" else ():  # the trajectory and extracted fields are kept on the host
        grown = int(holders.get(name, 0) * ratio)
        extra += grown - holders.get(name, 0)
        holders[name] = grown
    return peak.bytes + extra, holders


def _weights_mode(model) -> str:
    loaded = getattr(model, "model_loaded_weight_memory", None)
    if loaded is None:
        loaded = model.loaded_size()
    return "full" if loaded >= model.model_size() else "partial"


def _step_kind(mix: StepMix, run_steps: int, phase: str, index: int):
    """The kind of the edit's ``index``-th model evaluation (its plan's step needs); other phases have one kind."""
    if phase != "edit" or not mix.calls:
        return None
    kinds = mix.kinds(run_steps)
    return kinds[index] if index < len(kinds) else ("beyond the plan", index)


def dry_run(args) -> str:
    from torch._subclasses.fake_tensor import FakeTensorMode

    started = time.monotonic()
    tracker = MemoryTracker()
    vram, ram = int(args.vram * GIB), int(args.ram * GIB)
    shims.install_device_facts(vram, ram, tracker.live_bytes)
    shims.install_fingerprints()
    shims.install_gpu_attention()
    reserve = int((args.reserve if args.reserve is not None else
                   comfy.model_management.minimum_inference_memory() / GIB) * GIB)
    budget = vram - reserve
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    small = shims.SmallValues(fake_mode)
    shims.install_fake_parameter_moves(fake_mode)
    mix = StepMix()
    flops = StepFlops(tracker, functools.partial(_step_kind, mix, args.run_steps))
    ratio = args.steps / args.run_steps
    verdict = None
    # Built outside the modes: the schedule's buffers are real host tensors, the weights fake ones.
    model = models.build(args.model, args.dtype, fake_mode, lambda t: tracker.track(t, "weights"))
    controlnet = None
    if args.editor == "controlnet":
        controlnet = models.build_controlnet(args.model, model, fake_mode, lambda t: tracker.track(t, "weights"))
    with ExitStack() as stack:
        stack.enter_context(fake_mode)
        stack.enter_context(small)
        stack.enter_context(tracker)
        c = models.LATENT_CHANNELS.get(args.model, 16)
        latent = torch.randn(args.frames, c, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))
        source, positive, negative = (models.conditioning(args.model, s, args.size) for s in (1, 2, 3))
        if controlnet is not None:
            positive = apply_controlnet(positive, controlnet, args.frames, args.size)
        work = Workload(model, latent, source, positive, negative, models.CFG[args.model], args.editor,
                        args.extracted, args.run_steps, controlnet)
        stack.enter_context(flops.installed())
        stack.enter_context(mix.installed())
        stack.enter_context(retag(tracker, model))
        replay = CallReplay(tracker, lambda: flops.counting, shims.SmallValues.forget)
        if args.replay:
            stack.enter_context(replay.installed(model.model.diffusion_model, HostBank))
        try:
            run_phases(work, tracker, flops)
        except ValueError as exc:  # the pack's refusals: one line naming the input and the fix
            verdict = f"verdict: refused: {exc}"
        weights = _weights_mode(model)
    print("shims (stand-ins for a GPU and for weight values):")
    for line in dict.fromkeys(shims.SHIMS):
        print(f"  - {line}")
    print(f"\n{args.model} {args.dtype} {args.size}x{args.size} px, {args.frames} frames, editor {args.editor}"
          f"{' (extracted)' if args.extracted else ''}; ran {args.run_steps} steps per phase, memory counted for "
          f"{args.steps} steps (trajectory, fields x{ratio:g}); vram {args.vram} GiB - reserve {reserve / GIB:.2f} = "
          f"budget {budget / GIB:.2f} GiB, ram {args.ram} GiB")
    plain = flops.per_step("plain")
    per_step = {phase: (flops.per_step(phase), "") for phase in tracker.peaks}
    if flops.per_phase.get("edit") and mix.calls:
        weighted, how = mix.weighted(flops.per_phase["edit"], args.run_steps, args.steps)
        per_step["edit"] = (weighted, f"; over a {args.steps}-step edit's step mix: {how}")
    worst = None
    for phase, peaks in tracker.peaks.items():
        if phase == "setup":
            continue
        value, how = per_step[phase]
        print(f"\n{phase}: FLOPs/step {value / 1e12:.2f} T" + (f" ({value / plain:.2f}x plain)" if plain else "") + how)
        print(f"  {'device':<6} {'peak GiB':>9}  " + "  ".join(f"{h:>11}" for h in HOLDERS))
        for device in ("cuda", "cpu"):
            total, holders = scaled_peak(tracker, phase, device, ratio)
            print(f"  {device:<6} {total / GIB:9.2f}  " + "  ".join(f"{holders.get(h, 0) / GIB:11.2f}" for h in HOLDERS))
            limit = budget if device == "cuda" else ram
            over = total - limit
            if over > 0 and phase == BASELINE:
                print(f"  (the FLOP baseline, core plain sampling, is {over / GIB:.2f} GiB over on {device}; not a "
                      f"phase of the edit, not in the verdict)")
            elif over > 0 and (worst is None or over > worst[0]):
                worst = (over, device, phase, total, limit, max(holders, key=holders.get) if holders else "reserve")
    edit_phases = [p for p in tracker.peaks if p not in ("setup", BASELINE)] or list(tracker.peaks)
    peak_vram = max(scaled_peak(tracker, p, "cuda", ratio)[0] for p in edit_phases)
    peak_ram = max(scaled_peak(tracker, p, "cpu", ratio)[0] for p in edit_phases)
    if verdict is None and worst is not None:
        _, device, phase, total, limit, largest = worst
        verdict = (f"verdict: oom memory={'vram' if device == 'cuda' else 'ram'} phase={phase} "
                   f"peak_gib={total / GIB:.2f} budget_gib={limit / GIB:.2f} largest={largest}")
    record = memory_plan.latest_record()  # what the edit's planner chose, step by step
    bank = memory_plan.HOST if record is not None and memory_plan.HOST in record.placements else memory_plan.DEVICE
    if record is not None and record.placements:
        moved = [b for p, b in zip(record.placements, record.transfer_bytes) if p == memory_plan.HOST]
        print(f"\nkeyframe bank: {bank} ({record.placements.count(memory_plan.HOST)} of {len(record.placements)} steps "
              f"run in host memory), up to {max(record.bank_bytes) / GIB:.2f} GiB; host <-> device transfer "
              f"{(sum(moved) / len(moved) if moved else 0) / GIB:.2f} GiB per step")
    if verdict is None:
        verdict = (f"verdict: fits peak_vram_gib={peak_vram / GIB:.2f} peak_ram_gib={peak_ram / GIB:.2f} "
                   f"weights={weights} bank={bank}")
    print(f"\npage-locked host memory (what the caching host allocator would keep): peak {shims.PINNED.peak} bytes "
          f"({shims.PINNED.peak / 2**20:.2f} MiB) live, {shims.PINNED.allocations} allocations (the {args.run_steps} "
          f"steps run, not scaled)")
    if shims.SmallValues.reads:
        print("\nvalues read back from the real small inputs: "
              + ", ".join(f"{k} x{v}" for k, v in sorted(shims.SmallValues.reads.items())))
    print(replay.summary() if args.replay else "model calls: every call run (--no-replay)")
    print(f"dry run: {time.monotonic() - started:.0f} s wall")
    print(verdict)
    return verdict

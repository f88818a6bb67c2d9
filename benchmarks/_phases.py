"""What the benchmark scripts measure: the workload, the phase runners and the measurements.

Import after ``_host.bootstrap(...)``. The probes live in ``_probes.py`` (time, memory) and
``_counting.py`` (UNet calls and torch ops per step); this module builds the workload (model,
frames, prompts, products), runs each phase and summarizes timed, memory and counting runs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import comfy.model_management
import comfy.sample

import _counting
import _host
import models
import tiny_models
from _probes import (KEYFRAME_PASS, PROPAGATION, STEP, PeakTracker, Probe, instrument, memory_mode, tensor_bytes,
                     timing_mode)
from comfyui_tokenflow.engine import sampling_paths
from comfyui_tokenflow.engine.ddpm import edit as ddpm_edit, invert as ddpm_invert
from comfyui_tokenflow.engine.plan.settings import EditSettings
from comfyui_tokenflow.engine.editors import editor_options, get_editor

DEFAULTS = EditSettings()  # the sampler's defaults; the editors' live in their declarations


# -- the workload -------------------------------------------------------------------------------------
@dataclass
class Workload:
    model_size: str
    device: str
    frames: int
    latent: int
    steps: int
    inversion_steps: int
    batch_size: int = DEFAULTS.batch_size
    cfg: float = DEFAULTS.cfg
    max_keyframes: int = DEFAULTS.max_keyframes
    seed: int = 0  # of the model weights and frames (the keyframe plan uses the sampler's seed)
    editor_options: dict = field(default_factory=dict)  # e.g. {"pnp_attn_t": 1.0}; the editors' defaults otherwise
    dtype: str = "auto"  # the UNet's (and ControlNet's) weight dtype, see models.resolve_dtype
    inversion_frame_batch: int = 0  # TokenFlowInvert's frame_batch: 0 = all frames per call when they fit
    share: "Workload | None" = None  # reuse this workload's model, frames, prompts and ControlNet

    def __post_init__(self) -> None:
        self.batch_size = min(self.batch_size, self.frames)  # the pack refuses B > frames
        self.torch_device = models.load_device(self.device)
        self.inversion = None
        self.correspondences = None
        if self.share is not None:
            other = self.share
            self.model, self.latent_dict, self._control = other.model, other.latent_dict, other._control
            self.source, self.positive, self.negative = other.source, other.positive, other.negative
            self.share = None
            return
        self.model = models.make_unet(self.model_size, self.device, seed=self.seed, dtype=self.dtype)
        g = torch.Generator().manual_seed(self.seed)
        self.latent_dict = {"samples": torch.randn(self.frames, 4, self.latent, self.latent, generator=g)}
        self.source, self.positive, self.negative = (tiny_models.make_conditioning(self.model, seed=s)
                                                     for s in (11, 12, 13))
        self._control: tuple | None = None

    def with_steps(self, steps: int, **changes) -> "Workload":
        """The same model, frames and prompts with another step count (its own products)."""
        fields = dict(batch_size=self.batch_size, cfg=self.cfg, max_keyframes=self.max_keyframes, seed=self.seed,
                      editor_options=self.editor_options, dtype=self.dtype,
                      inversion_frame_batch=self.inversion_frame_batch)
        fields.update(changes)
        return Workload(self.model_size, self.device, self.frames, self.latent, steps, steps, share=self, **fields)

    # ControlNet-conditioned prompts, as Apply ControlNet (Advanced) makes them: one hint per frame.
    def controlled(self) -> tuple[list, list]:
        if self._control is None:
            controlnet = models.make_controlnet(self.model_size, self.device, dtype=self.dtype)
            g = torch.Generator().manual_seed(5)
            hints = torch.rand(self.frames, 3, self.latent * 8, self.latent * 8, generator=g)
            control = controlnet.copy().set_cond_hint(hints, 1.0, (0.0, 1.0))
            self._control = tuple([[c, {**d, "control": control, "control_apply_to_uncond": False}] for c, d in cond]
                                  for cond in (self.positive, self.negative))
        return self._control

    def settings(self, editor: str) -> EditSettings:
        return EditSettings.of(editor=editor, cfg=self.cfg, batch_size=self.batch_size, keyframes="random",
                               seed=DEFAULTS.seed, max_keyframes=self.max_keyframes, **self.editor_options)

    def warm_up(self) -> None:
        """One plain step on the whole clip (loads the model, warms the kernels); not measured."""
        comfy.model_management.load_models_gpu([self.model])
        latent = self.latent_dict["samples"]
        with torch.no_grad():
            comfy.sample.sample(self.model, torch.randn_like(latent), 1, self.cfg, "ddim", "ddim_uniform",
                                self.positive, self.negative, latent, seed=0, disable_pbar=True)

    def controlnet_modules(self) -> list[torch.nn.Module]:
        """The cldm models of the ControlNets in use (every copy shares its original's)."""
        if self._control is None:
            return []
        out, seen = [], set()
        for cond in self._control:
            for _, d in cond:
                control = d.get("control")
                while control is not None:
                    model = getattr(control, "control_model", None)
                    if model is not None and id(model) not in seen:
                        seen.add(id(model))
                        out.append(model)
                    control = control.previous_controlnet
        return out

    # -- products (built untimed when a measured phase needs one that was not measured) ------------
    def ensure_inversion(self):
        if self.inversion is None:
            self.inversion = ddpm_invert.run_inversion(self.model, self.latent_dict, self.source, self.steps,
                                                       self.inversion_steps, frame_batch=self.inversion_frame_batch)
        return self.inversion

    def ensure_correspondences(self):
        if self.correspondences is None:
            self.correspondences = sampling_paths.run_extraction(
                self.model, self.ensure_inversion(), self.batch_size, "random", 1, max_keyframes=self.max_keyframes)
        return self.correspondences


# -- phases ---------------------------------------------------------------------------------------
EDITORS = {  # phase -> (editor, with extracted correspondences, with a ControlNet)
    "pnp": ("pnp", False, False),
    "pnp_extracted": ("pnp", True, False),
    "sdedit_extracted": ("sdedit", True, False),
    "controlnet_extracted": ("controlnet", True, True),
    "sdedit": ("sdedit", False, False),
    "controlnet": ("controlnet", False, True),
}
PLAIN = {"plain": False, "plain_controlnet": True}
PHASES = ("inversion", "extraction", "plain", "plain_controlnet", *EDITORS)


def _phase_call(work: Workload, phase: str) -> tuple[Callable[[], Any], Callable[[Any], int]]:
    """(run, steps_of(result)) for one phase; products it needs are made beforehand, untimed."""
    if phase == "inversion":
        def run():
            work.inversion = ddpm_invert.run_inversion(work.model, work.latent_dict, work.source, work.steps,
                                                       work.inversion_steps, frame_batch=work.inversion_frame_batch)
            return work.inversion
        return run, lambda result: result.inversion_steps
    if phase == "extraction":
        inversion = work.ensure_inversion()

        def run():
            work.correspondences = sampling_paths.run_extraction(
                work.model, inversion, work.batch_size, "random", 1, max_keyframes=work.max_keyframes)
            return work.correspondences
        return run, lambda result: len(result.timesteps)
    if phase in PLAIN:
        positive, negative = work.controlled() if PLAIN[phase] else (work.positive, work.negative)
        latent = work.latent_dict["samples"]
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(3))

        def run():
            return comfy.sample.sample(work.model, noise, work.steps, work.cfg, "ddim", "ddim_uniform", positive,
                                       negative, latent, seed=0, disable_pbar=True)
        return run, lambda result: work.steps
    if phase in EDITORS:
        editor, extracted, control = EDITORS[phase]
        inversion = work.ensure_inversion()
        correspondences = work.ensure_correspondences() if extracted else None
        positive, negative = work.controlled() if control else (work.positive, work.negative)
        settings = work.settings(editor)

        def run():
            return ddpm_edit.run_edit(work.model, positive, negative, inversion, settings, correspondences)
        return run, None
    raise ValueError(f"unknown phase {phase!r}; choose from {PHASES}")


def run_phase_once(work: Workload, phase: str) -> dict[str, Any]:
    """One measured run of ``phase``: wall time, per-step records, peaks."""
    run, steps_of = _phase_call(work, phase)
    tracker = PeakTracker(work.torch_device)
    probe = Probe(work.torch_device, tracker)
    tracker.begin()
    with torch.no_grad(), instrument(probe):
        probe.sync()
        start, start_clock = time.perf_counter(), probe.clock()
        result = run()
        probe.sync()
        wall, total = time.perf_counter() - start, probe.clock() - start_clock
    peaks = tracker.end()
    steps = steps_of(result) if steps_of is not None else len(probe.steps)
    del result
    return {"phase": phase, "total_s": total, "wall_s": wall, "steps": steps, "step_records": probe.steps, "peaks": peaks,
            "keyframes": max(probe.keyframes_per_step) if probe.keyframes_per_step else 0,
            "bank_mib": probe.bank_bytes / 2**20}


def step_kinds(phase: str, steps: int, settings: EditSettings | None = None) -> list[str]:
    """The kinds (see :func:`_probes.step_kind`) of the steps of ``phase`` run with ``steps`` editing steps."""
    if phase not in EDITORS:
        return ["step"] * steps
    settings = settings or EditSettings(editor=EDITORS[phase][0])
    editor = EDITORS[phase][0]
    options = editor_options(get_editor(editor), settings.editor_options)
    if editor == "sdedit":
        from comfyui_tokenflow.tokenflow_ops.schedule import sdedit_timesteps

        return ["plain"] * len(sdedit_timesteps(steps, options["sdedit_start"]))
    if editor != "pnp":
        return ["plain"] * steps
    attn, res = int(steps * options["pnp_attn_t"]), int(steps * options["pnp_f_t"])
    return [("attn+" if i < attn else "") + ("res" if i < res else "plain") for i in range(steps)]


def summarize(runs: list[dict[str, Any]], mix: list[str] | None = None) -> dict[str, Any]:
    """Noise-robust per-step figures from repeated runs of one phase on a shared machine.

    Steps of the same kind (see :func:`_probes.step_kind`) do the same work, so each kind's cost is the
    fastest such step over all runs, and s/step is the mean of those minima over one run's steps
    (with the fastest run's per-pass split). Time per step including the per-run set-up is kept
    too (``run_s_per_step``: fastest run's total / steps). Times are on :data:`_host.CLOCK`; ``wall_s`` is the
    fastest run's wall time. Peaks: the largest over runs.
    """
    best_kind: dict[str, dict] = {}
    for run in runs:
        for record in run["step_records"]:
            kind = record["kind"]
            if kind not in best_kind or record["seconds"] < best_kind[kind]["seconds"]:
                best_kind[kind] = record
    fastest = min(runs, key=lambda r: r["total_s"])
    records = fastest["step_records"]
    steps = fastest["steps"]
    if records:
        per_step = [best_kind[r["kind"]] for r in records]
        # Inversion/extraction count their steps themselves; one model evaluation is one step.
        n = len(per_step)
        s_per_step = sum(r["seconds"] for r in per_step) / n
        keyframe = sum(r.get(KEYFRAME_PASS, 0.0) for r in per_step) / n
        propagation = sum(r.get(PROPAGATION, 0.0) for r in per_step) / n
    else:
        s_per_step = fastest["total_s"] / max(1, steps)
        keyframe = propagation = 0.0
    mix_s_per_step = None
    if mix and all(kind in best_kind for kind in mix):
        mix_s_per_step = sum(best_kind[kind]["seconds"] for kind in mix) / len(mix)
    peaks: dict[str, float] = {}
    for run in runs:
        for key, value in run["peaks"].items():
            peaks[key] = max(peaks.get(key, 0.0), value)
    return {
        "phase": fastest["phase"], "steps": steps, "repeats": len(runs), "s_per_step": s_per_step,
        "mix_s_per_step": mix_s_per_step if mix_s_per_step is not None else s_per_step,
        "mix_steps": len(mix) if mix_s_per_step is not None else steps,
        "keyframe_s_per_step": keyframe, "propagation_s_per_step": propagation,
        "run_s_per_step": fastest["total_s"] / max(1, steps), "total_s": fastest["total_s"],
        "wall_s": min(r["wall_s"] for r in runs), "clock": _host.CLOCK,
        "kinds": {k: v["seconds"] for k, v in best_kind.items()},
        "step_kinds": [r["kind"] for r in records],
        "peak_mib": peaks.get("total", 0.0), "step_peak_mib": peaks.get(STEP, 0.0),
        "keyframe_peak_mib": peaks.get(KEYFRAME_PASS, 0.0), "propagation_peak_mib": peaks.get(PROPAGATION, 0.0),
        "keyframes": fastest["keyframes"], "bank_mib": max(r["bank_mib"] for r in runs),
    }


def measure_phases(work: Workload, phases: list[str], repeats: int = 1, log: Callable[[str], None] | None = None,
                   mix_steps: int = 50) -> dict[str, dict[str, Any]]:
    """Each phase ``repeats`` times, interleaved (a burst of load elsewhere hits one run of each, not all)."""
    runs: dict[str, list] = {p: [] for p in phases}
    for rep in range(max(1, repeats)):
        for phase in phases:
            runs[phase].append(run_phase_once(work, phase))
            if log is not None:
                last = runs[phase][-1]
                log(f"{phase} run {rep + 1}: {last['total_s']:.2f} s, {last['steps']} steps, "
                    f"peak {last['peaks'].get('total', 0):.0f} MiB")
    return {p: summarize(r, step_kinds(p, mix_steps, work.settings(EDITORS[p][0]) if p in EDITORS else None))
            for p, r in runs.items()}


def measure_memory(work: Workload, phases: list[str], steps: int = 1) -> dict[str, dict[str, Any]]:
    """Peak memory per phase from one run each with ``steps`` steps (call :func:`memory_mode` first).

    On CUDA the timed runs' ``max_memory_allocated`` is already exact: use their peaks instead.
    PnP runs with ``pnp_attn_t = pnp_f_t = 1`` here so that every step is its heaviest kind (q/k and
    residual injection); every step of the other phases is alike. The products (trajectory, fields)
    grow with the step count but are small next to the activations (see :func:`product_sizes`).
    """
    mem_work = work.with_steps(steps, editor_options={"pnp_attn_t": 1.0, "pnp_f_t": 1.0})
    out = {}
    for phase in phases:
        run = run_phase_once(mem_work, phase)
        peaks = run["peaks"]
        out[phase] = {"peak_mib": peaks.get("total", 0.0), "step_peak_mib": peaks.get(STEP, 0.0),
                      "keyframe_peak_mib": peaks.get(KEYFRAME_PASS, 0.0),
                      "propagation_peak_mib": peaks.get(PROPAGATION, 0.0), "bank_mib": run["bank_mib"],
                      "memory_steps": steps}
    return out


def measure_counts(work: Workload, phases: list[str], steps: int = 0) -> dict[str, dict[str, Any]]:
    """UNet calls and torch ops per step of each phase, from one separate counting run each (see ``_counting``).

    ``steps`` > 0 counts a run with that many steps (its own products), else the workload's steps.
    Products a phase needs are made before its run, outside the counters, as for the timed runs.
    """
    count_work = work if steps <= 0 or steps == work.steps else work.with_steps(steps)
    out = {}
    for phase in phases:
        run, _ = _phase_call(count_work, phase)
        with torch.no_grad():
            result, counts, totals = _counting.count_run(run, work.model.model.diffusion_model,
                                                         count_work.controlnet_modules())
        del result
        out[phase] = _counting.summarize_counts(counts, totals)
    return out


def product_sizes(work: Workload) -> dict[str, float]:
    out = {"latents_mib": tensor_bytes(work.latent_dict["samples"]) / 2**20}
    if work.inversion is not None:
        out["trajectory_mib"] = tensor_bytes(work.inversion.trajectory) / 2**20
        out["inversion_mib"] = (tensor_bytes(work.inversion.trajectory) + tensor_bytes(work.inversion.x0)
                                + tensor_bytes(work.inversion.inverted)) / 2**20
    if work.correspondences is not None:
        out["correspondences_mib"] = work.correspondences.nbytes() / 2**20
    return out


def memory_first(device: str, memory_steps: int) -> bool:
    """Whether a worker measures memory before timing (CPU with memory steps); if so, start a fresh heap now,
    before anything is allocated (see :func:`memory_mode`)."""
    first = device == "cpu" and memory_steps > 0
    if first:
        memory_mode()
    return first


def measure_memory_and_phases(work, phases: list[str], first: bool, memory_steps: int, repeats: int, log,
                              **timing) -> dict:
    """Memory peaks (when ``first``), then the timed phases: each phase's results with its peaks added."""
    memory = {}
    if first:
        memory = measure_memory(work, phases, memory_steps)
        timing_mode()
        work.warm_up()  # grow the heap again, outside the timed runs
    results = measure_phases(work, phases, repeats, log=log, **timing)
    for phase, peaks in memory.items():
        results[phase].update(peaks)
    return results


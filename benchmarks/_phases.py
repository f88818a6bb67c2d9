"""What the benchmark scripts measure: the workload, the phase runners and the timing/memory probes.

Import after ``_host.bootstrap(...)``. Nothing in the pack is changed: the per-pass timings come
from wrapping ``calc_on_frames`` / ``predict_noise`` of the pack's guider classes for the
duration of one measured run (:func:`instrument`), keyed by the ``PassContext.phase`` each call
carries, and restored afterwards.
"""
from __future__ import annotations

import ctypes
import gc
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers

import _host
import models
import tiny_models
from comfyui_tokenflow.nodes import correspondence_runner, inversion_runner, tokenflow_runner
from comfyui_tokenflow.nodes.attention_patches import Phase
from comfyui_tokenflow.nodes.edit_plan import EditSettings
from comfyui_tokenflow.nodes.frame_guider import FrameSubsetGuider

KEYFRAME_PASS = "keyframe"
PROPAGATION = "propagation"
STEP = "step"
SUBPHASE = {
    Phase.SOURCE_KEYFRAMES: KEYFRAME_PASS, Phase.EDIT_KEYFRAMES: KEYFRAME_PASS, Phase.EXTRACT_KEYFRAMES: KEYFRAME_PASS,
    Phase.SOURCE_FRAMES: PROPAGATION, Phase.EDIT_FRAMES: PROPAGATION, Phase.EXTRACT_FRAMES: PROPAGATION,
}


def tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.mallopt(-3, mmap_threshold) == 1 and libc.mallopt(-1, trim_threshold) == 1  # M_MMAP/M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def memory_mode() -> bool:
    """Serve every allocation >= 4 KiB by its own mmap, unmapped on free (glibc ``mallopt``).

    Call it at process start, before the model is built, and measure memory before any timing run.
    glibc's default raises the mmap threshold dynamically (up to 32 MiB) and then serves tensors
    from its heap, and a free chunk in the heap is reused before any new mmap: a phase's peak RSS
    then depends on how earlier work fragmented the heap (measured: +-15 MiB between identical
    processes, and tens of MiB too much after a timed run). With a fresh heap and a 4 KiB threshold,
    RSS follows the live tensors. The page faults slow a run down by up to 1.5x: never time in it.
    """
    ok = _mallopt(4096, 4096)
    malloc_trim()
    return ok


def timing_mode() -> bool:
    """glibc's steady state after its dynamic adjustment: tensors < 32 MiB from the heap, no page-fault churn."""
    return _mallopt(32 << 20, 64 << 20)


def malloc_trim() -> None:
    """Give the C allocator's free pages back to the OS so that a phase's peak RSS counts all it touches."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakTracker:
    """Peak memory above a phase's starting point, overall and per (possibly nested) region.

    CPU: the kernel's resident-set high-water mark (VmHWM), reset through ``/proc/self/clear_refs``
    at every region boundary, so each region's peak is exact (no sampling). CUDA:
    ``torch.cuda.max_memory_allocated`` with ``reset_peak_memory_stats`` at the boundaries.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.base = 0.0
        self.peaks: dict[str, float] = {}
        self.open: list[str] = []

    def _current(self) -> float:
        return torch.cuda.memory_allocated() / 2**20 if self.cuda else _host.rss_mib()

    def _read_and_reset(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            value = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        else:
            value = _host.peak_rss_mib()
            _host.reset_peak_rss()
        return value - self.base

    def _credit(self, value: float) -> None:
        self.peaks["total"] = max(self.peaks.get("total", 0.0), value)
        for label in self.open:
            self.peaks[label] = max(self.peaks.get(label, 0.0), value)

    def begin(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            malloc_trim()
            if not _host.reset_peak_rss():
                raise RuntimeError("cannot reset the peak RSS through /proc/self/clear_refs (Linux >= 4.0 needed)")
        self.base = self._current()
        self.peaks = {"total": 0.0}
        self.open = []

    def enter(self, label: str) -> None:
        self._credit(self._read_and_reset())
        self.open.append(label)

    def exit(self, label: str) -> None:
        self._credit(self._read_and_reset())
        self.open.remove(label)

    def end(self) -> dict[str, float]:
        self._credit(self._read_and_reset())
        return dict(self.peaks)


@dataclass
class Probe:
    """Per-run accumulators filled by the instrumented guider methods."""

    device: torch.device
    tracker: PeakTracker
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    steps: list[dict] = field(default_factory=list)  # per model evaluation: kind, seconds, per-pass seconds
    keyframes_per_step: list[int] = field(default_factory=list)
    bank_bytes: int = 0
    _step: dict | None = None

    def sync(self) -> None:
        _host.synchronize(self.device)

    def clock(self) -> float:
        return CLOCKS[CLOCK]()


# "cpu": this process's CPU seconds (all threads). With one torch thread on a shared CPU this is the
# time the work itself took, unaffected by other jobs taking turns on the cores (wall time there
# varies 2x run to run). "wall": perf_counter (always used on CUDA, and with several threads).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = "wall"


def set_clock(name: str) -> None:
    global CLOCK
    if name not in CLOCKS:
        raise ValueError(f"clock must be one of {tuple(CLOCKS)}")
    CLOCK = name


def _step_kind(guider, timestep) -> str:
    """Steps of one kind cost the same: TokenFlow steps differ only by which PnP injections they do."""
    if isinstance(guider, tokenflow_runner.TokenFlowGuider):
        t = guider.plan.timesteps[guider._step_index(timestep)]
        return ("attn+" if guider.plan.pnp_attention[t] else "") + ("res" if guider.plan.pnp_residual[t] else "plain")
    return "step"


_ORIGINAL_CALC = FrameSubsetGuider.calc_on_frames
_STEP_CLASSES = (comfy.samplers.CFGGuider, tokenflow_runner.TokenFlowGuider, correspondence_runner.ExtractionGuider,
                 inversion_runner.FrameBatchGuider)
_ORIGINAL_PREDICT = {cls: cls.__dict__["predict_noise"] for cls in _STEP_CLASSES}


@contextmanager
def instrument(probe: Probe):
    """Time/measure every ``calc_on_frames`` by pass and every model evaluation (step), for this block only."""

    def calc_on_frames(self, names, x, timestep, idx, model_options, context, n_frames, cache=True):
        label = SUBPHASE.get(context.phase, "other") if context is not None else "other"
        probe.tracker.enter(label)
        probe.sync()
        start = probe.clock()
        try:
            return _ORIGINAL_CALC(self, names, x, timestep, idx, model_options, context, n_frames, cache)
        finally:
            probe.sync()
            elapsed = probe.clock() - start
            probe.seconds[label] += elapsed
            probe.calls[label] += 1
            if probe._step is not None:
                probe._step[label] = probe._step.get(label, 0.0) + elapsed
            probe.tracker.exit(label)
            if context is not None and context.phase in (Phase.EDIT_KEYFRAMES, Phase.EXTRACT_KEYFRAMES):
                bank = context.bank
                probe.bank_bytes = max(probe.bank_bytes, tensor_bytes(bank.keyframe_outputs)
                                       + tensor_bytes(bank.keyframe_tokens) + tensor_bytes(bank.pnp_qk))
                probe.keyframes_per_step.append(int(context.frames.numel()))

    def make_predict(original):
        def predict_noise(self, x, timestep, model_options={}, seed=None):
            probe._step = {"kind": _step_kind(self, timestep)}
            probe.tracker.enter(STEP)
            probe.sync()
            start = probe.clock()
            try:
                return original(self, x, timestep, model_options, seed)
            finally:
                probe.sync()
                probe._step["seconds"] = probe.clock() - start
                probe.steps.append(probe._step)
                probe._step = None
                probe.tracker.exit(STEP)
        return predict_noise

    FrameSubsetGuider.calc_on_frames = calc_on_frames
    for cls, original in _ORIGINAL_PREDICT.items():
        cls.predict_noise = make_predict(original)
    try:
        yield probe
    finally:
        FrameSubsetGuider.calc_on_frames = _ORIGINAL_CALC
        for cls, original in _ORIGINAL_PREDICT.items():
            cls.predict_noise = original


# -- the workload -------------------------------------------------------------------------------------
@dataclass
class Workload:
    model_size: str
    device: str
    frames: int
    latent: int
    steps: int
    inversion_steps: int
    batch_size: int = 8
    cfg: float = 7.5
    max_keyframes: int = 0
    seed: int = 0
    pnp_attn_t: float = 0.5
    pnp_f_t: float = 0.8
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
        self.model = models.make_unet(self.model_size, self.device, seed=self.seed)
        g = torch.Generator().manual_seed(self.seed)
        self.latent_dict = {"samples": torch.randn(self.frames, 4, self.latent, self.latent, generator=g)}
        self.source, self.positive, self.negative = (tiny_models.make_conditioning(self.model, seed=s)
                                                     for s in (11, 12, 13))
        self._control: tuple | None = None

    def with_steps(self, steps: int, **changes) -> "Workload":
        """The same model, frames and prompts with another step count (its own products)."""
        fields = dict(batch_size=self.batch_size, cfg=self.cfg, max_keyframes=self.max_keyframes, seed=self.seed,
                      pnp_attn_t=self.pnp_attn_t, pnp_f_t=self.pnp_f_t)
        fields.update(changes)
        return Workload(self.model_size, self.device, self.frames, self.latent, steps, steps, share=self, **fields)

    # ControlNet-conditioned prompts, as Apply ControlNet (Advanced) makes them: one hint per frame.
    def controlled(self) -> tuple[list, list]:
        if self._control is None:
            controlnet = models.make_controlnet(self.model_size, self.device)
            g = torch.Generator().manual_seed(5)
            hints = torch.rand(self.frames, 3, self.latent * 8, self.latent * 8, generator=g)
            control = controlnet.copy().set_cond_hint(hints, 1.0, (0.0, 1.0))
            self._control = tuple([[c, {**d, "control": control, "control_apply_to_uncond": False}] for c, d in cond]
                                  for cond in (self.positive, self.negative))
        return self._control

    def settings(self, editor: str) -> EditSettings:
        return EditSettings(editor=editor, cfg=self.cfg, batch_size=self.batch_size, keyframes="random", seed=1,
                            max_keyframes=self.max_keyframes, pnp_attn_t=self.pnp_attn_t, pnp_f_t=self.pnp_f_t)

    def warm_up(self) -> None:
        """One plain step on the whole clip (loads the model, warms the kernels); not measured."""
        comfy.model_management.load_models_gpu([self.model])
        latent = self.latent_dict["samples"]
        with torch.no_grad():
            comfy.sample.sample(self.model, torch.randn_like(latent), 1, self.cfg, "ddim", "ddim_uniform",
                                self.positive, self.negative, latent, seed=0, disable_pbar=True)

    # -- products (built untimed when a measured phase needs one that was not measured) ------------
    def ensure_inversion(self):
        if self.inversion is None:
            self.inversion = inversion_runner.run_inversion(self.model, self.latent_dict, self.source, self.steps,
                                                            self.inversion_steps, frame_batch=16)
        return self.inversion

    def ensure_correspondences(self):
        if self.correspondences is None:
            self.correspondences = correspondence_runner.run_extraction(
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
            work.inversion = inversion_runner.run_inversion(work.model, work.latent_dict, work.source, work.steps,
                                                            work.inversion_steps, frame_batch=16)
            return work.inversion
        return run, lambda result: result.inversion_steps
    if phase == "extraction":
        inversion = work.ensure_inversion()

        def run():
            work.correspondences = correspondence_runner.run_extraction(
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
            return tokenflow_runner.run_edit(work.model, positive, negative, inversion, settings, correspondences)
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
    """The kinds (see :func:`_step_kind`) of the steps of ``phase`` run with ``steps`` editing steps."""
    if phase not in EDITORS:
        return ["step"] * steps
    settings = settings or EditSettings(editor=EDITORS[phase][0])
    editor = EDITORS[phase][0]
    if editor == "sdedit":
        from comfyui_tokenflow.tokenflow_ops.schedule import sdedit_timesteps

        return ["plain"] * len(sdedit_timesteps(steps, settings.sdedit_start))
    if editor != "pnp":
        return ["plain"] * steps
    attn, res = int(steps * settings.pnp_attn_t), int(steps * settings.pnp_f_t)
    return [("attn+" if i < attn else "") + ("res" if i < res else "plain") for i in range(steps)]


def summarize(runs: list[dict[str, Any]], mix: list[str] | None = None) -> dict[str, Any]:
    """Noise-robust per-step figures from repeated runs of one phase on a shared machine.

    Steps of the same kind (see :func:`_step_kind`) do the same work, so each kind's cost is the
    fastest such step over all runs, and s/step is the mean of those minima over one run's steps
    (with the fastest run's per-pass split). Time per step including the per-run set-up is kept
    too (``run_s_per_step``: fastest run's total / steps). Times are on :data:`CLOCK`; ``wall_s`` is the
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
        "wall_s": min(r["wall_s"] for r in runs), "clock": CLOCK,
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
    mem_work = work.with_steps(steps, pnp_attn_t=1.0, pnp_f_t=1.0)
    out = {}
    for phase in phases:
        run = run_phase_once(mem_work, phase)
        peaks = run["peaks"]
        out[phase] = {"peak_mib": peaks.get("total", 0.0), "step_peak_mib": peaks.get(STEP, 0.0),
                      "keyframe_peak_mib": peaks.get(KEYFRAME_PASS, 0.0),
                      "propagation_peak_mib": peaks.get(PROPAGATION, 0.0), "bank_mib": run["bank_mib"],
                      "memory_steps": steps}
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

"""A CFGGuider that evaluates the model on chosen subsets of frames, each with its own conditioning.

ComfyUI calls a guider with the whole latent batch. TokenFlow needs calls on keyframes and on
batches of frames, and every per-frame conditioning (a ControlNet hint per frame, a per-frame
cond tensor) must follow the frames it belongs to. This base class slices processed conds to a
frame subset, with per-subset copies of ControlNet chains that are cleaned up after the run,
and runs ``calc_cond_batch`` on it, so LoRA, model patches, hooks and ControlNet keep working
through ComfyUI's own sampling path.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers

from ..checks import check_hint_count
from ..plan.call_sizing import available_bytes
from ..patches.contract import KEY, PassContext, to_device

log = logging.getLogger(__name__)


def frames_of(tensor: torch.Tensor, frames: range | torch.Tensor) -> torch.Tensor:
    """``tensor[frames]``: the tensor itself or a view for a range, a gather for indices."""
    if isinstance(frames, range):
        if frames.start == 0 and frames.stop == tensor.shape[0]:
            return tensor
        return tensor[frames.start:frames.stop]
    return tensor[to_device(frames, tensor.device)]


def frame_ids(frames: range | torch.Tensor) -> torch.Tensor:
    """The frames as a CPU index tensor."""
    return torch.arange(frames.start, frames.stop) if isinstance(frames, range) else frames


def _slice_frames(value: torch.Tensor, frames: range | torch.Tensor, n_frames: int) -> torch.Tensor:
    if n_frames > 1 and value.ndim > 0 and value.shape[0] == n_frames:
        return frames_of(value, frames)
    return value


def make_room_for_call(model_patcher, need: float) -> None:
    """Offload part of the loaded weights when ``need`` bytes (the host's own estimate for the largest call
    TokenFlow cannot split, as its load sizing uses it) do not fit beside them and ComfyUI's minimum inference
    memory. ComfyUI sizes a load from the memory it is asked for, but never offloads a model it is loading, so
    weights loaded whole by an earlier, smaller job (the inversion's one-frame calls) would stay whole beside the
    edit's keyframe pass. The CPU shares one memory: nothing to offload there."""
    device = model_patcher.load_device
    if device.type == "cpu" or model_patcher.loaded_size() <= 0:
        return
    short = need - available_bytes(device)  # the free memory beyond ComfyUI's minimum inference memory
    if short > 0:
        freed = model_patcher.partially_unload(model_patcher.offload_device, short)
        log.info("TokenFlow: offloaded %.2f GiB of weights to make room for a %.2f GiB call", freed / 2**30,
                 need / 2**30)


class FrameSubsetGuider(comfy.samplers.CFGGuider):
    """Base guider: ``calc_on_frames`` runs chosen conds on a frame subset."""

    def __init__(self, model_patcher) -> None:
        super().__init__(model_patcher)
        self._subset_cache: dict[tuple[int, tuple[int, ...], int], list[dict]] = {}
        self._control_copies: list[Any] = []
        self.current_step = 0  # set by the pack's samplers before each model call (no device read needed)

    def begin_step(self, step: int) -> None:
        self.current_step = step

    # -- lifecycle -------------------------------------------------------------------------
    def sample(self, *args, **kwargs):
        try:
            output = super().sample(*args, **kwargs)
        except BaseException:
            self.release_subsets(raise_errors=False)  # a cleanup error must not replace the original one
            raise
        self.release_subsets()
        return output

    def outer_sample(self, *args, **kwargs):
        # ``sample`` has made this run's copy of the model options: the wrapper lives and dies with the run.
        comfy.patcher_extension.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, KEY,
                                                     self._prepare_sampling_for_calls, self.model_options,
                                                     is_model_options=True)
        return super().outer_sample(*args, **kwargs)

    def largest_call_images(self, n_frames: int) -> int | None:
        """The images of the largest model call this guider cannot split by frames (None: the host's estimate)."""
        return None

    def extra_call_images(self, latent_shape: tuple[int, ...]) -> int:
        """The guider's own device bytes beside its largest call's activations, as images of the host's estimate."""
        return 0

    def _prepare_sampling_for_calls(self, executor, model, noise_shape, *args, **kwargs):
        """ComfyUI sizes the model's load for the whole latent batch (every frame, twice for CFG) and loads the
        weights partly when that does not fit; each TokenFlow call holds a few frames and the guider splits its
        calls to what fits after loading, so the load is sized for the largest call that cannot be split (core
        context windows cap the same estimate). The host's other arguments pass through unchanged: they differ
        between ComfyUI versions."""
        images = self.largest_call_images(int(noise_shape[0]))
        if images is None:
            return executor(model, noise_shape, *args, **kwargs)
        latent_shape = tuple(int(d) for d in noise_shape[1:])
        images += self.extra_call_images(latent_shape)
        # the host estimates two images (CFG) per frame of noise_shape
        prepared = executor(model, [min(int(noise_shape[0]), max(1, -(-images // 2))), *noise_shape[1:]],
                            *args, **kwargs)
        make_room_for_call(model, model.model.memory_required([images, *latent_shape]))
        return prepared

    def release_subsets(self, raise_errors: bool = True) -> None:
        """Drop cached cond subsets and clean every ControlNet copy made for them (all of them, even if one fails)."""
        copies = list(self._control_copies)
        self._control_copies.clear()
        self._subset_cache.clear()
        self._clean_controls(copies, raise_errors)

    def _clean_controls(self, copies: list, raise_errors: bool) -> None:
        errors = []
        for control in copies:
            try:
                control.cleanup()
            except Exception as e:  # noqa: BLE001 - every copy must still be cleaned
                errors.append(e)
        if errors and raise_errors:
            raise errors[0]
        for error in errors:
            log.warning("TokenFlow: cleaning up a ControlNet copy failed after an earlier error: %r", error)

    # -- conditioning subsets --------------------------------------------------------------
    def _subset_control(self, control, idx: torch.Tensor, n_frames: int, memo: dict):
        # One copy per original object and subset, so conds that shared a ControlNet (positive and
        # negative from Apply ControlNet) still share it and ComfyUI can batch them together.
        if id(control) in memo:
            return memo[id(control)]
        copy = control.copy()
        memo[id(control)] = copy
        if control.previous_controlnet is not None:
            copy.set_previous_controlnet(self._subset_control(control.previous_controlnet, idx, n_frames, memo))
        hint = getattr(control, "cond_hint_original", None)
        if isinstance(hint, torch.Tensor):
            check_hint_count(hint, n_frames, "conditioning")
            copy.cond_hint_original = _slice_frames(hint, idx, n_frames)
        copy.extra_concat_orig = [_slice_frames(c, idx, n_frames) for c in getattr(control, "extra_concat_orig", [])]
        sampling = self.inner_model.model_sampling
        copy.pre_run(self.inner_model, lambda a: sampling.percent_to_sigma(a))
        self._control_copies.append(copy)
        return copy

    def _subset_cond(self, cond: dict, idx: torch.Tensor, n_frames: int, memo: dict) -> dict:
        out = cond.copy()
        for key, value in cond.items():
            if isinstance(value, torch.Tensor):
                out[key] = _slice_frames(value, idx, n_frames)
            elif key == "control" and value is not None:
                out[key] = self._subset_control(value, idx, n_frames, memo)
            elif key == "model_conds":
                sliced = {}
                for name, item in value.items():
                    tensor = getattr(item, "cond", None)
                    if isinstance(tensor, torch.Tensor) and n_frames > 1 and tensor.shape[0] == n_frames:
                        sliced[name] = item._copy_with(frames_of(tensor, idx))
                    else:
                        sliced[name] = item
                out[key] = sliced
        return out

    def conds_for(self, name: str, idx: torch.Tensor, n_frames: int, cache: bool, memo: dict) -> list[dict] | None:
        """The processed conds ``name`` restricted to frames ``idx`` (cached for recurring subsets)."""
        conds = self.conds.get(name)
        if conds is None:
            return None
        key = (id(conds), tuple(idx) if isinstance(idx, range) else tuple(idx.tolist()), n_frames)
        if key in self._subset_cache:
            return self._subset_cache[key]
        subset = [self._subset_cond(c, idx, n_frames, memo) for c in conds]
        if cache:
            self._subset_cache[key] = subset
        return subset

    # -- model calls -----------------------------------------------------------------------
    def pass_options(self, model_options: dict, context: PassContext | None) -> dict:
        """A copy of ``model_options`` for calls on a frame subset, carrying ``context`` (and the clone's settings)."""
        options = comfy.model_patcher.create_model_options_clone(model_options)
        options.pop("context_handler", None)  # TokenFlow does its own frame batching
        if context is not None:
            context.clone_settings = model_options.get(KEY)  # the patched clone's, for the per-call wrappers
            transformer_options = options.setdefault("transformer_options", {})
            context.base_attn1 = transformer_options.get("patches_replace", {}).get("attn1", {})
            transformer_options[KEY] = context
        return options

    def calc_on_frames(self, names: list[str | None], x: torch.Tensor, timestep: torch.Tensor, idx: range | torch.Tensor,
                       model_options: dict, context: PassContext | None, n_frames: int, cache: bool = True,
                       calc: Callable | None = None) -> list[torch.Tensor]:
        """Denoised predictions for conds ``names`` on frames ``idx`` of ``x`` (already subset by the caller or not).

        ``calc``: a ``sampler_calc_cond_batch_function`` (e.g. SkipLayerGuidanceDiTSimple's) to run the conds with,
        given the arguments the host's ``sampling_function`` gives it, instead of ``calc_cond_batch``."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        options = self.pass_options(model_options, context)
        memo: dict = {}
        try:
            conds = [self.conds_for(name, idx, n_frames, cache, memo) if name else None for name in names]
            x_sub, t_sub = frames_of(x, idx), frames_of(timestep, idx)
            if calc is not None:
                return calc({"conds": conds, "input": x_sub, "sigma": t_sub, "model": self.inner_model,
                             "model_options": options})
            return comfy.samplers.calc_cond_batch(self.inner_model, conds, x_sub, t_sub, options)
        finally:
            if not cache and memo:  # a subset used once (a step's keyframes): its ControlNet copies go now
                made = {id(copy) for copy in memo.values()}
                self._control_copies[:] = [c for c in self._control_copies if id(c) not in made]
                # Dropped either way; a failing cleanup is logged, never raised over the pass's own result or error.
                self._clean_controls(list(memo.values()), raise_errors=False)

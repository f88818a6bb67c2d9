"""The TokenFlow editing step inside ComfyUI's sampler, shared by both sampling rules (the official
run_tokenflow_pnp.py / run_tokenflow_sdedit.py ``batched_denoise_step``).

``TokenFlowGuider.predict_noise`` is called once per step with the whole clip and runs it as few, large
model calls: the keyframe pass (source, uncond and cond branches of every keyframe in one call) and the
propagation pass (the three branches of every frame, as many frames per call as the device's memory
allows; B only decides which keyframes a frame blends). What the source branch must do at a step comes
from the editor's :class:`StepNeeds`. A sampling rule (``ddpm/edit.py``, ``flow/edit.py``) says what the
source branch's input is at a step and brings its sampler.
"""
from __future__ import annotations

import logging
import math

import torch

import comfy.samplers
import comfy.utils

from ...data.products import TokenFlowInversion
from ..patches.bank_transfer import HostBank
from ..patches.contract import KEY, PassContext, Phase, SourceBranchMissing, StepBank, to_device
from ..plan.call_sizing import even_chunks
from ..plan.edit_plan import EditPlan
from ..plan.memory_plan import (HOST, MemoryRecord, StepShape, attention_sizes, compute_dtype, extra_load_images,
                                plan_step, publish_record, text_tokens_of, tokenflow_bytes, widest_step)
from .cfg_hooks import apply_cfg, guidance_banks
from .frame_guider import FrameSubsetGuider, frame_ids, frames_of

SOURCE = "tokenflow_source"  # the source branch's conds: the inversion prompt

log = logging.getLogger(__name__)


class TokenFlowGuider(FrameSubsetGuider):
    """CFG guider whose every model evaluation is one TokenFlow step over the whole clip."""

    def __init__(self, model_patcher, inversion: TokenFlowInversion, plan: EditPlan, sigmas: torch.Tensor) -> None:
        super().__init__(model_patcher)
        self.inversion = inversion
        self.plan = plan
        self.step_sigmas = sigmas[:-1].double()
        self.skip_unused_source = True  # a source-only call that just feeds the PnP residuals stops after them
        self.progress = comfy.utils.ProgressBar(len(plan.timesteps) * inversion.n_frames)
        self.trace: list[tuple] | None = None  # set to [] to log (timestep, kind, where, phase) of PnP injections
        self.text_tokens = 0  # the longest prompt's tokens (a DiT's joint attention spans them), set by ``edit``
        self.source_apart = False  # set once the host ran an edit branch of a shared call before the source branch
        self.memory_record = MemoryRecord()  # what the planner chose and moved, per step
        self.host_bank: HostBank | None = None  # the bank's host side and device buffers, when a step needs them
        self._sizes: dict[tuple, tuple] = {}  # the patched attentions' sizes per latent shape and text length

    def largest_call_images(self, n_frames: int) -> int:
        """The keyframe pass: every keyframe in one call (extended attention), in each edit branch and the source's."""
        keyframes = max((len(k) for k in self.plan.schedule.keyframes), default=1)
        branches = 1 if math.isclose(self.cfg, 1.0) else 2
        source = any(needs.source_in_keyframe_pass(self.plan.on_the_fly) for needs in self.plan.needs)
        return keyframes * (branches + source)

    def extra_call_images(self, latent_shape: tuple[int, ...]) -> int:
        """The keyframe pass's joint keys/values, PnP store and host-bank buffers, as images of the host's estimate:
        the load leaves room for them (the bank itself goes on the device only where it fits after loading)."""
        shape = widest_step(self.plan, 1 if math.isclose(self.cfg, 1.0) else 2)
        return extra_load_images(self.model_patcher.model, self._tokenflow_bytes(shape, latent_shape), latent_shape)

    def _tokenflow_bytes(self, shape: StepShape, latent_shape: tuple[int, ...]):
        layout = self.model_patcher.model_options[KEY].layout
        key = (latent_shape, self.text_tokens)
        if key not in self._sizes:  # read off the model once per run
            self._sizes[key] = attention_sizes(self.model_patcher, layout, latent_shape, self.text_tokens)
        sizes = self._sizes[key]
        element = torch.empty((), dtype=compute_dtype(self.model_patcher.model)).element_size()
        return tokenflow_bytes(sizes, shape, layout.sampling, element)

    def _field_provider(self, step: int):
        corr = self.plan.correspondences
        if corr is None:
            return None
        row = corr.timesteps.index(self.plan.timesteps[step])
        return lambda block, frames: corr.fields_at(row, block, frames)

    def source_latents(self, step: int) -> torch.Tensor:
        """The source branch's model input at ``step``, by the sampling rule (``ddpm/edit.py``, ``flow/edit.py``)."""
        raise NotImplementedError

    def edit(self, positive, negative, latent_image: torch.Tensor, sampler, sigmas: torch.Tensor, callback, seed: int,
             trace: list | None) -> torch.Tensor:
        """Sample the edit from ``latent_image`` with the rule's ``sampler``; ``trace`` (a list) receives
        (timestep, kind, where, phase) for every PnP injection."""
        self.trace = trace
        self.text_tokens = text_tokens_of(positive, negative, self.inversion.conditioning)
        self.inner_set_conds({"positive": positive, "negative": negative, SOURCE: self.inversion.conditioning})
        try:
            return self.sample(torch.zeros_like(latent_image), latent_image, sampler, sigmas, callback=callback,
                               seed=seed, disable_pbar=True)
        finally:
            if self.host_bank is not None:
                self.host_bank.release()
                self.host_bank = None
            publish_record(self.memory_record)
            self.memory_record.log()

    def _source_shares_calls(self, edit_names: list[str | None], x: torch.Tensor, timestep: torch.Tensor) -> bool:
        """Whether calc_cond_batch runs the source branch in its first model call, i.e. before any edit cond.

        Mirrors calc_cond_batch on the conds as the host processes them at this step
        (``comfy.samplers.get_area_and_mult``: timestep ranges drop conds, GLIGEN adds a patch of its own, a mask or
        an area changes the input): it groups conds by hooks, in order, and its first call holds the conds that
        ``comfy.samplers.can_concat_cond`` (input shape, ControlNet and patch identity, model conds) lets it batch
        with the first one. The source, listed last, is in that call only if every source cond is. Otherwise the
        source branch gets calls of its own, first. One frame stands for all: processing repeats every cond to the
        call's batch, so what batches does not depend on which frames a call holds.
        """
        x1, t1 = x[:1], timestep[:1]
        processed = []
        for name in [name for name in edit_names if name] + [SOURCE]:
            for cond in self.conds.get(name) or []:
                if "default" in cond:  # run after every other cond (finalize_default_conds)
                    if name == SOURCE:
                        return False
                    continue
                p = comfy.samplers.get_area_and_mult(cond, x1, t1)
                if p is not None:
                    processed.append((name, p))
        sources = [p for name, p in processed if name == SOURCE]
        if not sources:
            return False
        first = processed[0][1]
        return all(p.hooks == first.hooks and comfy.samplers.can_concat_cond(p, first) for p in sources)

    def _run_pass(self, phase: Phase, idx: range | torch.Tensor, x, source, edit_names, timestep, model_options,
                  common, n: int, separate_source: bool, stop_source_early: bool = False) -> list[torch.Tensor]:
        """One pass over frames ``idx``: the source branch with the edit branches, or before them. A
        ``sampler_calc_cond_batch_function`` runs the edit branches' calls (then never shared with the source)."""
        ids = frame_ids(idx)
        cache = phase is Phase.FRAMES  # propagation subsets recur every step; keyframe subsets do not
        calc = model_options.get("sampler_calc_cond_batch_function")
        if source is None:
            return self.calc_on_frames(edit_names, x, timestep, idx, model_options,
                                       PassContext(phase, frames=ids, **common), n, cache=cache, calc=calc)
        if separate_source:
            self.calc_on_frames([SOURCE], source, timestep, idx, model_options,
                                PassContext(phase, frames=ids, source_index=0, stop_after_residuals=stop_source_early,
                                            **common), n, cache=cache)
            return self.calc_on_frames(edit_names, x, timestep, idx, model_options,
                                       PassContext(phase, frames=ids, **common), n, cache=cache, calc=calc)
        # Listed LAST: short of memory, calc_cond_batch runs a call's conds in parts, last listed first
        # (it reverses the batchable list), so the source branch still runs before the edit branches.
        names = edit_names + [SOURCE]
        ctx = PassContext(phase, frames=ids, source_index=len(edit_names), source_input=frames_of(source, idx),
                          **common)
        bank = common["bank"]
        traced = len(bank.trace) if bank.trace is not None else 0
        try:
            return self.calc_on_frames(names, x, timestep, idx, model_options, ctx, n, cache=cache)[:-1]
        except SourceBranchMissing as error:
            # The host split the call and ran an edit branch first: what that part recorded is dropped, the source
            # branch runs in calls of its own first (from now on), and the pass again (same arithmetic per branch).
            log.info("TokenFlow: %s; ComfyUI split a shared call, so the source branch now runs in calls of its own",
                     error)
            self.source_apart = True
            if bank.trace is not None:
                del bank.trace[traced:]
            if phase is Phase.KEYFRAMES:
                bank.keyframe_outputs.clear()
                bank.keyframe_tokens.clear()
                bank.pnp_qk.clear()
            bank.fields.clear()
            bank.residuals.clear()
            return self._run_pass(phase, idx, x, source, edit_names, timestep, model_options, common, n,
                                  separate_source=True)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        step = self.current_step
        t = self.plan.timesteps[step]
        needs = self.plan.needs[step]
        on_the_fly = self.plan.on_the_fly
        n, latent_shape = x.shape[0], tuple(x.shape[1:])
        keyframes = self.plan.schedule.keyframes[step]
        edit_names = ["positive", "negative"]
        if math.isclose(self.cfg, 1.0) and not model_options.get("disable_cfg1_optimization", False):
            edit_names = ["positive", None]
        branches = sum(1 for name in edit_names if name)
        source = None
        if needs.source_in_keyframe_pass(on_the_fly):
            source = to_device(self.source_latents(step), x.device, x.dtype)
        # A calc_cond_batch function is handed the edit branches' conds alone: the source gets calls of its own.
        calc_function = "sampler_calc_cond_batch_function" in model_options
        own_calls = source is not None and (calc_function or self.source_apart
                                            or not self._source_shares_calls(edit_names, x, timestep))
        frame_source = source if needs.source_in_propagation(on_the_fly) else None
        separate = frame_source is not None and (own_calls or needs.source_stops_early(on_the_fly))
        shape = StepShape(len(keyframes), branches, source is not None, on_the_fly,
                          frozenset(needs.attention_injection))
        memory = plan_step(self.inner_model, self._tokenflow_bytes(shape, latent_shape), shape, latent_shape, x.device,
                           n, branches + (frame_source is not None and not separate))
        if memory.placement == HOST and self.host_bank is None:
            self.host_bank = HostBank(x.device)
        bank = StepBank(trace=[] if self.trace is not None else None,
                        host=self.host_bank if memory.placement == HOST else None)
        common = dict(bank=bank, pairing=self.plan.schedule.pairing(step, n), pnp_attention=needs.attention_injection,
                      pnp_tensors=dict(needs.attention_tensors), pnp_residual=needs.residual_injection, field_provider=self._field_provider(step),
                      field_blocks=tuple(self.plan.correspondences.fields) if not on_the_fly else (),
                      keyframes=len(keyframes))
        out = torch.empty_like(x)
        guides = guidance_banks(model_options, bank)
        try:
            # Keyframe pass: it cannot be split by frames (extended attention spans every keyframe).
            keyframe_preds = self._run_pass(Phase.KEYFRAMES, keyframes, x, source, edit_names, timestep, model_options,
                                            common, n, separate_source=own_calls or not memory.shared_keyframe_call)
            if guides:  # the post-CFG functions' own keyframe passes, recorded in their banks (the CFG is unused)
                self._combine(keyframe_preds, x, timestep, keyframes, model_options, edit_names, Phase.KEYFRAMES,
                              guides, common, cache=False)
            bank.pnp_qk.clear()  # only the keyframe pass computes (and injects into) self-attention
            # Propagation pass: every frame, as many per call as memory allows.
            separate = separate or (frame_source is not None and self.source_apart)
            per_call = memory.frames_per_call
            stop_early = self.skip_unused_source and needs.source_stops_early(on_the_fly)
            for frames in even_chunks(n, per_call):
                bank.fields.clear()
                bank.residuals.clear()
                preds = self._run_pass(Phase.FRAMES, frames, x, frame_source, edit_names, timestep, model_options,
                                       common, n, separate_source=separate, stop_source_early=stop_early)
                out[frames.start:frames.stop] = self._combine(preds, x, timestep, frames, model_options, edit_names,
                                                              Phase.FRAMES, guides, common)
                self.progress.update(len(frames))
        finally:
            if self.trace is not None:
                self.trace.extend((t, *event) for event in bank.trace)
            record = self.memory_record
            record.placements.append(memory.placement)
            record.bank_bytes.append(memory.bytes.bank)
            record.transfer_bytes.append(bank.host.finish_step() if bank.host is not None else 0)
            bank.clear()
            for guide in guides:
                guide.clear()
        return out

    def _combine(self, preds: list[torch.Tensor], x, timestep, idx, model_options, edit_names, phase: Phase,
                 guides: list[StepBank], common: dict, cache: bool = True) -> torch.Tensor:
        """The CFG of frames ``idx`` (:func:`.cfg_hooks.apply_cfg`): the hooks get these frames' own conds, and each
        post-CFG function's model calls are a ``phase`` pass on its bank in ``guides``."""
        memo: dict = {}
        cond, uncond = (self.conds_for(name, idx, x.shape[0], cache, memo) if name else None for name in edit_names)
        ids = frame_ids(idx)
        post = [self.pass_options(model_options, PassContext(phase, frames=ids, **{**common, "bank": guide}))
                for guide in guides]
        hooks = model_options
        if phase is Phase.KEYFRAMES:  # only the post-CFG functions' model calls count here: a stateful pre-CFG
            hooks = {**model_options, "sampler_pre_cfg_function": []}  # hook (a momentum) sees each frame once a step
        return apply_cfg(self.inner_model, preds, cond, uncond, self.cfg, frames_of(x, idx), frames_of(timestep, idx),
                         hooks, post)

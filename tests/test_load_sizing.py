"""ComfyUI sizes a model's load for the whole latent batch it is handed (``estimate_memory``: every frame, twice
for CFG) and loads the weights partly when that does not fit. TokenFlow hands the whole clip to the sampler but
runs calls of a few frames, split to what fits after loading, so its guiders size the load for the largest call
they cannot split (a ``PREPARE_SAMPLING`` wrapper, as core context windows do): the keyframe pass of an edit or
an extraction, one frame_batch of an inversion."""
from __future__ import annotations

import pytest

import comfy.patcher_extension
import comfy.sampler_helpers
from comfyui_tokenflow.engine.patches.contract import KEY
from tokenflow_helpers import conds, edit, extract, invert, random_latent

N = 8  # batch_size 4: 2 keyframes per step


@pytest.fixture
def estimated(monkeypatch):
    """The batch sizes ComfyUI's load estimate is asked for, in order."""
    seen: list[int] = []
    estimate = comfy.sampler_helpers.estimate_memory

    def recording(model, noise_shape, conds_):
        seen.append(int(noise_shape[0]))
        return estimate(model, noise_shape, conds_)

    monkeypatch.setattr(comfy.sampler_helpers, "estimate_memory", recording)
    return seen


def test_each_phase_sizes_the_load_for_its_largest_call(tiny_sd15, estimated):
    src, pos, neg = conds(tiny_sd15)
    inversion = invert(tiny_sd15, random_latent(N, seed=3), src)
    assert estimated == [2], "inversion: frame_batch 4 images (the host counts 2 per frame)"
    estimated.clear()
    corr = extract(tiny_sd15, inversion, batch_size=4)
    assert estimated == [1], "extraction: the keyframe pass holds 2 images (the host counts 2 per frame)"
    estimated.clear()
    edit(tiny_sd15, pos, neg, inversion, batch_size=4)  # PnP on the fly, cfg above 1: 2 keyframes x 3 branches
    edit(tiny_sd15, pos, neg, inversion, batch_size=4, correspondences=corr, editor="sdedit")  # no source: x 2
    assert estimated == [3, 2]


def test_the_wrapper_lives_only_in_the_run(tiny_sd15, estimated):
    """Added to the run's own copy of the model options: the patched model keeps no wrapper of the pack's."""
    src, pos, neg = conds(tiny_sd15)
    inversion = invert(tiny_sd15, random_latent(2, seed=3), src)
    edit(tiny_sd15, pos, neg, inversion, batch_size=4)
    assert not comfy.patcher_extension.get_wrappers_with_key(
        comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, KEY, tiny_sd15.model_options, is_model_options=True)
    assert estimated and all(shape <= 2 for shape in estimated)

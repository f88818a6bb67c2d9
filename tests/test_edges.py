"""Edges a user meets in the engine: short clips, where the keyframe plan comes from, editors without
their conditioning, and that a refused run leaves the next run exactly as a clean one."""
from __future__ import annotations

import logging

import pytest
import torch

import node_helpers
from tokenflow_helpers import conds, edit, extract, invert, random_latent


@pytest.fixture(scope="module")
def prompts(tiny_sd15):
    return conds(tiny_sd15)


@pytest.mark.parametrize("n", [1, 3, 5])
def test_a_clip_shorter_than_batch_size_is_edited_as_one_batch(tiny_sd15, prompts, n, caplog):
    src, pos, neg = prompts
    inversion = invert(tiny_sd15, random_latent(n, seed=n), src)
    with caplog.at_level(logging.WARNING):
        clamped = edit(tiny_sd15, pos, neg, inversion, batch_size=8)
    assert f"batch_size 8 is larger than the clip ({n} frames); using {n}" in caplog.text
    assert torch.equal(clamped, edit(tiny_sd15, pos, neg, inversion, batch_size=n))
    corr = extract(tiny_sd15, inversion, batch_size=8)  # the extraction clamps the same way
    assert corr.group_size == n and corr.keyframes.shape[1] == 1


def test_the_keyframe_plan_used_is_logged_and_comes_from_the_correspondences(tiny_sd15, prompts, caplog):
    src, pos, neg = prompts
    inversion = invert(tiny_sd15, random_latent(6, seed=1), src)
    corr = extract(tiny_sd15, inversion, batch_size=3, seed=5)
    with caplog.at_level(logging.INFO):
        with_corr = edit(tiny_sd15, pos, neg, inversion, correspondences=corr, batch_size=2, seed=9)
    assert "keyframe plan from the correspondences: groups of 3 frames, 2 keyframes per step" in caplog.text
    assert "batch_size, keyframes, seed, blend and max_keyframes are not used" in caplog.text
    # the sampler's own batch_size/seed changed nothing
    assert torch.equal(with_corr, edit(tiny_sd15, pos, neg, inversion, correspondences=corr, batch_size=3, seed=5))


def test_controlnet_editor_without_a_controlnet_warns(tiny_sd15, prompts, caplog):
    src, pos, neg = prompts
    inversion = invert(tiny_sd15, random_latent(2), src)
    with caplog.at_level(logging.WARNING):
        edit(tiny_sd15, pos, neg, inversion, editor="controlnet", steps=1)
    assert "editor 'controlnet'" in caplog.text and "neither positive nor negative has one" in caplog.text


def test_a_refused_run_leaves_the_next_run_identical_to_a_clean_one(tiny_sd15, prompts):
    src, pos, neg = prompts
    inversion = invert(tiny_sd15, random_latent(4, seed=3), src)
    clean = edit(tiny_sd15, pos, neg, inversion)
    area = node_helpers.conditioning_set_values(pos, {"area": (4, 4, 0, 0), "strength": 1.0,
                                                      "set_area_to_bounds": False})
    with pytest.raises(ValueError, match="Conditioning Set Area"):
        edit(tiny_sd15, area, neg, inversion)
    assert torch.equal(edit(tiny_sd15, pos, neg, inversion), clean)


def test_auto_keyframe_cap_keeps_the_official_plan_up_to_64_frames():
    from comfyui_tokenflow.tokenflow_ops.keyframes import auto_max_keyframes, spread_keyframe_groups

    assert [spread_keyframe_groups(n, 8, 0) for n in (8, 40, 64)] == [8, 8, 8]
    assert spread_keyframe_groups(120, 8, 0) == 8  # 15 keyframes: under the cap
    assert spread_keyframe_groups(240, 8, 0) == 15 and auto_max_keyframes(240) == 16
    assert spread_keyframe_groups(1000, 8, 0) == 63  # 16 keyframes
    assert spread_keyframe_groups(1000, 8, -1) == 8  # -1: never capped
    assert spread_keyframe_groups(240, 8, 4) == 60

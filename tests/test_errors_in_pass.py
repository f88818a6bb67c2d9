"""An error inside a pass (a ControlNet failing in ``get_control``, a user model patch failing at the second
step) surfaces as itself, not as a cleanup error, and cleanup still happens: the next run is bit-identical.
"""
from __future__ import annotations

import logging

import pytest
import torch

from reliability_tools import STAGES, UNetCalls, assert_clean, assert_same_result, model_state, run_controlled_edit
from tokenflow_helpers import STEPS


@pytest.mark.parametrize("cleanup_fails", [False, True], ids=["error", "error-and-failing-cleanup"])
def test_controlnet_error_inside_a_pass_surfaces_and_everything_is_cleaned(tiny_sd15, clip, clean, cleanup_fails,
                                                                            caplog):
    model = tiny_sd15.clone()
    state = model_state(model)
    control = clip["control"]
    control.get_control_calls = 0
    run_controlled_edit(model, clip)
    per_step = control.get_control_calls // STEPS
    copies_before = len(control.copies)
    control.get_control_calls, control.fail_at, control.fail_cleanup = 0, per_step + 1, cleanup_fails  # 2nd step
    try:
        with UNetCalls(model) as calls, caplog.at_level(logging.WARNING):
            with pytest.raises(RuntimeError) as raised:
                run_controlled_edit(model, clip)
    finally:
        control.fail_at, control.fail_cleanup = None, False
    assert type(raised.value) is RuntimeError and str(raised.value) == "ControlNet failed inside get_control"
    assert control.get_control_calls == per_step + 1, "the failure did not happen at the second step"
    if cleanup_fails:
        assert any("cleaning up a ControlNet copy failed" in r.getMessage() for r in caplog.records)
    assert_clean(model, state, calls, control, copies_before)
    with UNetCalls(model) as rerun_calls:
        assert torch.equal(run_controlled_edit(model, clip), clean["sampling"])
    assert_clean(model, state, rerun_calls)


class PatchFailure(Exception):
    pass


@pytest.mark.parametrize("stage", list(STAGES))
def test_model_patch_error_at_the_second_step_surfaces_and_everything_is_cleaned(tiny_sd15, clip, clean, stage):
    sigmas_seen: list[float] = []

    def failing_patch(n, extra):
        sigma = float(extra["sigmas"].flatten()[0])
        if sigma not in sigmas_seen:
            sigmas_seen.append(sigma)
        if len(sigmas_seen) == 2:
            raise PatchFailure(f"user patch failed at sigma {sigma:.4f}")
        return n

    patched = tiny_sd15.clone()
    patched.set_model_attn1_output_patch(failing_patch)
    state = model_state(patched)
    with UNetCalls(patched) as calls:
        with pytest.raises(PatchFailure, match=r"^user patch failed at sigma \d"):
            STAGES[stage](patched, clip)
    assert len(sigmas_seen) == 2
    assert_clean(patched, state, calls)
    if stage != "inversion":
        assert calls.banks, "no StepBank was seen: the failure happened outside the TokenFlow passes"
    with UNetCalls(tiny_sd15) as rerun_calls:
        again = STAGES[stage](tiny_sd15, clip)
    assert_same_result(stage, clean[stage], again)
    assert_clean(tiny_sd15, model_state(tiny_sd15), rerun_calls)

"""ComfyUI's interrupt stops inversion, extraction and sampling within one batch; nothing is left on the model
and the next run is bit-identical to a clean one.
"""
from __future__ import annotations

import pytest

import comfy.model_management
from reliability_tools import STAGES, ProgressHook, UNetCalls, assert_clean, assert_same_result, model_state

Interrupted = comfy.model_management.InterruptProcessingException


def _interrupt() -> None:
    comfy.model_management.interrupt_current_processing(True)


# UNet calls of one batch: an inversion or extraction batch is one call, a sampling batch two (source, edit).
BATCH_CALLS = {"inversion": 1, "extraction": 1, "sampling": 2}


@pytest.mark.parametrize("trigger", ["progress", "unet-call"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_interrupt_stops_within_a_batch_and_leaves_nothing_behind(tiny_sd15, clip, clean, stage, trigger):
    model = tiny_sd15.clone()
    state = model_state(model)
    control = clip["control"]
    copies_before = len(control.copies)
    flagged_at: list[int] = []

    def set_flag_once(calls_so_far: int) -> None:
        if not flagged_at:
            flagged_at.append(calls_so_far)
            _interrupt()

    # "progress": after the first step (inversion) or batch (extraction, sampling) reports progress;
    # "unet-call": from inside the 3rd UNet call, in the middle of a step.
    on_call = (lambda i: set_flag_once(i) if i == 3 else None) if trigger == "unet-call" else None
    on_progress = (lambda *a, **k: set_flag_once(calls.count)) if trigger == "progress" else None
    try:
        with UNetCalls(model, on_call=on_call) as calls, ProgressHook(on_progress):
            with pytest.raises(Interrupted):
                STAGES[stage](model, clip)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert flagged_at, "the interrupt was never triggered"
    after = calls.count - flagged_at[0]
    assert after <= BATCH_CALLS[stage], f"{after} UNet calls started after the interrupt"
    assert_clean(model, state, calls, control if stage == "sampling" else None, copies_before)
    with UNetCalls(model) as rerun_calls:
        again = STAGES[stage](model, clip)
    assert_same_result(stage, clean[stage], again)
    assert_clean(model, state, rerun_calls)


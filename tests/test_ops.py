"""Pure-torch TokenFlow ops (schedule, DDIM inversion, keyframes, correspondences, propagation, extended
attention) against brute-force restatements."""
from __future__ import annotations

import pytest
import torch

from comfyui_tokenflow.tokenflow_ops import attention, correspondence, keyframes, propagation, schedule


def test_editing_timesteps_are_the_official_leading_grid():
    ts = schedule.editing_timesteps(50)
    assert ts[:3] == [981, 961, 941] and ts[-1] == 1 and len(ts) == 50
    assert schedule.inversion_timesteps(500)[:3] == [1, 3, 5] and schedule.inversion_timesteps(500)[-1] == 999
    assert set(ts) <= set(schedule.inversion_timesteps(500))
    sd = schedule.sdedit_timesteps(50, 0.9)
    assert len(sd) == 44 and sd[0] == 861 and sd[-1] == 1


def test_inversion_steps_must_cover_editing_steps():
    schedule.check_inversion_covers(50, 500)
    with pytest.raises(ValueError, match=r"steps \(50\) and inversion_steps \(120\) do not fit together"):
        schedule.check_inversion_covers(50, 120)


def test_keyframe_plan_matches_official_draws_and_is_reproducible():
    plan = keyframes.keyframe_plan(40, 8, 3, seed=1, mode="random")
    torch.manual_seed(1)
    for step in range(3):  # the official: torch.randint(B, (n // B,)) + torch.arange(0, n, B)
        expected = torch.randint(8, (5,)) + torch.arange(0, 40, 8)
        assert torch.equal(plan[step], expected)
    assert torch.equal(plan, keyframes.keyframe_plan(40, 8, 3, seed=1, mode="random"))
    fixed = keyframes.keyframe_plan(10, 4, 2, seed=0, mode="fixed")
    assert fixed.tolist() == [[2, 6, 9]] * 2


@pytest.mark.parametrize("n", [1, 2, 7, 9, 17])
def test_keyframe_plan_short_last_batch_stays_inside_it(n):
    plan = keyframes.keyframe_plan(n, 8, 20, seed=3)
    for b, frames in enumerate(keyframes.batch_ranges(n, 8)):
        assert all(k in frames for k in plan[:, b].tolist())


def test_official_pairing_weights():
    pairing = keyframes.official_pairing(24, 8)
    assert pairing.slots[:8].tolist() == [[0, 0]] * 8 and (pairing.weights[:8, 1] == 0).all()
    i = 10  # batch 1: centres c1 = 12, c0 = 4
    w = torch.sigmoid(torch.tensor(6 / (2 + 6)))
    assert pairing.slots[i].tolist() == [1, 0]
    assert torch.allclose(pairing.weights[i], torch.stack([w, 1 - w]))  # same float32 sigmoid: observed exactly equal


def test_paper_pairing_uses_neighbouring_keyframes_linearly():
    pairing = keyframes.paper_pairing(torch.tensor([2, 10]), 12)
    assert pairing.slots[6].tolist() == [0, 1] and torch.allclose(pairing.weights[6], torch.tensor([0.5, 0.5]))
    assert pairing.slots[0].tolist() == [0, 0] and pairing.weights[0].tolist() == [1.0, 0.0]
    assert pairing.weights[10].tolist() == [1.0, 0.0] and pairing.slots[11].tolist() == [1, 1]


def _float32_dot_bound(dim: int) -> float:
    """Worst-case float32 error of a cosine similarity: a dim-term dot product of unit vectors plus their
    normalisation, (dim + 4) unit roundoffs (Higham's gamma bound)."""
    return (dim + 4) * torch.finfo(torch.float32).eps / 2


def _assert_clear_margins(q, k):
    """No nearest-neighbour decision of q against k is a near-tie: two computations of the similarities, each
    within the worst-case bound, cannot pick different tokens when the top-1/top-2 margin exceeds twice the
    bound; 10 x that is asked (measured: >= 95 x)."""
    sim = torch.nn.functional.normalize(q.double(), dim=-1) @ torch.nn.functional.normalize(k.double(), dim=-1).T
    top = sim.topk(2, dim=-1).values
    margin = (top[:, 0] - top[:, 1]).min().item()
    assert margin > 10 * 2 * _float32_dot_bound(q.shape[-1]), f"near-tie: margin {margin:.3g}; choose another seed"


def _brute_nn(q, k):
    _assert_clear_margins(q, k)
    sim = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).T
    return sim.argmax(-1)


def test_frame_fields_and_propagation_equal_brute_force():
    g = torch.Generator().manual_seed(1)
    n, tokens, dim = 11, 20, 8
    frames = torch.randn(n, tokens, dim, generator=g)
    plan = keyframes.keyframe_plan(n, 4, 1, seed=0)[0]
    pairing = keyframes.official_pairing(n, 4)
    key_tokens = frames[plan]
    ids = torch.arange(3, 9)
    fields = correspondence.frame_fields(frames[ids], ids, key_tokens, pairing, max_elements=64)
    branches = 3  # e.g. source, uncond, cond: one gather for all of them
    values = torch.randn(branches * len(plan), tokens, 5, generator=g)
    base = propagation.gather_base(torch.arange(branches) * len(plan), pairing.slots[ids], tokens)
    out = propagation.propagate(values, fields, base, propagation.blend_weights(pairing.weights[ids], values.dtype))
    assert out.shape == (branches, len(ids), tokens, 5)
    for row, i in enumerate(ids.tolist()):
        a, b = pairing.slots[i].tolist()
        f0, f1 = _brute_nn(frames[i], key_tokens[a]), _brute_nn(frames[i], key_tokens[b])
        assert torch.equal(fields[row, 0], f0) and torch.equal(fields[row, 1], f1)
        w0, w1 = pairing.weights[i]
        for branch in range(branches):
            kv = values[branch * len(plan):(branch + 1) * len(plan)]
            expected = kv[a][f0] if w1 == 0 else w0 * kv[a][f0] + w1 * kv[b][f1]
            assert torch.allclose(out[branch, row], expected, atol=1e-6)  # float32 w0*a + w1*b, same order: observed 0


@pytest.mark.parametrize("budget", [20, 50, 20 * 20, 3 * 20 * 20, 1 << 20])  # one token row ... everything at once
def test_frame_field_search_is_batched_within_the_budget(monkeypatch, budget):
    g = torch.Generator().manual_seed(4)
    n, tokens, dim = 9, 20, 8
    frames = torch.randn(n, tokens, dim, generator=g)
    plan = keyframes.keyframe_plan(n, 3, 1, seed=0)[0]
    pairing = keyframes.official_pairing(n, 3)
    expected = correspondence.frame_fields(frames, torch.arange(n), frames[plan], pairing, max_elements=1 << 30)
    for i in range(n):  # every chunking must give the same argmax: only if no decision is a near-tie
        for slot in set(pairing.slots[i].tolist()):
            if plan[slot] != i:  # a keyframe matches itself with similarity 1
                _assert_clear_margins(frames[i], frames[plan[slot]])
    sizes = []
    real_matmul, real_bmm = torch.Tensor.__matmul__, torch.bmm

    def spy(real):
        def counted(a, b):
            out = real(a, b)
            sizes.append(out.numel())
            return out
        return counted

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy(real_matmul))
    monkeypatch.setattr(torch, "bmm", spy(real_bmm))
    fields = correspondence.frame_fields(frames, torch.arange(n), frames[plan], pairing, max_elements=budget)
    assert torch.equal(fields, expected)
    pairs = n + int((pairing.slots[:, 0] != pairing.slots[:, 1]).sum())  # a frame with one keyframe: one search
    assert max(sizes) <= budget and sum(sizes) == pairs * tokens * tokens
    if budget >= 3 * tokens * tokens:
        assert len(sizes) <= -(-pairs // 3), "each matmul should cover several frames"


def test_keyframe_tokens_match_themselves():
    frames = torch.randn(8, 30, 16)
    pairing = keyframes.official_pairing(8, 8)
    fields = correspondence.frame_fields(frames, torch.arange(8), frames[[5]], pairing)
    assert torch.equal(fields[5, 0], torch.arange(30))


def _brute_extended(q, k, v, heads):
    kk, n, inner = q.shape
    d = inner // heads
    outs = []
    for i in range(kk):  # the official way: every keyframe gets a copy of all keyframes' keys
        keys, vals = k.reshape(1, -1, inner)[0], v.reshape(1, -1, inner)[0]
        qh = q[i].view(n, heads, d).transpose(0, 1)
        kh, vh = keys.view(-1, heads, d).transpose(0, 1), vals.view(-1, heads, d).transpose(0, 1)
        att = (qh @ kh.transpose(-1, -2) * d ** -0.5).softmax(-1) @ vh
        outs.append(att.transpose(0, 1).reshape(n, inner))
    return torch.stack(outs)


@pytest.mark.parametrize("frames", [1, 3])
def test_extended_attention_equals_concatenated_keys(frames):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(frames, 12, 16, generator=g) for _ in range(3))
    out = attention.extended_attention(q, k, v, heads=2)
    # float32 fused SDPA vs a matmul-softmax restatement: a few ulp of O(1) values (observed <= 0.02 of the bound)
    assert torch.allclose(out, _brute_extended(q, k, v, 2), atol=1e-5)
    if frames == 1:
        assert torch.allclose(out, attention.sdpa_attention(q, k, v, 2), atol=1e-6)  # the same SDPA call: observed 0


def test_extended_attention_runs_on_comfyui_fused_attention():
    import comfy.ldm.modules.attention as comfy_attention

    q, k, v = (torch.randn(3, 10, 16) for _ in range(3))
    calls = []

    def fused(a, b, c, heads):
        calls.append(a.shape)
        return comfy_attention.optimized_attention(a, b, c, heads)

    out = attention.extended_attention(q, k, v, 2, fused)
    assert calls == [torch.Size([1, 30, 16])]  # one fused call, keys never repeated per keyframe
    assert torch.allclose(out, _brute_extended(q, k, v, 2), atol=1e-5)  # float32 kernel vs restatement (observed <= 0.03)


@pytest.mark.parametrize("budget", [1 << 20, 3 * 256 * 256, 100])  # one matmul, batches of pairs, token rows
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_tokens_are_compared_in_float32(dtype, budget):
    """bf16 / fp16 tokens (Flux, SDXL in half precision): the similarities are computed in float32, so the
    nearest neighbours are those of float32 brute force on the same (rounded) tokens, not ties broken by a
    dot product rounded to 8 or 11 mantissa bits."""
    g = torch.Generator().manual_seed(3)
    n, tokens, dim = 6, 256, 64
    frames = correspondence.unit_tokens(torch.randn(n, tokens, dim, generator=g)).to(dtype)
    pairing = keyframes.official_pairing(n, 3)
    plan = keyframes.keyframe_plan(n, 3, 1, seed=0)[0]
    fields = correspondence.frame_fields(frames, torch.arange(n), frames[plan], pairing, max_elements=budget,
                                         keys_are_unit=True)
    wide = frames.float()
    for i in range(n):
        for column, slot in enumerate(pairing.slots[i].tolist()):
            assert torch.equal(fields[i, column], (wide[i] @ wide[plan[slot]].T).argmax(-1))

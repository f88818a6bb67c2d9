"""An independent, brute-force restatement of the official TokenFlow PnP/SDEdit loop for tests.

It follows omerbt/TokenFlow (run_tokenflow_pnp.py, run_tokenflow_sdedit.py, tokenflow_utils.py)
step by step, on a ComfyUI UNetModel called directly with the official three-branch batch
[source, uncond, cond]: keys repeated per keyframe, full similarity matrices, attention outputs
stored and gathered AFTER the output projection, PnP injection by copying the source slice.
It shares no code with the pack (only ComfyUI's UNet and its public patch points).

``host_dtype`` (the tests' float32 twin) rounds, at the points where ComfyUI's sampling path
holds values in float32 whatever the UNet's dtype, to that dtype: every UNet output
(``BaseModel._apply_model`` returns ``model_output.float()``), the inversion's state (the pack
inverts float32 latents) and the edit's returned samples (``CFGGuider.sample`` returns
``samples.to(torch.float32)``). The difference from the plain run measures what that rounding
alone does to the result. ``record`` (a list) receives every nearest-neighbour decision's
similarity rows, for the tests' margin checks.
"""
from __future__ import annotations

import torch

ABAR = lambda sigmas, t: float(1.0 / (1.0 + sigmas[t].double() ** 2))  # noqa: E731


def official_timesteps(steps: int) -> list[int]:
    ratio = 1000 // steps
    return [k * ratio + 1 for k in range(steps)][::-1]


def _round(x, dtype):
    return x if dtype is None else x.to(dtype).to(x.dtype)


def reference_inversion(unet, sigmas, x0, context, inversion_steps, keep, host_dtype=None):
    """preprocess.py's ddim_inversion: eps at the TARGET timestep; returns {t: x_t} for t in keep, plus final."""
    ratio = 1000 // inversion_steps
    timesteps = [k * ratio + 1 for k in range(inversion_steps)]
    x = x0.clone()
    saved = {}
    abar_prev = ABAR(sigmas, 0)
    for t in timesteps:
        abar = ABAR(sigmas, t)
        eps = _round(unet(x, torch.full((x.shape[0],), float(t)), context=context.repeat(x.shape[0], 1, 1)), host_dtype)
        pred_x0 = (x - (1 - abar_prev) ** 0.5 * eps) / abar_prev ** 0.5
        x = _round(abar ** 0.5 * pred_x0 + (1 - abar) ** 0.5 * eps, host_dtype)
        abar_prev = abar
        if t in keep:
            saved[t] = x.clone()
    return saved, x, timesteps[-1]


class _OfficialState:
    def __init__(self, pnp_blocks, qk_steps, conv_steps):
        self.pivotal = True
        self.batch_idx = 0
        self.t = None
        self.pnp_blocks, self.qk_steps, self.conv_steps = pnp_blocks, qk_steps, conv_steps
        self.pivot_hidden = {}
        self.kf_out = {}
        self.idx = {}
        self.batch_size = 8
        self.n_batch_frames = 0
        self.record = None  # a list: every nearest-neighbour decision is appended to it


def _block(extra):
    return (extra["block"][0], extra["block"][1], extra.get("block_index", 0))


def _make_patches(state: _OfficialState):
    def attn1_patch(n, context, value, extra):
        block = _block(extra)
        n3 = n.view(3, -1, n.shape[1], n.shape[2])
        if state.pivotal:
            state.pivot_hidden[block] = n3
        else:
            dim = n.shape[-1]
            batch_idxs = [state.batch_idx] + ([state.batch_idx - 1] if state.batch_idx > 0 else [])
            x = n3[0].reshape(-1, dim)
            y = state.pivot_hidden[block][0][batch_idxs].reshape(-1, dim)
            sim = (x / x.norm(dim=-1, keepdim=True)) @ (y / y.norm(dim=-1, keepdim=True)).T
            if len(batch_idxs) == 2:
                sim1, sim2 = sim.chunk(2, dim=1)
                state.idx[block] = (sim1.argmax(dim=-1), sim2.argmax(dim=-1), batch_idxs)
            else:
                sim1, sim2 = sim, None
                state.idx[block] = (sim.argmax(dim=-1), None, batch_idxs)
            if state.record is not None:
                state.record.append(dict(t=state.t, block=block, batch=state.batch_idx, frames=n3.shape[1],
                                         sims=[s for s in (sim1, sim2) if s is not None]))
        return n, context, value

    def attn1_replace(q, k, v, extra):
        if not state.pivotal:
            return torch.zeros_like(q)  # replaced after to_out below
        heads = extra["n_heads"]
        block = _block(extra)
        nf = q.shape[0] // 3
        tokens, dim = q.shape[1], q.shape[2]
        if block in state.pnp_blocks and state.t in state.qk_steps:
            q, k = q.clone(), k.clone()
            for t in (q, k):  # uncond and cond get the source's queries and keys
                t[nf:2 * nf] = t[:nf]
                t[2 * nf:] = t[:nf]
        dh = dim // heads
        scale = dh ** -0.5

        def heads_of(t):
            return t.reshape(t.shape[0], t.shape[1], heads, dh).permute(0, 2, 1, 3)

        outs = []
        for branch in range(3):
            qb = heads_of(q[branch * nf:(branch + 1) * nf])
            kb, vb = k[branch * nf:(branch + 1) * nf], v[branch * nf:(branch + 1) * nf]
            if branch > 0:  # extended attention: every keyframe sees all keyframes' keys (repeated per frame)
                kb = kb.reshape(1, nf * tokens, dim).repeat(nf, 1, 1)
                vb = vb.reshape(1, nf * tokens, dim).repeat(nf, 1, 1)
            sim = qb @ heads_of(kb).transpose(-1, -2) * scale
            outs.append((sim.softmax(dim=-1) @ heads_of(vb)).permute(0, 2, 1, 3).reshape(nf, tokens, dim))
        return torch.cat(outs)

    def attn1_output_patch(out, extra):
        block = _block(extra)
        dim = out.shape[-1]
        if state.pivotal:
            state.kf_out[block] = out
            return out
        nf, tokens = out.shape[0] // 3, out.shape[1]
        kf = state.kf_out[block].view(3, -1, tokens, dim)
        idx1, idx2, batch_idxs = state.idx[block]
        idx1 = idx1.view(1, -1).repeat(3, 1)
        attn = kf[:, batch_idxs]
        out1 = attn[:, 0].gather(dim=1, index=idx1.unsqueeze(-1).repeat(1, 1, dim))
        if idx2 is None:
            return out1.reshape(3 * nf, tokens, dim)
        idx2 = idx2.view(1, -1).repeat(3, 1)
        out2 = attn[:, 1].gather(dim=1, index=idx2.unsqueeze(-1).repeat(1, 1, dim))
        b = state.batch_size
        s = torch.arange(nf) + batch_idxs[0] * b
        d1 = (s - (batch_idxs[0] * b + b // 2)).abs()
        d2 = (s - (batch_idxs[1] * b + b // 2)).abs()
        w = torch.sigmoid(d2 / (d1 + d2)).view(1, nf, 1, 1)
        mixed = w * out1.view(3, nf, tokens, dim) + (1 - w) * out2.view(3, nf, tokens, dim)
        return mixed.reshape(3 * nf, tokens, dim)

    return attn1_patch, attn1_replace, attn1_output_patch


def reference_edit(unet, sigmas, blocks, x0, saved, inverted, inverted_t, c_src, c_pos, c_neg, plan,
                   steps=50, editor="pnp", cfg=7.5, pnp_attn_t=0.5, pnp_f_t=0.8, start=0.9, batch_size=8,
                   pnp_blocks=None, residual_path="output_blocks.4.0", record=None, host_dtype=None):
    """The official editing loop; returns the final latents (scaled, DDPM space)."""
    full = official_timesteps(steps)
    timesteps = full[int(1 - start * len(full)):] if editor == "sdedit" else full
    pnp = editor == "pnp"
    pnp_blocks = set(pnp_blocks or [])
    state = _OfficialState(pnp_blocks if pnp else set(), set(full[:int(steps * pnp_attn_t)]) if pnp else set(),
                           set(full[:int(steps * pnp_f_t)]) if pnp else set())
    state.batch_size = batch_size
    state.record = record
    attn1_patch, attn1_replace, attn1_output_patch = _make_patches(state)
    options = {"patches": {"attn1_patch": [attn1_patch], "attn1_output_patch": [attn1_output_patch]},
               "patches_replace": {"attn1": {b: attn1_replace for b in blocks}}}
    residual = unet.get_submodule(residual_path).out_layers[-1]

    def conv_hook(module, inputs, output):
        if state.t in state.conv_steps:
            output = output.clone()
            nf = output.shape[0] // 3
            output[nf:2 * nf] = output[:nf]
            output[2 * nf:] = output[:nf]
        return output

    abar_T = ABAR(sigmas, inverted_t)
    eps = (inverted - abar_T ** 0.5 * x0) / (1 - abar_T) ** 0.5
    abar0 = ABAR(sigmas, timesteps[0])
    x = abar0 ** 0.5 * x0 + (1 - abar0) ** 0.5 * eps
    n = x.shape[0]

    def denoise_step(xb, t, idx):
        src = saved[t][idx]
        nb = len(idx)
        inp = torch.cat([src, xb, xb])
        ctx = torch.cat([c_src.repeat(nb, 1, 1), c_neg.repeat(nb, 1, 1), c_pos.repeat(nb, 1, 1)])
        opts = {k: dict(v) for k, v in options.items()}
        noise = unet(inp, torch.full((3 * nb,), float(t)), context=ctx, transformer_options=opts)
        noise = _round(noise, host_dtype)
        _, unc, con = noise.chunk(3)
        e = unc + cfg * (con - unc)
        i = timesteps.index(t)
        abar_t = ABAR(sigmas, t)
        abar_prev = ABAR(sigmas, t - 1000 // steps) if t - 1000 // steps >= 0 else ABAR(sigmas, 0)
        pred = (xb - (1 - abar_t) ** 0.5 * e) / abar_t ** 0.5
        return abar_prev ** 0.5 * pred + (1 - abar_prev) ** 0.5 * e

    handle = residual.register_forward_hook(conv_hook)
    try:
        for step, t in enumerate(timesteps):
            state.t = t
            kf = plan[step]
            state.pivotal = True
            denoise_step(x[kf], t, kf)
            state.pivotal = False
            outs = []
            for b_i, start_b in enumerate(range(0, n, batch_size)):
                state.batch_idx = b_i
                idx = torch.arange(start_b, min(start_b + batch_size, n))
                outs.append(denoise_step(x[idx], t, idx))
            x = torch.cat(outs)
    finally:
        handle.remove()
    return _round(x, host_dtype)

"""An independent restatement of TokenFlow on joint-attention transformers (Flux, SD3.x), for the tests.

It shares no code with the pack: its own block tagging, its own attention (an explicit float64
softmax), its own nearest-neighbour search, blend weights, Euler loops and model calls (the host's
diffusion model called directly), and it runs every branch (source, edit, negative) in calls of
its own. The algorithm, as the pack's docs state it:

- inversion: Euler on ascending sigmas from x0, the velocity evaluated at the next sigma;
- edit: Euler on descending sigmas from x_s0 = (1 - s0) x0 + s0 eps, eps from the fully inverted latent;
- per step, keyframes: the source branch attends plainly and its image-token values (unit length)
  are kept per attention; an edit branch's IMAGE queries of keyframe i see keyframe i's own text
  keys (their logits raised by log K: K keyframes' worth of text, plain attention's text/image
  balance) and the image keys of every keyframe; its TEXT queries attend plainly. PnP in the
  chosen attentions for the first ``pnp_t`` of the steps: the edit uses the source keyframes'
  image values ("v") or keys and values ("kv");
- per step, every frame: an attention's image-token outputs are w0 * O[k0][nn0] + w1 * O[k1][nn1],
  O the same branch's keyframe outputs, nn the most cosine-similar source keyframe image value
  for each source image value of the frame; text queries attend plainly. The official pairing:
  frame f of group g blends keyframe g (w = sigmoid(d2 / (d1 + d2)), float32 as torch computes it
  in the official tokenflow_utils.py) and keyframe g - 1.

``host_dtype`` (the tests' float32 twin) computes what ComfyUI's sampling path holds in float32
whatever the model's dtype in that dtype, with the host's expressions: the model output
(``BaseModel._apply_model`` returns ``model_output.float()``), the sampling state (the start
latent and the inversion's latents are float32 LATENTs), the CONST denoised ``x - v sigma``, the
CFG mix, the Euler step, and the LATENT round trips (``process_latent_out`` / ``process_latent_in``)
at the start and the end. The plain run keeps all of it in float64; the difference of the two runs
measures what that rounding alone does. ``record`` (a dict) receives every nearest-neighbour
decision's similarity rows, {(step, attention, frame, slot): (N, M)}, for the tests' margin checks.
"""
from __future__ import annotations

import math
from typing import Any

import torch


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Explicit softmax attention, (H, Tq, D) x (H, Tk, D) -> (Tq, H*D), float64."""
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    out = torch.softmax(logits, -1) @ v.double()
    return out.transpose(0, 1).reshape(q.shape[1], q.shape[0] * v.shape[-1])


def _heads(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    if skip_reshape:
        return t
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


class _Run:
    """State of one step: which pass and branch runs, and what the keyframe pass kept."""

    def __init__(self, n_img: int, keyframes: list[int], pairs: list[tuple[int, int, float, float]], pnp: set,
                 injects: str, step: int, record: dict | None):
        self.n_img, self.keyframes, self.pairs, self.pnp, self.injects = n_img, keyframes, pairs, pnp, injects
        self.step, self.record = step, record
        self.mode = ("keyframes", "source")
        self.inject = False
        self.src_units: dict = {}
        self.src_kv: dict = {}
        self.outputs: dict = {}  # (branch, attention) -> (K, n_img, HD)
        self.fields: dict = {}  # attention -> list over frames of (nn0, nn1)

    def attention(self, key, q, k, v, heads, skip_reshape):
        q, k, v = (_heads(t, heads, skip_reshape) for t in (q, k, v))
        n, frames = self.n_img, q.shape[0]
        n_txt = q.shape[2] - n
        phase, branch = self.mode
        out = []
        if phase == "keyframes":
            big_k = len(self.keyframes)
            if branch == "source":
                self.src_units[key] = [self._unit(v[i, :, n_txt:]) for i in range(frames)]
                self.src_kv[key] = (k[:, :, n_txt:], v[:, :, n_txt:])
            k_img, v_img = k[:, :, n_txt:], v[:, :, n_txt:]
            if branch != "source" and self.inject and key in self.pnp:
                v_img = self.src_kv[key][1]
                if "k" in self.injects:
                    k_img = self.src_kv[key][0]
            all_k = torch.cat(list(k_img), 1)  # (H, K*n, D)
            all_v = torch.cat(list(v_img), 1)
            bias = torch.cat([torch.full((n_txt,), math.log(big_k)), torch.zeros(big_k * n)]).double()
            for i in range(frames):
                if branch == "source":
                    out.append(_attend(q[i], k[i], v[i]))
                    continue
                img = _attend(q[i, :, n_txt:], torch.cat([k[i, :, :n_txt], all_k], 1),
                              torch.cat([v[i, :, :n_txt], all_v], 1), bias)
                txt = _attend(q[i, :, :n_txt], k[i], v[i])
                out.append(torch.cat([txt, img]))
            result = torch.stack(out)
            self.outputs[(branch, key)] = result[:, n_txt:]
            return result
        if branch == "source":
            fields = []
            for f in range(frames):
                g0, g1 = self.pairs[f][:2]
                units = self._unit(v[f, :, n_txt:])
                sims = [units @ self.src_units[key][g].T for g in (g0, g1)]
                if self.record is not None:
                    for slot, sim in enumerate(sims):
                        self.record[(self.step, key, f, slot)] = sim
                fields.append(tuple(sim.argmax(-1) for sim in sims))
            self.fields[key] = fields
        keyframe_out = self.outputs[(branch, key)]
        for f in range(frames):
            g0, g1, w0, w1 = self.pairs[f]
            nn0, nn1 = self.fields[key][f]
            img = w0 * keyframe_out[g0][nn0] + w1 * keyframe_out[g1][nn1]
            txt = _attend(q[f, :, :n_txt], k[f], v[f])
            out.append(torch.cat([txt, img]))
        return torch.stack(out)

    @staticmethod
    def _unit(v_img: torch.Tensor) -> torch.Tensor:
        tokens = v_img.double().transpose(0, 1).reshape(v_img.shape[1], -1)
        return tokens / tokens.norm(dim=-1, keepdim=True)


def official_pairs(n_frames: int, group: int) -> list[tuple[int, int, float, float]]:
    """(own keyframe, previous keyframe, w0, w1) per frame; w as the official code computes it (float32)."""
    pairs = []
    for f in range(n_frames):
        g = f // group
        prev = max(g - 1, 0)
        d1, d2 = abs(f - (g * group + group // 2)), abs(f - (prev * group + group // 2))
        if g == 0:
            pairs.append((g, prev, 1.0, 0.0))
            continue
        w = torch.sigmoid(torch.tensor(d2) / torch.tensor(d1 + d2))  # torch's default dtype, as in the official code
        pairs.append((g, prev, float(w), float(1 - w)))
    return pairs


def _options(run: _Run, blocks: list[tuple[str, int]]) -> dict[str, Any]:
    def block_fn(kind, index):
        def replace(args, extra):
            tagged = dict(args["transformer_options"], ref_block=[kind, index, 0])
            return extra["original_block"](dict(args, transformer_options=tagged))
        return replace

    def override(func, q, k, v, heads, *args, **kwargs):
        tag = kwargs["transformer_options"].get("ref_block")
        if tag is None:
            return func(q, k, v, heads, *args, **kwargs)
        key = (tag[0], tag[1], tag[2])
        tag[2] += 1
        return run.attention(key, q, k, v, heads, kwargs.get("skip_reshape", False)).to(q.dtype)

    return {"patches_replace": {"dit": {b: block_fn(*b) for b in blocks}}, "optimized_attention_override": override}


def _velocity(model, x: torch.Tensor, sigma: float, cond: list, options: dict) -> torch.Tensor:
    """The diffusion model's output at ``sigma`` (called directly: no host cast), float64."""
    dm = model.model.diffusion_model
    tokens, extra = cond[0]
    b = x.shape[0]
    kwargs = {"context": tokens.repeat(b, 1, 1).to(dm.dtype), "y": extra["pooled_output"].repeat(b, 1).to(dm.dtype)}
    if "guidance" in extra:
        kwargs["guidance"] = torch.full((b,), float(extra["guidance"]), dtype=dm.dtype)
    # The timestep goes in as float32, as the host passes it (the same value on every side).
    t = model.get_model_object("model_sampling").timestep(torch.full((b,), sigma, dtype=torch.float64)).float()
    return dm(x.to(dm.dtype), t, transformer_options=options, **kwargs).double()


def _latent_round_trip(model, x: torch.Tensor, host_dtype) -> torch.Tensor:
    """A LATENT handed to / returned by the host's sampler: process_latent_out then process_latent_in."""
    return x if host_dtype is None else model.model.process_latent_in(model.model.process_latent_out(x))


@torch.no_grad()
def reference_flow_inversion(model, *, x0: torch.Tensor, cond: list, levels: list[float],
                             host_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """x after each Euler step up ``levels`` (ascending sigmas), the velocity at the step's target sigma (float64)."""
    state = host_dtype or torch.float64
    x = x0.to(state)
    path, previous = [], 0.0
    for sigma in levels:
        v = _velocity(model, x, sigma, cond, {}).to(state)
        denoised = x - v * torch.tensor(sigma, dtype=state)  # CONST: what the host's model call returns
        x = x + (sigma - previous) * ((x - denoised) / sigma)
        previous = sigma
        path.append(x.double())
    return path


@torch.no_grad()
def reference_flow_edit(model, *, x0, inverted, sigma_inv: float, trajectory: dict, timesteps: list[int],
                        sigmas: dict, src, pos, neg, cfg: float, keyframe_plan: torch.Tensor, group: int,
                        n_img: int, blocks: list[tuple[str, int]], pnp: set, pnp_t: float, injects: str,
                        host_dtype: torch.dtype | None = None, record: dict | None = None) -> torch.Tensor:
    """The edited clip (model space, float64)."""
    state = host_dtype or torch.float64
    x0 = x0.double()
    eps = (inverted.double() - (1 - sigma_inv) * x0) / sigma_inv
    s0 = sigmas[timesteps[0]]
    x = _latent_round_trip(model, ((1 - s0) * x0 + s0 * eps).to(state), host_dtype)
    n_frames = x.shape[0]
    pairs = official_pairs(n_frames, group)
    branches = [("edit", pos)] + ([("negative", neg)] if not math.isclose(cfg, 1.0) else [])
    for step, t in enumerate(timesteps):
        sigma = sigmas[t]
        sigma_next = sigmas[timesteps[step + 1]] if step + 1 < len(timesteps) else 0.0
        keyframes = keyframe_plan[step].tolist()
        run = _Run(n_img, keyframes, pairs, pnp, injects, step, record)
        run.inject = step < int(len(timesteps) * pnp_t)
        options = _options(run, blocks)
        source = trajectory[t].double()
        run.mode = ("keyframes", "source")
        _velocity(model, source[keyframes], sigma, src, options)
        for name, cond in branches:
            run.mode = ("keyframes", name)
            _velocity(model, x[keyframes], sigma, cond, options)
        run.mode = ("frames", "source")
        _velocity(model, source, sigma, src, options)
        preds = {}
        for name, cond in branches:
            run.mode = ("frames", name)
            v = _velocity(model, x, sigma, cond, options).to(state)
            preds[name] = x - v * torch.tensor(sigma, dtype=state)
        denoised = preds["edit"] if len(branches) == 1 else preds["negative"] + (preds["edit"] - preds["negative"]) * cfg
        x = denoised + (x - denoised) * (sigma_next / sigma)
    return _latent_round_trip(model, x, host_dtype).double()

"""An independent restatement of TokenFlow on joint-attention transformers (Flux, SD3.x), for the tests.

It shares no code with the pack: its own block tagging, its own attention (an explicit float64
softmax), its own nearest-neighbour search, blend weights and Euler loop, and it runs every branch
(source, edit, negative) in calls of its own. The algorithm, as the pack's docs state it:

- Euler on descending sigmas from x_s0 = (1 - s0) x0 + s0 eps, eps from the fully inverted latent;
- per step, keyframes: the source branch attends plainly and its image-token values (unit length)
  are kept per attention; an edit branch's IMAGE queries of keyframe i see keyframe i's own text
  keys (their logits raised by log K: K keyframes' worth of text, plain attention's text/image
  balance) and the image keys of every keyframe; its TEXT queries attend plainly. PnP in the
  chosen attentions for the first ``pnp_t`` of the steps: the edit uses the source keyframes'
  image values ("v") or keys and values ("kv");
- per step, every frame: an attention's image-token outputs are w0 * O[k0][nn0] + w1 * O[k1][nn1],
  O the same branch's keyframe outputs, nn the most cosine-similar source keyframe image value
  for each source image value of the frame; text queries attend plainly. The official pairing:
  frame f of group g blends keyframe g (w = sigmoid(d2 / (d1 + d2))) and keyframe g - 1.
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

    def __init__(self, n_img: int, keyframes: list[int], pairs: list[tuple[int, int, float]], pnp: set, injects: str):
        self.n_img, self.keyframes, self.pairs, self.pnp, self.injects = n_img, keyframes, pairs, pnp, injects
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
                g0, g1, _ = self.pairs[f]
                units = self._unit(v[f, :, n_txt:])
                fields.append(tuple((units @ self.src_units[key][g].T).argmax(-1) for g in (g0, g1)))
            self.fields[key] = fields
        keyframe_out = self.outputs[(branch, key)]
        for f in range(frames):
            g0, g1, w = self.pairs[f]
            nn0, nn1 = self.fields[key][f]
            img = w * keyframe_out[g0][nn0] + (1 - w) * keyframe_out[g1][nn1]
            txt = _attend(q[f, :, :n_txt], k[f], v[f])
            out.append(torch.cat([txt, img]))
        return torch.stack(out)

    @staticmethod
    def _unit(v_img: torch.Tensor) -> torch.Tensor:
        tokens = v_img.double().transpose(0, 1).reshape(v_img.shape[1], -1)
        return tokens / tokens.norm(dim=-1, keepdim=True)


def official_pairs(n_frames: int, group: int) -> list[tuple[int, int, float]]:
    pairs = []
    for f in range(n_frames):
        g = f // group
        prev = max(g - 1, 0)
        d1, d2 = abs(f - (g * group + group // 2)), abs(f - (prev * group + group // 2))
        w = 1.0 if g == 0 else 1.0 / (1.0 + math.exp(-d2 / (d1 + d2)))
        pairs.append((g, prev, w))
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


def _denoised(model, x, sigma: float, cond: list, options: dict) -> torch.Tensor:
    tokens, extra = cond[0]
    b = x.shape[0]
    kwargs = {"c_crossattn": tokens.repeat(b, 1, 1), "y": extra["pooled_output"].repeat(b, 1)}
    if "guidance" in extra:
        kwargs["guidance"] = torch.full((b,), float(extra["guidance"]))
    return model.model.apply_model(x, torch.full((b,), sigma, dtype=x.dtype), transformer_options=options, **kwargs)


@torch.no_grad()
def reference_flow_edit(model, *, x0, inverted, sigma_inv: float, trajectory: dict, timesteps: list[int],
                        sigmas: dict, src, pos, neg, cfg: float, keyframe_plan: torch.Tensor, group: int,
                        n_img: int, blocks: list[tuple[str, int]], pnp: set, pnp_t: float, injects: str) -> torch.Tensor:
    """The edited clip (model space, float64)."""
    x0 = x0.double()
    eps = (inverted.double() - (1 - sigma_inv) * x0) / sigma_inv
    s0 = sigmas[timesteps[0]]
    x = (1 - s0) * x0 + s0 * eps
    n_frames = x.shape[0]
    pairs = official_pairs(n_frames, group)
    branches = [("edit", pos)] + ([("negative", neg)] if not math.isclose(cfg, 1.0) else [])
    for step, t in enumerate(timesteps):
        sigma = sigmas[t]
        sigma_next = sigmas[timesteps[step + 1]] if step + 1 < len(timesteps) else 0.0
        keyframes = keyframe_plan[step].tolist()
        run = _Run(n_img, keyframes, pairs, pnp, injects)
        run.inject = step < int(len(timesteps) * pnp_t)
        options = _options(run, blocks)
        source = trajectory[t].double()
        run.mode = ("keyframes", "source")
        _denoised(model, source[keyframes], sigma, src, options)
        for name, cond in branches:
            run.mode = ("keyframes", name)
            _denoised(model, x[keyframes], sigma, cond, options)
        run.mode = ("frames", "source")
        _denoised(model, source, sigma, src, options)
        preds = {}
        for name, cond in branches:
            run.mode = ("frames", name)
            preds[name] = _denoised(model, x, sigma, cond, options).double()
        denoised = preds["edit"] if len(branches) == 1 else preds["negative"] + cfg * (preds["edit"] - preds["negative"])
        x = denoised + (x - denoised) * (sigma_next / sigma)
    return x

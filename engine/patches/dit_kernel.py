"""The attention arithmetic of TokenFlow on a DiT's image tokens: the host kernel of one call, head layouts, and
extended attention in which each keyframe's image queries see every keyframe's image tokens.

Used by the TokenFlow DiT patch (:mod:`.dit`) and the Keyframe Joint Edit's (:mod:`.dit_joint`).
"""
from __future__ import annotations

import torch


def to_heads(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    """(B, H, T, D) of a call's q, k or v, whatever layout its block gives."""
    if skip_reshape:
        return t  # (B, H, T, D)
    if t.ndim == 4:  # (B, T, H, D) (SD3's values)
        return t.transpose(1, 2)
    b, n = t.shape[:2]  # (B, T, H*D)
    return t.reshape(b, n, heads, -1).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, H*D)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


class Kernel:
    """The host's attention function with one call's own options, for q/k/v in the layout its block gives:
    (B, H, T, D) (Flux, ``in_heads``) or (B, T, H*D) (SD3; its values may be (B, T, H, D)).

    ``kernel(q, k, v)`` is plain attention, (B, T, H*D) out. :meth:`heads_out` takes and gives the heads
    layout (``skip_output_reshape``), so the pieces of a call are joined there and merged once.
    """

    def __init__(self, func, heads: int, kwargs: dict) -> None:
        self.func, self.heads = func, heads
        self.in_heads = bool(kwargs.get("skip_reshape", False))
        self.kwargs = {k: v for k, v in kwargs.items() if k not in ("skip_reshape", "skip_output_reshape", "mask")}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.func(q, k, v, self.heads, skip_reshape=self.in_heads, **self.kwargs)

    def heads_out(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self.func(q, k, v, self.heads, skip_reshape=True, skip_output_reshape=True, **self.kwargs)
        if out.ndim == 3:  # a backend path that merges anyway (attention_pytorch past SDP_BATCH_LIMIT)
            out = to_heads(out, self.heads, False)
        return out

    def to_heads(self, t: torch.Tensor) -> torch.Tensor:
        return to_heads(t, self.heads, self.in_heads)

    def text_tokens(self, t: torch.Tensor, n_txt: int) -> torch.Tensor:
        return t[:, :, :n_txt] if self.in_heads else t[:, :n_txt]

    def image_values(self, v: torch.Tensor, n_img: int) -> torch.Tensor:
        """(B, n_img, H*D): the image-token values of ``v`` (rows of this call's values, as given), merged."""
        n_txt = (v.shape[2] if self.in_heads else v.shape[1]) - n_img
        if self.in_heads:
            return merge_heads(v[:, :, -n_img:] if n_txt else v)
        return (v[:, -n_img:] if n_txt else v).flatten(2)


def extended_kv(k: torch.Tensor, v: torch.Tensor, src_kv: tuple | None, injects: str, n_img: int,
             branches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the extended attention of C edit branches of K keyframes each, (C*K, H, K*T, D) each.

    Row i: its own text tokens repeated K times, then the image tokens of all K keyframes of its
    branch (its own branch's, or the source's where PnP injects them). Built for k and v at once.
    """
    rows, heads, tokens, dim = k.shape
    frames, n_txt = rows // branches, tokens - n_img
    own = torch.stack((k, v))  # (2, C*K, H, T, D)

    def own_img() -> torch.Tensor:
        return own[:, :, :, n_txt:] if n_txt else own
    if injects == "kv" or branches == 1:  # one set of K keyframes' image tokens for every row: (2, K, H, n_img, D)
        if injects == "kv":
            img = torch.stack(src_kv)
        elif injects:  # "v": own image keys, the source's image values
            img = torch.stack((k[:, :, n_txt:] if n_txt else k, src_kv[1]))
        else:
            img = own_img()
        shared = img.transpose(1, 2).reshape(2, 1, heads, frames * n_img, dim).expand(-1, rows, -1, -1, -1)
        if n_txt == 0:
            return tuple(shared.unbind(0))
        joint = torch.cat((own[:, :, :, :n_txt].repeat(1, 1, 1, frames, 1), shared), 3)
        return tuple(joint.unbind(0))
    if injects:  # "v", several branches: (2, C, K, H, n_img, D)
        src_v = src_kv[1].unsqueeze(0).expand(branches, -1, -1, -1, -1)
        img = torch.stack(((k[:, :, n_txt:] if n_txt else k).unflatten(0, (branches, frames)), src_v))
    else:
        img = own_img().unflatten(1, (branches, frames))
    shared = img.transpose(2, 3).reshape(2, branches, 1, heads, frames * n_img, dim).expand(-1, -1, frames, -1, -1, -1)
    if n_txt:
        text = own[:, :, :, :n_txt].repeat(1, 1, 1, frames, 1).unflatten(1, (branches, frames))
        shared = torch.cat((text, shared), 4)
    return tuple(shared.flatten(1, 2).unbind(0))


def extended_image_attention(q, k, v, src_kv: tuple | None, injects: str, kernel: Kernel, n_img: int,
                             branches: int) -> torch.Tensor:
    """K keyframes: image queries see own text + every keyframe's image tokens; text queries attend as usual.

    The own text keys/values are repeated K times (one copy per keyframe's image tokens), so that
    the text-to-image balance of the softmax is that of plain attention: K identical keyframes give
    exactly the single-frame result (the UNet's extended attention has the same property).
    q, k, v: (C*K, H, T, D) of ``branches`` edit branches; out in the same layout.
    """
    n_txt = q.shape[2] - n_img
    k_joint, v_joint = extended_kv(k, v, src_kv, injects, n_img, branches)
    if n_txt == 0:
        return kernel.heads_out(q, k_joint, v_joint)
    img_out = kernel.heads_out(q[:, :, n_txt:], k_joint, v_joint)
    txt_out = kernel.heads_out(q[:, :, :n_txt], k, v)
    return torch.cat([txt_out, img_out], 2)

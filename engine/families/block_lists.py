"""The Plug-and-Play block lists a user types ("output:4-11", "single_block:20-37", "output_blocks.4.0"), read
against a model's layout."""
from __future__ import annotations

import torch

from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

from .base import BlockKey, ModelLayout


def _block_list_example(default: tuple[BlockKey, ...]) -> str:
    """The model's default injection blocks of their first kind as a list entry ('output:4-11', 'single_block:20-37')."""
    if not default:
        return "output:4-11"
    kind = default[0][0]
    ids = [b[1] for b in default if b[0] == kind]
    return f"{kind}:{min(ids)}" + (f"-{max(ids)}" if max(ids) != min(ids) else "")


def parse_block_list(text: str, layout: ModelLayout, default: tuple[BlockKey, ...]) -> tuple[BlockKey, ...]:
    """Parse "auto" or a list like "output:4-11, input:7" (all indices of those blocks) into block keys."""
    text = text.strip().lower()
    if text in ("", "auto"):
        return default
    if text == "none":
        return ()
    chosen: set[BlockKey] = set()
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            kind, ids = part.split(":")
            lo, _, hi = ids.partition("-")
            wanted = range(int(lo), int(hi or lo) + 1)
        except ValueError:
            raise ValueError(f"pnp_attention_blocks: cannot read {part!r}; write e.g. '{_block_list_example(default)}' "
                             "or 'auto'") from None
        matched = [b for b in layout.transformer_blocks if b[0] == kind.strip() and b[1] in wanted]
        if not matched:
            raise ValueError(f"pnp_attention_blocks: {part!r} names no transformer block of this model "
                             f"(it has {sorted({(b[0], b[1]) for b in layout.transformer_blocks})})")
        chosen.update(matched)
    return tuple(b for b in layout.transformer_blocks if b in chosen)


def parse_residual_list(text: str, unet: torch.nn.Module, default: tuple[str, ...]) -> tuple[str, ...]:
    """Parse "auto", "none" or module paths like "output_blocks.4.0" (must be ResBlocks)."""
    text = text.strip()
    if text.lower() in ("", "auto"):
        return default
    if text.lower() == "none":
        return ()
    paths = tuple(p.strip() for p in text.split(",") if p.strip())
    for path in paths:
        try:
            module = unet.get_submodule(path)
        except AttributeError:
            module = None
        if not isinstance(module, ResBlock):
            raise ValueError(f"pnp_residual_blocks: {path!r} is not a ResBlock of this UNet; write e.g. 'output_blocks.4.0'")
    return paths

"""The Plug-and-Play block lists a user types ("output:4-11", "single_block:20-37:v", "rf_solver",
"output_blocks.4.0"), read against a model's layout."""
from __future__ import annotations

import torch

from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

from .base import BlockKey, ModelLayout
from .injection_presets import INJECTS


def _block_list_example(default: tuple[BlockKey, ...]) -> str:
    """The model's default injection blocks of their first kind as a list entry ('output:4-11', 'single_block:20-37')."""
    if not default:
        return "output:4-11"
    kind = default[0][0]
    ids = [b[1] for b in default if b[0] == kind]
    return f"{kind}:{min(ids)}" + (f"-{max(ids)}" if max(ids) != min(ids) else "")


def injection_choices(layout: ModelLayout) -> str:
    """The values of pnp_attention_blocks this model takes, for one-line messages."""
    presets = [p.name for p in getattr(layout.adapter, "presets", ())]
    suffix = " (an entry may end in ':v' or ':kv': inject image values, or keys and values)" \
        if _family_injects(layout) else ""
    return f"'{_block_list_example(layout.default_pnp_attention)}'{suffix}, or " + \
        ", ".join(f"'{name}'" for name in ["auto", "none", *presets])


def _family_injects(layout: ModelLayout) -> str:
    """What the family's default preset injects ("v" / "kv" on a DiT); "" on the SD UNets (queries and keys)."""
    return getattr(layout.adapter, "pnp_injects", "") or ""


def _not_a_value(word: str, layout: ModelLayout) -> ValueError:
    from .dit import DIT_FAMILIES  # the other families' presets, to say whose a misplaced one is

    owners = [f.name for f in DIT_FAMILIES if word in {p.name for p in f.presets}]
    whose = f" (a {'/'.join(owners)} preset)" if owners else ""
    return ValueError(f"pnp_attention_blocks: {word!r}{whose} is not a value for this {layout.family} model; "
                      f"write e.g. {injection_choices(layout)}")


def parse_attention_injection(text: str, layout: ModelLayout,
                              default: tuple[BlockKey, ...] | None = None) -> dict[BlockKey, str]:
    """What PnP injects where, from "auto", "none", a preset name of the model's family ("rf_solver") or a list like
    "output:4-11, input:7" / "single_block:20-37:v, double_block:0-1:kv" (all attentions of those blocks).

    Each block maps to what the source hands it: on a DiT "v" (image values) or "kv" (image keys and values),
    an entry's suffix, else what the family's default preset injects, so a list that names a preset's blocks
    with its suffix behaves as the preset; "" on the SD UNets (their queries and keys: no suffix there).
    ``default``: the blocks of "auto" (the layout's default when None)."""
    text = text.strip().lower()
    injects = _family_injects(layout)
    if text in ("", "auto"):
        return dict.fromkeys(layout.default_pnp_attention if default is None else default, injects)
    if text == "none":
        return {}
    preset = next((p for p in getattr(layout.adapter, "presets", ()) if p.name == text), None)
    if preset is not None:
        return dict.fromkeys(preset.blocks(layout.transformer_blocks), preset.injects)
    chosen: dict[BlockKey, str] = {}
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        if ":" not in part and part.replace("_", "").isalpha():
            raise _not_a_value(part, layout)
        try:
            kind, ids, *suffix = part.split(":")
            lo, _, hi = ids.partition("-")
            wanted = range(int(lo), int(hi or lo) + 1)
            what = suffix[0].strip() if len(suffix) == 1 else injects if not suffix else None
        except ValueError:
            what = None
        if what is None or (suffix and what not in INJECTS):
            raise ValueError(f"pnp_attention_blocks: cannot read {part!r}; write e.g. {injection_choices(layout)}")
        if suffix and not injects:
            raise ValueError(f"pnp_attention_blocks: {part!r}: the {layout.family} UNet injects the source's queries "
                             f"and keys, a ':{what}' suffix is for Flux / SD3.x blocks; write '{kind}:{ids}'")
        matched = [b for b in layout.transformer_blocks if b[0] == kind.strip() and b[1] in wanted]
        if not matched:
            raise ValueError(f"pnp_attention_blocks: {part!r} names no transformer block of this model "
                             f"(it has {sorted({(b[0], b[1]) for b in layout.transformer_blocks})})")
        clash = next((b for b in matched if chosen.get(b, what) != what), None)
        if clash is not None:
            raise ValueError(f"pnp_attention_blocks: {clash[0]} {clash[1]} is given twice, injecting "
                             f"'{chosen[clash]}' and '{what}'; name it once")
        chosen.update(dict.fromkeys(matched, what))
    return {b: chosen[b] for b in layout.transformer_blocks if b in chosen}


def parse_block_list(text: str, layout: ModelLayout, default: tuple[BlockKey, ...]) -> tuple[BlockKey, ...]:
    """The blocks of a pnp_attention_blocks value (:func:`parse_attention_injection`), in the model's order."""
    return tuple(parse_attention_injection(text, layout, default))


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

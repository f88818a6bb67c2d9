"""A trivial editor in its own module: Plug-and-Play with query/key injection only (no residual features)."""
from __future__ import annotations

from comfy_api.latest import io

from comfyui_tokenflow.engine.editors import StepNeeds
from comfyui_tokenflow.engine.families.block_lists import parse_block_list
from comfyui_tokenflow.tokenflow_ops.schedule import editing_timesteps


class AttentionOnlyEditor:
    name = "pnp_attention_only"
    description = "Plug-and-Play without residual injection: source q/k in the first attention_only_t of the steps."
    inputs = (io.Float.Input("attention_only_t", default=0.5, min=0.0, max=1.0, optional=True,
                             tooltip="pnp_attention_only: fraction of the steps with q/k injection."),)

    def timesteps(self, steps, options):
        return editing_timesteps(steps)

    def check_conditioning(self, positive, negative):
        return None

    def step_needs(self, timesteps_full, options, layout, unet):
        blocks = frozenset(parse_block_list("auto", layout, layout.default_pnp_attention))
        fraction = options["attention_only_t"]  # only what it declared, its default where the sampler gave none
        injected = set(timesteps_full[:int(len(timesteps_full) * fraction)])
        return {t: StepNeeds(attention_injection=blocks if t in injected else frozenset()) for t in timesteps_full}

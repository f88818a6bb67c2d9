"""TEST-ONLY custom node pack: a second pack that adds a TokenFlow editor through the door (``engine/door.py``).

It is what the README's "Editor from your own pack" recipe describes, and imports nothing of
ComfyUI-TokenFlow: the editor is put into the door's dict on ``comfy.model_patcher`` at import, and
its methods read TokenFlow's API (``door["api"]``) when they are called. ``tests/test_door.py`` loads it
in a real ComfyUI server before and after the TokenFlow folder and runs an edit with it.
"""
import logging

import comfy.model_patcher
from comfy_api.latest import io

door = vars(comfy.model_patcher).setdefault("tokenflow_door", {})


class DoorAttentionOnlyEditor:
    """Plug-and-Play with query/key injection only, for the first ``door_attention_t`` of the steps."""

    name = "door_attention_only"
    api_version = 1  # the door API it was written for
    description = "Test pack's editor: source q/k injection in the first door_attention_t of the steps, no residuals."
    inputs = (io.Float.Input("door_attention_t", default=0.5, min=0.0, max=1.0, optional=True,
                             tooltip="door_attention_only: fraction of the steps with q/k injection."),)

    def timesteps(self, steps, options):
        return door["api"].editing_timesteps(steps)

    def check_conditioning(self, positive, negative):
        return None

    def step_needs(self, timesteps_full, options, layout, unet):
        api = door["api"]
        blocks = frozenset(api.parse_block_list("auto", layout, layout.default_pnp_attention))
        fraction = options["door_attention_t"]  # the values of the inputs it declared, defaults filled in
        injected = set(timesteps_full[:int(len(timesteps_full) * fraction)])
        logging.info("tokenflow door test pack: door_attention_only planned %d steps, q/k injected in %d",
                     len(timesteps_full), len(injected))
        return {t: api.StepNeeds(attention_injection=blocks if t in injected else frozenset()) for t in timesteps_full}


class DoorSeedEditor(DoorAttentionOnlyEditor):
    """A mistake TokenFlow must survive: an input named like the sampler's own ``seed`` (the sampler's schema would
    repeat an input id and ComfyUI would drop the node). TokenFlow leaves this editor out with one logged line."""

    name = "door_bad_seed"
    description = "Test pack's editor that TokenFlow must leave out: it declares an input named seed."
    inputs = (io.Int.Input("seed", default=0, optional=True, tooltip="door_bad_seed: clashes with the sampler's."),)


door.setdefault("editors", {})[DoorAttentionOnlyEditor.name] = DoorAttentionOnlyEditor()
door["editors"][DoorSeedEditor.name] = DoorSeedEditor()
logging.info("tokenflow door test pack: editor registered; TokenFlow %s",
             "already loaded" if "api" in door else "not loaded yet")

NODE_CLASS_MAPPINGS: dict = {}  # no nodes of its own (ComfyUI's loader needs the name)

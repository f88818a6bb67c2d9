"""The TokenFlow-patched model of a run: the one place a ModelPatcher is cloned and patched."""
from __future__ import annotations

from .attention_patches import JOINT_KEY
from .call_wrappers import install_tokenflow_patches
from .families.base import FLOW
from .model_support import ModelLayout, check_supported, sampling_rule


def patched_clone(model_patcher, layout: ModelLayout):
    """A clone of ``model_patcher`` with TokenFlow's patches installed; the input ModelPatcher is never changed.

    The patches follow the layout's sampling rule: the UNets' attention / ResBlock patches, or a flow DiT's
    image-token attention (:mod:`.dit_attention`)."""
    patched = model_patcher.clone()
    if layout.sampling == FLOW:
        from .dit_attention import install_dit_patches

        install_dit_patches(patched, layout)
    else:
        install_tokenflow_patches(patched, layout)
    return patched


def joint_edit_model(model_patcher):
    """The Keyframe Joint Edit's model: self-attention extended across every frame of the batch it samples.

    The patch follows the sampling rule the model's family layout declares: the UNets' ``attn1``
    replacement, or a flow DiT's image-token joint attention (:mod:`.dit_joint_attention`).
    """
    if sampling_rule(model_patcher) == FLOW:
        from .dit_joint_attention import install_dit_joint_patches

        patched = model_patcher.clone()
        install_dit_joint_patches(patched, check_supported(model_patcher, sampling=FLOW))
        return patched
    patched = patched_clone(model_patcher, check_supported(model_patcher))
    patched.model_options.setdefault("transformer_options", {})[JOINT_KEY] = True
    return patched

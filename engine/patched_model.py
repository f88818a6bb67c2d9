"""The TokenFlow-patched model of a run: the one place a ModelPatcher is cloned and patched."""
from __future__ import annotations

from .attention_patches import JOINT_KEY, install_tokenflow_patches
from .model_support import ModelLayout, check_supported


def patched_clone(model_patcher, layout: ModelLayout):
    """A clone of ``model_patcher`` with TokenFlow's patches installed; the input ModelPatcher is never changed."""
    patched = model_patcher.clone()
    install_tokenflow_patches(patched, layout)
    return patched


def joint_edit_model(model_patcher):
    """The Keyframe Joint Edit's model: self-attention extended across every frame of the batch it samples."""
    patched = patched_clone(model_patcher, check_supported(model_patcher))
    patched.model_options.setdefault("transformer_options", {})[JOINT_KEY] = True
    return patched

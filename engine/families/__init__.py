"""Model families: how the engine recognises a model and where TokenFlow acts in it.

``base`` (the adapter protocol and :class:`ModelLayout`), ``unet`` (SD1.x/SD2.x/SDXL), ``dit`` (Flux, SD3.x),
``registry`` (:data:`~.registry.FAMILIES`, ``check_supported``, ``sampling_rule``), ``block_lists`` (the PnP block
lists a user types), ``injection_presets`` (the DiT PnP presets named after their method: rf_solver, stable_flow) and ``fingerprints`` (the identity of weights and frames). A new family is one adapter here.
"""
from .base import DDPM, FLOW, BlockKey, FamilyAdapter, ModelLayout

__all__ = ["DDPM", "FLOW", "BlockKey", "FamilyAdapter", "ModelLayout"]

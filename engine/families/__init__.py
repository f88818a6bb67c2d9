"""Model family adapters: one module per family kind (the UNet families live in ``engine.model_support``).

The registry itself is ``engine.model_support.FAMILIES``; :mod:`.dit` holds the flow-matching
transformer families (Flux, SD3.x).
"""
from .base import DDPM, FLOW, BlockKey, FamilyAdapter, ModelLayout

__all__ = ["DDPM", "FLOW", "BlockKey", "FamilyAdapter", "ModelLayout"]

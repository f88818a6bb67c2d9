"""ComfyUI-TokenFlow: TokenFlow (Geyer et al., ICLR 2024) video editing as ComfyUI nodes.

ComfyUI loads this package and calls :func:`comfy_entrypoint`; the node classes live in
``nodes/`` and the pure-torch algorithm in ``tokenflow_ops/``.
"""
from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]

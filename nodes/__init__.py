"""TokenFlow node classes, one family per module, registered through ComfyUI's V3 extension API."""
from __future__ import annotations

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from . import (
    consistency_nodes,
    correspondence_nodes,
    inversion_nodes,
    joint_edit_nodes,
    product_io_nodes,
    sampler_nodes,
    video_nodes,
)

NODE_MODULES = (
    video_nodes,
    inversion_nodes,
    correspondence_nodes,
    joint_edit_nodes,
    sampler_nodes,
    product_io_nodes,
    consistency_nodes,
)


class TokenFlowExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [node for module in NODE_MODULES for node in module.NODES]


async def comfy_entrypoint() -> TokenFlowExtension:
    return TokenFlowExtension()

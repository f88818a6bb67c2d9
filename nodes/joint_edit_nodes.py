"""TokenFlowKeyframeJointEdit: extended self-attention across all frames of the sampled batch."""
from __future__ import annotations

from comfy_api.latest import io

from ..engine.patches.install import joint_edit_model
from .common import CATEGORY


class TokenFlowKeyframeJointEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TokenFlowKeyframeJointEdit",
            display_name="TokenFlow Keyframe Joint Edit",
            category=CATEGORY,
            description="Returns a model whose self-attention is extended across every frame of the batch it samples: "
                        "each frame attends to the keys/values of all frames (TokenFlow's joint keyframe edit, and the "
                        "paper's 'joint attention' ablation). On Flux / SD3.x every frame's image tokens are shared "
                        "and each frame keeps its own text. Feed it a few keyframes for a fast preview of the look. "
                        "Cost grows with the square of the frame count.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x / SD2.x / SDXL, Flux or SD3.x model to patch (it is "
                                                "cloned, never changed)."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The patched clone; use it with any sampler."),
            ],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        return io.NodeOutput(joint_edit_model(model))


NODES = [TokenFlowKeyframeJointEdit]

"""The PeRFlow nodes (ComfyUI V3 schema API). They only build objects; the math is in perflow_core."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .calibration_nodes import PerflowCalibrateNode, PerflowLoadThetaNode, PerflowSaveThetaNode
from .display import with_named_errors
from .dropdowns import register_dropdowns
from .loader_nodes import PerflowApplyDeltaNode, PerflowCheckpointLoaderNode, PerflowDiffusersLoaderNode
from .sampling_nodes import PerflowKSamplerNode, PerflowSamplerNode, PerflowSigmasNode
from .save_nodes import PerflowSaveCheckpointNode
from .settings_node import PerflowSettingsNode

NODES = [
    PerflowSettingsNode,
    PerflowSigmasNode,
    PerflowSamplerNode,
    PerflowKSamplerNode,
    PerflowCheckpointLoaderNode,
    PerflowApplyDeltaNode,
    PerflowDiffusersLoaderNode,
    PerflowCalibrateNode,
    PerflowSaveThetaNode,
    PerflowLoadThetaNode,
    PerflowSaveCheckpointNode,
]
# Their errors name them: ComfyUI's error dialog shows the node id, not the display name.
NODES = [with_named_errors(node) for node in NODES]


# At import: ComfyUI 0.3.64 imports the pack but never calls ComfyExtension.on_load (later versions do; then
# register_dropdowns finds its entries there and does nothing).
register_dropdowns()


class PerflowExtension(ComfyExtension):
    async def on_load(self) -> None:
        register_dropdowns()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> PerflowExtension:
    return PerflowExtension()

"""ComfyUI entry point of the PeRFlow node pack (V3 API).

ComfyUI imports this file from `custom_nodes/<pack>/`; `perflow_core` itself never needs ComfyUI.
Imported anywhere else (pytest collects this folder as a package), there is nothing to register.
"""

from importlib.util import find_spec

# The frontend scripts (plain ES modules, no build step): the segment and theta editor drawn on PeRFlow Settings,
# and the text the PeRFlow nodes show after a run.
WEB_DIRECTORY = "./web"

if find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]

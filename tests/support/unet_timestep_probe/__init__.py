"""A test-only ComfyUI custom node folder: records the timestep of every UNet call, as the network receives it
(after the model's DIFFUSION_MODEL wrappers, e.g. the PeRFlow sampler's shift to 1000, 875, ...).

tests/support/server.py links it into the test server's custom_nodes. The server then answers
GET /perflow_probe/unet_timesteps with {"timesteps": [first timestep of the batch of each call, ...]} and
POST /perflow_probe/unet_timesteps/clear empties the list. It adds no nodes.
"""

import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
from aiohttp import web
from server import PromptServer

NODE_CLASS_MAPPINGS: dict = {}
MAX_RECORDED = 100_000
_recorded: list = []
_unet_forward = openaimodel.UNetModel._forward


def _recording_forward(self, x, timesteps=None, *args, **kwargs):
    if timesteps is not None and len(_recorded) < MAX_RECORDED:
        _recorded.append(float(timesteps.flatten()[0]))
    return _unet_forward(self, x, timesteps, *args, **kwargs)


openaimodel.UNetModel._forward = _recording_forward


@PromptServer.instance.routes.get("/perflow_probe/unet_timesteps")
async def _timesteps(request):
    return web.json_response({"timesteps": list(_recorded)})


@PromptServer.instance.routes.post("/perflow_probe/unet_timesteps/clear")
async def _clear(request):
    _recorded.clear()
    return web.json_response({"timesteps": []})

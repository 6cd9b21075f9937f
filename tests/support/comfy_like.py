"""Stand-ins for ComfyUI's model wrapper and sampling classes, recognised by class name as ComfyUI's are."""

import math

import torch

from perflow_core.k_sampling import ModelSpace
from perflow_core.noise_schedule import alphas_cumprod_for


class EPS:
    pass


class V_PREDICTION(EPS):
    pass


class CONST:
    pass


class ModelSamplingDiscrete:
    def __init__(self):
        alphas = alphas_cumprod_for().double()
        self.sigmas = ((1 - alphas) / alphas).sqrt().float()


class DiscreteEps(ModelSamplingDiscrete, EPS):
    pass


class DiscreteV(ModelSamplingDiscrete, V_PREDICTION):
    pass


class Flow(CONST):
    multiplier = 1000


class ModelSamplingContinuousEDM(EPS):
    sigmas = torch.linspace(0.002, 80, 1000)


def network(z, timestep):
    """A raw 'network' output: what the original scheduler would be fed."""
    return 0.8 * torch.tanh(z) + 0.1 * math.sin(timestep / 37.0) * z


class ComfyLikeModel:
    """model(x, sigma) -> denoised, computed from the raw network the way ComfyUI's wrapper does."""

    def __init__(self, model_sampling):
        self.inner_model = type("Guider", (), {})()
        self.inner_model.inner_model = type("BaseModel", (), {})()
        self.inner_model.inner_model.model_sampling = model_sampling
        self.space = ModelSpace.of(model_sampling)
        self.seen_timesteps = []
        self.seen_inputs = []

    def __call__(self, x, sigma, **extra_args):
        s = float(sigma[0])
        timestep = self.space.timestep_of(s)
        self.seen_timesteps.append(timestep)
        if self.space.kind == "flow":
            return x - network(x, timestep) * s
        z = x / math.sqrt(1 + s * s)
        self.seen_inputs.append(z)
        out = network(z, timestep)
        if self.space.kind == "v":
            return x / (s * s + 1) - out * s / math.sqrt(s * s + 1)
        return x - out * s

"""The student network: a residual MLP on the flattened image, FiLM-conditioned on t, fed by a learned prototype
memory; and the farthest-point selection its prototypes start from."""

from __future__ import annotations

import math
from typing import Dict, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn


class ReflowStudent(ModelMixin, ConfigMixin):
    """A small PeRFlow student for tiny images: a residual MLP on the flattened image, FiLM-conditioned on t,
    optionally fed by a learned prototype memory.

    Called like a `UNet2DModel` (``model(sample, timestep).sample``), so it runs in `UnconditionalPipeline`
    with `PerflowScheduler`.

    Args:
        sample_size (`int`, defaults to 8): image side.
        in_channels (`int`, defaults to 1): input channels.
        out_channels (`int`, defaults to 1): output channels.
        hidden_size (`int`, defaults to 256): width of the residual stream.
        num_blocks (`int`, defaults to 3): residual blocks.
        mlp_ratio (`int`, defaults to 2): inner width of a block relative to ``hidden_size``.
        time_embedding_size (`int`, defaults to 64): width of the timestep embedding.
        num_prototypes (`int`, defaults to 0): size of the [`PrototypeMemory`] (0: a plain MLP).
        num_prototype_heads (`int`, defaults to 4): memory readouts per stage, each with its own t-dependent sharpness.
        num_memory_stages (`int`, defaults to 1): query points of the memory; stage j + 1 reads it at a learned
            combination of the input and stage j's readouts (a DDIM-like step inside the network).
        num_train_timesteps (`int`, defaults to 1000): T (the range of the timesteps the model sees).
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 8,
        in_channels: int = 1,
        out_channels: int = 1,
        hidden_size: int = 256,
        num_blocks: int = 3,
        mlp_ratio: int = 2,
        time_embedding_size: int = 64,
        num_prototypes: int = 0,
        num_prototype_heads: int = 4,
        num_memory_stages: int = 1,
        num_train_timesteps: int = 1000,
    ):
        super().__init__()
        pixels = in_channels * sample_size * sample_size
        self.time_embedding = nn.Sequential(
            SinusoidalEmbedding(time_embedding_size),
            nn.Linear(time_embedding_size, time_embedding_size),
            nn.SiLU(),
            nn.Linear(time_embedding_size, time_embedding_size),
            nn.SiLU(),
        )
        self.memory = None
        if num_prototypes:
            self.memory = PrototypeMemory(
                num_prototypes, pixels, num_prototype_heads, num_memory_stages, time_embedding_size
            )
        readouts = num_prototype_heads * num_memory_stages if num_prototypes else 0
        self.input = nn.Linear(pixels * (1 + readouts), hidden_size)
        self.blocks = nn.ModuleList(
            [ResidualFiLMBlock(hidden_size, hidden_size * mlp_ratio, time_embedding_size) for _ in range(num_blocks)]
        )
        self.output = nn.Sequential(
            nn.LayerNorm(hidden_size), nn.Linear(hidden_size, out_channels * sample_size * sample_size)
        )
        # t-dependent gains on the input and on the memory readouts, added to the output: where the
        # target is (close to) a combination of z and prototype averages, the MLP only fits the rest.
        self.skip_gains = nn.Linear(time_embedding_size, 1 + readouts) if in_channels == out_channels else None
        if self.skip_gains is not None:
            nn.init.zeros_(self.skip_gains.weight)
            nn.init.zeros_(self.skip_gains.bias)

    def forward(
        self, sample: torch.Tensor, timestep: Union[float, int, torch.Tensor], return_dict: bool = True, **unused
    ) -> Union[UNet2DOutput, Tuple[torch.Tensor]]:
        """The raw output for ``sample`` ``[B, C, H, W]`` at model timestep(s) ``timestep`` (number or ``[B]``)."""
        batch = sample.shape[0]
        timesteps = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(-1).expand(batch)
        embedding = self.time_embedding(timesteps)
        flat = sample.reshape(batch, -1).to(self.input.weight.dtype)
        sources = [flat] if self.memory is None else [flat, *self.memory(flat, embedding).unbind(1)]
        hidden = self.input(torch.cat(sources, dim=1))
        for block in self.blocks:
            hidden = block(hidden, embedding)
        output = self.output(hidden)
        if self.skip_gains is not None:
            gains = self.skip_gains(embedding)
            output = output + sum(gains[:, j : j + 1] * source for j, source in enumerate(sources))
        shape = (batch, self.config.out_channels, self.config.sample_size, self.config.sample_size)
        output = output.reshape(shape).to(sample.dtype)
        return UNet2DOutput(sample=output) if return_dict else (output,)

    @torch.no_grad()
    def initialise_prototypes(self, samples: torch.Tensor) -> None:
        """Start the prototype memory at the given clean samples (one per prototype), like a k-means start."""
        if self.memory is None:
            raise ValueError("this student has no prototype memory (num_prototypes=0)")
        self.memory.prototypes.copy_(samples.reshape(self.memory.prototypes.shape))


class PrototypeMemory(nn.Module):
    """Learned prototypes ``p_i`` read by soft nearest-prototype attention, at one or more query points.

    A readout of a flattened query q with sharpness ``(a, b)`` is ``sum_i softmax_i(a q.p_i - b |p_i|^2 / 2) p_i``.
    With ``a = sqrt(alpha) / v`` and ``b = alpha / v`` it is the exact posterior mean of a Gaussian mixture with
    means ``p_i`` (see `AnalyticDigitsDenoiser`). Every stage has ``num_heads`` readouts whose sharpness is a
    function of t (starting log-spaced from ``e^-1`` to ``e^3``); stage 1 queries the input x, stage j + 1 the
    point ``c_0(t) x + sum_h c_h(t) r_h`` built from stage j's readouts ``r_h`` (starting at x).
    """

    def __init__(self, num_prototypes: int, size: int, num_heads: int, num_stages: int, embedding_size: int):
        super().__init__()
        self.prototypes = nn.Parameter(0.5 * torch.randn(num_prototypes, size))
        self.log_sharpness = nn.ModuleList([self._sharpness_layer(embedding_size, num_heads) for _ in range(num_stages)])
        self.query_gains = nn.ModuleList([self._query_layer(embedding_size, num_heads) for _ in range(num_stages - 1)])

    @staticmethod
    def _sharpness_layer(embedding_size: int, num_heads: int) -> nn.Linear:
        layer = nn.Linear(embedding_size, 2 * num_heads)
        nn.init.zeros_(layer.weight)
        with torch.no_grad():
            layer.bias.copy_(torch.linspace(-1.0, 3.0, num_heads).repeat(2))
        return layer

    @staticmethod
    def _query_layer(embedding_size: int, num_heads: int) -> nn.Linear:
        layer = nn.Linear(embedding_size, 1 + num_heads)
        nn.init.zeros_(layer.weight)
        with torch.no_grad():
            layer.bias.copy_(torch.eye(1, 1 + num_heads)[0])
        return layer

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """All readouts, ``[B, num_stages * num_heads, size]``."""
        query, readouts = x, []
        for stage, sharpness_layer in enumerate(self.log_sharpness):
            readout = self.read(query, sharpness_layer(embedding))
            readouts.append(readout)
            if stage < len(self.query_gains):
                gains = self.query_gains[stage](embedding)
                query = gains[:, :1] * x + (gains[:, 1:, None] * readout).sum(dim=1)
        return torch.cat(readouts, dim=1)

    def read(self, query: torch.Tensor, log_sharpness: torch.Tensor) -> torch.Tensor:
        """One readout per head, ``[B, H, size]``."""
        a, b = log_sharpness.clamp(-8.0, 8.0).exp().unsqueeze(-1).chunk(2, dim=1)  # [B, H, 1] each
        half_norms = 0.5 * self.prototypes.pow(2).sum(dim=1)
        logits = a * (query @ self.prototypes.T).unsqueeze(1) - b * half_norms
        return torch.softmax(logits, dim=-1) @ self.prototypes


def farthest_point_selection(samples: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` rows of ``samples`` chosen greedily, each the farthest from those chosen before (Gonzalez 1985).

    Every well-separated cluster of the samples gets a row before any cluster gets a second one.
    """
    flat = samples.reshape(samples.shape[0], -1)
    if count > flat.shape[0]:
        raise ValueError(f"cannot choose {count} rows from {flat.shape[0]} samples")
    chosen = [0]
    distances = (flat - flat[0]).pow(2).sum(dim=1)
    for _ in range(count - 1):
        index = int(distances.argmax())
        chosen.append(index)
        distances = torch.minimum(distances, (flat - flat[index]).pow(2).sum(dim=1))
    return samples[chosen]


class SinusoidalEmbedding(nn.Module):
    """The transformer / DDPM sinusoidal embedding of a (float) timestep."""

    def __init__(self, size: int, max_period: float = 10_000.0):
        super().__init__()
        half = size // 2
        self.register_buffer("frequencies", torch.exp(-math.log(max_period) * torch.arange(half) / half), persistent=False)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        # Angles up to ~1000 rad: computed in float32 whatever the module's dtype, then given that dtype.
        angles = timesteps.float()[:, None] * self.frequencies.float()[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1).to(self.frequencies.dtype)


class ResidualFiLMBlock(nn.Module):
    """``h + MLP(LayerNorm(h) * (1 + scale) + shift)``, with scale and shift computed from the time embedding."""

    def __init__(self, size: int, inner_size: int, embedding_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(size, elementwise_affine=False)
        self.modulation = nn.Linear(embedding_size, 2 * size)
        self.mlp = nn.Sequential(nn.Linear(size, inner_size), nn.SiLU(), nn.Linear(inner_size, size))

    def forward(self, hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        scale, shift = self.modulation(embedding).chunk(2, dim=1)
        return hidden + self.mlp(self.norm(hidden) * (1 + scale) + shift)


STUDENT_CLASSES: Dict[str, type] = {"ReflowStudent": ReflowStudent}

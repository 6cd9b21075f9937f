"""`PerflowSettings`: what a PeRFlow sampler needs besides the model, as one validated object.

Shared by the checkpoint reader/writer, the diffusers scheduler and the ComfyUI nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from .parameterization import canonical_prediction_type
from .segments import Segments, validate_boundaries, validate_num_segments
from .theta import as_theta, theta_to_list

FORMAT_VERSION = "0.1"
DEFAULT_SEGMENTS = 4


@dataclass
class PerflowSettings:
    """PeRFlow sampling settings.

    Args:
        segments: number of segments K (default: as many as ``segment_boundaries`` give, else 4).
        segment_boundaries: explicit boundaries in training timesteps (``[T, ..., 0]``), or None for K uniform ones.
        theta: ``[K, 3]`` float64 correction (zeros = the original PeRFlow).
        prediction_type: ``diff_eps``, ``ddim_eps`` or ``velocity``.
        version: format version of the PeRFlow settings.
        num_train_timesteps: T.
    """

    segments: Optional[int] = None
    segment_boundaries: Optional[List[float]] = None
    theta: torch.Tensor = field(default=None)  # type: ignore[assignment]
    prediction_type: str = "ddim_eps"
    version: str = FORMAT_VERSION
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        self.prediction_type = canonical_prediction_type(self.prediction_type)
        if self.segment_boundaries is not None:
            self.segment_boundaries = validate_boundaries(self.segment_boundaries, self.num_train_timesteps)
            count = len(self.segment_boundaries) - 1
            if self.segments not in (None, count):
                raise ValueError(
                    f"segments={self.segments} disagrees with segment_boundaries {self.segment_boundaries} ({count} segments)"
                )
            self.segments = count
        self.segments = validate_num_segments(DEFAULT_SEGMENTS if self.segments is None else self.segments)
        self.theta = as_theta(self.theta, self.segments)

    def build_segments(self) -> Segments:
        if self.segment_boundaries is None:
            return Segments.uniform(self.segments, self.num_train_timesteps)
        return Segments.from_boundaries(self.segment_boundaries, self.num_train_timesteps)

    @property
    def theta_is_zero(self) -> bool:
        return not bool(self.theta.any())

    def scheduler_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments for ``PerflowScheduler(...)``."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "segments": self.segments,
            "segment_boundaries": self.segment_boundaries,
            "theta_init": None if self.theta_is_zero else theta_to_list(self.theta),
            "prediction_type": self.prediction_type,
            "version": self.version,
        }

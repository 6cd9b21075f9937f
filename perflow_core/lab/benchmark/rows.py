"""The results: a sampler's row of errors per NFE, a model's table of rows, the workload they are measured on, and
the base of the timing records (a wall-time ratio)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch

from ...calibration import rmse
from ..analytic import AnalyticDigitsDenoiser
from .endpoints import ExactPath, SamplerRun, map_to_sigma_zero


@dataclass
class TimeRatio:
    """A timing record whose ``ratio`` is one of its wall times over another (``RATIO_OF`` names the two
    fields), guarded against a zero denominator. ``as_json`` is its fields and the ratio."""

    RATIO_OF: ClassVar[Tuple[str, str]]

    @property
    def ratio(self) -> float:
        numerator, denominator = (getattr(self, name) for name in self.RATIO_OF)
        return numerator / max(denominator, 1e-12)

    def as_json(self) -> Dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


@dataclass
class Row:
    """One sampler's errors per NFE (RMSE to the exact solution at sigma 0)."""

    sampler: str
    family: str
    note: str = ""
    teacher: Optional[str] = None
    errors: Dict[int, float] = field(default_factory=dict)
    errors_x0_map: Dict[int, float] = field(default_factory=dict)
    calls: Dict[int, int] = field(default_factory=dict)
    steps: Dict[int, int] = field(default_factory=dict)
    endpoints: Dict[int, str] = field(default_factory=dict)
    theta: Dict[int, List[List[float]]] = field(default_factory=dict)
    boundaries: Dict[int, List[float]] = field(default_factory=dict)
    best_of: Dict[int, str] = field(default_factory=dict)
    mapped: Dict[int, bool] = field(default_factory=dict)

    def record(self, nfe: int, run: SamplerRun, steps: int, reference: torch.Tensor, model: AnalyticDigitsDenoiser) -> None:
        self.errors[nfe] = rmse(map_to_sigma_zero(model, run.final, run.endpoint, "ode"), reference)
        self.errors_x0_map[nfe] = rmse(map_to_sigma_zero(model, run.final, run.endpoint, "x0"), reference)
        self.calls[nfe], self.steps[nfe], self.endpoints[nfe] = run.calls, steps, run.endpoint.describe()
        self.mapped[nfe] = not run.endpoint.at_sigma_zero

    @property
    def is_mapped(self) -> bool:
        """Whether some final state lay short of sigma 0 (so the endpoint map changes its errors)."""
        return any(self.mapped.values())

    def error(self, nfe: int, endpoint_map: str) -> Optional[float]:
        return (self.errors if endpoint_map == "ode" else self.errors_x0_map).get(nfe)

    def as_json(self) -> Dict[str, Any]:
        keyed = lambda values: {str(k): v for k, v in values.items()}  # noqa: E731
        return {
            "sampler": self.sampler,
            "family": self.family,
            "note": self.note,
            "teacher": self.teacher,
            "errors": keyed(self.errors),
            "errors_x0_map": keyed(self.errors_x0_map),
            "calls": keyed(self.calls),
            "steps": keyed(self.steps),
            "endpoints": keyed(self.endpoints),
            "theta": keyed(self.theta),
            "boundaries": keyed(self.boundaries),
            "best_of": keyed(self.best_of),
        }


@dataclass
class ModelResult:
    """A model's rows and what its table needs to say."""

    title: str
    smoothing: float
    rows: List[Row]
    notes: List[str] = field(default_factory=list)
    model_name: str = "digits"

    @property
    def tag(self) -> str:
        """How the ratios name this model: ``s=0.05``, or ``inverted s=0.05`` for another data set."""
        return f"s={self.smoothing:g}" if self.model_name == "digits" else f"{self.model_name} s={self.smoothing:g}"

    def row(self, sampler: str) -> Optional[Row]:
        return next((r for r in self.rows if r.sampler == sampler), None)

    def best_peer(self, nfe: int, endpoint_map: str = "ode") -> Optional[Row]:
        peers = [r for r in self.rows if r.family in ("diffusers", "comfyui") and r.error(nfe, endpoint_map) is not None]
        return min(peers, key=lambda r: r.error(nfe, endpoint_map), default=None)


@dataclass
class Workload:
    """The noise and exact solutions one model is measured with."""

    model: AnalyticDigitsDenoiser
    held_out: ExactPath
    fit: ExactPath
    nfes: Sequence[int]

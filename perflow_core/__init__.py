"""PeRFlow (Piecewise Rectified Flow) for diffusers and ComfyUI: the shared torch core.

Importing this package never needs ComfyUI. The diffusers-based parts (`PerflowScheduler`) are
imported on first use, so the ComfyUI nodes load without importing diffusers.
"""

from importlib import import_module
from typing import Any

from .parameterization import PREDICTION_TYPES, canonical_prediction_type
from .sampling import SamplingPlan, run_plan
from .segments import Segments, SegmentStep
from .settings import PerflowSettings
from .solver import StepResult, perflow_step
from .theta import THETA_COLUMNS, as_theta, parse_theta_text

__version__ = "0.1.0"

# Imported on first use (diffusers' pipeline loader also looks up SchedulerMixin in a component's module).
_LAZY = {"PerflowScheduler": ".scheduler", "PerflowSchedulerOutput": ".scheduler", "SchedulerMixin": ".scheduler"}

__all__ = [
    "PREDICTION_TYPES",
    "PerflowScheduler",
    "PerflowSchedulerOutput",
    "PerflowSettings",
    "SamplingPlan",
    "Segments",
    "StepResult",
    "THETA_COLUMNS",
    "SegmentStep",
    "as_theta",
    "canonical_prediction_type",
    "parse_theta_text",
    "perflow_step",
    "run_plan",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""PeRFlow (Piecewise Rectified Flow) for diffusers and ComfyUI: the shared torch core.

Importing this package never needs ComfyUI.
"""

from .parameterization import PREDICTION_TYPES, canonical_prediction_type
from .scheduler import PerflowScheduler, PerflowSchedulerOutput
from .segments import Segments, Window
from .solver import StepResult, perflow_step
from .theta import THETA_COLUMNS, as_theta, parse_theta_text

__version__ = "0.1.0"

__all__ = [
    "PREDICTION_TYPES",
    "PerflowScheduler",
    "PerflowSchedulerOutput",
    "Segments",
    "StepResult",
    "THETA_COLUMNS",
    "Window",
    "as_theta",
    "canonical_prediction_type",
    "parse_theta_text",
    "perflow_step",
]

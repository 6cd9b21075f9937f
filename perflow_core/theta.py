"""theta: the learned per-segment correction of the PeRFlow step.

theta has one row per segment and up to three dimensionless columns. For a step from t_c to t_next
inside window k, with velocity v, predicted window end z_e, ``dt = t_next - t_c`` and
``r = dt / (t_e - t_c)`` (the share of the rest of the window this step covers):

    x_next = x + dt * v                                  (the original PeRFlow step)
           + theta[k, 0] * dt * v                        (gain on the step)
           + theta[k, 1] * r * z_e                       (scale on the predicted window end)
           + theta[k, 2] * dt * (v(o) - v(o_prev))       (weight on the change in the model output since
                                                          the previous step: a learned two-step correction)

Each step is linear in theta, so theta can be fitted per segment by least squares; theta = 0 is the
original exactly. ``v(o_prev)`` is the velocity the previous step's raw output ``o_prev`` gives with this
step's sample and coefficients (the term is 0 at the first step).
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

import numpy as np
import torch

THETA_COLUMNS = ("gain", "window_end_scale", "output_change")
NUM_THETA_COLUMNS = len(THETA_COLUMNS)
# Fitted values stay well inside; any finite theta gives finite steps for finite inputs.
THETA_DOCUMENTED_RANGE = (-4.0, 4.0)


def zero_theta(num_segments: int) -> torch.Tensor:
    return torch.zeros(num_segments, NUM_THETA_COLUMNS, dtype=torch.float64)


def as_theta(value: Any, num_segments: int, name: str = "theta") -> torch.Tensor:
    """Validate theta and return it as a float64 ``[K, 3]`` tensor.

    Accepts ``None`` (zeros), a ``[K]`` vector (the gain column) or a ``[K, P]`` matrix with
    ``P <= 3`` (missing columns are zero), as a tensor, array or nested list.
    """
    if value is None:
        return zero_theta(num_segments)
    accepted = f"a [K] vector or a [K, P] matrix with K = {num_segments} segments and P <= {NUM_THETA_COLUMNS}"
    try:
        theta = torch.as_tensor(np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=np.float64))
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numbers, {accepted}; got {value!r}") from None
    if theta.ndim == 1:
        theta = theta[:, None]
    if theta.ndim != 2 or theta.shape[0] != num_segments or not 1 <= theta.shape[1] <= NUM_THETA_COLUMNS:
        raise ValueError(f"{name} has shape {list(theta.shape)}; expected {accepted}")
    if not torch.isfinite(theta).all():
        raise ValueError(f"{name} contains NaN or Inf; every entry must be finite")
    padding = theta.new_zeros(num_segments, NUM_THETA_COLUMNS - theta.shape[1])
    return torch.cat([theta, padding], dim=1)


def theta_rows_like(theta: torch.Tensor, like: torch.Tensor) -> List[Optional[Union[List[float], torch.Tensor]]]:
    """theta's rows for one sampling run, None where a row is zero (the original step). A fixed theta's rows are its
    float64 values as Python numbers (folded into each step's scalar coefficients before the loop); a theta that
    learns goes to ``like``'s device and dtype, keeping its graph."""
    if theta.requires_grad:
        return [row.to(like) for row in theta]
    return [row if any(row) else None for row in theta.detach().cpu().tolist()]


def theta_to_list(theta: torch.Tensor) -> list[list[float]]:
    """JSON-friendly nested list (the form stored in ``scheduler_config.json``)."""
    return [[float(v) for v in row] for row in theta.detach().cpu().tolist()]


def parse_theta_text(text: str, num_segments: Optional[int], name: str = "theta") -> Any:
    """Parse theta typed by a person: rows separated by ``;`` or new lines, numbers by ``,`` or spaces.

    An empty text means theta = 0; a single row of K numbers is the gain column. With ``num_segments`` None
    the rows are returned as lists (for counting them), else the validated ``[K, 3]`` tensor.
    """
    rows = [row for row in text.replace("\n", ";").split(";") if row.strip()]
    try:
        values: Sequence[Sequence[float]] = [[float(v) for v in row.replace(",", " ").split()] for row in rows]
    except ValueError:
        raise ValueError(
            f"{name} text must be numbers, one row per segment separated by ';' (e.g. '0.1, 0, 0.2; 0, 0, 0'); got {text!r}"
        ) from None
    if num_segments is None:
        return values
    if not values:
        return zero_theta(num_segments)
    if len(values) == 1 and num_segments > 1 and len(values[0]) == num_segments:
        return as_theta(values[0], num_segments, name)
    if len({len(row) for row in values}) != 1:
        raise ValueError(f"{name} rows must all have the same number of columns; got {text!r}")
    return as_theta(values, num_segments, name)

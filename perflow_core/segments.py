"""The K segments of the piecewise linear PeRFlow path, the timestep grid, and where a step lies in its segment.

Vocabulary: a *segment* is one of the K pieces of the time axis (the original code and paper call it a "time
window": its config key ``num_time_windows``, and the math names ``window_end`` / ``window_start_coefficients``
for the predicted end of the current segment and the coefficients at its start keep the paper's word). A
`SegmentStep` is one sampling step and the segment it lies in.

Time runs over t in [0, 1] with 1 = pure noise; a model sees the timestep ``t * T`` where ``T`` is
``num_train_timesteps``. Boundaries are given in those training-timestep units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

# A timestep belongs to the first window whose end lies more than this far below it, so a point
# exactly on a boundary belongs to the later window (the original's rule, in timestep units).
BOUNDARY_TOLERANCE = 0.1


@dataclass(frozen=True)
class SegmentStep:
    """One sampling step and the segment it lies in.

    Args:
        index: segment index k (0 = the window at the noise end).
        t: current time t_c in [0, 1].
        t_next: time the step goes to.
        t_start, t_end: the window's start and end times (t_start > t_end).
        alpha_start, alpha_end: ``alphas_cumprod`` at the window's start and end.
    """

    index: int
    t: float
    t_next: float
    t_start: float
    t_end: float
    alpha_start: float
    alpha_end: float


class Segments:
    """K time windows covering t in [1, 0].

    Build with :meth:`uniform` (the original PeRFlow's K equal windows) or :meth:`from_boundaries`.
    """

    def __init__(self, starts: Sequence[float], ends: Sequence[float], num_train_timesteps: int = 1000):
        self.starts = tuple(float(s) for s in starts)
        self.ends = tuple(float(e) for e in ends)
        self.num_train_timesteps = int(num_train_timesteps)

    @classmethod
    def uniform(cls, num_segments: int, num_train_timesteps: int = 1000, t_clean: float = 0.0) -> "Segments":
        """K equal windows, computed exactly as the original PeRFlow does (starts ``i / K``); the last one ends at
        ``t_clean`` (the original's path end, 0 by default)."""
        num_segments = validate_num_segments(num_segments)
        starts = [1.0 * i / num_segments for i in range(num_segments, 0, -1)]
        ends = starts[1:] + [float(t_clean)]
        return cls(starts, ends, num_train_timesteps)

    @classmethod
    def from_boundaries(cls, boundaries: Sequence[float], num_train_timesteps: int = 1000, t_clean: float = 0.0) -> "Segments":
        """Windows from a strictly decreasing list of training timesteps ``[noise end, ..., 0]``.

        The first boundary may be ``T`` or ``T - 1`` (e.g. 1000 or 999): both mean pure noise and are
        read as ``T``, so the model sees timestep 1000 first and the window starts at
        ``alphas_cumprod[T - 1]``, as in the original. The last boundary must be 0.
        """
        values = validate_boundaries(boundaries, num_train_timesteps)
        t = [1.0] + [b / num_train_timesteps for b in values[1:-1]] + [float(t_clean)]
        return cls(t[:-1], t[1:], num_train_timesteps)

    def __len__(self) -> int:
        return len(self.starts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Segments) and (self.starts, self.ends, self.num_train_timesteps) == (
            other.starts,
            other.ends,
            other.num_train_timesteps,
        )

    def __repr__(self) -> str:
        end = f", t_clean={self.t_clean}" if self.t_clean else ""
        return f"Segments(boundaries={self.boundaries}, num_train_timesteps={self.num_train_timesteps}{end})"

    @property
    def boundaries(self) -> list[float]:
        """Boundaries in training-timestep units, ``[T, ..., 0]``."""
        scale = self.num_train_timesteps
        return [_tidy(t * scale) for t in self.starts] + [0.0]

    @property
    def t_clean(self) -> float:
        """Where the last segment ends (the boundaries always end at 0; the original's ``t_clean`` moves only this)."""
        return self.ends[-1]

    @property
    def is_uniform(self) -> bool:
        return self == Segments.uniform(len(self), self.num_train_timesteps, self.t_clean)

    def steps_per_segment(self, num_steps: int) -> list[int]:
        """Spread ``num_steps`` over the windows; the earliest windows take the remainder."""
        k = len(self)
        return [num_steps // k + (1 if i < num_steps % k else 0) for i in range(k)]

    def timesteps(self, num_steps: int, name: str = "num_inference_steps") -> np.ndarray:
        """The original's grid: ``linspace(t_s, t_e, m, endpoint=False)`` per window, as int64 ``t * T``.

        A count whose truncated grid puts two steps on one training timestep is refused naming ``name`` and the
        largest count that fits (e.g. K = 4: at most 996 of the 1000 timesteps)."""
        if num_steps < len(self):
            raise ValueError(f"{name}={num_steps} is below the number of segments {len(self)}")
        grid = self._grid(num_steps)
        if np.any(np.diff(grid) >= 0):
            fits = next(n for n in range(num_steps - 1, len(self) - 1, -1) if not np.any(np.diff(self._grid(n)) >= 0))
            raise ValueError(
                f"{name}={num_steps} puts two steps on the same training timestep in segments {self.boundaries}: at most "
                f"{fits} steps fit (each step needs its own integer timestep); use fewer steps or wider segments"
            )
        return grid

    def _grid(self, num_steps: int) -> np.ndarray:
        pieces = [
            np.linspace(t_s, t_e, num=m, endpoint=False)
            for t_s, t_e, m in zip(self.starts, self.ends, self.steps_per_segment(num_steps))
        ]
        return (np.concatenate(pieces) * self.num_train_timesteps).astype(np.int64)

    def index_of(self, timestep: float) -> int:
        """The window a model timestep belongs to (a boundary belongs to the later window)."""
        for k, t_end in enumerate(self.ends):
            if timestep - BOUNDARY_TOLERANCE > t_end * self.num_train_timesteps:
                return k
        return len(self) - 1

    def alpha_indices(self, k: int) -> tuple[int, int]:
        """Indices into ``alphas_cumprod`` of window k's start and end: ``t*T - 1``, at least 0."""
        scale = self.num_train_timesteps
        return _alpha_index(self.starts[k] * scale), _alpha_index(self.ends[k] * scale)

    def step_at(self, timestep: float, next_timestep: float, alphas_cumprod: torch.Tensor) -> SegmentStep:
        """The geometry of a step from ``timestep`` to ``next_timestep`` (model timestep units)."""
        k = self.index_of(timestep)
        i_start, i_end = self.alpha_indices(k)
        scale = self.num_train_timesteps
        return SegmentStep(
            index=k,
            t=float(timestep) / scale,
            t_next=float(next_timestep) / scale,
            t_start=self.starts[k],
            t_end=self.ends[k],
            alpha_start=float(alphas_cumprod[i_start]),
            alpha_end=float(alphas_cumprod[i_end]),
        )


def _alpha_index(timestep: float) -> int:
    # The original truncates float32 ``t*T - 1``; the 1e-6 keeps an integer boundary such as 700
    # (t = 0.7, which float arithmetic can land just below 700) at its intended index 699.
    return max(int(math.floor(timestep - 1 + 1e-6)), 0)


def _tidy(value: float) -> float:
    rounded = round(value)
    return float(rounded) if abs(value - rounded) < 1e-9 else value


def validate_num_segments(num_segments: object, num_train_timesteps: Optional[int] = None, name: str = "segments") -> int:
    """K as an int: a whole number >= 1, and at most T (each segment at least one training timestep wide)."""
    if isinstance(num_segments, bool) or not isinstance(num_segments, (int, np.integer)) or num_segments < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {num_segments!r}")
    if num_train_timesteps is not None and num_segments > num_train_timesteps:
        raise ValueError(f"{name} must be at most num_train_timesteps={num_train_timesteps}; got {num_segments}")
    return int(num_segments)


def validate_boundaries(boundaries: Sequence[float], num_train_timesteps: int = 1000, name: str = "segment_boundaries") -> list[float]:
    """Check a boundary list and return it as floats with the noise end normalised to ``T``."""
    accepted = (
        f"a strictly decreasing list of training timesteps from {num_train_timesteps} "
        f"(or {num_train_timesteps - 1}) down to 0, e.g. [999, 750, 500, 250, 0]"
    )
    if isinstance(boundaries, torch.Tensor):
        boundaries = boundaries.detach().cpu().flatten().tolist()
    try:
        values = [_real(b) for b in boundaries]
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be {accepted}; got {short_repr(boundaries)}") from None
    if len(values) < 2:
        raise ValueError(f"{name} needs at least 2 entries ({accepted}); got {values}")
    if len(values) > num_train_timesteps + 1:
        raise ValueError(f"{name} has {len(values)} entries; at most {num_train_timesteps + 1} (one segment per training timestep)")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be finite; got {values}")
    if any(later >= earlier for earlier, later in zip(values, values[1:])):
        raise ValueError(f"{name} must be strictly decreasing ({accepted}); got {values}")
    if values[0] not in (num_train_timesteps, num_train_timesteps - 1):
        raise ValueError(f"{name} must start at the noise end ({accepted}); got {values}")
    if values[-1] != 0:
        raise ValueError(f"{name} must end at 0 ({accepted}); got {values}")
    narrow = [(earlier, later) for earlier, later in zip(values, values[1:]) if earlier - later < 1]
    if narrow:
        raise ValueError(f"{name}: each segment must be at least one training timestep wide; {narrow[0][0]:g} to {narrow[0][1]:g} is not")
    values[0] = float(num_train_timesteps)
    return values


def _real(value: object) -> float:
    """A number (an int or a float); never a bool or text (typed text is split into numbers before)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError("a timestep is a number")
    return float(value)


def short_repr(value: object, limit: int = 80) -> str:
    """A value for an error message, cut short (a hostile value can be huge, or too long to print)."""
    try:
        text = repr(value)
    except ValueError:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."

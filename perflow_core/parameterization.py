"""The PeRFlow parameterisations: raw network output -> velocity and predicted window end.

Every parameterisation amounts to predicting the window end ``z_e = lambda_t * z + eta_t * o`` from
the current sample ``z`` and the raw output ``o``; the velocity of the straight path is then
``v = (z_e - z) / (t_e - t_c)`` (Yan et al. 2024, Sec. 3; ``src/scheduler_perflow.py``).
"""

from __future__ import annotations

import math

from .segments import SegmentStep

PREDICTION_TYPES = ("diff_eps", "ddim_eps", "velocity")
# Before April 2024 the original called ``diff_eps`` "epsilon"; diffusers' v-prediction configs
# map onto PeRFlow's velocity models (SD2.1).
PREDICTION_TYPE_ALIASES = {"epsilon": "diff_eps", "v_prediction": "velocity"}

_EPS = 1e-12


def canonical_prediction_type(prediction_type: str, name: str = "prediction_type") -> str:
    """Resolve legacy names (``epsilon`` -> ``diff_eps``) and reject unknown ones."""
    canonical = PREDICTION_TYPE_ALIASES.get(prediction_type, prediction_type) if isinstance(prediction_type, str) else None
    if canonical not in PREDICTION_TYPES:
        accepted = ", ".join(PREDICTION_TYPES + tuple(PREDICTION_TYPE_ALIASES))
        raise ValueError(f"{name} must be one of {accepted}; got {prediction_type!r}")
    return canonical


def window_start_coefficients(prediction_type: str, alpha_start: float, alpha_end: float) -> tuple[float, float]:
    """``(lambda_s, eta_s)`` of the window-end prediction at the window start."""
    if prediction_type == "ddim_eps":
        # One DDIM step from the window start to its end, o read as the usual epsilon.
        lam = math.sqrt(alpha_end / max(alpha_start, _EPS))
        eta = math.sqrt(max(1 - alpha_end, 0.0)) - math.sqrt(alpha_end * (1 - alpha_start) / max(alpha_start, _EPS))
        return lam, eta
    if prediction_type == "diff_eps":
        # o is the noise of the process that takes the window end to the window start, g = sqrt(a_s / a_e).
        g = math.sqrt(alpha_start / max(alpha_end, _EPS))
        return 1 / max(g, _EPS), -math.sqrt(max(1 - g * g, 0.0)) / max(g, _EPS)
    raise ValueError(f"window coefficients exist for ddim_eps and diff_eps, not {prediction_type!r}")


def window_end_coefficients(prediction_type: str, step: SegmentStep) -> tuple[float, float]:
    """``(lambda_t, eta_t)`` at the current time t_c inside the window."""
    lam_s, eta_s = window_start_coefficients(prediction_type, step.alpha_start, step.alpha_end)
    t_s, t_e, t_c = step.t_start, step.t_end, step.t
    denominator = lam_s * (t_c - t_s) + (t_e - t_c)
    denominator = math.copysign(max(abs(denominator), _EPS), denominator)
    return lam_s * (t_e - t_s) / denominator, eta_s * (t_e - t_c) / denominator


def time_to_window_end(step: SegmentStep) -> float:
    """``t_e - t_c`` (negative), kept away from zero."""
    return min(step.t_end - step.t, -_EPS)


def path_noise_scales(step: SegmentStep) -> tuple[float, float]:
    """``(signal, noise)`` scales of the PeRFlow path at ``step.t`` for a clean sample and its noise.

    The straight line between the window's start and end, both noised with the same x0 and noise
    (``sqrt(a) x0 + sqrt(1 - a) noise``); at the window start it is the DDPM marginal.
    """
    a_s, a_e = step.alpha_start, step.alpha_end
    w = min(max((step.t_start - step.t) / (step.t_start - step.t_end), 0.0), 1.0)
    signal = (1 - w) * math.sqrt(a_s) + w * math.sqrt(a_e)
    noise = (1 - w) * math.sqrt(1 - a_s) + w * math.sqrt(1 - a_e)
    return signal, noise

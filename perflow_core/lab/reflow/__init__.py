"""Piecewise reflow: training a PeRFlow student from a frozen diffusion teacher (notes, "Training").

One training step of the original PeRFlow (Yan et al. 2024, Sec. 3.2):

1. sample t uniformly in (0, 1] and find its window [t_s, t_e];
2. noise clean data x0 to ``z_s = sqrt(a_s) x0 + sqrt(1 - a_s) noise`` with ``a_s = alphas_cumprod[int(t_s*T) - 1]``;
3. the frozen teacher solves the probability-flow ODE from t_s to t_e: ``z_e = teacher(z_s, window)``;
4. the student sees ``z_t = lerp(z_s, z_e)`` at timestep ``t*T`` and regresses, with MSE, the velocity
   ``(z_e - z_s) / (t_e - t_s)`` or the eps target ``(z_e - lambda_s z_s) / eta_s``.

The trainer is generic over the network (any ``student(z_t, timesteps)`` returning a tensor or an object with
``.sample``), the data (any ``data_source(batch_size, generator)``) and the teacher (any ``teacher(z_s, window)``).
Two options go beyond the original, both off by default: a teacher pool (the teacher runs once on N samples per
window, and batches reuse those exact pairs) and ``window_start_share`` (a share of t moved to window starts,
where one-step-per-window sampling queries the student).

Files: ``windows.py`` (windows, targets, data, teachers), ``trainer.py`` (``ReflowConfig`` and the trainer),
``student.py`` (the network), ``files.py`` (a student's .safetensors file), ``digits.py`` (the analytic digits
model's student: train and evaluate).
"""

from ...calibration import rmse
from .digits import (
    PROTOTYPE_CANDIDATES_PER_PROTOTYPE,
    VALIDATION_SEEDS,
    DigitsStudentReport,
    default_digits_student,
    evaluate_digits_student,
    exact_ode_samples,
    perflow_pipeline_samples,
    train_digits_student,
)
from .files import STUDENT_CLASS_KEY, STUDENT_CONFIG_KEY, STUDENT_TRAINING_KEY, load_student, save_student, student_smoothing, student_training
from .student import STUDENT_CLASSES, PrototypeMemory, ReflowStudent, ResidualFiLMBlock, SinusoidalEmbedding, farthest_point_selection
from .trainer import PiecewiseReflowTrainer, ReflowConfig, ReflowHistory
from .windows import (
    ANALYTIC_TEACHER_STEPS_PER_LOG_SIGMA,
    AnalyticODETeacher,
    DataSource,
    DDIMTeacher,
    WindowTeacher,
    ddim_step,
    interpolate_in_window,
    noise_to_window_start,
    reflow_target,
    smoothed_digits_source,
    training_windows,
    window_indices,
)

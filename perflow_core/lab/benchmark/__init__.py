"""Error-vs-NFE benchmark: PeRFlow (theta = 0 and calibrated) against diffusers' and ComfyUI's samplers.

Every sampler starts from the same held-out noise on the analytic digits model (``analytic.py``, exact
epsilon, SD1.5 schedule) and is compared with the exact probability-flow ODE solution at sigma = 0.

NFE and steps: PeRFlow (``ddim_eps``, K = 4, K = 2 at NFE 2), diffusers' Euler, DDIM, DPM-Solver++ 2M, UniPC
and DEIS, and ComfyUI's samplers take NFE steps of one call; diffusers' Heun takes NFE // 2 steps, which
make 2 * steps - 1 calls (its last step, to sigma 0, is an Euler step). Calls are counted, never assumed.

Where each sampler stops (read from the scheduler after ``set_timesteps``, not assumed):

- sigma 0: diffusers Euler, Heun (``sigmas[-1] = 0``, Karras' ``x`` equals z there), DPM-Solver++ and UniPC
  (``final_sigmas_type="zero"``), DDIM (``set_alpha_to_one=True``, its default), ComfyUI euler, dpmpp_2m,
  ipndm and deis. These are never remapped.
- ``alphas_cumprod[0]`` (sigma 0.029): PeRFlow (its last window ends there) and diffusers DEIS
  (``sigmas[-1]`` is that level's sigma); ComfyUI uni_pc stops at sigma 0.001. These are carried to sigma 0.

The default carrier is the model's exact ODE flow map (an exact state lands on the exact solution to
~1e-7). ``--endpoint-map x0`` uses the model's exact x0 prediction ``E[x0 | z]`` instead; that is not the ODE's
endpoint (on the exact state at ``alphas_cumprod[0]`` it is off by 6.8e-3 RMSE at smoothing 0.05, nearly the
whole 7.9e-3 gap), so both errors are computed for every row and both sets of ratios are printed.

The analytic model reads timestep ``tau`` at ``alphas_cumprod[tau - 1]`` (PeRFlow's convention); diffusers'
schedulers mean ``alphas_cumprod[t]``, so they see the model through ``CountingModel(timestep_offset=1)``.
ComfyUI's samplers see it as ``model(x, sigma) -> denoised``, evaluated at the exact sigma.

Run ``python -m perflow_core.lab.benchmark`` (``--quick`` for a smoke test). It prints one table per model,
the required ratios, the sampler overhead and the calibration cost, and writes ``benchmark.json`` and
``benchmark.png`` to ``--output-dir``. ComfyUI's samplers join when ``COMFYUI_PATH`` points at a ComfyUI
checkout that imports; the trained student joins when its file exists.

Files: ``endpoints.py`` (where a sampler stops, the map to sigma 0, the exact ODE paths), ``models.py`` (the
wrappers a pipeline runs, a tiny UNet), ``rows.py`` (rows, tables, workloads, timing records), ``peers.py`` (diffusers and ComfyUI
samplers), ``perflow_rows.py`` (PeRFlow and student rows, calibration costs), ``overhead.py`` (time per step),
``report.py`` (ratios, tables, plot), ``run.py`` (the command line).
"""

from ...calibration import rmse
from ...sampling import SamplingPlan
from .endpoints import ENDPOINT_MAPS, FLOW_MAP_STEPS, Endpoint, ExactPath, SamplerRun, endpoint_from_sigma, exact_path, map_to_sigma_zero
from ..pipeline import run_pipeline
from .models import MODEL_TITLES, ConstantOutputModel, CountingModel, ModelWrapper, StudentEpsModel, analytic_model, tiny_unet
from .overhead import (
    FREE_MODEL_REPEAT_FACTOR,
    Overhead,
    comfy_overheads,
    euler_scheduler,
    interleaved_medians,
    measure_overheads,
    scheduler_overheads,
)
from .peers import (
    COMFY_SAMPLERS,
    COMFY_SCHEDULE_SAMPLERS,
    COMFY_SCHEDULES,
    COMFY_UNI_PC_LAST_SIGMA,
    DIFFUSERS_PEERS,
    SD15_SCHEDULE,
    ComfyDenoiser,
    ComfyEnvironment,
    DiffusersPeer,
    EpsFn,
    analytic_eps,
    comfy_rows,
    comfy_schedule_rows,
    diffusers_endpoint,
    diffusers_rows,
    load_comfy,
    network_eps,
    run_comfy_sampler,
    run_diffusers_peer,
)
from .perflow_rows import (
    BEST_PEER_ON_TEACHER,
    CALIBRATED_2M_TEACHER,
    CALIBRATED_EXACT_TEACHER,
    CALIBRATED_PERFLOW_TEACHER,
    CALIBRATED_ROWS,
    LEARNED_GRID,
    STUDENT_CALIBRATED,
    STUDENT_PATH,
    STUDENT_PEER_SUFFIX,
    STUDENT_STORED,
    STUDENT_THETA_ZERO,
    TEACHER_MULTIPLIER,
    THETA_ZERO,
    CalibrationCost,
    boundary_levels,
    exact_ode_teacher,
    load_student_model,
    perflow_endpoint,
    perflow_rows,
    perflow_segments_for,
    perflow_settings,
    run_perflow,
    student_levels,
    student_rows,
    student_window_errors,
    teacher_smoothing_or_default,
)
from .report import (
    MARGIN_B,
    MARGIN_L,
    MARGIN_R,
    MARGIN_T,
    PALETTE,
    PANEL_H,
    PANEL_W,
    TARGETS,
    Ratio,
    cost_lines,
    format_table,
    overhead_lines,
    plot_results,
    required_ratios,
    sampler_notes,
)
from .rows import ModelResult, Row, TimeRatio, Workload
from .run import (
    FIT_COUNT,
    FIT_FIRST_SEED,
    HELD_OUT_COUNT,
    HELD_OUT_FIRST_SEED,
    NFES,
    QUICK_FIT_COUNT,
    QUICK_HELD_OUT_COUNT,
    QUICK_NFES,
    SMOOTHINGS,
    _with_levels,
    analytic_result,
    build_parser,
    build_workload,
    compose_report,
    endpoint_floor_notes,
    json_payload,
    main,
    parse_seeds,
    run,
    student_section,
)

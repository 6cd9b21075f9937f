"""What the benchmark prints and draws: the required ratios, one table per model, the sampler notes, the
overhead and calibration-cost lines, and the error-vs-NFE plot."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

from .endpoints import ENDPOINT_MAPS
from .overhead import Overhead
from .perflow_rows import (
    BEST_PEER_ON_TEACHER,
    CALIBRATED_ROWS,
    STUDENT_CALIBRATED,
    STUDENT_PEER_SUFFIX,
    STUDENT_STORED,
    STUDENT_THETA_ZERO,
    THETA_ZERO,
    CalibrationCost,
)
from .rows import ModelResult, Row

# Issue 12: calibrated at 4 calls <= 0.8x the best peer at 4, no worse than the best peer at 6 and 8 when calibrated
# there, and (the aim) at 4 calls no worse than the best peer at 8; calibration within 2x its teacher sampling.
TARGETS = {"theta": 0.7, "peer_4": 0.8, "peer_same_nfe": 1.0, "peer_8": 1.0, "student": 1.0, "calibration_time": 2.0}


@dataclass
class Ratio:
    """A required ratio, its target and whether it is met."""

    name: str
    value: Optional[float]
    target: float
    inclusive: bool
    endpoint_map: str

    @property
    def met(self) -> Optional[bool]:
        if self.value is None:
            return None
        return self.value <= self.target if self.inclusive else self.value < self.target

    def line(self) -> str:
        sign = "<=" if self.inclusive else "<"
        if self.value is None:
            return f"{self.name} = n/a (target {sign} {self.target:g}): not measured"
        return f"{self.name} = {self.value:.3f} (target {sign} {self.target:g}): {'met' if self.met else 'NOT met'}"


def _divide(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def required_ratios(analytic: Sequence[ModelResult], student: Optional[ModelResult], endpoint_map: str) -> List[Ratio]:
    """The ratios the brief asks for, at both smoothings, for both calibration teachers."""
    ratios = []
    for result in analytic:
        zero = result.row(THETA_ZERO)
        peers = {n: result.best_peer(n, endpoint_map) for n in (4, 6, 8)}
        tag = result.tag
        for calibrated_name, short, *_ in CALIBRATED_ROWS:
            calibrated = result.row(calibrated_name)
            at = lambda n: calibrated.error(n, endpoint_map) if calibrated else None  # noqa: E731
            peer_at = lambda n: peers[n].error(n, endpoint_map) if peers[n] else None  # noqa: E731
            ratios.append(Ratio(f"{tag} {short}@4 / theta=0@4", _divide(at(4), zero.error(4, endpoint_map) if zero else None), TARGETS["theta"], True, endpoint_map))
            ratios.append(Ratio(f"{tag} {short}@4 / best peer@4 ({_name(peers[4])})", _divide(at(4), peer_at(4)), TARGETS["peer_4"], True, endpoint_map))
            for nfe in (6, 8):
                ratios.append(Ratio(f"{tag} {short}@{nfe} / best peer@{nfe} ({_name(peers[nfe])})", _divide(at(nfe), peer_at(nfe)), TARGETS["peer_same_nfe"], True, endpoint_map))
            ratios.append(Ratio(f"{tag} {short}@4 / best peer@8 ({_name(peers[8])}) [aim]", _divide(at(4), peers[8].error(8, endpoint_map) if peers[8] else None), TARGETS["peer_8"], True, endpoint_map))
    if student is not None:
        best = student.row(BEST_PEER_ON_TEACHER)
        for row in (student.row(STUDENT_THETA_ZERO), student.row(STUDENT_CALIBRATED), student.row(STUDENT_STORED)):
            if row is not None and best is not None:
                peer = best.best_of.get(8, "n/a")
                ratios.append(Ratio(f"student s={student.smoothing:g} {row.sampler}@4 / best peer on teacher@8 ({peer})", _divide(row.error(4, endpoint_map), best.error(8, endpoint_map)), TARGETS["student"], False, endpoint_map))
    return ratios


def _name(row: Optional[Row]) -> str:
    return row.sampler if row is not None else "none"


def format_table(result: ModelResult, nfes: Sequence[int], endpoint_map: str, samples: int) -> str:
    """Rows: sampler; columns: NFE; cells: RMSE to the exact ODE solution at sigma 0."""
    width = max(len(r.sampler) for r in result.rows) + 2
    header = f"{'sampler':<{width}}" + "".join(f"{'NFE ' + str(n):>11}" for n in nfes)
    lines = [f"== {result.title}: RMSE to the exact ODE solution at sigma 0 ({samples} held-out seeds, endpoint map: {endpoint_map}) ==", header]
    other_map = next(m for m in ENDPOINT_MAPS if m != endpoint_map)
    for row in result.rows:
        lines.append(f"{row.sampler:<{width}}" + "".join(f"{_cell(row.error(n, endpoint_map)):>11}" for n in nfes))
        if row.is_mapped:
            lines.append(f"{'  ' + other_map + ' map':<{width}}" + "".join(f"{_cell(row.error(n, other_map)):>11}" for n in nfes))
    best = result.row(BEST_PEER_ON_TEACHER)
    if best is not None:
        lines.append(f"{'  (best peer)':<{width}}" + "".join(f"{_short(best.best_of.get(n, '')):>11}" for n in nfes))
    lines += [f"  note: {note}" for note in result.notes]
    return "\n".join(lines)


def _cell(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3e}"


def _short(name: str) -> str:
    return name.replace("diffusers ", "d:").replace("ComfyUI ", "c:")[:10]


def sampler_notes(results: Sequence[ModelResult], nfes: Sequence[int]) -> List[str]:
    """How NFE maps to steps and where each sampler ends (each sampler once, from its first table)."""
    lines = ["== samplers: steps, network calls and final state (mapped to sigma 0 when short of it) =="]
    rows = {row.sampler: row for result in reversed(results) for row in result.rows if row.family != "reference"}
    for row in sorted(rows.values(), key=lambda r: _first_position(results, r.sampler)):
        steps = ", ".join(f"{n}:{row.steps.get(n, '-')}/{row.calls.get(n, '-')}" for n in nfes)
        endpoint = sorted(set(row.endpoints.values()))
        teacher = f"; teacher: {row.teacher}" if row.teacher and row.teacher != "none" else ""
        lines.append(f"{row.sampler}: {row.note}{teacher}; NFE:steps/calls {steps}; ends: {' | '.join(endpoint)}")
    return lines


def _first_position(results: Sequence[ModelResult], sampler: str) -> Tuple[int, int]:
    return next((i, j) for i, result in enumerate(results) for j, row in enumerate(result.rows) if row.sampler == sampler)


def overhead_lines(overheads: Sequence[Overhead]) -> List[str]:
    lines = ["== sampler overhead: time per step, side by side (interleaved repetitions, median) =="]
    for o in overheads:
        lines.append(
            f"{o.setting}, NFE {o.nfe}: {o.ours} {o.ours_seconds_per_step * 1e3:.3f} ms/step, {o.theirs} "
            f"{o.theirs_seconds_per_step * 1e3:.3f} ms/step, ratio {o.ratio:.2f}"
        )
    return lines


def cost_lines(costs: Sequence[CalibrationCost]) -> List[str]:
    target = TARGETS["calibration_time"]
    lines = [f"== calibration cost: calibrate_theta wall time / its teacher sampling time (fit + held-out seeds), target <= {target:g} =="]
    for c in costs:
        verdict = "met" if c.ratio <= target else "NOT met"
        lines.append(f"{c.model}, NFE {c.nfe} ({c.teacher}): total {c.total_seconds:.2f} s, teacher {c.teacher_seconds:.2f} s, ratio {c.ratio:.2f}: {verdict}")
    return lines


PALETTE = [
    (0, 0, 0), (214, 39, 40), (31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 128), (128, 0, 0), (0, 100, 0),
    (255, 0, 255), (70, 130, 180), (210, 105, 30), (95, 158, 160),
]
PANEL_W, PANEL_H, MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 520, 410, 70, 20, 50, 50


def plot_results(results: Sequence[ModelResult], nfes: Sequence[int], endpoint_map: str, path: Path) -> None:
    """One panel per model: RMSE vs NFE, log-scale y, a line per sampler, a shared legend below."""
    names = list(dict.fromkeys(_colour_key(r.sampler) for result in results for r in result.rows))
    colours = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
    legend_rows = math.ceil(len(names) / 3)
    image = Image.new("RGB", (PANEL_W * len(results), PANEL_H + 20 + 18 * legend_rows), "white")
    draw = ImageDraw.Draw(image)
    font = _font()
    values = [v for result in results for r in result.rows for v in (r.error(n, endpoint_map) for n in nfes) if v and v > 0]
    low, high = (math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))) if values else (-4, 0)
    high = max(high, low + 1)
    for index, result in enumerate(results):
        _draw_panel(draw, font, index * PANEL_W, result, nfes, endpoint_map, (low, high), colours)
    _draw_legend(draw, font, PANEL_H + 10, names, colours, image.width)
    image.save(path)


def _font() -> Any:
    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _draw_panel(draw: ImageDraw.ImageDraw, font: Any, left: int, result: ModelResult, nfes: Sequence[int], endpoint_map: str, decades: Tuple[int, int], colours: Dict[str, Tuple[int, int, int]]) -> None:
    box = (left + MARGIN_L, MARGIN_T, left + PANEL_W - MARGIN_R, PANEL_H - MARGIN_B)
    draw.rectangle(box, outline="black")
    draw.text((box[0], 8), result.title, fill="black", font=font)
    to_x = _axis(math.log2(min(nfes)), math.log2(max(nfes)), box[0] + 10, box[2] - 10)
    to_y = _axis(decades[1], decades[0], box[1], box[3])
    for decade in range(decades[0], decades[1] + 1):
        y = to_y(decade)
        draw.line((box[0], y, box[2], y), fill=(225, 225, 225))
        draw.text((box[0] - 48, y - 7), f"1e{decade}", fill="black", font=font)
        for minor in (2, 5):
            if decade + math.log10(minor) < decades[1]:
                minor_y = to_y(decade + math.log10(minor))
                draw.line((box[0], minor_y, box[0] + 5, minor_y), fill="black")
    for nfe in nfes:
        x = to_x(math.log2(nfe))
        draw.line((x, box[3], x, box[3] + 5), fill="black")
        draw.text((x - 6, box[3] + 8), str(nfe), fill="black", font=font)
    draw.text(((box[0] + box[2]) // 2 - 40, box[3] + 26), "NFE (network calls)", fill="black", font=font)
    draw.text((box[0], 26), f"RMSE to the exact sigma-0 solution, log scale ({endpoint_map} map)", fill="black", font=font)
    for row in result.rows:
        points = [(to_x(math.log2(n)), to_y(math.log10(v))) for n in nfes if (v := row.error(n, endpoint_map))]
        width = 3 if row.family in ("perflow", "student") else 1
        if len(points) > 1:
            draw.line(points, fill=colours[_colour_key(row.sampler)], width=width)
        for x, y in points:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colours[_colour_key(row.sampler)])


def _colour_key(sampler: str) -> str:
    """A peer run on the student takes its own colour (the student's panel shows no peer on the teacher)."""
    return sampler.removesuffix(STUDENT_PEER_SUFFIX)


def _axis(value_low: float, value_high: float, pixel_low: float, pixel_high: float) -> Callable[[float], float]:
    scale = (pixel_high - pixel_low) / (value_high - value_low)
    return lambda value: pixel_low + (value - value_low) * scale


def _draw_legend(draw: ImageDraw.ImageDraw, font: Any, top: int, names: Sequence[str], colours: Dict[str, Tuple[int, int, int]], width: int) -> None:
    column = width // 3
    for i, name in enumerate(names):
        x, y = (i % 3) * column + 20, top + (i // 3) * 18
        draw.line((x, y + 7, x + 24, y + 7), fill=colours[name], width=3)
        draw.text((x + 30, y), name, fill="black", font=font)

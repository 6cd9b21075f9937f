"""A small PIL chart of a calibration report (no plotting library needed)."""

from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw

BEFORE_COLOUR = (150, 150, 150)
AFTER_COLOUR = (40, 110, 200)


def calibration_chart(before: Sequence[float], after: Sequence[float], title: str, width: int = 480, height: int = 280) -> Image.Image:
    """Paired bars of the held-out error after each step, theta = 0 (grey) and calibrated (blue)."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, top, bottom = 50, 40, height - 30
    plot_width = width - left - 20
    top_value = max(list(before) + list(after) + [1e-12])
    draw.text((10, 8), title, fill="black")
    draw.line([(left, top), (left, bottom), (width - 20, bottom)], fill="black")
    draw.text((5, top - 5), f"{top_value:.3g}", fill="black")
    draw.text((5, bottom - 10), "0", fill="black")
    slot = plot_width / max(len(before), 1)
    bar = max(slot / 3, 2)
    for i, (b, a) in enumerate(zip(before, after)):
        x = left + i * slot + slot / 6
        for offset, value, colour in ((0, b, BEFORE_COLOUR), (bar, a, AFTER_COLOUR)):
            y = min(bottom - (bottom - top) * value / top_value, bottom - 1)  # a zero error draws no bar
            draw.rectangle([x + offset, y, x + offset + bar - 1, bottom - 1], fill=colour)
        draw.text((x, bottom + 5), f"step {i + 1}", fill="black")
    draw.rectangle([width - 170, 10, width - 160, 20], fill=BEFORE_COLOUR)
    draw.text((width - 155, 9), "theta = 0", fill="black")
    draw.rectangle([width - 90, 10, width - 80, 20], fill=AFTER_COLOUR)
    draw.text((width - 75, 9), "calibrated", fill="black")
    return image

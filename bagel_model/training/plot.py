"""The loss curve of a training run as a picture (PIL only: no plotting library is a requirement).

Per-step losses of a flow model are noisy (each step draws its own flow times), so the curve drawn is
their running mean over a window of a tenth of the run, over the raw losses in a lighter line.
"""

from __future__ import annotations

from PIL import Image, ImageDraw

_MARGIN = (56, 16, 16, 28)  # left, top, right, bottom: room for the axis labels


def _running_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_curve(losses: list[float], width: int = 512, height: int = 256) -> Image.Image:
    """Loss per step (light) and its running mean (dark) on a white canvas, with the range on the axes."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = _MARGIN
    x0, y0, x1, y1 = left, top, width - right, height - bottom
    draw.rectangle((x0, y0, x1, y1), outline=(160, 160, 160))
    if not losses:
        draw.text((x0 + 8, y0 + 8), "no steps yet", fill="black")
        return image
    low, high = min(losses), max(losses)
    span = (high - low) or 1.0

    def point(i: int, v: float) -> tuple[float, float]:
        x = x0 + (x1 - x0) * (i / max(len(losses) - 1, 1))
        return x, y1 - (y1 - y0) * (v - low) / span

    smooth = _running_mean(losses, max(1, len(losses) // 10))
    for values, color in ((losses, (190, 200, 230)), (smooth, (30, 60, 160))):
        points = [point(i, v) for i, v in enumerate(values)]
        if len(points) == 1:
            draw.ellipse((points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2), fill=color)
        else:
            draw.line(points, fill=color, width=2)
    draw.text((4, y0), f"{high:.3g}", fill="black")
    draw.text((4, y1 - 10), f"{low:.3g}", fill="black")
    draw.text((x0, y1 + 6), "step 1", fill="black")
    draw.text((x1 - 60, y1 + 6), f"step {len(losses)}", fill="black")
    draw.text((x0 + 8, y0 + 4), f"loss (last {smooth[-1]:.4f})", fill=(30, 60, 160))
    return image

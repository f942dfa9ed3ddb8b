"""Training curves as a PNG: the loss per step and the validation metric, one or several runs on one picture.

Drawn with Pillow, which the engine already needs and Slicer ships: no plotting library to install into a user's
Python or Slicer for two line charts. Left panel: the training loss (each step faint, a moving average bold);
right panel: the validation metric at each validation (points joined by lines). One colour per run, named in the
legend, so ``med3d demo`` shows pretrained and from-scratch fine-tuning side by side.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import Med3DError

Points = Sequence[Tuple[float, float]]
RUN_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def curves_from_history(history: Sequence[Mapping[str, Any]], validations: Sequence[Mapping[str, Any]] = (),
                        metric: Optional[str] = None) -> Dict[str, Any]:
    """One run's curves from :func:`med3dcore.train.train`'s records: ``{"loss": points, "metric": name,
    "validation": points}``; ``metric`` defaults to the first numeric validation metric (e.g. ``dice``)."""
    loss = [(float(r["step"]), float(r["loss"])) for r in history
            if isinstance(r.get("loss"), (int, float)) and math.isfinite(float(r["loss"]))]
    if metric is None:
        metric = next((k for v in validations for k, x in v.items() if k != "step" and isinstance(x, (int, float))),
                      None)
    points = [(float(v["step"]), float(v[metric])) for v in validations
              if metric is not None and isinstance(v.get(metric), (int, float)) and math.isfinite(float(v[metric]))]
    return {"loss": loss, "metric": metric, "validation": points}


def _nice_ticks(low: float, high: float, count: int = 5) -> List[float]:
    if not math.isfinite(low) or not math.isfinite(high):
        return [0.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks, value = [], first
    while value <= high + step * 0.5 and len(ticks) < 12:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _smooth(points: Points) -> Points:
    """A centred moving average over about a twentieth of the run (at least 1 step)."""
    window = max(1, len(points) // 20)
    values = [v for _, v in points]
    out = []
    for i, (x, _) in enumerate(points):
        part = values[max(0, i - window):i + window + 1]
        out.append((x, sum(part) / len(part)))
    return out


def _text(draw: Any, xy: Tuple[float, float], text: str, font: Any, anchor: str) -> None:
    """Text placed by its right-middle (``rm``) or middle-top (``mt``) point (bitmap fonts have no anchors)."""
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    x, y = xy
    x = x - (r - l) if anchor == "rm" else x - (r - l) / 2
    y = y - (b - t) / 2 - t if anchor == "rm" else y - t
    draw.text((x, y), text, fill=(60, 60, 60), font=font)


Series = Tuple[Tuple[int, int, int], Points, bool, bool]  # colour, points, faint, markers


def _y_range(ys: List[float]) -> Tuple[float, float]:
    """Scores in [0, 1] (Dice, AUC, accuracy) on a 0..1 axis; losses from 0; anything else around its values."""
    low, high = min(ys), max(ys)
    if low >= 0.0 and high <= 1.0:
        return 0.0, 1.0
    if low >= 0.0:
        return 0.0, high if high > 0 else 1.0
    return (low, high) if high > low else (low - 0.5, high + 0.5)


def _panel(draw: Any, box: Tuple[int, int, int, int], title: str, series: List[Series],
           x_range: Tuple[float, float], font: Any, small: Any, xlabel: str) -> None:
    """Axes with ticks and grid in ``box`` (left, top, right, bottom) over ``x_range`` (shared by the panels)."""
    left, top, right, bottom = box
    draw.text((left, top - 22), title, fill=(20, 20, 20), font=font)
    ys = [y for _, pts, _, _ in series for _, y in pts]
    if not ys:
        draw.rectangle(box, outline=(160, 160, 160))
        draw.text((left + 10, (top + bottom) // 2), "no values recorded", fill=(120, 120, 120), font=small)
        return
    xticks, yticks = _nice_ticks(*x_range), _nice_ticks(*_y_range(ys))
    x0, x1, y0, y1 = xticks[0], xticks[-1], yticks[0], yticks[-1]
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def to_px(x: float, y: float) -> Tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    for y in yticks:
        _, py = to_px(x0, y)
        draw.line((left, py, right, py), fill=(228, 228, 228))
        _text(draw, (left - 6, py), f"{y:g}", small, "rm")
    for x in xticks:
        px, _ = to_px(x, y0)
        draw.line((px, bottom, px, bottom + 4), fill=(60, 60, 60))
        _text(draw, (px, bottom + 6), f"{x:g}", small, "mt")
    draw.rectangle(box, outline=(90, 90, 90))
    _text(draw, ((left + right) / 2, bottom + 24), xlabel, small, "mt")
    for color, pts, faint, markers in series:
        line = [to_px(x, y) for x, y in pts]
        shade = tuple(int(c + (255 - c) * 0.65) for c in color) if faint else color
        if len(line) > 1:
            draw.line(line, fill=shade, width=1 if faint else 3, joint="curve")
        if markers:
            for px, py in line:
                draw.ellipse((px - 4, py - 4, px + 4, py + 4), fill=color)


def render_curves(runs: Mapping[str, Mapping[str, Any]], title: str = "Training",
                  size: Tuple[int, int] = (1000, 440)) -> Any:
    """The picture (a PIL image) of ``runs``: name -> :func:`curves_from_history` result."""
    from PIL import Image, ImageDraw

    from .overlay import label_font

    width, height = size
    picture = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    font, small = label_font(16), label_font(13)
    draw.text((20, 10), title, fill=(0, 0, 0), font=label_font(18))
    x = 20
    colors = {}
    for n, name in enumerate(runs):
        colors[name] = RUN_COLORS[n % len(RUN_COLORS)]
        draw.rectangle((x, 40, x + 22, 44), fill=colors[name])
        draw.text((x + 28, 34), name, fill=(30, 30, 30), font=small)
        x += 40 + int(draw.textlength(name, font=small))
    metrics = sorted({str(r.get("metric")) for r in runs.values() if r.get("metric")})
    half = width // 2
    loss_series, metric_series = [], []
    for name, run in runs.items():
        loss = list(run.get("loss") or [])
        if len(loss) > 1:
            loss_series.append((colors[name], loss, True, False))
        loss_series.append((colors[name], _smooth(loss) if len(loss) > 1 else loss, False, len(loss) == 1))
        metric_series.append((colors[name], list(run.get("validation") or []), False, True))
    xs = [x for _, pts, _, _ in loss_series + metric_series for x, _ in pts]
    x_range = (0.0, max(xs)) if xs else (0.0, 1.0)  # both panels on one step axis
    _panel(draw, (80, 90, half - 30, height - 60), "training loss (faint: each step; bold: moving average)",
           loss_series, x_range, font, small, "step")
    _panel(draw, (half + 70, 90, width - 30, height - 60),
           f"validation {' / '.join(metrics) or 'metric'}", metric_series, x_range, font, small, "step")
    return picture


def write_curves(path: Union[str, "os.PathLike[str]"], runs: Mapping[str, Mapping[str, Any]],
                 title: str = "Training", overwrite: bool = True) -> Path:
    """Render :func:`render_curves` and write it as a PNG through the one write path."""
    from .safe_io import write_atomically

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise Med3DError(f"a curve picture is a PNG; give a name ending in .png, not '{path.name}'")
    picture = render_curves(runs, title)

    def verify(staged: Path) -> None:
        from PIL import Image

        with Image.open(staged) as back:
            back.load()

    return write_atomically(path, lambda staged: picture.save(staged, format="PNG"), overwrite=overwrite,
                            verify=verify, what="training curve")

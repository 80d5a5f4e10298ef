"""Charts drawn on the server as inline SVG: no script, no CDN, nothing the CSP has to allow.
Every text in them is escaped; colours come from classes in forum.css."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from markupsafe import Markup, escape

WIDTH, HEIGHT = 560, 190
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 14, 26  # room for the axes' labels


@dataclass(frozen=True)
class Line:
    label: str
    values: Sequence[float | None]  # one per time; None: no value yet (the line starts later)
    css: str  # the class that colours it


def clock(moment: float, span: float) -> str:
    """A time of day on an axis; with seconds when the whole axis is a few minutes."""
    return datetime.fromtimestamp(moment, UTC).strftime("%H:%M" if span >= 600 else "%H:%M:%S")


def _path(points: list[tuple[float, float] | None]) -> str:
    """An SVG path through the points, lifted over the gaps."""
    parts, pen_down = [], False
    for point in points:
        if point is None:
            pen_down = False
            continue
        parts.append(f"{'L' if pen_down else 'M'}{point[0]:.1f},{point[1]:.1f}")
        pen_down = True
    return " ".join(parts)


def line_chart(
    title: str,
    times: Sequence[float],
    lines: Sequence[Line],
    *,
    y_format: Callable[[float], str] = lambda value: f"{value:g}",
    ceiling: tuple[str, float] | None = None,
    y_floor: float = 0.0,
) -> Markup:
    """Lines over time, as a step chart would read them; `ceiling` is a dashed limit (a cap)."""
    values = [v for line in lines for v in line.values if v is not None]
    if ceiling is not None:
        values.append(ceiling[1])
    if not times or not values:
        return Markup('<p class="empty">{}: nothing yet.</p>').format(title)
    low = min([y_floor, *values])
    high = max(values)
    if high <= low:
        high = low + 1.0
    start, end = times[0], times[-1]
    span = max(end - start, 1e-9)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(moment: float) -> float:
        return LEFT + plot_w * (moment - start) / span if len(times) > 1 else LEFT + plot_w

    def y(value: float) -> float:
        return TOP + plot_h * (1 - (value - low) / (high - low))

    out = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
        f'<path class="axis" d="M{LEFT},{TOP} V{TOP + plot_h} H{LEFT + plot_w}"/>',
    ]
    for value in (low, high):
        out.append(
            f'<text class="tick" x="{LEFT - 4}" y="{y(value) + 4:.1f}" text-anchor="end">'
            f"{escape(y_format(value))}</text>"
        )
    bottom = TOP + plot_h + 16
    out.append(f'<text class="tick" x="{LEFT}" y="{bottom}">{clock(start, span)}</text>')
    out.append(
        f'<text class="tick" x="{LEFT + plot_w}" y="{bottom}" text-anchor="end">'
        f"{clock(end, span)} UTC</text>"
    )
    if ceiling is not None:
        label, limit = ceiling
        out.append(
            f'<path class="ceiling" d="M{LEFT},{y(limit):.1f} H{LEFT + plot_w}"/>'
            f'<text class="tick" x="{LEFT + 4}" y="{y(limit) - 4:.1f}">{escape(label)}</text>'
        )
    for line in lines:
        points = [
            None if value is None else (x(moment), y(value))
            for moment, value in zip(times, line.values, strict=True)
        ]
        out.append(
            f'<path class="line {escape(line.css)}" data-series="{escape(line.label)}" '
            f'd="{_path(points)}"/>'
        )
    out.append("</svg>")
    legend = "".join(
        f'<span class="key {escape(line.css)}">{escape(line.label)}</span>' for line in lines
    )
    return Markup(
        f"<figure><figcaption>{escape(title)} {legend}</figcaption>{''.join(out)}</figure>"
    )


def bar_chart(title: str, bars: Sequence[tuple[str, int]]) -> Markup:
    """Horizontal bars, one per label (agents by state)."""
    if not bars:
        return Markup('<p class="empty">{}: nothing yet.</p>').format(title)
    row, label_w = 24, 170
    height = TOP + row * len(bars) + 4
    most = max(count for _, count in bars) or 1
    out = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {height}" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
    ]
    for index, (label, count) in enumerate(bars):
        top = TOP + index * row
        width = (WIDTH - label_w - 60) * count / most
        out.append(
            f'<text class="tick" x="{label_w - 6}" y="{top + 15}" text-anchor="end">'
            f"{escape(label)}</text>"
            f'<path class="bar" data-series="{escape(label)}" '
            f'd="M{label_w},{top + 3} h{width:.1f} v16 h{-width:.1f} Z"/>'
            f'<text class="tick" x="{label_w + width + 6:.1f}" y="{top + 15}">{count}</text>'
        )
    out.append("</svg>")
    return Markup(f"<figure><figcaption>{escape(title)}</figcaption>{''.join(out)}</figure>")

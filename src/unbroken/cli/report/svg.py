"""Charts as inline SVG, drawn here so that the report needs no library and no network.

Every string that reaches the markup passes through :func:`esc`: metric names and hosts come from the
run's log, which anyone's script writes.  Each drawn point is a ``<circle class="pt" data-series=NAME>``
(with a ``<title>`` tooltip), so the points of a plot can be counted in the page's DOM; a series longer
than ``MAX_POINTS`` is thinned to the minimum and maximum of each stretch, which keeps its spikes.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["MAX_POINTS", "Marker", "Series", "esc", "line_chart", "Scale", "thin"]

MAX_POINTS = 1000
WIDTH, HEIGHT = 760, 230
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 30, 34

Formatter = Callable[[float], str]


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def number(value: float) -> str:
    return f"{value:.4g}"


@dataclass
class Series:
    name: str
    points: Sequence[tuple[float, float | None]]
    """(x, y); y None: a missing or non-finite value, drawn as a gap and a mark on the x axis."""
    label: Callable[[float, float | None], str] | None = None
    step_line: bool = False
    css: int | None = None
    """The colour (0-7, cycling); default: the series' place in its chart."""


@dataclass(frozen=True)
class Marker:
    x: float
    label: str
    """The tooltip."""
    kind: str = "restart"
    tag: str = ""
    """Drawn above the line (short: neighbouring markers' tags are staggered on two rows)."""


class Scale:
    """Maps [lo, hi] onto [a, b]; computed on halves, so that any two finite floats have a finite span."""

    def __init__(self, lo: float, hi: float, a: float, b: float) -> None:
        if not hi > lo:
            pad = abs(lo) * 0.1 or 1.0
            lo, hi = lo - pad, hi + pad
        self.lo, self.hi, self.a, self.b = lo, hi, a, b

    def __call__(self, v: float) -> float:
        return self.a + (v * 0.5 - self.lo * 0.5) / (self.hi * 0.5 - self.lo * 0.5) * (self.b - self.a)

    def ticks(self, count: int = 5) -> list[float]:
        half_span = self.hi * 0.5 - self.lo * 0.5
        raw = half_span / (count / 2)
        if not raw > 0 or not math.isfinite(raw):
            return [self.lo, self.hi]
        power = 10 ** math.floor(math.log10(raw))
        step = next((m * power for m in (1, 2, 5, 10) if m * power >= raw), 10 * power)
        first = math.ceil(self.lo / step)
        ticks = [k * step for k in range(first, first + 2 * count + 2) if k * step <= self.hi]
        return ticks or [self.lo, self.hi]


def thin(points: Sequence[tuple[float, float | None]], limit: int = MAX_POINTS) -> list[tuple[float, float | None]]:
    """At most about ``limit`` points of ``points``, in order: each stretch's lowest and highest value,
    and one gap where the stretch holds one."""
    if len(points) <= limit:
        return list(points)
    buckets = max(1, limit // 2)
    size = len(points) / buckets
    kept: list[tuple[float, float | None]] = []
    for b in range(buckets):
        chunk = points[int(b * size):int((b + 1) * size)]
        values = [(x, y) for x, y in chunk if y is not None]
        picks = {min(range(len(values)), key=lambda i: values[i][1]),
                 max(range(len(values)), key=lambda i: values[i][1])} if values else set()
        kept.extend(values[i] for i in sorted(picks))
        gap = next((p for p in chunk if p[1] is None), None)
        if gap is not None:
            kept.append(gap)
    return kept


@dataclass
class Chart:
    title: str
    series: list[Series]
    markers: list[Marker] = field(default_factory=list)
    x_format: Formatter = number
    y_format: Formatter = number
    x_label: str = "step"
    legend: bool = False
    y_from_zero: bool = False


def line_chart(chart: Chart, chart_class: str = "chart") -> str:
    """One chart: its series as lines and counted points, its markers as labelled vertical lines."""
    drawn = [thin(s.points) for s in chart.series]
    xs = [p[0] for d in drawn for p in d] + [m.x for m in chart.markers]
    ys = [p[1] for d in drawn for p in d if p[1] is not None]
    total = sum(len([p for p in s.points if p[1] is not None]) for s in chart.series)
    head = (f'<figure class="{esc(chart_class)}" data-title="{esc(chart.title)}" data-points="{total}" '
            f'data-drawn="{sum(len([p for p in d if p[1] is not None]) for d in drawn)}">'
            f"<figcaption>{esc(chart.title)}{_legend(chart.series) if chart.legend else ''}</figcaption>")
    if not xs:
        return head + '<p class="empty">nothing recorded</p></figure>'
    sx = Scale(min(xs), max(xs), LEFT, WIDTH - RIGHT)
    if chart.y_from_zero:
        ys.append(0.0)
    sy = Scale(min(ys) if ys else 0.0, max(ys) if ys else 1.0, HEIGHT - BOTTOM, TOP)
    parts = [f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img">',
             _axes(sx, sy, chart)]
    parts.extend(_marker(m, i, sx) for i, m in enumerate(chart.markers))
    for index, (series, points) in enumerate(zip(chart.series, drawn, strict=True)):
        parts.append(_series(series, points, index, sx, sy))
    parts.append("</svg>")
    return head + "".join(parts) + "</figure>"


def _legend(series: Sequence[Series]) -> str:
    return " " + " ".join(f'<span class="key s{_colour(s, i)}">{esc(s.name)}</span>' for i, s in enumerate(series))


def _colour(series: Series, index: int) -> int:
    return (index if series.css is None else series.css) % 8


def _axes(sx: Scale, sy: Scale, chart: Chart) -> str:
    bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
    out = [f'<line class="axis" x1="{LEFT}" y1="{bottom}" x2="{right}" y2="{bottom}"/>',
           f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{bottom}"/>']
    for v in sy.ticks():
        y = sy(v)
        out.append(f'<line class="grid" x1="{LEFT}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}"/>'
                   f'<text class="tick" x="{LEFT - 4}" y="{y + 3:.1f}" text-anchor="end">'
                   f"{esc(chart.y_format(v))}</text>")
    for v in sx.ticks(6):
        x = sx(v)
        out.append(f'<text class="tick" x="{x:.1f}" y="{bottom + 14}" text-anchor="middle">'
                   f"{esc(chart.x_format(v))}</text>")
    out.append(f'<text class="tick" x="{right}" y="{HEIGHT - 2}" text-anchor="end">{esc(chart.x_label)}</text>')
    return "".join(out)


def _marker(marker: Marker, index: int, sx: Scale) -> str:
    x = sx(marker.x)
    tag_y = TOP - 8 - (index % 2) * 10
    return (f'<g class="marker {esc(marker.kind)}" data-x="{esc(number(marker.x))}">'
            f'<line x1="{x:.1f}" y1="{tag_y + 2}" x2="{x:.1f}" y2="{HEIGHT - BOTTOM}"/>'
            + (f'<text x="{x + 2:.1f}" y="{tag_y}">{esc(marker.tag)}</text>' if marker.tag else "")
            + f'<title>{esc(marker.label)}</title></g>')


def _series(series: Series, points: Sequence[tuple[float, float | None]], index: int, sx: Scale, sy: Scale) -> str:
    name = esc(series.name)
    label = series.label or (lambda x, y: f"{series.name} at {number(x)}: {'-' if y is None else number(y)}")
    path: list[str] = []
    pen_down = False
    dots: list[str] = []
    gaps: list[str] = []
    for x, y in points:
        px = sx(x)
        if y is None:
            pen_down = False
            gaps.append(f'<line class="gap" x1="{px:.1f}" y1="{HEIGHT - BOTTOM}" x2="{px:.1f}" '
                        f'y2="{HEIGHT - BOTTOM - 8}"><title>{esc(label(x, None))}</title></line>')
            continue
        py = sy(y)
        if pen_down and series.step_line:
            path.append(f"H{px:.1f}V{py:.1f}")
        else:
            path.append(f"{'L' if pen_down else 'M'}{px:.1f} {py:.1f}")
        pen_down = True
        dots.append(f'<circle class="pt" data-series="{name}" cx="{px:.1f}" cy="{py:.1f}" r="2">'
                    f"<title>{esc(label(x, y))}</title></circle>")
    return (f'<g class="series s{_colour(series, index)}" data-series="{name}"><path d="{"".join(path)}"/>'
            + "".join(dots) + "".join(gaps) + "</g>")

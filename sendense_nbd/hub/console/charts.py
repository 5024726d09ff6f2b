"""Line charts as inline SVG, drawn on the server: no chart library, no script.

A chart is a title (for screen readers too), a polyline over the points, the value range on the
left and the first and last x label underneath. Text goes through Markup's escaping.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from markupsafe import Markup

WIDTH, HEIGHT = 640, 200
_LEFT, _RIGHT, _TOP, _BOTTOM = 72, 8, 12, 28


def line_chart(
    points: Sequence[tuple[float, float]],
    *,
    element_id: str,
    title: str,
    y_label: Callable[[float], str],
    x_labels: tuple[str, str],
) -> Markup:
    """An SVG line over ``points`` (x ascending); fewer than two points draw "no data yet"."""
    head = Markup(
        '<svg id="{}" class="chart" role="img" aria-labelledby="{}-title" viewBox="0 0 {} {}" '
        'preserveAspectRatio="xMidYMid meet"><title id="{}-title">{}</title>'
    ).format(element_id, element_id, WIDTH, HEIGHT, element_id, title)
    if len(points) < 2:
        body = Markup('<text x="{}" y="{}" class="chart-empty">no data yet</text>').format(WIDTH // 2, HEIGHT // 2)
        return head + body + Markup("</svg>")
    xs, ys = [x for x, _ in points], [y for _, y in points]
    x0, x1 = min(xs), max(xs)
    y1 = max(max(ys), 1e-9)
    inner_w, inner_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM

    def place(x: float, y: float) -> str:
        px = _LEFT + (x - x0) / ((x1 - x0) or 1) * inner_w
        py = _TOP + inner_h - max(y, 0.0) / y1 * inner_h
        return f"{px:.1f},{py:.1f}"

    line = " ".join(place(x, y) for x, y in points)
    base = HEIGHT - _BOTTOM
    body = Markup(
        '<line class="chart-axis" x1="{l}" y1="{t}" x2="{l}" y2="{b}"/>'
        '<line class="chart-axis" x1="{l}" y1="{b}" x2="{r}" y2="{b}"/>'
        '<polyline class="chart-line" points="{line}"/>'
        '<text class="chart-label" x="{lx}" y="{ty}" text-anchor="end">{top}</text>'
        '<text class="chart-label" x="{lx}" y="{b}" text-anchor="end">{zero}</text>'
        '<text class="chart-label" x="{l}" y="{xy}">{first}</text>'
        '<text class="chart-label" x="{r}" y="{xy}" text-anchor="end">{last}</text>'
    ).format(
        l=_LEFT, t=_TOP, b=base, r=WIDTH - _RIGHT, line=line, lx=_LEFT - 6, ty=_TOP + 10,
        top=y_label(y1), zero=y_label(0.0), xy=HEIGHT - 8, first=x_labels[0], last=x_labels[1],
    )  # fmt: skip
    return head + body + Markup("</svg>")


def rates(samples: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Throughput between consecutive (time, bytes) samples, at each interval's end; never negative."""
    out: list[tuple[float, float]] = []
    for (t0, b0), (t1, b1) in zip(samples, samples[1:], strict=False):
        if t1 > t0:
            out.append((t1, max(0.0, (b1 - b0) / (t1 - t0))))
    return out

"""Charts drawn on the server as SVG: nothing runs in the browser and nothing is fetched.

Each chart is markup the templates insert (``Markup``), built with every label escaped; the
page puts a table of the same numbers beside it. Amounts are µcredits, shown as credits.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from markupsafe import Markup

WIDTH, HEIGHT = 640, 220
LEFT, BOTTOM, TOP, RIGHT = 64, 28, 12, 12
_MICRO = 1_000_000


def _credits(micro: int) -> str:
    return f"{micro / _MICRO:,.0f}"


def _frame(title: str, body: list[str]) -> Markup:
    return Markup(
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'preserveAspectRatio="xMidYMid meet" aria-label="{escape(title)}">'
        f"<title>{escape(title)}</title>{''.join(body)}</svg>"
    )


def _axis(top_micro: int) -> list[str]:
    plot_h = HEIGHT - BOTTOM - TOP
    out = [
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{HEIGHT - BOTTOM}" class="axis"/>',
        f'<line x1="{LEFT}" y1="{HEIGHT - BOTTOM}" x2="{WIDTH - RIGHT}" '
        f'y2="{HEIGHT - BOTTOM}" class="axis"/>',
    ]
    for step in range(5):
        value = top_micro * step // 4
        y = HEIGHT - BOTTOM - plot_h * step / 4
        out.append(
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">'
            f"{_credits(value)}</text>"
        )
    return out


def bars(title: str, points: Sequence[tuple[str, int]]) -> Markup:
    """One bar per (label, µcredits), left to right."""
    top = max((v for _, v in points), default=0) or _MICRO
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - BOTTOM - TOP
    body = _axis(top)
    width = plot_w / max(1, len(points))
    for index, (label, value) in enumerate(points):
        h = plot_h * value / top
        x = LEFT + index * width
        body.append(
            f'<rect x="{x + width * 0.1:.1f}" y="{HEIGHT - BOTTOM - h:.1f}" '
            f'width="{width * 0.8:.1f}" height="{h:.1f}" class="bar">'
            f"<title>{escape(label)}: {_credits(value)} credits</title></rect>"
        )
        if len(points) <= 16 or index % max(1, len(points) // 8) == 0:
            body.append(
                f'<text x="{x + width / 2:.1f}" y="{HEIGHT - 8}" class="tick" '
                f'text-anchor="middle">{escape(label[-5:])}</text>'
            )
    return _frame(title, body)


def burn_down(
    title: str,
    cumulative: Sequence[tuple[float, int]],
    granted_micro: int,
    projected_micro: int,
) -> Markup:
    """Credits used so far (a line through (fraction of the period passed at the end of a
    day, µcredits used by then)), the plan's grant (a level) and the projection to the
    period's end (dashed)."""
    top = max(granted_micro, projected_micro, *(v for _, v in cumulative), _MICRO)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - BOTTOM - TOP
    body = _axis(top)

    def y(value: int) -> float:
        return HEIGHT - BOTTOM - plot_h * value / top

    grant_y = y(granted_micro)
    body.append(
        f'<line x1="{LEFT}" y1="{grant_y:.1f}" x2="{WIDTH - RIGHT}" y2="{grant_y:.1f}" '
        f'class="grant"><title>granted: {_credits(granted_micro)} credits</title></line>'
    )
    points = [(LEFT + plot_w * min(1.0, fraction), y(value)) for fraction, value in cumulative]
    if points:
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in [(LEFT, y(0)), *points])
        body.append(f'<polyline points="{path}" class="used"/>')
        last_x, last_y = points[-1]
        body.append(
            f'<line x1="{last_x:.1f}" y1="{last_y:.1f}" x2="{WIDTH - RIGHT}" '
            f'y2="{y(projected_micro):.1f}" class="projected"><title>projected: '
            f"{_credits(projected_micro)} credits</title></line>"
        )
    return _frame(title, body)

"""Charts drawn on the server as inline SVG: no script, no CDN, and they scale with the page."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from html import escape

from markupsafe import Markup

from app.core import money

PALETTE = ("#4f6bed", "#e8743b", "#19a979", "#ed4a7b", "#945ecf", "#13a4b4", "#bf8b00", "#6c8893")
MAX_SERIES = len(PALETTE) - 1  # the rest share the last colour as "other models"
W, H = 720, 240
LEFT, RIGHT, TOP, BOTTOM = 64, 8, 12, 26


def _usd(units: int, step: int) -> str:
    value = money.to_decimal(units)
    places = 2 if step >= 10_000_000 else 3 if step >= 1_000_000 else 5
    return f"${value.quantize(Decimal(1).scaleb(-places))}"


def _nice_step(top: int, ticks: int = 4) -> int:
    """A round tick step (1, 2 or 5 times a power of ten, in units) covering `top` in `ticks` steps."""
    raw = max(1, -(-top // ticks))
    power = 1
    while power * 10 <= raw:
        power *= 10
    for factor in (1, 2, 5, 10):
        if factor * power >= raw:
            return factor * power
    return 10 * power  # pragma: no cover


def _group(series: dict[str, list[int]]) -> list[tuple[str, list[int]]]:
    ranked = sorted(series.items(), key=lambda item: (-sum(item[1]), item[0]))
    if len(ranked) <= MAX_SERIES + 1:
        return ranked
    head, tail = ranked[:MAX_SERIES], ranked[MAX_SERIES:]
    other = [sum(values[i] for _, values in tail) for i in range(len(tail[0][1]))]
    return [*head, (f"other models ({len(tail)})", other)]


def daily_spend(days: list[date], series: dict[str, list[int]]) -> dict:
    """A stacked bar per day, one colour per model. Returns {"svg": Markup, "legend": [(name, colour, total)]}."""
    groups = _group(series)
    totals = [sum(values[i] for _, values in groups) for i in range(len(days))]
    peak = max(totals, default=0)
    parts = [f'<svg class="chart" viewBox="0 0 {W} {H}" role="img" '
             f'aria-label="Daily spend by model, last {len(days)} days" xmlns="http://www.w3.org/2000/svg">']
    plot_w, plot_h = W - LEFT - RIGHT, H - TOP - BOTTOM
    step = _nice_step(peak) if peak else 1
    top = step * 4 if peak else 1
    for tick in range(5):
        y = TOP + plot_h - plot_h * tick / 4
        parts.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        if peak:
            parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" class="axis" text-anchor="end">'
                         f'{_usd(step * tick, step)}</text>')
    slot = plot_w / max(1, len(days))
    for index, day in enumerate(days):
        x = LEFT + slot * index + slot * 0.15
        y = TOP + plot_h
        for (name, values), colour in zip(groups, PALETTE, strict=False):  # fewer models than colours
            amount = values[index]
            if amount <= 0:
                continue
            height = plot_h * amount / top
            y -= height
            label = escape(f"{day.isoformat()} · {name}: ${money.render(amount)}")
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{slot * 0.7:.1f}" height="{max(height, 0.5):.1f}" '
                         f'fill="{colour}"><title>{label}</title></rect>')
        if index % 5 == (len(days) - 1) % 5:
            parts.append(f'<text x="{x + slot * 0.35:.1f}" y="{H - 8}" class="axis" text-anchor="middle">'
                         f'{day.strftime("%b")} {day.day}</text>')
    if not peak:
        parts.append(f'<text x="{LEFT + plot_w / 2:.0f}" y="{TOP + plot_h / 2:.0f}" class="empty" '
                     f'text-anchor="middle">No spend in the last {len(days)} days</text>')
    parts.append("</svg>")
    legend = [(name, colour, sum(values)) for (name, values), colour in zip(groups, PALETTE, strict=False)]
    return {"svg": Markup("".join(parts)), "legend": legend}

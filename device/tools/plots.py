"""Small SVG charts (reliability diagram, ROC curve) as strings: no matplotlib on the Pi.

The model card embeds them as files, the page draws them inline; both from the figures in a
bundle's manifest or a site profile, so what is drawn is what was recorded.
"""

from __future__ import annotations

import html

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
SIZE, MARGIN = 260, 38


def _frame(title: str, x_label: str, y_label: str) -> list[str]:
    inner = SIZE - 2 * MARGIN
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{SIZE}" height="{SIZE}" viewBox="0 0 {SIZE} {SIZE}" '
        'font-family="sans-serif" font-size="10">',
        f'<rect x="{MARGIN}" y="{MARGIN}" width="{inner}" height="{inner}" fill="white" stroke="#888"/>',
        f'<line x1="{MARGIN}" y1="{SIZE - MARGIN}" x2="{SIZE - MARGIN}" y2="{MARGIN}" stroke="#bbb" stroke-dasharray="4 3"/>',
        f'<text x="{SIZE / 2}" y="14" text-anchor="middle" font-size="11" font-weight="bold">{html.escape(title)}</text>',
        f'<text x="{SIZE / 2}" y="{SIZE - 6}" text-anchor="middle">{html.escape(x_label)}</text>',
        f'<text x="10" y="{SIZE / 2}" text-anchor="middle" transform="rotate(-90 10 {SIZE / 2})">{html.escape(y_label)}</text>',
    ]
    for tick in (0.0, 0.5, 1.0):
        x, y = _xy(tick, tick)
        parts.append(f'<text x="{x:.1f}" y="{SIZE - MARGIN + 12}" text-anchor="middle">{tick:g}</text>')
        parts.append(f'<text x="{MARGIN - 4}" y="{y + 3:.1f}" text-anchor="end">{tick:g}</text>')
    return parts


def _xy(x: float, y: float) -> tuple[float, float]:
    inner = SIZE - 2 * MARGIN
    return MARGIN + x * inner, SIZE - MARGIN - y * inner


def _legend(names: list[str]) -> list[str]:
    parts = []
    for index, name in enumerate(names):
        y = MARGIN + 10 + 12 * index
        parts.append(f'<rect x="{MARGIN + 6}" y="{y - 7}" width="8" height="8" fill="{COLOURS[index % len(COLOURS)]}"/>')
        parts.append(f'<text x="{MARGIN + 18}" y="{y}">{html.escape(name)}</text>')
    return parts


def reliability_svg(curves: dict[str, list[dict]], title: str = "Reliability") -> str:
    """Observed positive rate against mean predicted probability per bin, one line per curve
    (``{name: reliability bins}`` as :func:`device.core.metrics.reliability_bins` gives them);
    points are sized by the bin's count. The dashed diagonal is perfect calibration."""
    parts = _frame(title, "predicted probability", "observed positive rate")
    for index, bins in enumerate(curves.values()):
        colour = COLOURS[index % len(COLOURS)]
        points = [(b["mean_probability"], b["observed_rate"], b["count"]) for b in bins if b.get("count")]
        total = max(sum(c for _, _, c in points), 1)
        path = " ".join(f"{'M' if i == 0 else 'L'}{_xy(x, y)[0]:.1f},{_xy(x, y)[1]:.1f}" for i, (x, y, _) in enumerate(points))
        if path:
            parts.append(f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        for x, y, count in points:
            cx, cy = _xy(x, y)
            parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{2 + 6 * (count / total) ** 0.5:.1f}" fill="{colour}" fill-opacity="0.6"/>')
    parts += _legend(list(curves))
    parts.append("</svg>")
    return "\n".join(parts)


def roc_svg(curves: dict[str, tuple[list[float], list[float]]], title: str = "ROC", marks: dict[str, tuple[float, float]] | None = None) -> str:
    """ROC curves (``{name: (false positive rates, true positive rates)}``), with optional
    marked operating points (``{label: (fpr, tpr)}``, e.g. the threshold in use)."""
    parts = _frame(title, "1 - specificity", "sensitivity")
    for index, (fpr, tpr) in enumerate(curves.values()):
        colour = COLOURS[index % len(COLOURS)]
        path = " ".join(f"{'M' if i == 0 else 'L'}{_xy(x, y)[0]:.1f},{_xy(x, y)[1]:.1f}" for i, (x, y) in enumerate(zip(fpr, tpr, strict=True)))
        parts.append(f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="1.8"/>')
    for label, (x, y) in (marks or {}).items():
        cx, cy = _xy(x, y)
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="black"/>')
        parts.append(f'<text x="{cx + 6:.1f}" y="{cy + 12:.1f}">{html.escape(label)}</text>')
    parts += _legend(list(curves))
    parts.append("</svg>")
    return "\n".join(parts)

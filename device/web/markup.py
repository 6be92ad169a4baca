"""The HTML and Markdown pieces the tabs share, drawn by hand so every tab looks alike and the page needs no pandas (memory on a Pi)."""

from __future__ import annotations

import html

from device.core.heatmap import OPACITY, legend


def probability_bar(probability: float, threshold: float, positive_label: str, band: list[float] | None = None) -> str:
    """An HTML bar of P(positive) with a marker at the threshold and the "uncertain — review"
    band shaded."""
    over = probability >= threshold
    uncertain = band is not None and band[0] <= probability < band[1]
    colour = "#e0a100" if uncertain else "#d33" if over else "#2a8a4a"
    shade = (
        f'<div data-band="{band[0]:.3f},{band[1]:.3f}" title="uncertain — review" style="position:absolute;'
        f'left:{band[0] * 100:.1f}%;width:{(band[1] - band[0]) * 100:.1f}%;top:0;bottom:0;'
        'background:repeating-linear-gradient(45deg,rgba(224,161,0,.45) 0 4px,rgba(224,161,0,.15) 4px 8px)"></div>'
        if band else ""
    )
    return (
        '<div style="font-size:0.85rem;margin:0.2rem 0 0.6rem 0">'
        f'<div style="display:flex;justify-content:space-between"><span>P({html.escape(positive_label)}), calibrated</span>'
        f"<span><b>{probability:.3f}</b></span></div>"
        '<div style="position:relative;height:14px;background:#e6e8eb;border-radius:7px;overflow:hidden">'
        f'<div style="width:{probability * 100:.1f}%;height:100%;background:{colour}"></div>{shade}'
        f'<div style="position:absolute;left:{threshold * 100:.1f}%;top:0;bottom:0;width:2px;background:#222"></div>'
        "</div>"
        f'<div style="position:relative;height:1.1rem"><span style="position:absolute;left:{threshold * 100:.1f}%;'
        f'transform:translateX(-50%);color:#555">threshold {threshold:.2f}</span></div>'
        + (f'<div style="color:#8a6d00">uncertain — review band {band[0]:.2f}–{band[1]:.2f}</div>' if band else "")
        + "</div>"
    )


def heatmap_legend(scale: float, positive_label: str) -> str:
    """A colour bar for the overlay: the colours at their drawn opacity over mid grey, with
    the change of P each end stands for (this image's own scale)."""
    stops = ", ".join(
        f"rgba({r},{g},{b},{OPACITY * abs(value):.2f}) {(value + 1) * 50:.0f}%" for value, (r, g, b) in legend(21)
    )
    label = html.escape(positive_label)
    return (
        '<div data-legend="heatmap" style="font-size:0.75rem;width:260px;margin-top:-0.4rem">'
        f'<div style="height:12px;border-radius:3px;background:linear-gradient(to right, {stops}), #808080"></div>'
        '<div style="display:flex;justify-content:space-between;color:#444">'
        f"<span>−{scale:.2f}</span><span>0</span><span>+{scale:.2f}</span></div>"
        f'<div style="color:#444">change of P({label}) when the region is hidden: warm = evidence for {label}, '
        "blue = against</div></div>"
    )


def md_escape(text: str) -> str:
    """A file name as literal Markdown text (a name like ``[x](http://…)`` must not become a link)."""
    return "".join("\\" + c if c in "\\`*_{}[]()<>#+!|~" else c for c in text)


def flatten(values: dict, prefix: str = "") -> dict[str, object]:
    """Nested manifest metrics as ``a.b.c -> value`` for a two-column table."""
    flat: dict[str, object] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, float):
            flat[name] = f"{value:.4g}"
        elif isinstance(value, (int, str, bool)) or value is None:
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


TABLE_STYLE = (
    "<style>table.ctpi{border-collapse:collapse;width:100%;font-size:0.85rem}"
    "table.ctpi th{text-align:left;font-weight:600;border-bottom:2px solid #d5d8dc;padding:0.3rem 0.6rem}"
    "table.ctpi td{border-bottom:1px solid #eceef0;padding:0.25rem 0.6rem}"
    "table.ctpi td.n{text-align:right;font-variant-numeric:tabular-nums}"
    "table.ctpi tr.flag td{background:#fdecec}</style>"
)


def html_table(rows: list[dict], name: str, flag=None) -> str:
    """Rows as an escaped HTML table. Streamlit's dataframe would pull in pandas and pyarrow
    (about 80 MB more in the page process, a lot on a 1 GB Pi) for a few dozen rows."""
    if not rows:
        return ""
    columns = list(rows[0])

    def cell(value) -> str:
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        text = "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
        return f'<td class="n">{html.escape(text)}</td>' if numeric else f"<td>{html.escape(text)}</td>"

    header = "".join(f"<th>{html.escape(str(column))}</th>" for column in columns)
    body = "".join(
        f'<tr{" class=flag" if flag and flag(row) else ""}>{"".join(cell(row[c]) for c in columns)}</tr>' for row in rows
    )
    return f'{TABLE_STYLE}<table class="ctpi" data-table="{html.escape(name)}"><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>'

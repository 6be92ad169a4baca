"""The "Calibration and the uncertain band" section of ``MODEL_CARD.md``.

Written by ``python -m convert.calibrate`` (and so by ``python -m convert``) from the manifest's
``calibration`` entry, and replaced in place when a bundle is recalibrated: the rest of the card
(:mod:`convert.model_card`) is the conversion's and stays as it was.
"""

from __future__ import annotations

from convert.model_card import number_text, with_marked_section
from device.core.calibration import ece_floor_text

CALIBRATION_START, CALIBRATION_END = "<!-- section:calibration -->", "<!-- /section:calibration -->"
RELIABILITY_FILE = "reliability.svg"


def calibration_section(entry: dict, band: list[float] | None, threshold: float) -> str:
    """The card's "Calibration and the uncertain band" section from the manifest's
    ``calibration`` entry (written by ``python -m convert.calibrate``)."""
    sources = entry["sources"]
    fraction = lambda value: "n/a" if value is None else f"{value:.1%}"  # noqa: E731
    choice = entry.get("choice")
    chosen = ("" if not choice else " Chosen by the " + choice["rule"] + " (" + ", ".join(
        f"{name} {value:.3f}" for name, value in choice["worst_source_ece"].items()) + ").")
    if entry["method"] == "identity":
        opening = (f"P({entry['positive_label']}) is the model's own: no map was applied, because neither Platt nor "
                   f"temperature scaling, fitted on {entry['fitted_on']['n']} labelled val slices ({', '.join(sources)}; "
                   f"{entry['weighting']}), lowered the worst source's ECE.{chosen} The threshold is the model's, "
                   f"**{threshold:.4f}**.")
        lines = [CALIBRATION_START, "## Calibration and the uncertain band", "", opening, ""]
    else:
        lines = None
    lines = lines or [
        CALIBRATION_START,
        "## Calibration and the uncertain band",
        "",
        f"P({entry['positive_label']}) is calibrated on labelled val slices by **{entry['method']}** scaling of the "
        f"model's logit, applied by the device after the model (every format): "
        f"`P = sigmoid({entry['a']:.4f} · logit(p) + {entry['b']:.4f})`, fitted on the {entry['format']} model's "
        f"outputs of {entry['fitted_on']['n']} slices ({', '.join(sources)}; {entry['weighting']}). "
        f"The map is increasing, so ROC AUC and every decision are unchanged: the threshold "
        f"{entry['raw_threshold']:.4f} on the model's scale is **{threshold:.4f}** on the calibrated scale.{chosen}",
        "",
    ]
    if band:
        lines += [
            f"Slices with calibrated P in **[{band[0]:.3f}, {band[1]:.3f})** are labelled `uncertain — review` instead "
            f"of a class (rule: {entry['band']['rule']}; target {'reached' if entry['band']['reached_target'] else 'not reached'}).",
            "",
        ]
    lines += [
        "| val source | slices | ECE before | ECE after | ECE of a perfectly calibrated P here (90 % range) | in the band | accuracy outside the band | accuracy (no band) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in [*sources, "pooled"]:
        if name not in entry["ece_after"]:
            continue
        figures = entry["band"]["figures"].get(name, {})
        lines.append(
            f"| {name} | {entry['reliability'][name]['after']['n']} | {entry['ece_before'][name]:.3f} | "
            f"{entry['ece_after'][name]:.3f} | {ece_floor_text(entry['reliability'][name]['after']) or 'n/a'} | "
            f"{figures.get('in_band', 'n/a')} ({fraction(figures.get('fraction_in_band'))}) | "
            f"{number_text(figures.get('accuracy_outside'))} | {number_text(figures.get('accuracy_all'))} |"
        )
    lines += [
        "",
        "ECE: expected calibration error over 10 equal-width bins of P. Fitted and measured on the same val "
        "slices (which also chose the threshold), so these figures are optimistic; a site check on local "
        "slices (`ctpi site-check`) measures them where the model is used. ECE is biased upwards on few "
        "slices: the column after it is what a model whose P is exactly right would show on the same slices "
        "(labels drawn from P, 2,000 times; median and 90 % range, and p, the share of those draws at least "
        "as large as the measured ECE). An ECE inside that range is sampling noise, not miscalibration.",
        "",
        f"![Reliability diagram per val source, after calibration]({RELIABILITY_FILE})",
        "",
        f"Recalibrate with: `{entry['command']}`",
        CALIBRATION_END,
        "",
    ]
    return "\n".join(lines)


def with_calibration_section(card: str, section: str, threshold: float, raw_threshold: float) -> str:
    """``card`` with its calibration section replaced (or appended) and the headline threshold
    stated on the calibrated scale."""
    import re

    card = with_marked_section(card, CALIBRATION_START, CALIBRATION_END, section)
    return re.sub(
        r"at threshold \*\*[0-9.]+\*\*( \(calibrated[^)]*\))?",
        f"at threshold **{threshold:.4f}** (calibrated; {raw_threshold:.4f} on the model's own scale)",
        card,
        count=1,
    )

"""The Model card tab: what the bundle and an accepted site profile recorded about the model, so a user can judge how far to trust it."""

from __future__ import annotations

import streamlit as st

from device.core.classifier import Classifier
from device.tools.plots import reliability_svg, roc_svg
from device.web.markup import flatten, html_table

FIGURES = ("accuracy", "sensitivity", "specificity", "auc")


def model_figures(metrics: dict, split: str = "val") -> list[dict]:
    """The model card's headline figures from a manifest's ``metrics``: the reference model's
    and each format's on ``split`` (as ``python -m convert`` records them)."""
    rows = []

    def add(name: str, figures) -> None:
        if isinstance(figures, dict) and all(isinstance(figures.get(key), (int, float)) for key in FIGURES):
            rows.append({"model": name, "n": figures.get("n"), **{key: round(float(figures[key]), 3) for key in FIGURES}})

    add("reference (Keras float)" if "formats" in metrics else "model", metrics.get(split))
    for fmt, figures in (metrics.get("formats") or {}).items():
        if isinstance(figures, dict):
            add(fmt, figures.get(split))
    return rows


def model_card_tab(classifier: Classifier) -> None:
    bundle = classifier.bundle
    manifest = bundle.manifest
    st.markdown(
        f"**{manifest['name']}** {manifest['version']} · {manifest['architecture']} · labels {', '.join(bundle.labels)} · "
        f"threshold **{bundle.threshold:.3f}** for {bundle.positive_label} · formats {', '.join(bundle.formats)}"
    )
    metrics = manifest.get("metrics") or {}
    figures = model_figures(metrics)
    if figures:
        st.caption("Figures on the validation split, from the bundle's manifest")
        st.html(html_table([{("ROC AUC" if key == "auc" else key): value for key, value in row.items()} for row in figures], "figures"))
    elif metrics:
        st.html(html_table([{"metric": key, "value": str(value)} for key, value in flatten(metrics).items()], "metrics"))
    else:
        st.info("This bundle's manifest records no metrics.")
    calibration_section(manifest, bundle.positive_label)
    site_section(classifier)
    card = bundle.path / "MODEL_CARD.md"
    if card.is_file():
        with st.expander("MODEL_CARD.md", expanded=True):
            st.markdown(card.read_text(encoding="utf-8"))
    else:
        st.caption("This bundle has no MODEL_CARD.md.")


def calibration_section(manifest: dict, positive_label: str) -> None:
    """ECE per val source before and after calibration, the reliability diagram, the band."""
    entry = manifest.get("calibration")
    if not entry:
        st.warning("This bundle's P is not calibrated: run `python -m convert.calibrate` on it.")
        return
    st.subheader("Calibration")
    band = manifest.get("uncertain_band")
    mapping = (f"P({positive_label}) is the model's own (checked on {entry['fitted_on']['n']} val slices: no map lowered "
               "the worst source's ECE)" if entry["method"] == "identity" else
               f"P({positive_label}) = sigmoid({entry['a']:.3f} · logit(p) + {entry['b']:.3f}) ({entry['method']}, fitted on "
               f"{entry['fitted_on']['n']} val slices)")
    st.markdown(
        mapping + f"; threshold {manifest['threshold']:.3f} on this scale"
        + (f"; **uncertain — review** band [{band[0]:.3f}, {band[1]:.3f})" if band else "")
    )
    rows = []
    for name, after in entry["ece_after"].items():
        figures = entry["band"]["figures"].get(name, {})
        rows.append({
            "val source": name, "slices": entry["reliability"][name]["after"]["n"],
            "ECE before": round(entry["ece_before"][name], 3), "ECE after": round(after, 3),
            "ECE if perfectly calibrated (median)": _floor(entry["reliability"][name]["after"]),
            "in band": figures.get("in_band"), "accuracy outside band": round(figures.get("accuracy_outside", float("nan")), 3),
        })  # fmt: skip
    st.html(html_table(rows, "calibration"))
    st.html(reliability_svg({name: r["after"]["bins"] for name, r in entry["reliability"].items()}, "Reliability after calibration (val)"))


def site_section(classifier: Classifier) -> None:
    """The accepted site profile's report: ROC curve and the figures with their intervals."""
    site = classifier.site
    if site is None:
        st.caption("No site profile: `ctpi site-check --model BUNDLE DATA --accept` checks the model on local slices.")
        return
    report = site.data["report"]
    st.subheader("Site check")
    st.markdown(f"**{site.describe()}** · data fingerprint `{site.data['data']['fingerprint'][:12]}` · rule {site.data['rule']}")
    rows = []
    for title, point in (("bundle", report["bundle"]), ("site (in use)", report["proposed"])):
        sensitivity, specificity = point["sensitivity"], point["specificity"]
        rows.append({
            "threshold": title, "value": round(point["threshold"], 3),
            "sensitivity": f"{sensitivity['value']:.3f} ({sensitivity['ci95'][0]:.3f}–{sensitivity['ci95'][1]:.3f})",
            "specificity": f"{specificity['value']:.3f} ({specificity['ci95'][0]:.3f}–{specificity['ci95'][1]:.3f})",
            "uncertain": point["band"]["in_band"], "accuracy outside band": round(point["band"]["accuracy_outside"], 3),
        })  # fmt: skip
    st.html(html_table(rows, "site"))
    auc = report["auc"]
    st.caption(
        f"ROC AUC {auc['value']:.3f} (95% CI {auc['ci95'][0]:.3f}–{auc['ci95'][1]:.3f}, DeLong) · ECE {report['calibration']['ece']:.3f} · "
        f"{report['data']['n']} slices scored, {report['refused']['n']} refused, {report['uncertain']} uncertain at the bundle's band · "
        "intervals: 95% Wilson"
    )
    point = report["proposed"]
    mark = (1 - point["specificity"]["value"], point["sensitivity"]["value"])
    st.html(roc_svg({"site slices": (report["roc"]["fpr"], report["roc"]["tpr"])}, "ROC on local slices", {"site threshold": mark}))
    site_map = report.get("site_calibration") or {}
    if site.calibration is not None and "reliability" in site_map:
        ece = site_map["ece"]
        st.caption(
            f"Site calibration in use instead of the bundle's: P = sigmoid({site_map['a']:.3f} · logit(p) + {site_map['b']:.3f}) "
            f"(Platt on the model's raw output of {site_map['fitted_on']['n']} local slices) · ECE bundle map {ece['bundle_map']:.3f}, "
            f"site map {ece['site_map_in_sample']:.3f} in-sample"
            + (f", {ece['site_map_cross_fitted']:.3f} cross-fitted ({site_map['cross_fit']['folds']} folds)" if ece["site_map_cross_fitted"] is not None else "")
        )
        curves = {name: bins for name, bins in site_map["reliability"].items() if name != "site map, in-sample"}
        st.html(reliability_svg(curves, "Reliability on local slices"))


def _floor(report: dict):
    """The ECE a perfectly calibrated P would show on the same slices (older bundles lack it)."""
    median = (report.get("ece_if_calibrated") or {}).get("median")
    return "n/a" if median is None else round(median, 3)

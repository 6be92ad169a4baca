"""``ctpi site-check``: how the model does on a hospital's own labelled slices, before go-live.

Scores a folder of local slices (``DATA/COVID/``, ``DATA/NonCOVID/``, any depth, PNG, JPEG or
DICOM) through :class:`device.core.classifier.Classifier` with the bundle's own threshold and band,
and reports sensitivity and specificity with 95 % Wilson intervals, ROC AUC with its DeLong
interval, calibration (ECE), refused and uncertain counts.

One global calibration map cannot serve hospitals whose scores are shifted differently, but the
appliance knows its site: the check also fits a **site calibration map** (Platt, with
:func:`device.core.calibration.fit`) on the model's *raw* outputs of the site's slices, reports ECE
with the bundle's map and with the site's (in-sample, and cross-fitted over stratified folds:
fitted on the others, measured on the held-out fold, so the figure is not the optimistic one),
and proposes a site threshold (the bundle's rule, :func:`device.core.metrics.choose_threshold`) and
band (:func:`device.core.band.choose_band`) on the site-calibrated scale.

``--accept`` writes that map, threshold and band, with the data's fingerprint, the figures and
the model's sha256, to ``STATE/site-profile.json``. The watch daemon and the page then apply
the site map instead of the bundle's and decide with the site threshold and band
(:meth:`Classifier.use_site_profile`); the signed bundle is never modified. The profile is tied
to the model file's sha256 (the map is fitted on that file's raw outputs, so it stays right when
the bundle is only recalibrated); one made for another model file is refused. ``--accept``
refuses fewer than :data:`MIN_PER_CLASS` slices of a class, and a site where the ROC AUC's 95 %
interval does not lie above 0.5: a model not shown to beat chance there must not go live.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from device.core.band import UNCERTAIN, Band, band_figures, choose_band
from device.core.calibration import Calibration, CalibrationError, calibration_report, ece_floor_text, fit
from device.core.classifier import Classifier
from device.core.dataset import fingerprint, list_examples
from device.core.metrics import (
    THRESHOLD_RULES,
    choose_threshold,
    confusion,
    roc_auc,
    roc_auc_interval,
    roc_curve,
    wilson_interval,
)
from device.core.preprocess import BadSliceError, decode_slice, prepare
from device.core.siteprofile import PROFILE_NAME, PROFILE_SCHEMA, write_site_profile
from device.tools.plots import reliability_svg
from device.tools.progress import progress

MIN_PER_CLASS = 30
ROC_POINTS = 200
CROSS_FIT_FOLDS = 5
CROSS_FIT_SEED = 0


def _rate(successes: int, trials: int) -> dict:
    low, high = wilson_interval(successes, trials)
    return {"value": successes / trials if trials else float("nan"), "successes": successes, "n": trials, "ci95": [low, high]}


def operating_point(y: np.ndarray, probabilities: np.ndarray, threshold: float, band: Band | None) -> dict:
    """Sensitivity and specificity (with Wilson intervals) at ``threshold``, the confusion
    counts, and how the band splits the slices."""
    counts = confusion(y, probabilities, threshold)
    return {
        "threshold": float(threshold),
        "uncertain_band": band.to_manifest() if band is not None else None,
        "sensitivity": _rate(counts["tp"], counts["tp"] + counts["fn"]),
        "specificity": _rate(counts["tn"], counts["tn"] + counts["fp"]),
        "confusion": counts,
        "band": band_figures(y, probabilities, threshold, band),
    }


def _roc_points(y: np.ndarray, probabilities: np.ndarray) -> dict:
    fpr, tpr, _ = roc_curve(y, probabilities)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), ROC_POINTS)).round().astype(int))
    return {"fpr": [round(float(v), 4) for v in fpr[keep]], "tpr": [round(float(v), 4) for v in tpr[keep]]}


def stratified_folds(y_true: np.ndarray, folds: int, seed: int = CROSS_FIT_SEED) -> np.ndarray:
    """A fold index per slice: each class shuffled (fixed seed) and dealt round the folds, so
    every fold holds both classes in the site's proportion."""
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(y_true), np.int64)
    for value in (0, 1):
        members = rng.permutation(np.flatnonzero(y_true == value))
        assignment[members] = np.arange(len(members)) % folds
    return assignment


def site_calibration(y_true, raw, bundle_map: Calibration, folds: int = CROSS_FIT_FOLDS, seed: int = CROSS_FIT_SEED) -> tuple[Calibration, dict]:
    """Fit the site's Platt map on the model's raw positive probabilities ``raw`` and measure it.

    ECE is reported for the raw output, the bundle's map, the site map in-sample (fitted and
    measured on the same slices: optimistic) and the site map cross-fitted (each stratified fold
    scored by a map fitted on the other folds; ``None`` when a class has fewer than 2 slices).
    Raises :class:`CalibrationError` when the map cannot be fitted (one class, reversed ranking)."""
    y = np.asarray(y_true, np.int64)
    raw = np.asarray(raw, np.float64)
    site_map = fit(raw, y, "platt")
    curves = {"model output": raw, "bundle map": np.asarray(bundle_map.apply(raw), np.float64), "site map, in-sample": site_map.apply(raw)}
    folds = min(folds, int(y.sum()), int((1 - y).sum()))
    if folds >= 2:
        assignment = stratified_folds(y, folds, seed)
        held_out = np.empty_like(raw)
        for fold in range(folds):
            member = assignment == fold
            held_out[member] = fit(raw[~member], y[~member], "platt").apply(raw[member])
        curves["site map, cross-fitted"] = held_out
    reports = {name: calibration_report(y, scores) for name, scores in curves.items()}
    cross = reports.get("site map, cross-fitted")
    return site_map, {
        "method": site_map.method, "a": site_map.a, "b": site_map.b,
        "fitted_on": {"n": int(y.size), "positive": int(y.sum()), "negative": int((1 - y).sum())},
        "ece": {
            "model_output": reports["model output"]["ece"], "bundle_map": reports["bundle map"]["ece"],
            "site_map_in_sample": reports["site map, in-sample"]["ece"], "site_map_cross_fitted": cross["ece"] if cross else None,
        },
        "cross_fit": {"folds": folds if folds >= 2 else 0, "stratified": True, "seed": seed},
        "reliability": {name: report["bins"] for name, report in reports.items()},
    }  # fmt: skip


def site_check(classifier: Classifier, data: Path, rule: str | None = None, show_progress: bool = True) -> dict:
    """The site report (a dict, as ``--json`` prints it) for the labelled folder ``data``,
    with ``classifier`` deciding by its bundle's own threshold and band."""
    if classifier.site is not None:
        raise ValueError("site_check measures the bundle's own threshold: pass a classifier without a site profile")
    bundle = classifier.bundle
    rule = rule or (bundle.manifest.get("training") or {}).get("threshold_rule") or "youden"
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule {rule!r} is not one of {THRESHOLD_RULES}")
    data = Path(data)
    examples = list_examples(data, classifier.labels)
    y, raw_scores, scores, labels, refused = [], [], [], [], {}
    for example in progress(examples, len(examples), f"site check on {data}", show_progress):
        try:  # Classifier.predict's path, keeping the raw output the site map is fitted on
            decoded = decode_slice(example.path, bundle.spec)
            classifier.check(decoded)
            raw = classifier.raw_probabilities(prepare(decoded.pixels, bundle.spec))
        except BadSliceError as error:
            refused.setdefault(error.reason, []).append(str(example.path.relative_to(data)))
            continue
        label, positive = classifier.decide(classifier.calibration.apply_distribution(raw, bundle.positive_index))
        y.append(int(example.label == bundle.positive_label))
        raw_scores.append(float(raw[bundle.positive_index]))
        scores.append(positive)
        labels.append(label)
    y_true, probabilities = np.array(y, np.int64), np.array(scores, np.float64)
    per_class = {label: sum(1 for e in examples if e.label == label) for label in classifier.labels}
    scored = {bundle.positive_label: int(y_true.sum()), "other": int((1 - y_true).sum())}
    enough = min(scored.values()) >= MIN_PER_CLASS
    report = {
        "model": {
            "name": bundle.name, "version": bundle.manifest["version"], "format": classifier.format,
            "sha256": classifier.sha256, "bundle_sha256": classifier.bundle_sha256, "calibrated": not classifier.calibration.identity,
        },
        "data": {
            "path": str(data), "fingerprint": fingerprint(examples, data), "files": len(examples), "files_per_label": per_class,
            "n": int(y_true.size), "positive": scored[bundle.positive_label], "negative": scored["other"],
        },
        "refused": {"n": sum(len(v) for v in refused.values()), "by_reason": {k: len(v) for k, v in refused.items()}, "files": refused},
        "uncertain": sum(1 for label in labels if label == UNCERTAIN),
        "rule": rule,
        "enough": enough,
        "warning": None if enough else (
            f"only {min(scored.values())} scored slices in the smallest class; at least {MIN_PER_CLASS} per class are "
            "needed before a site threshold can be accepted, and intervals this wide say little"
        ),
    }  # fmt: skip
    if y_true.size == 0 or y_true.min() == y_true.max():
        report["warning"] = "the folder needs scored slices of both labels for sensitivity, specificity and ROC AUC"
        report["enough"] = False
        return report
    auc_low, auc_high = roc_auc_interval(y_true, probabilities)
    report["auc"] = {"value": roc_auc(y_true, probabilities), "ci95": [auc_low, auc_high], "method": "DeLong"}
    report["calibration"] = calibration_report(y_true, probabilities)
    report["bundle"] = operating_point(y_true, probabilities, classifier.threshold, classifier.band)
    try:
        site_map, report["site_calibration"] = site_calibration(y_true, np.array(raw_scores), classifier.calibration)
        site_scores, scale = site_map.apply(np.array(raw_scores)), "site-calibrated"
    except CalibrationError as error:  # the proposal stays on the bundle's scale, and cannot be accepted
        report["site_calibration"] = {"error": str(error)}
        site_scores, scale = probabilities, "bundle-calibrated"
    site_threshold = choose_threshold(y_true, site_scores, rule)
    band_settings = (bundle.manifest.get("calibration") or {}).get("band") or {}
    site_band, band_info = choose_band(
        {"site": (y_true, site_scores)}, site_threshold,
        band_settings.get("max_fraction", 0.10), band_settings.get("target_accuracy", 0.95),
    )  # fmt: skip
    report["proposed"] = {**operating_point(y_true, site_scores, site_threshold, site_band), "band_rule": band_info["rule"], "scale": scale}
    report["roc"] = _roc_points(y_true, probabilities)
    return report


def acceptance_refusals(report: dict) -> list[str]:
    """Why ``--accept`` must not write this report's profile (empty: it may)."""
    reasons = [report["warning"]] if not report["enough"] and report["warning"] else []
    auc = report.get("auc")
    if auc and not auc["ci95"][0] > 0.5:
        reasons.append(
            f"the ROC AUC's 95% interval on these slices ({auc['ci95'][0]:.3f}-{auc['ci95'][1]:.3f}) does not lie above 0.5: "
            "the model is not shown to do better than chance on this site's slices, so it must not go live here"
        )
    if "error" in report.get("site_calibration", {}):
        reasons.append(f"no site calibration map: {report['site_calibration']['error']}")
    return reasons


def profile_from_report(report: dict) -> dict:
    """What ``--accept`` writes: the site map, proposed threshold and band with what they rest on."""
    proposed = report["proposed"]
    site = report.get("site_calibration") or {}
    return {
        "schema": PROFILE_SCHEMA,
        "model": report["model"],
        "calibration": {key: site[key] for key in ("method", "a", "b", "fitted_on", "ece", "cross_fit")} if "a" in site else None,
        "threshold": proposed["threshold"],
        "uncertain_band": proposed["uncertain_band"],
        "rule": report["rule"],
        "data": report["data"],
        "accepted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "report": report,
    }


def _interval(rate: dict) -> str:
    low, high = rate["ci95"]
    return f"{rate['value']:.3f} (95% CI {low:.3f}-{high:.3f}; {rate['successes']}/{rate['n']})"


def format_report(report: dict) -> str:
    model, data = report["model"], report["data"]
    lines = [
        f"model {model['name']} {model['version']} ({model['format']}, sha256 {model['sha256'][:12]}) on {data['path']}",
        f"slices        {data['n']} scored ({data['positive']} positive, {data['negative']} negative), "
        f"{report['refused']['n']} refused" + (f" {report['refused']['by_reason']}" if report["refused"]["n"] else ""),
    ]
    if "bundle" in report:
        proposed_title = f"proposed site ({report['rule']}, {report['proposed'].get('scale', 'bundle-calibrated')} scale)"
        for title, point in (("bundle", report["bundle"]), (proposed_title, report["proposed"])):
            band = point["uncertain_band"]
            lines += [
                f"{title} threshold {point['threshold']:.3f}"
                + (f", uncertain band [{band[0]:.3f}, {band[1]:.3f})" if band else ", no uncertain band"),
                f"  sensitivity {_interval(point['sensitivity'])}",
                f"  specificity {_interval(point['specificity'])}",
                f"  uncertain   {point['band']['in_band']} ({point['band']['fraction_in_band']:.1%}); accuracy outside "
                f"the band {point['band']['accuracy_outside']:.3f}, without it {point['band']['accuracy_all']:.3f}",
            ]
        auc = report["auc"]
        lines += [
            f"ROC AUC       {auc['value']:.3f} (95% CI {auc['ci95'][0]:.3f}-{auc['ci95'][1]:.3f}, DeLong)",
            f"calibration   ECE {report['calibration']['ece']:.3f} with the bundle's map (10 bins)"
            + ("" if model["calibrated"] else "; the bundle is not calibrated")
            + (f"; a perfectly calibrated P would show {floor} on these slices"
               if (floor := ece_floor_text(report["calibration"])) else ""),
        ]
        site = report["site_calibration"]
        if "error" in site:
            lines.append(f"site map      not fitted: {site['error']}")
        else:
            ece, cross = site["ece"], site["cross_fit"]
            lines += [
                f"site map      P = sigmoid({site['a']:.3f} · logit(p) + {site['b']:.3f}), Platt on the model's raw output of "
                f"{site['fitted_on']['n']} local slices",
                f"  ECE         model output {ece['model_output']:.3f}, bundle map {ece['bundle_map']:.3f}, site map "
                f"{ece['site_map_in_sample']:.3f} in-sample (fitted and measured on the same slices)"
                + (f", {ece['site_map_cross_fitted']:.3f} cross-fitted ({cross['folds']} stratified folds, each measured with a "
                   "map fitted on the others)" if ece["site_map_cross_fitted"] is not None else ", too few slices to cross-fit"),
            ]  # fmt: skip
    if report["warning"]:
        lines.append(f"WARNING: {report['warning']}")
    return "\n".join(lines)


def register(subparsers) -> None:
    from device.cli import add_model_arguments, add_threads_argument

    parser = subparsers.add_parser("site-check", help="acceptance check on local labelled slices; --accept writes a site profile")
    add_model_arguments(parser)
    add_threads_argument(parser)
    parser.add_argument("data", type=Path, metavar="DATA", help="folder with COVID/ and NonCOVID/ of local slices (PNG, JPEG, DICOM)")
    parser.add_argument("--rule", choices=THRESHOLD_RULES, default=None, help="rule of the proposed threshold (default: the bundle's)")
    parser.add_argument("--accept", action="store_true", help=f"write the site calibration map, threshold and band to STATE/{PROFILE_NAME}")
    parser.add_argument("--reliability", type=Path, default=None, metavar="SVG", help="write the reliability diagram (bundle map vs site map) to this file")
    parser.add_argument("--state", type=Path, default=None, help="the appliance's state folder (default: [watch] state of the config)")
    parser.add_argument("--config", type=Path, default=None, help="config file (default: /etc/ctpi/ctpi.toml if present)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from device.cli import EXIT_FAILED_INPUTS, EXIT_OK, print_json
    from device.config import load_config

    classifier = Classifier(args.model, args.fmt, args.threads, args.backend)
    report = site_check(classifier, args.data, args.rule, show_progress=not args.json)
    accepted = None
    if args.reliability and "reliability" in report.get("site_calibration", {}):
        args.reliability.write_text(reliability_svg(report["site_calibration"]["reliability"], "Reliability on local slices"), encoding="utf-8")
    if args.accept:
        refusals = acceptance_refusals(report)
        if refusals:
            print(f"ctpi site-check: not accepted: {'; '.join(refusals)}", file=sys.stderr)
        else:
            state = args.state or load_config(args.config).watch.state
            accepted = write_site_profile(state, profile_from_report(report))
    if args.json:
        print_json({**report, "accepted": str(accepted) if accepted else None})
    else:
        print(format_report(report))
        if accepted:
            print(f"accepted: {accepted} (restart the watch daemon to use it; the page uses it at once)")
    return EXIT_FAILED_INPUTS if args.accept and accepted is None else EXIT_OK

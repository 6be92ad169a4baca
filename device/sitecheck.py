"""``ctpi site-check``: how the model does on a hospital's own labelled slices, before go-live.

Scores a folder of local slices (``DATA/COVID/``, ``DATA/NonCOVID/``, any depth, PNG, JPEG or
DICOM) through :class:`device.classifier.Classifier` with the bundle's own threshold and band,
and reports sensitivity and specificity with 95 % Wilson intervals, ROC AUC with its DeLong
interval, calibration (ECE), refused and uncertain counts, and a site threshold proposed by
the bundle's own rule (:func:`device.metrics.choose_threshold`) with a band around it.

``--accept`` writes that threshold and band, with the data's fingerprint, the figures and the
model's sha256, to ``STATE/site-profile.json``. The watch daemon and the page decide with it
(:meth:`Classifier.use_site_profile`); the signed bundle is never modified. A profile made for
another model file is refused, and fewer than :data:`MIN_PER_CLASS` slices of a class give the
figures with a warning but no ``--accept``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from device.band import Band, band_figures, choose_band
from device.calibration import calibration_report
from device.classifier import Classifier
from device.dataset import fingerprint, list_examples
from device.metrics import (
    THRESHOLD_RULES,
    choose_threshold,
    confusion,
    roc_auc,
    roc_auc_interval,
    roc_curve,
    wilson_interval,
)
from device.preprocess import BadSliceError
from device.progress import progress

PROFILE_NAME = "site-profile.json"
PROFILE_SCHEMA = "ctpi.site-profile/1"
MIN_PER_CLASS = 30
ROC_POINTS = 200


class SiteProfileError(ValueError):
    """A site profile that cannot be used (another model's, unreadable); the message says what to do."""


@dataclass(frozen=True)
class SiteProfile:
    """An accepted site profile: the threshold and band the appliance decides with on this site."""

    path: Path
    data: dict

    @property
    def threshold(self) -> float:
        return float(self.data["threshold"])

    @property
    def band(self) -> Band | None:
        return Band.from_manifest(self.data.get("uncertain_band"), self.threshold)

    @property
    def model_sha256(self) -> str:
        return self.data["model"]["sha256"]

    def check_model(self, sha256: str) -> None:
        if sha256 != self.model_sha256:
            model = self.data["model"]
            raise SiteProfileError(
                f"the site profile {self.path} was accepted for model {model.get('name')} {model.get('version')} "
                f"({model.get('format')}, sha256 {self.model_sha256[:12]}…), not for this model (sha256 {sha256[:12]}…); "
                "it is not used and the bundle's own threshold applies. Run `ctpi site-check --model BUNDLE DATA "
                "--accept` with the model in use, or delete the file"
            )

    def describe(self) -> str:
        """One line for people: ``site threshold 0.410, checked on 212 local slices on 2026-…``."""
        return (
            f"site threshold {self.threshold:.3f}, checked on {self.data['data']['n']} local slices on "
            f"{self.data['accepted'][:10]}"
        )


def load_site_profile(state: str | Path) -> SiteProfile | None:
    """The profile in a state folder, or None when there is none."""
    path = Path(state) / PROFILE_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("schema") != PROFILE_SCHEMA:
            raise ValueError(f"schema {data.get('schema')!r} is not {PROFILE_SCHEMA!r}")
        profile = SiteProfile(path, data)
        float(profile.threshold), profile.model_sha256, profile.band  # noqa: B018 (validates)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise SiteProfileError(f"the site profile {path} cannot be read ({error}); run `ctpi site-check --accept` again") from None
    return profile


def write_site_profile(state: str | Path, data: dict) -> Path:
    """Write ``STATE/site-profile.json`` atomically (readable by the page's service user)."""
    state = Path(state)
    state.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=state, delete=False, suffix=".tmp", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(handle.name, 0o644)
    os.replace(handle.name, state / PROFILE_NAME)
    return state / PROFILE_NAME


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
    y, scores, labels, refused = [], [], [], {}
    for example in progress(examples, len(examples), f"site check on {data}", show_progress):
        try:
            prediction = classifier.predict(example.path)
        except BadSliceError as error:
            refused.setdefault(error.reason, []).append(str(example.path.relative_to(data)))
            continue
        y.append(int(example.label == bundle.positive_label))
        scores.append(prediction.positive_probability)
        labels.append(prediction.label)
    y_true, probabilities = np.array(y, np.int64), np.array(scores, np.float64)
    per_class = {label: sum(1 for e in examples if e.label == label) for label in classifier.labels}
    scored = {bundle.positive_label: int(y_true.sum()), "other": int((1 - y_true).sum())}
    enough = min(scored.values()) >= MIN_PER_CLASS
    report = {
        "model": {
            "name": bundle.name, "version": bundle.manifest["version"], "format": classifier.format,
            "sha256": classifier.sha256, "calibrated": not classifier.calibration.identity,
        },
        "data": {
            "path": str(data), "fingerprint": fingerprint(examples, data), "files": len(examples), "files_per_label": per_class,
            "n": int(y_true.size), "positive": scored[bundle.positive_label], "negative": scored["other"],
        },
        "refused": {"n": sum(len(v) for v in refused.values()), "by_reason": {k: len(v) for k, v in refused.items()}, "files": refused},
        "uncertain": sum(1 for label in labels if label == "uncertain"),
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
    site_threshold = choose_threshold(y_true, probabilities, rule)
    band_settings = (bundle.manifest.get("calibration") or {}).get("band") or {}
    site_band, band_info = choose_band(
        {"site": (y_true, probabilities)}, site_threshold,
        band_settings.get("max_fraction", 0.10), band_settings.get("target_accuracy", 0.95),
    )  # fmt: skip
    report["proposed"] = {**operating_point(y_true, probabilities, site_threshold, site_band), "band_rule": band_info["rule"]}
    report["roc"] = _roc_points(y_true, probabilities)
    return report


def profile_from_report(report: dict) -> dict:
    """What ``--accept`` writes: the proposed threshold and band with what they rest on."""
    proposed = report["proposed"]
    return {
        "schema": PROFILE_SCHEMA,
        "model": report["model"],
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
        for title, point in (("bundle", report["bundle"]), (f"proposed site ({report['rule']})", report["proposed"])):
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
            f"calibration   ECE {report['calibration']['ece']:.3f} (10 bins)" + ("" if model["calibrated"] else "; the bundle is not calibrated"),
        ]
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
    parser.add_argument("--accept", action="store_true", help=f"write the proposed threshold and band to STATE/{PROFILE_NAME}")
    parser.add_argument("--state", type=Path, default=None, help="the appliance's state folder (default: [watch] state of the config)")
    parser.add_argument("--config", type=Path, default=None, help="config file (default: /etc/ctpi/ctpi.toml if present)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from device.cli import EXIT_FAILED_INPUTS, EXIT_OK, print_json
    from device.config import load_config

    classifier = Classifier(args.model, args.fmt, args.threads, args.backend)
    report = site_check(classifier, args.data, args.rule, show_progress=not args.json)
    accepted = None
    if args.accept:
        if not report["enough"]:
            print(f"ctpi site-check: not accepted: {report['warning']}", file=sys.stderr)
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

"""``ctpi predict``: label, probabilities and latency per slice file.

A bad file gets an error record and the others still run; the exit status is 1 when any
file failed, so scripts can tell.
"""

from __future__ import annotations

import sys
from pathlib import Path

from device.core.band import display_label
from device.core.classifier import Classifier
from device.core.preprocess import BadSliceError


def register(subparsers) -> None:
    from device.cli import add_model_arguments, add_threads_argument

    parser = subparsers.add_parser("predict", help="classify slice files (PNG, JPEG, DICOM)")
    add_model_arguments(parser)
    add_threads_argument(parser)
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE")
    parser.add_argument("--state", type=Path, default=None,
                        help="the appliance's state folder: decide with its accepted site profile (ctpi site-check --accept), "
                             "as the daemon and the page do")
    parser.add_argument("--no-guard", action="store_true", help="score every image, even one the input guard says is not a chest CT slice")
    parser.set_defaults(handler=run)


def predict_files(classifier: Classifier, files: list[Path]) -> list[dict]:
    """One record per file, in order: a prediction, or ``{"file", "error", "reason"}``."""
    records = []
    for path in files:
        try:
            prediction = classifier.predict(path)
        except BadSliceError as error:
            records.append({"file": str(path), "error": str(error), "reason": error.reason})
            continue
        records.append({"file": str(path), **prediction.to_dict()})
    return records


def run(args) -> int:
    from device.cli import EXIT_FAILED_INPUTS, EXIT_OK, print_json

    classifier = Classifier(args.model, args.fmt, args.threads, args.backend, guard=not args.no_guard)
    if args.state is not None:
        from device.core.siteprofile import load_site_profile

        # A profile made for another model raises SiteProfileError (a ValueError): exit 2 with its message,
        # rather than answer with a threshold the hospital never checked.
        classifier.use_site_profile(load_site_profile(args.state))
    records = predict_files(classifier, args.files)
    if args.json:
        print_json(
            {
                "model": {"name": classifier.bundle.name, "format": classifier.format, "sha256": classifier.sha256,
                          "bundle_sha256": classifier.bundle_sha256},
                "backend": {"name": classifier.backend.name, "version": classifier.backend.version(), "threads": classifier.threads},
                "site_profile": classifier.site.describe() if classifier.site is not None else None,
                "results": records,
            }
        )
    else:
        positive = classifier.bundle.positive_label
        band = classifier.band
        print(
            f"model {classifier.bundle.describe(classifier.format)} on {classifier.backend.name}, threshold {classifier.threshold:.3f}"
            + (f", uncertain band [{band.low:.3f}, {band.high:.3f})" if band is not None else "")
        )
        if classifier.site is not None:
            print(classifier.site.describe())
        width = max(len(str(r["file"])) for r in records)
        for record in records:
            if "error" in record:
                status = "REFUSED" if record["reason"] == "not-ct" else "ERROR"
                print(f"{record['file']:<{width}}  {status}  {record['error']}", file=sys.stdout)
            else:
                print(
                    f"{record['file']:<{width}}  {display_label(record['label']):<18} P({positive})={record['positive_probability']:.3f}"
                    f"  {record['latency_ms']['total']:.1f} ms"
                )
    return EXIT_FAILED_INPUTS if any("error" in r for r in records) else EXIT_OK

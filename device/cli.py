"""``ctpi <verb>``: the device-side command line.

Each verb lives in the module that owns its concept and exposes ``register(subparsers)``,
which adds its parser and sets ``handler`` (a function ``args -> int``). This file only
maps verbs to their modules, so adding a verb touches one line here. Only the module of the
verb being run is imported (``ctpi --help`` and a mistyped verb import them all): the
long-running services (``ctpi dicom``, ``ctpi watch``) do not carry the other verbs' imports
in their memory (#19: the node's RSS budget is 80 MB). Exit codes: 0 success, 1 some
inputs failed (e.g. a bad slice), 2 usage or configuration errors (bad bundle, bad flags).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from device import __version__
from device.core.backends import BackendError
from device.core.bundle import BundleError

VERBS = {  # verb -> the module that registers it, in the order ``ctpi --help`` lists them
    "predict": "device.tools.predict",
    "evaluate": "device.tools.evaluate",
    "site-check": "device.tools.sitecheck",
    "bench": "device.tools.bench",
    "capture": "device.tools.capture",
    "watch": "device.watch.daemon",
    "dicom": "device.node.daemon",
    "results": "device.tools.results",
    "status": "device.tools.results",
    "ui": "device.web.ui",
    "passwd": "device.web.ui",
    "run": "device.tools.appliance",
}
VERB_MODULES = tuple(dict.fromkeys(VERBS.values()))

EXIT_OK, EXIT_FAILED_INPUTS, EXIT_USAGE = 0, 1, 2


def requested_verb(argv: list[str]) -> str | None:
    """The verb in ``argv`` if it names one: the first word that is not an option (the
    top-level options take no value), or None (``ctpi --help``, a mistyped verb)."""
    word = next((arg for arg in argv if not arg.startswith("-")), None)
    return word if word in VERBS else None


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The parser with every verb, or, given ``verb``, with only the verbs of its module."""
    parser = argparse.ArgumentParser(prog="ctpi", description="COVID-19 triage of lung CT slices on a Raspberry Pi")
    parser.add_argument("--version", action="version", version=f"ctpi {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name in VERB_MODULES if verb is None else (VERBS[verb],):
        importlib.import_module(name).register(subparsers)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser, multiple: bool = False) -> None:
    """The options every model-using verb shares."""
    if multiple:
        parser.add_argument("--model", action="append", required=True, metavar="BUNDLE", help="bundle folder (repeat to compare)")
    else:
        parser.add_argument("--model", required=True, metavar="BUNDLE", help="bundle folder, e.g. models/mobilenetv2")
    parser.add_argument("--format", dest="fmt", default=None, help="model format in the bundle (default: the bundle's default_format, e.g. int8 for models/mobilenetv2, float16 for models/resnet50)")
    parser.add_argument("--backend", default=None, help="force a backend (ai-edge-litert, tflite-runtime, onnxruntime)")
    parser.add_argument("--json", action="store_true", help="machine-readable JSON output")


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="inference threads (default: cores, at most 4)")


def print_json(value) -> None:
    json.dump(value, sys.stdout, indent=2, allow_nan=True)
    sys.stdout.write("\n")


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(requested_verb(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args) or 0)
    except (BundleError, BackendError, FileNotFoundError, ValueError) as error:
        print(f"ctpi {args.verb}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``ctpi <verb>``: the device-side command line.

Each verb lives in the module that owns its concept and exposes ``register(subparsers)``,
which adds its parser and sets ``handler`` (a function ``args -> int``). This file only
lists the modules, so adding a verb touches one line here. Exit codes: 0 success, 1 some
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

VERB_MODULES = (
    "device.tools.predict",
    "device.tools.evaluate",
    "device.tools.sitecheck",
    "device.tools.bench",
    "device.tools.capture",
    "device.watch.daemon",
    "device.node.daemon",
    "device.tools.results",
    "device.web.ui",
    "device.tools.appliance",
)

EXIT_OK, EXIT_FAILED_INPUTS, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctpi", description="COVID-19 triage of lung CT slices on a Raspberry Pi")
    parser.add_argument("--version", action="version", version=f"ctpi {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name in VERB_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser, multiple: bool = False) -> None:
    """The options every model-using verb shares."""
    if multiple:
        parser.add_argument("--model", action="append", required=True, metavar="BUNDLE", help="bundle folder (repeat to compare)")
    else:
        parser.add_argument("--model", required=True, metavar="BUNDLE", help="bundle folder, e.g. models/mobilenetv2")
    parser.add_argument("--format", dest="fmt", default=None, help="model format in the bundle (default: the bundle's default_format, e.g. int8 for models/resnet50, float16 for models/mobilenetv2)")
    parser.add_argument("--backend", default=None, help="force a backend (ai-edge-litert, tflite-runtime, onnxruntime)")
    parser.add_argument("--json", action="store_true", help="machine-readable JSON output")


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="inference threads (default: cores, at most 4)")


def print_json(value) -> None:
    json.dump(value, sys.stdout, indent=2, allow_nan=True)
    sys.stdout.write("\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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

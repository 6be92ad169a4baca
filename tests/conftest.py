"""Shared fixtures: synthetic slices and tiny real bundles, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.synthetic import LABELS, POSITIVE, write_image_folder


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """An ImageFolder with 12 slices per class (``COVID/``, ``NonCOVID/``)."""
    return write_image_folder(tmp_path_factory.mktemp("data"), per_class=12, seed=1)


@pytest.fixture(scope="session")
def tiny_keras_model(synthetic_data):
    pytest.importorskip("tensorflow")
    from tests.tiny_model import build_model, labelled_pixels

    return build_model(*labelled_pixels(synthetic_data))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_keras_model, synthetic_data) -> Path:
    """A real bundle (int8 default, float16, float32 TFLite, ONNX) made by the project's own
    conversion code."""
    from convert.assemble import assemble_bundle
    from convert.export import export_formats
    from tests.tiny_model import SPEC, labelled_pixels

    representative, _ = labelled_pixels(synthetic_data)
    models, format_extras = export_formats(tiny_keras_model, ("int8", "float16", "float32", "onnx"), representative)
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    assemble_bundle(
        out,
        models,
        name="tiny-texture",
        version="0.0.1",
        architecture="laplacian-energy",
        labels=LABELS,
        positive_label=POSITIVE,
        threshold=0.5,
        spec=SPEC,
        metrics={},
        training_data={"fingerprint": "synthetic", "description": "tests/synthetic.py"},
        default_format="int8",
        format_extras=format_extras,
    )
    return out


# -- skips are failures in CI -----------------------------------------------------------------
# A missing Python package (TensorFlow that failed to install, playwright, ansible-core) must not
# turn ~100 tests into skips and a green run. In CI (CI set, as every CI service does) or with
# --no-skips, a skip fails unless the test needs a system service (marked `system`) and the
# reason is not a missing Python package.
PACKAGE_SKIP_MARKERS = ("could not import", "pip install")


def pytest_addoption(parser):
    parser.addoption("--no-skips", action="store_true", default=False,
                     help="a skip fails unless a `system` test lacks a system service (on when CI is set)")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``pi_emu`` (the emulated arm64 Pi, minutes under QEMU) run only with
    CTPI_PI_EMU=1: deselected otherwise, not skipped, so --no-skips does not fail on them."""
    if os.environ.get("CTPI_PI_EMU", "") == "1":
        return
    chosen = [item for item in items if item.get_closest_marker("pi_emu") is None]
    if len(chosen) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("pi_emu") is not None])
        items[:] = chosen


def strict_skips(config) -> bool:
    return config.getoption("--no-skips") or os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail") or not strict_skips(item.config):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    missing_package = any(marker in reason for marker in PACKAGE_SKIP_MARKERS)
    if missing_package or item.get_closest_marker("system") is None:
        report.outcome = "failed"
        report.longrepr = f"skipped where skips are failures (CI / --no-skips): {reason}"

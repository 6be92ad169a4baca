"""Shared fixtures: synthetic slices and tiny real bundles, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.synthetic import LABELS, POSITIVE, write_image_folder
from tests.tiny_runs import file_run, shared_folder, split_data, tiny_weights_file  # noqa: F401 (fixtures)


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
def tiny_bundle(tmp_path_factory, request, synthetic_data) -> Path:
    """A real bundle (int8 default, float16, float32 TFLite, ONNX) made by the project's own
    conversion code; one per run, shared by the xdist workers (``tests/tiny_runs.py``). It sits
    alone in its folder, which the page lists as its models folder."""

    def build(folder: Path) -> None:
        from convert.assemble import assemble_bundle
        from convert.export import export_formats
        from tests.tiny_model import SPEC, labelled_pixels

        representative, _ = labelled_pixels(synthetic_data)
        keras_model = request.getfixturevalue("tiny_keras_model")
        models, format_extras = export_formats(keras_model, ("int8", "float16", "float32", "onnx"), representative)
        assemble_bundle(
            folder / "tiny",
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

    return shared_folder(tmp_path_factory, "bundles", build) / "tiny"


# -- skips are failures in CI -----------------------------------------------------------------
# A missing Python package (TensorFlow that failed to install, playwright, ansible-core) must not
# turn ~100 tests into skips and a green run. In CI (CI set, as every CI service does) or with
# --no-skips, a skip fails unless the test needs a system service (marked `system`) and the
# reason is not a missing Python package.
PACKAGE_SKIP_MARKERS = ("could not import", "pip install")


def pytest_addoption(parser):
    parser.addoption("--no-skips", action="store_true", default=False,
                     help="a skip fails unless a `system` test lacks a system service (on when CI is set)")


# -- the longest files first -------------------------------------------------------------------
# `make test` runs whole files on two workers (--dist loadfile). xdist hands out files in
# collection order (its default reorders them by their number of tests, which says little: the
# training file has 20 tests and takes a third of the suite, the deploy file 9 tests and a
# sixth). A long file handed out last leaves the other worker idle until it ends, so the files
# measured longest (pytest --durations, docs/testing.md) go first, longest first; the rest keep
# their order. Only the order changes, never what runs.
# The emulated Pi (CTPI_PI_EMU=1, as .ci/run sets it) goes first of all: minutes of QEMU on one
# worker, mostly waiting on the emulated Pi, while the other worker runs the rest beside it.
LONGEST_FIRST = (  # pytest --junitxml of a full run, 2026-12-06 evening: the files over ~6 s, longest first
    "test_pi_emu.py", "test_train.py", "test_deploy.py", "test_sources.py", "test_experts.py", "test_convert.py", "test_dicom_node.py",
    "test_watch.py", "test_ui.py", "test_snap.py", "test_browser.py", "test_watch_soak.py", "test_guard.py",
    "test_ui_tls.py", "test_ui_run.py", "test_sitecheck.py", "test_release_units.py", "test_ui_dicom.py",
    "test_study_heatmaps.py", "test_ui_trust.py", "test_guard_features.py",
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order given below
        config.option.loadscopereorder = False


def longest_first(items) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: ties keep their order


def pytest_collection_modifyitems(config, items):
    """Tests marked ``pi_emu`` (the emulated arm64 Pi, minutes under QEMU) run only with
    CTPI_PI_EMU=1: deselected otherwise, not skipped, so --no-skips does not fail on them; the
    one marked ``pi_emu_lost_wheel`` also goes with CTPI_PI_EMU_LOST_WHEEL=0 (no such release run).
    Then the longest files go first (above)."""
    longest_first(items)
    if os.environ.get("CTPI_PI_EMU", "") != "1":
        left_out = "pi_emu"
    elif os.environ.get("CTPI_PI_EMU_LOST_WHEEL", "1") == "0":  # tests/pi_emu.py then runs no lost-wheel release
        left_out = "pi_emu_lost_wheel"
    else:
        return
    chosen = [item for item in items if item.get_closest_marker(left_out) is None]
    if len(chosen) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker(left_out) is not None])
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

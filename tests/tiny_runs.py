"""Test inputs that several test files share, built once per test session even across
pytest-xdist workers: the tiny bundle (``tests/conftest.py``) and the tiny MobileNetV2 run from
a weights file (``test_train.py``, ``test_snap.py``).

``--dist loadfile`` may run the files that use one on different workers, each a session of its
own; a MobileNetV2 run costs 20-40 s of graph tracing however few its slices. So the first
worker that needs a folder builds it in the run's common temporary folder under a file lock,
and the other worker waits for it and reads it. The folders are read-only to the tests: a test
that changes a run or a bundle works on a copy.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.synthetic import write_image_folder

IMG = 32
# Tests do not enable TensorFlow's global op determinism: it would stay on for every later test
# in the same process. The seeded path is the same otherwise. --eager: a tiny run's few steps
# cost less than tracing the backbone's graphs (9 s a run against 22); test_train's
# finished_run trains in graphs, as every real run does, and an eager copy of it must give the
# same weights.
COMMON = ["--img-size", str(IMG), "--head-epochs", "1", "--cache", "", "--no-determinism", "-q", "--seed", "3", "--eager"]


def shared_folder(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """``name``'s folder, made by ``build(folder)`` by whichever worker of this run asks first."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this run's folder, above the workers' own (popen-gw0, popen-gw1)
    root = base / "shared"
    root.mkdir(exist_ok=True)
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if build raises
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed on the other worker
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


def train(args: list[str]) -> int:
    from train.cli import main

    return main(args)


@pytest.fixture(scope="session")
def split_data(tmp_path_factory) -> Path:
    """A train/val ImageFolder pair (10 + 6 slices per class), as ``python -m train`` reads."""

    def build(root: Path) -> None:
        write_image_folder(root / "train", per_class=10, seed=11)
        write_image_folder(root / "val", per_class=6, seed=12)

    return shared_folder(tmp_path_factory, "covidlike", build)


@pytest.fixture(scope="session")
def tiny_weights_file(tmp_path_factory, split_data) -> tuple[Path, list[np.ndarray]]:
    """A MobileNetV2 backbone with random weights whose BatchNorm statistics were set from
    synthetic slices (one training-mode pass at momentum 0), saved as a Keras weights file:
    unlike a bare random init, its features vary from slice to slice. Also its weights."""
    pytest.importorskip("tensorflow")

    def build(folder: Path) -> None:
        import keras

        from device.core.preprocess import PreprocessSpec
        from train.data import load_split

        keras.utils.set_random_seed(123)
        base = keras.applications.MobileNetV2(input_shape=(IMG, IMG, 3), include_top=False, weights=None)
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = 0.0
        split = load_split(split_data / "train", ["COVID", "NonCOVID"], PreprocessSpec(IMG, IMG, 1), None, False)
        grey = split.pixels.astype(np.float32) / 127.5 - 1.0
        base(np.repeat(grey, 3, axis=-1), training=True)
        base.save_weights(folder / "tiny_mobilenetv2_notop.weights.h5")
        np.savez(folder / "weights.npz", *base.get_weights())

    folder = shared_folder(tmp_path_factory, "weights", build)
    with np.load(folder / "weights.npz") as saved:
        weights = [saved[f"arr_{index}"] for index in range(len(saved.files))]
    return folder / "tiny_mobilenetv2_notop.weights.h5", weights


@pytest.fixture(scope="session")
def file_run(tmp_path_factory, tiny_weights_file, split_data) -> Path:
    """Both stages from a weights file: head on the frozen backbone, then block 16 unfrozen."""
    path, _ = tiny_weights_file

    def build(folder: Path) -> None:
        args = ["--arch", "mobilenetv2", "--data", str(split_data), "--weights", str(path), "--out",
                str(folder / "from_file"), *COMMON, "--fine-epochs", "1", "--unfreeze-from", "block_16_expand"]
        args[args.index("--cache") + 1] = str(folder / "cache")
        assert train(args) == 0

    return shared_folder(tmp_path_factory, "file-run", build) / "from_file"

"""The int8 representative data set: a seeded, stratified draw from the training split.

Calibration slices go through :func:`device.core.preprocess.load_slice`, the exact function the
Pi calls, so the activation ranges are those of real inputs. The training slices *not* drawn
are kept apart as a second, larger check for the accuracy gate (val has only 118 slices).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from device.core.dataset import Example
from device.core.preprocess import BadSliceError, PreprocessSpec, load_slice

log = logging.getLogger(__name__)


def stratified_split(examples: Sequence[Example], samples: int, seed: int) -> tuple[list[Example], list[Example]]:
    """``(calibration, rest)``: ``samples`` examples drawn without replacement with each label
    represented in proportion to its share (largest remainders), and everything else."""
    if samples < 1:
        raise ValueError("calibration needs at least one sample")
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[Example]] = {}
    for example in examples:
        by_label.setdefault(example.label, []).append(example)
    total = len(examples)
    samples = min(samples, total)
    exact = {label: samples * len(members) / total for label, members in by_label.items()}
    quota = {label: int(share) for label, share in exact.items()}
    for label in sorted(exact, key=lambda lab: exact[lab] - quota[lab], reverse=True)[: samples - sum(quota.values())]:
        quota[label] += 1
    chosen: set[int] = set()
    calibration: list[Example] = []
    for label in sorted(by_label):
        members = by_label[label]
        picks = rng.choice(len(members), size=quota[label], replace=False)
        for index in sorted(picks):
            calibration.append(members[index])
            chosen.add(id(members[index]))
    rest = [example for example in examples if id(example) not in chosen]
    return calibration, rest


def draw_by_source(per_source: Sequence[Sequence[Example]], samples: int, seed: int) -> list[tuple[list[Example], list[Example]]]:
    """``(calibration, rest)`` of each source: ``samples`` shared out equally over the sources
    (the model must work on each), each source's share drawn by :func:`stratified_split`.
    ``python -m convert`` and the experts head's int8 view (:func:`train.experts.calibration_pixels`)
    both draw with it, so a head chosen on int8 features sees the ranges the conversion sets."""
    count = len(per_source)
    return [stratified_split(examples, samples // count + (index < samples % count), seed)
            for index, examples in enumerate(per_source)]


@dataclass
class Slices:
    """Preprocessed slices of some examples; files that could not be read are listed apart."""

    examples: list[Example]
    pixels: np.ndarray  # N x H x W x C uint8
    failures: list[tuple[Example, str]]

    def y_true(self, positive_label: str) -> np.ndarray:
        return np.array([e.label == positive_label for e in self.examples], dtype=np.int64)


def load_slices(examples: Sequence[Example], spec: PreprocessSpec, description: str = "loading") -> Slices:
    from tqdm import tqdm

    kept, arrays, failures = [], [], []
    for example in tqdm(examples, desc=description, unit="slice", leave=False):
        try:
            arrays.append(load_slice(example.path, spec))
        except BadSliceError as error:
            log.warning("skipping %s: %s", example.path, error)
            failures.append((example, str(error)))
            continue
        kept.append(example)
    pixels = np.stack(arrays) if arrays else np.zeros((0, spec.height, spec.width, spec.channels), np.uint8)
    return Slices(kept, pixels, failures)

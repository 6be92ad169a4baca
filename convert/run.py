"""A training run folder as conversion reads it: ``model.keras`` plus ``run.json``.

The contract with ``train/``: ``model.keras`` uses built-in layers only, takes raw 0..255
float pixels ``(S, S, channels)`` and ends in a softmax over ``labels``; ``run.json`` says
what the model is (labels, threshold, preprocessing) and where it came from (data, initial
weights, recipe, versions). A run that breaks the contract is refused with :class:`RunError`
before anything is converted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from device.core.preprocess import PreprocessSpec

MODEL_FILE = "model.keras"
RUN_FILE = "run.json"
REQUIRED_KEYS = (
    "architecture",
    "labels",
    "positive_label",
    "threshold",
    "preprocessing",
    "training_data",
    "metrics",
)
PROVENANCE_KEYS = (
    "threshold_rule",
    "img_size",
    "initial_weights",
    "seed",
    "wall_seconds",
    "tensorflow_version",
    "keras_version",
    "recipe",
    "command",
    "ensemble",
)


class RunError(Exception):
    """A training run folder that cannot be converted; the message says what is wrong."""


@dataclass(frozen=True)
class TrainingRun:
    path: Path
    info: dict
    spec: PreprocessSpec

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def labels(self) -> list[str]:
        return list(self.info["labels"])

    @property
    def positive_label(self) -> str:
        return self.info["positive_label"]

    @property
    def threshold(self) -> float:
        return float(self.info["threshold"])

    @property
    def provenance(self) -> dict:
        """What the run says about how the model was made (for the manifest and model card)."""
        provenance = {key: self.info.get(key) for key in PROVENANCE_KEYS}
        head = self.head
        if head:
            provenance["experts"] = head
        return provenance

    @property
    def head(self) -> dict | None:
        """An experts-head run's layers, experts and gate (``metrics.json``, :mod:`train.experts`)."""
        try:
            return json.loads((self.path / "metrics.json").read_text(encoding="utf-8")).get("experts")
        except (OSError, ValueError):
            return None

    def load_model(self):
        """The Keras model, checked against ``run.json`` (input size, number of labels)."""
        import keras

        try:
            model = keras.models.load_model(self.model_path, compile=False)
        except (OSError, ValueError, TypeError) as error:
            raise RunError(f"{self.model_path} cannot be loaded by Keras {keras.__version__}: {error}") from None
        expected = (self.spec.height, self.spec.width, self.spec.channels)
        if tuple(model.input_shape[1:]) != expected:
            raise RunError(
                f"{self.model_path} takes {tuple(model.input_shape[1:])} but run.json's preprocessing "
                f"produces {expected}"
            )
        if model.output_shape[-1] != len(self.labels):
            raise RunError(f"{self.model_path} outputs {model.output_shape[-1]} values for {len(self.labels)} labels")
        return model


def load_run(path: str | Path) -> TrainingRun:
    path = Path(path)
    if not (path / RUN_FILE).is_file():
        raise RunError(f"{path} is not a finished training run: no {RUN_FILE} (make train writes it at the end)")
    if not (path / MODEL_FILE).is_file():
        raise RunError(f"{path} has {RUN_FILE} but no {MODEL_FILE}")
    try:
        info = json.loads((path / RUN_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunError(f"{path / RUN_FILE} is not valid JSON: {error}") from None
    missing = [key for key in REQUIRED_KEYS if key not in info]
    if missing:
        raise RunError(f"{path / RUN_FILE} lacks {missing}")
    if info["positive_label"] not in info["labels"]:
        raise RunError(f"positive_label {info['positive_label']!r} is not one of the labels {info['labels']}")
    if not 0.0 <= float(info["threshold"]) <= 1.0:
        raise RunError(f"threshold {info['threshold']!r} is not a probability")
    try:
        spec = PreprocessSpec.from_manifest(info["preprocessing"])
    except (TypeError, ValueError) as error:
        raise RunError(f"{path / RUN_FILE} preprocessing: {error}") from None
    return TrainingRun(path=path, info=info, spec=spec)

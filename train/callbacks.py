"""Model selection on val ROC AUC: a Keras callback that scores val with ``device.core.metrics``.

Keras' own AUC metric approximates the curve with 200 buckets and runs inside the graph; the
selection criterion must be the same figure ``ctpi evaluate`` prints, so the callback predicts
val after every epoch and computes the Mann-Whitney AUC with the one metrics implementation.
It checkpoints the best model to disk and stops a stage after ``patience`` epochs without
improvement. Ties in AUC (common on 118 slices) go to the lower val loss. With several sources
the criterion is the worst source's AUC: a model good on one hospital and poor on another is a
poor model.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import keras
import numpy as np

from device.core.metrics import roc_auc, worst_source_auc

log = logging.getLogger(__name__)


def predict_positive(model, pixels: np.ndarray, positive_index: int, batch_size: int = 64,
                     heads: np.ndarray | None = None) -> np.ndarray:
    """Positive-class probabilities of uint8 pixels (float32 cast per batch to bound memory).

    A model with one head per source (``--head sources``: output ``(sources, labels)``) is read
    at ``heads[i]``, the head of slice ``i``'s own source."""
    out = []
    for start in range(0, len(pixels), batch_size):
        batch = pixels[start : start + batch_size].astype(np.float32)
        probabilities = np.asarray(model(batch, training=False))
        if probabilities.ndim == 3:
            if heads is None:
                raise ValueError("a model with one head per source needs each slice's head to be scored")
            probabilities = probabilities[np.arange(len(batch)), heads[start : start + batch_size]]
        out.append(probabilities[:, positive_index])
    return np.concatenate(out).astype(np.float64)


def cross_entropy(y_true: np.ndarray, positive_probability: np.ndarray) -> float:
    p = np.clip(positive_probability, 1e-7, 1 - 1e-7)
    return float(-np.mean(y_true * np.log(p) + (1 - y_true) * np.log(1 - p)))


class ValAUCCheckpoint(keras.callbacks.Callback):
    """Adds ``val_auc`` and ``val_loss`` to the epoch logs, saves the best model to
    ``checkpoint``, and stops training after ``patience`` epochs without a better AUC.

    The best score persists across stages (one instance per run; call :meth:`start_stage`
    before each ``fit``), so stage 2 only replaces the stage 1 checkpoint when it beats it."""

    def __init__(self, pixels: np.ndarray, y_true: np.ndarray, positive_index: int, checkpoint: Path,
                 deadline: float | None = None, sources: np.ndarray | None = None, saved_model=None,
                 heads: np.ndarray | None = None):
        super().__init__()
        self.heads = heads  # each val slice's own head, for a model with one head per source
        self.saved_model = saved_model  # the whole classifier when the fitted model is its tail
        self.sources = None if sources is None or len(np.unique(sources)) < 2 else np.asarray(sources)
        self.deadline = deadline  # time.monotonic() after which no new epoch starts
        self.out_of_time = False
        self.pixels, self.y_true, self.positive_index = pixels, y_true, positive_index
        self.checkpoint = Path(checkpoint)
        self.best = (-math.inf, -math.inf)  # (auc, -loss)
        self.best_epoch: int | None = None
        self.best_stage: str | None = None
        self.best_weights = None
        self.stage = ""
        self.epoch_offset = 0
        self.patience = 0
        self.min_epochs = 0
        self.waited = 0

    def start_stage(self, stage: str, epoch_offset: int, patience: int, min_epochs: int = 0) -> None:
        self.stage, self.epoch_offset, self.patience, self.waited = stage, epoch_offset, patience, 0
        self.min_epochs = min_epochs

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        scores = predict_positive(self.model, self.pixels, self.positive_index, heads=self.heads)
        loss = cross_entropy(self.y_true, scores)
        if self.sources is None:
            auc = roc_auc(self.y_true, scores)
        else:
            auc = worst_source_auc(self.y_true, scores, self.sources)
            logs["val_auc_pooled"] = roc_auc(self.y_true, scores)
            for name in np.unique(self.sources):
                member = self.sources == name
                logs[f"val_auc_{name}"] = roc_auc(self.y_true[member], scores[member])
        logs["val_auc"], logs["val_loss"] = auc, loss
        logs["val_accuracy_at_half"] = float(np.mean((scores >= 0.5) == (self.y_true == 1)))
        key = (auc if not math.isnan(auc) else -math.inf, -loss)
        if key > self.best:
            self.best, self.best_epoch, self.best_stage = key, self.epoch_offset + epoch + 1, self.stage
            self.best_weights = self.model.get_weights()
            (self.saved_model if self.saved_model is not None else self.model).save(self.checkpoint)
            self.waited = 0
            log.info("epoch %d (%s): val AUC %.4f%s, loss %.4f: new best, saved", epoch + 1, self.stage, auc,
                     self._per_source(logs), loss)
        else:
            self.waited += 1
            log.info("epoch %d (%s): val AUC %.4f%s, loss %.4f", epoch + 1, self.stage, auc, self._per_source(logs), loss)
            if self.patience and self.waited >= self.patience and epoch + 1 >= self.min_epochs:
                log.info("no better val AUC for %d epochs: %s stage stops", self.waited, self.stage)
                self.model.stop_training = True
        if self.deadline is not None and time.monotonic() > self.deadline:
            log.warning("time budget reached after epoch %d (%s): training stops", epoch + 1, self.stage)
            self.out_of_time = True
            self.model.stop_training = True

    def _per_source(self, logs: dict) -> str:
        if self.sources is None:
            return ""
        parts = ", ".join(f"{key[8:]} {value:.4f}" for key, value in logs.items() if key.startswith("val_auc_"))
        return f" (worst source; {parts})"

    def restore_best(self) -> None:
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)


class SnapWeights(keras.callbacks.Callback):
    """Rounds the classifier's convolution kernels onto the int8 grid after every epoch
    (``--snap-weights``; :mod:`train.snap` says why). Listed before :class:`ValAUCCheckpoint`,
    so the model it scores and saves is the rounded one."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier  # the whole model, also when the fitted model is its tail
        self.last: dict | None = None

    def on_epoch_end(self, epoch, logs=None):
        from train.snap import snap_model

        self.last = snap_model(self.classifier)
        log.info("epoch %d: %d convolutions rounded onto the int8 grid (mean relative change %.4f)",
                 epoch + 1, self.last["layers"], self.last["mean_relative_change"])

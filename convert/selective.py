"""int8 with a float fallback only where it is needed (selective quantization).

When full-integer int8 loses the gate's label agreement, most layers are usually fine and a
few are not: a residual ``ADD`` whose two inputs have very different ranges, a layer whose
activations have outliers that stretch the int8 grid. TFLite's quantization debugger
measures, per quantized op, the error of its int8 output against the float op run on the
same (dequantized) inputs; the standard figure of merit is that error's root mean square in
units of the output's quantization step (``rmse / scale``: about 0.29 is pure rounding,
above 0.7 the op does worse than rounding). The ops with the largest ``rmse / scale`` are
kept in float (their output tensors "denylisted"), everything else stays int8, and the
model's input and output stay int8, so the Pi's code path is the same.

How many ops to keep in float is chosen by trying a short schedule (0, 1, 2, 4, 8, ...)
and taking the smallest number whose label agreement with the Keras float model, on
training slices that calibration did not use, meets the gate's int8 rule with a margin (the
model is surer of slices it trained on, so they flip less than unseen ones). The gate then
judges the result on val as it judges any format, so val never picks the layers.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from convert.tflite import frozen_function

log = logging.getLogger(__name__)

DEBUG_SAMPLES = 48  # calibration slices the debugger runs to rank the layers
SCHEDULE = (0, 1, 2, 4, 8, 16, 32)
MAX_FLOAT_SHARE = 0.25  # never keep more than a quarter of the ops in float: that is no int8 model


@dataclass(frozen=True)
class LayerError:
    """One quantized op's int8 error, as the quantization debugger reports it."""

    op: str
    tensor: str
    rmse_per_step: float  # sqrt(mean squared error) / output scale


@dataclass
class Selection:
    """The chosen model and how it was chosen (recorded in the manifest and the model card)."""

    content: bytes
    float_tensors: list[str]
    quantized_ops: int
    trials: list[dict] = field(default_factory=list)
    ranking: list[LayerError] = field(default_factory=list)
    chosen_on: str | None = None  # what picked the ops when it was not the trials (``--float-fallback head``)

    def manifest(self) -> dict:
        return {
            "float_ops": len(self.float_tensors),
            "quantized_ops": self.quantized_ops,
            "float_tensors": self.float_tensors,
            "ranking": "rmse / output scale of each int8 op (tf.lite.experimental.QuantizationDebugger)",
            "chosen_on": self.chosen_on or "training slices not used for calibration",
            "trials": self.trials,
        }


def _converter(model, representative: Sequence[np.ndarray]):
    import tensorflow as tf

    samples = [np.asarray(s, dtype=np.float32)[None, ...] for s in representative]

    def dataset():
        for sample in samples:
            yield [sample]

    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen_function(model)])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = dataset
    # Float builtins are allowed only for the denylisted ops; everything else is int8.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter, dataset


def _debugger(model, representative, denylist: Sequence[str] = (), debug_samples: int = DEBUG_SAMPLES):
    import tensorflow as tf

    converter, _ = _converter(model, representative)
    subset = [np.asarray(s, dtype=np.float32)[None, ...] for s in list(representative)[:debug_samples]]

    def debug_dataset():
        for sample in subset:
            yield [sample]

    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=list(denylist), fully_quantize=True)
    return tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=debug_dataset, debug_options=options)


def rank_layers(model, representative: Sequence[np.ndarray], debug_samples: int = DEBUG_SAMPLES) -> list[LayerError]:
    """Every quantized op with its ``rmse / scale``, worst first."""
    debugger = _debugger(model, representative, debug_samples=debug_samples)
    debugger.run()
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    ranking = []
    for row in csv.DictReader(io.StringIO(dump.getvalue())):
        scale = float(row["scale"])
        if not scale > 0:
            continue
        rmse = float(np.sqrt(max(float(row["mean_squared_error"]), 0.0)))
        ranking.append(LayerError(row["op_name"], row["tensor_name"], rmse / scale))
    return sorted(ranking, key=lambda layer: layer.rmse_per_step, reverse=True)


def convert_with_float(model, representative: Sequence[np.ndarray], float_tensors: Sequence[str]) -> bytes:
    """int8 model (int8 input and output) with the ops producing ``float_tensors`` in float."""
    return _debugger(model, representative, float_tensors, debug_samples=1).get_nondebug_quantized_model()


def choose_float_fallback(
    model,
    representative: Sequence[np.ndarray],
    agreement_of: Callable[[bytes], dict],
    passes: Callable[[dict], bool],
    first: bytes | None = None,
    schedule: Sequence[int] = SCHEDULE,
    on_step: Callable[[str], None] | None = None,
    original=None,
) -> Selection:
    """The smallest float fallback from ``schedule`` whose figures ``passes``.

    ``agreement_of(content)`` scores a candidate (``{"agreement": ..., "auc_change": ...}`` on
    the selection slices); ``first`` is the plain full-integer model when it is already made.
    Returns the first passing candidate, or else the one with the highest agreement (the gate
    then refuses it with its figures)."""
    say = on_step or (lambda message: None)
    ranking: list[LayerError] = []
    trials: list[dict] = []
    best: tuple[float, bytes, list[str]] | None = None
    for count in schedule:
        if count == 0:
            if first is None:
                continue
            content, tensors = first, []
        else:
            if not ranking:
                say("ranking int8 ops by their quantization error (tf.lite QuantizationDebugger)")
                ranking = rank_layers(model, representative)
                worst = ", ".join(f"{layer.op} {layer.rmse_per_step:.2f}" for layer in ranking[:5])
                say(f"  {len(ranking)} int8 ops; worst rmse/step: {worst}")
            if count > MAX_FLOAT_SHARE * len(ranking):
                break
            tensors = [layer.tensor for layer in ranking[:count]]
            say(f"int8 with the {count} worst op(s) in float")
            content = convert_with_float(with_float_layers_restored(model, original, tensors), representative, tensors)
        figures = agreement_of(content)
        trials.append({"float_ops": count, **figures})
        say(f"  {count} float op(s): agreement {figures['agreement']:.1%}, |dAUC| {figures['auc_change']:.4f} on the selection slices")
        if passes(figures):
            return Selection(content, tensors, len(ranking), trials, ranking)
        if best is None or figures["agreement"] > best[0]:
            best = (figures["agreement"], content, tensors)
    if best is None:
        raise ValueError("no int8 candidate was made")
    log.warning("no float fallback in %s met the int8 rule; keeping the one that agrees best", list(schedule))
    return Selection(best[1], best[2], len(ranking), trials, ranking)


def fixed_float_fallback(model, representative: Sequence[np.ndarray], count: int,
                         on_step: Callable[[str], None] | None = None, original=None) -> Selection:
    """int8 with exactly the ``count`` worst ops in float (``--float-fallback N``)."""
    return _fallback_of(model, representative, lambda ranking: [layer.tensor for layer in ranking[:count]],
                        on_step, original)


HEAD = "head"  # --float-fallback head


def head_layers(model) -> set[str]:
    """Names of the layers of ``model``'s classifier head after its global pooling: the layers of
    its last nested Keras model when it has a backbone and a head as two (an experts run), less
    inputs and pooling."""
    import keras

    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(nested) < 2:
        raise ValueError(f"--float-fallback {HEAD} needs a model whose head is a sub-model after the backbone's "
                         f"(an experts run, --head experts); {model.name} has none")
    return {layer.name for layer in nested[-1].layers
            if not isinstance(layer, (keras.layers.InputLayer, keras.layers.GlobalAveragePooling2D))}


def head_tensors(model, ranking: Sequence[LayerError]) -> list[str]:
    """The ranked ops that belong to ``model``'s head (:func:`head_layers`), in ranking order. A
    converted op's tensor name carries its Keras layer's scope (``name`` or ``name_1``)."""
    scopes = {scope for name in head_layers(model) for scope in (name, f"{name}_1")}
    return [layer.tensor for layer in ranking if _scopes(layer.tensor) & scopes]


def head_float_fallback(model, representative: Sequence[np.ndarray], on_step: Callable[[str], None] | None = None,
                        original=None) -> Selection:
    """int8 backbone and pooling, the head after them in float (``--float-fallback head``).

    Why: an experts head standardises each pooled feature and joins them before its dense layers,
    and full-integer int8 puts that joined vector on one grid per tensor. Its range is set by the
    calibration slices' most extreme standardised feature, so the grid is coarse for every other
    feature, and which slices calibrate decides how coarse: the rmse / step ranking cannot see it
    (each op rounds no worse than its own grid). Measured on MobileNetV2's blocks 6 and 13 head:
    full-integer int8 agreed with Keras on 97.4 % / 94.2 % of val (300 / 925 calibration slices),
    the int8 pooled maps read by a float head on 99.0 % with either (docs/models.md). The head is
    a few thousand multiply-adds; the backbone, all of the time, stays int8."""
    return _fallback_of(model, representative, lambda ranking: head_tensors(original or model, ranking), on_step,
                        original, chosen_on="the classifier head after the backbone's pooling (--float-fallback head)")


def _fallback_of(model, representative, pick: Callable[[list[LayerError]], list[str]], on_step, original,
                 chosen_on: str | None = None) -> Selection:
    say = on_step or (lambda message: None)
    say("ranking int8 ops by their quantization error (tf.lite QuantizationDebugger)")
    ranking = rank_layers(model, representative)
    tensors = pick(ranking)
    if not tensors:
        raise ValueError("no int8 op was picked to keep in float")
    say(f"int8 with {len(tensors)} of {len(ranking)} ops in float")
    content = convert_with_float(with_float_layers_restored(model, original, tensors), representative, tensors)
    return Selection(content, tensors, len(ranking), [], ranking, chosen_on=chosen_on)


def _scopes(tensor: str) -> set[str]:
    return {part for piece in tensor.split(";") for part in piece.split("/")}


def with_float_layers_restored(corrected, original, float_tensors: Sequence[str]):
    """``corrected`` (bias-corrected for int8 weight rounding, :mod:`convert.bias_correction`)
    with the layers of the ops kept in float back at their ``original`` weights: their
    weights are not rounded, so the correction would be a shift of its own. A fused op's
    tensor names carry the scope of every Keras layer folded into it (``name`` or
    ``name_1``). Returns ``corrected`` itself, changed in place; ``original=None``: unchanged."""
    if original is None:
        return corrected
    import keras

    def flatten(container) -> list:
        return [leaf for layer in container.layers
                for leaf in (flatten(layer) if isinstance(layer, keras.Model) else [layer])]

    scopes = set().union(*(_scopes(tensor) for tensor in float_tensors)) if float_tensors else set()
    source = {layer.name: layer for layer in flatten(original)}
    if not hasattr(corrected, "_ctpi_corrected_weights"):
        corrected._ctpi_corrected_weights = {layer.name: layer.get_weights() for layer in flatten(corrected)}
    for layer in flatten(corrected):
        if not layer.weights:
            continue
        if {layer.name, f"{layer.name}_1"} & scopes and layer.name in source:
            layer.set_weights(source[layer.name].get_weights())
        else:
            layer.set_weights(corrected._ctpi_corrected_weights[layer.name])
    return corrected


SELECTION_SLICES = 400  # held-out train slices that choose the float fallback


def parse_option(option: str) -> str | int:
    """``--float-fallback``'s value: ``auto``, ``off``, ``head`` or a number of ops (>= 1)."""
    if option in ("auto", "off", HEAD):
        return option
    try:
        count = int(option)
    except ValueError:
        raise ValueError(f"--float-fallback takes auto, off, {HEAD} or a number of ops, not {option!r}") from None
    if count < 1:
        raise ValueError("--float-fallback N needs N >= 1 (off keeps full-integer int8)")
    return count


def float_fallback(option: str, model, calibration, holdout, holdout_reference, run, full_integer: bytes, seed: int,
                   original=None, on_step: Callable[[str], None] | None = None) -> Selection:
    """``--float-fallback``: a fixed count, or the schedule chosen on held-out train slices (``auto``)."""
    from convert.diagnose import tflite_probabilities
    from convert.gate import GATE_RULES
    from device.core.metrics import roc_auc

    step = on_step or (lambda message: None)

    choice = parse_option(option)
    if choice == HEAD:
        return head_float_fallback(model, list(calibration.pixels), on_step=step, original=original)
    if isinstance(choice, int):
        return fixed_float_fallback(model, list(calibration.pixels), choice, on_step=step, original=original)
    if not len(holdout.examples):
        log.warning("no held-out train slices to choose int8's float fallback on; keeping full-integer int8")
        return Selection(full_integer, [], 0)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(len(holdout.examples))[:SELECTION_SLICES])
    pixels = holdout.pixels[chosen]
    positive = run.labels.index(run.positive_label)
    truth = holdout.y_true(run.positive_label)[chosen]
    reference = holdout_reference[chosen][:, positive]
    reference_auc = roc_auc(truth, reference)
    rule = GATE_RULES["int8"]

    def figures(content: bytes) -> dict:
        scores = tflite_probabilities(content, pixels)[:, positive]
        agreement = float(np.mean((scores >= run.threshold) == (reference >= run.threshold)))
        change = abs(roc_auc(truth, scores) - reference_auc)
        return {"agreement": agreement, "auc_change": 0.0 if np.isnan(change) else float(change), "slices": len(chosen)}

    # Slices the model was trained on sit far from the threshold, so they flip less than unseen
    # ones: a candidate just at the rule here fails it on val (seen: 98.5% here, 97.2% on val).
    # Half the rule's slack is kept as a margin.
    needed = rule.min_agreement + (1.0 - rule.min_agreement) / 2

    def passes(got: dict) -> bool:
        return got["agreement"] >= needed and got["auc_change"] <= rule.max_auc_change

    step(f"choosing int8's float fallback on {len(chosen)} held-out train slices (agreement >= {needed:.1%}, "
         f"|dAUC| <= {rule.max_auc_change})")
    return choose_float_fallback(model, list(calibration.pixels), figures, passes, first=full_integer, on_step=step,
                                 original=original)

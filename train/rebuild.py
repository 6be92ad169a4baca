"""A training run rebuilt from a bundle's float32 TFLite file, for re-conversion.

Conversion reads a run folder (``model.keras`` + ``run.json``). When the run that made a
shipped bundle is gone (runs/ is not versioned; training takes the better part of an hour on
two cores), the bundle still holds the trained network in full precision: its float32 TFLite
file. The converter folded every BatchNormalization into the kernel and bias before it, so
the architecture is rebuilt with :func:`train.model.build_model` and each weighted layer, in
graph order, takes the folded kernel and bias, with the BatchNormalization after it set to
the identity (``gamma = 1, beta = 0, mean = 0, variance = 1 - epsilon``). Shapes are checked
layer by layer, and the rebuilt model must reproduce the TFLite file's outputs on the given
slices, or nothing is written.

``python -m train.rebuild --bundle models/mobilenetv2 --out runs/mobilenetv2-rebuilt --data DIR``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from device.core.bundle import load_bundle
from device.core.dataset import list_examples
from device.core.preprocess import load_slice

WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
MAX_DIFFERENCE = 1e-4  # |P| between the rebuilt Keras model and the float32 TFLite file


class RebuildError(ValueError):
    """The TFLite graph and the architecture do not line up; the message says where."""


def tflite_weights(path: Path) -> list[tuple[str, np.ndarray, np.ndarray, set[str]]]:
    """``(op, kernel, bias, scope names)`` of every weighted op, in graph order, in TFLite's layouts."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    weights = []
    for op in interpreter._get_ops_details():
        if op["op_name"] in WEIGHTED:
            kernel = np.array(interpreter.get_tensor(op["inputs"][1]))
            channels = kernel.shape[-1] if op["op_name"] == "DEPTHWISE_CONV_2D" else kernel.shape[0]
            has_bias = len(op["inputs"]) > 2 and op["inputs"][2] >= 0  # a zero bias may be left out
            bias = np.array(interpreter.get_tensor(op["inputs"][2])) if has_bias else np.zeros(channels, np.float32)
            names = {interpreter._get_tensor_details(i, 0)["name"] for i in (op["inputs"][1], *op["outputs"])}
            scopes = {part for name in names for piece in name.split(";") for part in piece.split("/")}
            weights.append((op["op_name"], kernel, bias, scopes))
    return weights


def keras_layers(model):
    """Weighted layers in graph order, each with the BatchNormalization that reads its output
    (or None). Found in the graph, not as the next layer of the list: where a ResNet's branches
    meet, Keras lists ``block1_0_conv, block1_3_conv, block1_0_bn, block1_3_bn``, so the next
    layer of the shortcut convolution is another convolution, and that one's is the shortcut's
    BatchNorm."""
    import keras

    def flatten(container) -> list:
        return [leaf for layer in container.layers
                for leaf in (flatten(layer) if isinstance(layer, keras.Model) else [layer])]

    def tensor(layer, side: str):
        """The layer's one ``input`` or ``output`` in the functional graph, or None."""
        try:
            return getattr(layer, side)
        except (AttributeError, ValueError):  # never called, or called more than once
            return None

    flat = flatten(model)
    norms = [(layer, tensor(layer, "input")) for layer in flat if isinstance(layer, keras.layers.BatchNormalization)]
    pairs = []
    for index, layer in enumerate(flat):
        if isinstance(layer, (keras.layers.DepthwiseConv2D, keras.layers.Conv2D, keras.layers.Dense)):
            output = tensor(layer, "output")
            if output is not None:
                reads = [norm for norm, tensor in norms if tensor is output]
                pairs.append((layer, reads[0] if len(reads) == 1 else None))
            else:  # no graph to follow: the layer listed next
                after = flat[index + 1] if index + 1 < len(flat) else None
                pairs.append((layer, after if isinstance(after, keras.layers.BatchNormalization) else None))
    return pairs


def _in_layer_order(pairs, weights) -> list:
    """TFLite's weighted ops reordered to the Keras layers': by the layer's name in the op's
    tensor names (Keras scopes them ``name`` or ``name_1``), else by position. Graph order
    and layer order differ where branches meet (ResNet's shortcut convolutions)."""
    left = list(range(len(weights)))
    ordered = []
    for layer, _ in pairs:
        named = [i for i in left if {layer.name, f"{layer.name}_1"} & weights[i][3]]
        index = named[0] if len(named) == 1 else left[0]
        left.remove(index)
        ordered.append(weights[index][:3])
    return ordered


def load_folded(model, weights: list[tuple]) -> None:
    """Put the folded TFLite weights into ``model`` (see the module docstring)."""
    import keras

    pairs = keras_layers(model)
    if len(pairs) != len(weights):
        raise RebuildError(f"the TFLite file has {len(weights)} weighted ops, the architecture {len(pairs)} weighted layers")
    for (layer, norm), (op, kernel, bias) in zip(pairs, _in_layer_order(pairs, weights), strict=True):
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            expected = "DEPTHWISE_CONV_2D"
            _, height, width, channels = kernel.shape
            kernel = kernel.reshape(height, width, channels, 1)
        elif isinstance(layer, keras.layers.Conv2D):
            expected, kernel = "CONV_2D", kernel.transpose(1, 2, 3, 0)
        else:
            expected, kernel = "FULLY_CONNECTED", kernel.T
        current = layer.get_weights()
        if op != expected or current[0].shape != kernel.shape:
            raise RebuildError(f"{layer.name}: TFLite {op} {kernel.shape} where {expected} {current[0].shape} was expected")
        if norm is None:
            if len(current) != 2:
                raise RebuildError(f"{layer.name} has no bias and no BatchNormalization to carry TFLite's bias")
            layer.set_weights([kernel, bias])
            continue
        layer.set_weights([kernel] + ([np.zeros_like(bias)] if len(current) == 2 else []))
        epsilon = norm.epsilon
        norm.set_weights([np.ones_like(bias), bias, np.zeros_like(bias), np.full_like(bias, 1.0 - epsilon)])


def rebuild(bundle_path: Path, out: Path, data: list[Path], check_slices: int = 16) -> dict:
    """Write ``out/model.keras`` and ``out/run.json`` from the bundle; return the check's figures."""
    from train.model import InitialWeights, build_model

    bundle = load_bundle(bundle_path)
    manifest = bundle.manifest
    if "float32" not in manifest["formats"]:
        raise RebuildError(f"{bundle_path} has no float32 TFLite file to rebuild from")
    spec = bundle.spec
    model = build_model(manifest["architecture"], spec.height, list(manifest["labels"]), InitialWeights("none"))
    load_folded(model, tflite_weights(bundle.model_path("float32")))

    examples = [e for root in data for e in list_examples(root / "val", manifest["labels"])]
    rng = np.random.default_rng(0)
    chosen = [examples[i] for i in sorted(rng.permutation(len(examples))[:check_slices])]
    pixels = np.stack([load_slice(e.path, spec) for e in chosen]).astype(np.float32)
    keras_out = model.predict(pixels, verbose=0)
    from convert.diagnose import tflite_probabilities

    tflite_out = tflite_probabilities(bundle.model_path("float32").read_bytes(), pixels)
    difference = float(np.abs(keras_out - tflite_out).max())
    if difference > MAX_DIFFERENCE:
        raise RebuildError(f"the rebuilt model differs from the float32 TFLite file by {difference:.2e} in P")

    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "model.keras")
    training = dict(manifest.get("training") or {})
    run = {
        **training,
        "architecture": manifest["architecture"],
        "labels": manifest["labels"],
        "positive_label": manifest["positive_label"],
        # the bundle's threshold is on the calibrated scale; the run's is the model's own
        "threshold": (manifest.get("calibration") or {}).get("raw_threshold", manifest["threshold"]),
        "preprocessing": manifest["preprocessing"],
        "training_data": manifest["training_data"],
        "metrics": (manifest.get("metrics") or {}).get("training_run", {}),
        "rebuilt_from": {"bundle": manifest["name"], "version": manifest["version"],
                         "bundle_sha256": manifest.get("bundle_sha256"), "max_abs_difference": difference},
    }
    (out / "run.json").write_text(json.dumps(run, indent=2), encoding="utf-8")
    return {"slices": len(chosen), "max_abs_difference": difference}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.rebuild", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, action="append", required=True, help="source folders whose val slices check the rebuild")
    args = parser.parse_args(argv)
    try:
        figures = rebuild(args.bundle, args.out, args.data)
    except RebuildError as error:
        print(f"rebuild: {error}", file=sys.stderr)
        return 1
    print(f"rebuilt {args.out}: matches the float32 TFLite file within {figures['max_abs_difference']:.1e} on {figures['slices']} val slices")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Keras model to ONNX through tf2onnx, from the same frozen function the TFLite converter uses.

tf2onnx's Keras entry point (``from_keras``) breaks on Keras 3 models, so the graph handed to
it is the frozen concrete function of :func:`convert.tflite.frozen_function`: a fixed
``[1, H, W, C]`` float32 input named ``pixels``, variables folded into constants. The opset is
pinned (not "whatever tf2onnx prefers today") and recorded in the bundle manifest, so a
runtime on the Pi can be checked against it.
"""

from __future__ import annotations

import logging

from convert.tflite import frozen_function

log = logging.getLogger(__name__)

ONNX_OPSET = 17  # supported by tf2onnx 1.16+ and by every onnxruntime >= 1.14


def to_onnx(model, opset: int = ONNX_OPSET) -> bytes:
    """Serialized ONNX model computing the same softmax as ``model`` on raw 0..255 pixels."""
    import tensorflow as tf
    import tf2onnx

    function = frozen_function(model)
    input_names = [tensor.name for tensor in function.inputs if tensor.dtype != tf.resource]
    output_names = [tensor.name for tensor in function.outputs]
    log.info("tf2onnx %s: %s -> %s at opset %d", tf2onnx.__version__, input_names, output_names, opset)
    with tf.device("/cpu:0"):
        model_proto, _ = tf2onnx.convert.from_graph_def(
            function.graph.as_graph_def(),
            name=model.name,
            input_names=input_names,
            output_names=output_names,
            opset=opset,
        )
    return canonical(model_proto).SerializeToString()


def canonical(model_proto):
    """The same model with deterministic names and constant order.

    tf2onnx names the nodes and constants it creates from a process-wide counter
    (``pad_const__24``, ``Relu6_max__98``), so converting one Keras model twice gives different
    bytes and a new sha256 for an identical model. Nodes are renamed by their position in the
    (stable) topological order, their outputs after them, constants after their first consumer;
    the graph's input and output names are kept. A bundle rebuilt from the same run then has
    the same ONNX file."""
    graph = model_proto.graph
    kept = {value.name for value in graph.input} | {value.name for value in graph.output}
    constants = {initializer.name for initializer in graph.initializer}
    rename: dict[str, str] = {}
    constant_order: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            if name in constants and name not in constant_order and name not in kept:
                constant_order[name] = len(constant_order)
                rename[name] = f"const_{constant_order[name]}"
        for position, name in enumerate(node.output):
            if name and name not in kept:
                rename[name] = f"{node.op_type}_{index}:{position}"
        node.name = f"{node.op_type}_{index}"
    for node in graph.node:
        for position, name in enumerate(node.input):
            node.input[position] = rename.get(name, name)
        for position, name in enumerate(node.output):
            node.output[position] = rename.get(name, name)
    for initializer in graph.initializer:
        initializer.name = rename.get(initializer.name, initializer.name)
    for info in graph.value_info:
        info.name = rename.get(info.name, info.name)
    order = {rename[name]: position for name, position in constant_order.items()}
    ordered = sorted(graph.initializer, key=lambda initializer: order.get(initializer.name, -1))
    copies = [type(initializer)() for initializer in ordered]
    for copy, initializer in zip(copies, ordered, strict=True):
        copy.CopyFrom(initializer)
    del graph.initializer[:]
    graph.initializer.extend(copies)
    return model_proto


def onnx_opset(content: bytes) -> int:
    """The default-domain opset a serialized ONNX model declares (what the manifest records)."""
    import onnx

    proto = onnx.load_from_string(content)
    return next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))

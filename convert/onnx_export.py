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
    return model_proto.SerializeToString()


def onnx_opset(content: bytes) -> int:
    """The default-domain opset a serialized ONNX model declares (what the manifest records)."""
    import onnx

    proto = onnx.load_from_string(content)
    return next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))

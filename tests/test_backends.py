"""Backends: quantized and float models behind one interface, runtimes chosen by registry."""

import numpy as np
import pytest

from device.core.backends import BackendError, TensorSpec, dequantize, open_backend, quantize
from device.core.classifier import Classifier
from device.core.dataset import list_examples
from device.core.preprocess import load_slice


def test_affine_quantization_round_trips_and_saturates():
    spec = TensorSpec((1, 3), np.dtype(np.int8), scale=0.5, zero_point=-10)
    q = quantize(np.array([0.0, 1.0, 1000.0, -1000.0]), spec)
    assert q.dtype == np.int8 and q.tolist() == [-10, -8, 127, -128]
    assert dequantize(q[:2], spec).tolist() == [0.0, 1.0]


def test_int8_model_takes_and_returns_int8_through_the_interpreter(tiny_bundle):
    classifier = Classifier(tiny_bundle, "int8", threads=1)
    assert classifier.backend.input.dtype == np.int8 and classifier.backend.input.quantized
    assert classifier.backend.output.dtype == np.int8 and classifier.backend.output.quantized


def test_int8_and_float_models_agree_on_every_synthetic_slice(tiny_bundle, synthetic_data):
    int8 = Classifier(tiny_bundle, "int8", threads=2)
    float32 = Classifier(tiny_bundle, "float32", threads=1)
    assert float32.backend.input.dtype == np.float32 and not float32.backend.input.quantized
    for example in list_examples(synthetic_data):
        pixels = load_slice(example.path, int8.bundle.spec)
        quantized, reference = int8.probabilities(pixels), float32.probabilities(pixels)
        assert quantized.sum() == pytest.approx(1.0, abs=0.02)
        assert np.abs(quantized - reference).max() < 0.05
        assert int8.decide(quantized)[0] == float32.decide(reference)[0] == example.label


def test_missing_runtime_is_reported_with_what_to_install(tiny_bundle):
    pytest.importorskip("ai_edge_litert")
    try:
        import tflite_runtime  # noqa: F401
    except ImportError:
        with pytest.raises(BackendError, match="no runtime for tflite models is installed .*pip install"):
            open_backend(tiny_bundle / "model_int8.tflite", "tflite", 1, prefer="tflite-runtime")
    else:
        pytest.skip("tflite-runtime is installed here, so it cannot be reported missing")


def test_unknown_backend_name_is_refused(tiny_bundle):
    with pytest.raises(BackendError, match="no backend named 'tensorrt'"):
        open_backend(tiny_bundle / "model_int8.tflite", "tflite", 1, prefer="tensorrt")


def test_file_that_is_not_a_model_is_refused(tmp_path):
    fake = tmp_path / "model.tflite"
    fake.write_bytes(b"definitely not a flatbuffer" * 10)
    with pytest.raises(BackendError, match="not a loadable TFLite model"):
        open_backend(fake, "tflite", 1)


def test_threads_must_be_positive(tiny_bundle):
    with pytest.raises(ValueError):
        open_backend(tiny_bundle / "model_int8.tflite", "tflite", 0)

"""Who runs the tensor: small inference backends behind one interface.

ai-edge-litert (LiteRT, TFLite's successor) is preferred for ``.tflite``; tflite-runtime is
the fallback where LiteRT is not installed; onnxruntime runs ``.onnx``. A backend is chosen
by registry (first available for the model's runtime), never by an if-chain, and a missing
runtime is reported as :class:`BackendError`, not an ImportError traceback.

The thread count is always passed explicitly: LiteRT silently runs on one thread otherwise.
Tensor shapes, dtypes and quantization are read from the model, never assumed.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import ClassVar

import numpy as np


class BackendError(RuntimeError):
    """No runtime can run this model here, or the model cannot be loaded."""


def default_threads() -> int:
    """All cores up to 4 (a Raspberry Pi 4/5 has 4; more rarely helps a 224x224 CNN)."""
    return max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: np.dtype
    scale: float | None = None  # quantized tensors: real = scale * (q - zero_point)
    zero_point: int | None = None

    @property
    def quantized(self) -> bool:
        return self.scale is not None and np.issubdtype(self.dtype, np.integer)


def quantize(values: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Real values to the tensor's dtype: affine quantization for integer tensors."""
    if spec.quantized:
        info = np.iinfo(spec.dtype)
        scaled = np.rint(values.astype(np.float32) / np.float32(spec.scale)) + spec.zero_point
        return np.clip(scaled, info.min, info.max).astype(spec.dtype)
    return values.astype(spec.dtype)


def dequantize(values: np.ndarray, spec: TensorSpec) -> np.ndarray:
    if spec.quantized:
        return (values.astype(np.float32) - spec.zero_point) * np.float32(spec.scale)
    return values.astype(np.float32)


class Backend:
    """One loaded model. Subclasses set ``name``, ``runtime`` and ``module`` and implement
    ``_load`` and ``invoke``; ``invoke`` takes and returns tensors in the model's own dtype."""

    name: ClassVar[str]
    runtime: ClassVar[str]  # "tflite" or "onnx"
    module: ClassVar[str]
    distribution: ClassVar[str]

    input: TensorSpec
    output: TensorSpec

    def __init__(self, model_path: Path, threads: int):
        if threads < 1:
            raise ValueError("threads must be at least 1")
        self.model_path = Path(model_path)
        self.threads = threads
        self._load()

    @classmethod
    def available(cls) -> bool:
        try:
            importlib.import_module(cls.module)
        except ImportError:
            return False
        return True

    @classmethod
    def version(cls) -> str:
        try:
            return metadata.version(cls.distribution)
        except metadata.PackageNotFoundError:
            return "unknown"

    def _load(self) -> None:
        raise NotImplementedError

    def invoke(self, tensor: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class _TFLiteBackend(Backend):
    runtime = "tflite"

    def _load(self) -> None:
        interpreter_class = importlib.import_module(self.module).Interpreter
        try:
            self._interpreter = interpreter_class(model_path=str(self.model_path), num_threads=self.threads)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as error:
            raise BackendError(f"{self.model_path.name} is not a loadable TFLite model: {error}") from None
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise BackendError(f"{self.model_path.name}: expected one input and one output tensor")
        self._input_index = inputs[0]["index"]
        self._output_index = outputs[0]["index"]
        self.input = self._spec(inputs[0])
        self.output = self._spec(outputs[0])

    @staticmethod
    def _spec(detail: dict) -> TensorSpec:
        scale, zero_point = detail.get("quantization", (0.0, 0))
        quantized = scale not in (0, 0.0)
        return TensorSpec(
            shape=tuple(int(d) for d in detail["shape"]),
            dtype=np.dtype(detail["dtype"]),
            scale=float(scale) if quantized else None,
            zero_point=int(zero_point) if quantized else None,
        )

    def invoke(self, tensor: np.ndarray) -> np.ndarray:
        self._interpreter.set_tensor(self._input_index, tensor)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output_index).copy()  # no view across invokes


class LiteRTBackend(_TFLiteBackend):
    name = "ai-edge-litert"
    module = "ai_edge_litert.interpreter"
    distribution = "ai-edge-litert"


class TFLiteRuntimeBackend(_TFLiteBackend):
    name = "tflite-runtime"
    module = "tflite_runtime.interpreter"
    distribution = "tflite-runtime"


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    runtime = "onnx"
    module = "onnxruntime"
    distribution = "onnxruntime"

    _DTYPES = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}

    def _load(self) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self._session = onnxruntime.InferenceSession(
                str(self.model_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime raises its own exception hierarchy
            raise BackendError(f"{self.model_path.name} is not a loadable ONNX model: {error}") from None
        (model_input,) = self._session.get_inputs()
        (model_output,) = self._session.get_outputs()
        self._input_name = model_input.name
        self.input = TensorSpec(self._shape(model_input.shape), np.dtype(self._DTYPES[model_input.type]))
        self.output = TensorSpec(self._shape(model_output.shape), np.dtype(self._DTYPES[model_output.type]))

    @staticmethod
    def _shape(shape) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else 1 for d in shape)  # symbolic batch -> 1

    def invoke(self, tensor: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input_name: tensor})[0]


# Preference order per runtime: the first available backend runs the model.
REGISTRY: tuple[type[Backend], ...] = (LiteRTBackend, TFLiteRuntimeBackend, OnnxRuntimeBackend)


def backend_names() -> list[str]:
    return [backend.name for backend in REGISTRY]


def open_backend(model_path: Path, runtime: str, threads: int, prefer: str | None = None) -> Backend:
    """Load ``model_path`` with the first available backend for ``runtime`` (or ``prefer``)."""
    candidates = [b for b in REGISTRY if b.runtime == runtime and (prefer is None or b.name == prefer)]
    if not candidates:
        known = [b.name for b in REGISTRY if b.runtime == runtime]
        raise BackendError(f"no backend named {prefer!r} for {runtime} models (known: {known})")
    for backend in candidates:
        if backend.available():
            return backend(model_path, threads)
    hint = {
        "tflite": "pip install ai-edge-litert (or tflite-runtime on older systems)",
        "onnx": "pip install 'ctpi[onnx]' (onnxruntime)",
    }[runtime]
    names = ", ".join(b.name for b in candidates)
    raise BackendError(f"no runtime for {runtime} models is installed (tried {names}): {hint}")

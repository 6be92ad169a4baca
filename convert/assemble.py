"""Model files to a bundle folder: writes the files, reads their tensor specs back through the
device backends (what the Pi will see, not what we meant to produce) and writes the manifest
with :func:`device.core.bundle.write_manifest`."""

from __future__ import annotations

import shutil
from pathlib import Path

from device.core.backends import TensorSpec, open_backend
from device.core.bundle import FORMATS, RUNTIME_OF_FORMAT, load_bundle, write_manifest
from device.core.preprocess import PreprocessSpec

FILE_OF_FORMAT = {
    "int8": "model_int8.tflite",
    "float16": "model_float16.tflite",
    "float32": "model_float32.tflite",
    "onnx": "model.onnx",
}


def _tensor_info(spec: TensorSpec) -> dict:
    info = {"shape": list(spec.shape), "dtype": spec.dtype.name}
    info["quantization"] = {"scale": spec.scale, "zero_point": spec.zero_point} if spec.quantized else None
    return info


def assemble_bundle(
    out_dir: str | Path,
    models: dict[str, bytes],
    *,
    name: str,
    version: str,
    architecture: str,
    labels: list[str],
    positive_label: str,
    threshold: float,
    spec: PreprocessSpec,
    metrics: dict,
    training_data: dict,
    default_format: str | None = None,
    format_extras: dict[str, dict] | None = None,
    extra: dict | None = None,
    extra_files: dict[str, bytes | Path] | None = None,
):
    """Write a complete, verified bundle to ``out_dir`` (replaced if it exists) and return it
    loaded through :func:`device.core.bundle.load_bundle`, which proves it is readable."""
    out_dir = Path(out_dir)
    unknown = set(models) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown formats {sorted(unknown)}")
    staging = out_dir.with_name(out_dir.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    formats = {}
    for fmt, content in models.items():
        path = staging / FILE_OF_FORMAT[fmt]
        path.write_bytes(content)
        runtime = RUNTIME_OF_FORMAT[fmt]
        backend = open_backend(path, runtime, threads=1)
        formats[fmt] = {
            "file": path.name,
            "runtime": runtime,
            "size_bytes": len(content),
            "input": _tensor_info(backend.input),
            "output": _tensor_info(backend.output),
            **(format_extras or {}).get(fmt, {}),
        }
    for file_name, content in (extra_files or {}).items():
        target = staging / file_name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, target)
        else:
            target.write_bytes(content)
    manifest = {
        "schema": "ctpi.bundle/1",
        "name": name,
        "version": version,
        "architecture": architecture,
        "labels": list(labels),
        "positive_label": positive_label,
        "threshold": float(threshold),
        "preprocessing": spec.to_manifest(),
        "input": {
            "shape": [1, spec.height, spec.width, spec.channels],
            "layout": "NHWC",
            "pixels": "uint8 0..255 from device.core.preprocess (scaling is inside the model)",
        },
        "output": {"kind": "softmax probabilities", "order": list(labels)},
        "formats": formats,
        "default_format": default_format or next(f for f in FORMATS if f in models),
        "metrics": metrics,
        "training_data": training_data,
        **(extra or {}),
    }
    write_manifest(staging, manifest)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return load_bundle(out_dir)

"""The device boundary: nothing that runs on the Pi pulls in TensorFlow, Keras or tf2onnx."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESKTOP_ONLY = {"tensorflow", "keras", "tf_keras", "tf2onnx"}


def device_sources():
    return sorted((ROOT / "device").rglob("*.py")) + [p for p in [ROOT / "streamlit_app.py"] if p.exists()]


def test_device_sources_never_import_desktop_packages():
    offenders = []
    for path in device_sources():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in DESKTOP_ONLY]
    assert offenders == []


def test_importing_every_device_module_loads_no_tensorflow():
    code = (
        "import importlib, pkgutil, sys, device\n"
        "for m in pkgutil.walk_packages(device.__path__, 'device.'):\n"
        "    importlib.import_module(m.name)\n"
        "from device.cli import build_parser; build_parser()\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in {'tensorflow', 'keras', 'tf2onnx'})\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr

"""The device boundary: nothing that runs on the Pi pulls in TensorFlow, Keras or tf2onnx, and the
subpackages of device/ import one another only in the directions their docstrings state."""

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


# What each part of device/ may import of device (a package name: it and its modules; any other
# name: that module only). device.tools may import anything; device.cli finds the verbs by name.
IMPORT_RULES = {
    "device": set(),
    "device.config": set(),
    "device.cli": {"device", "device.core"},
    "device.core": {"device.core"},
    "device.watch": {"device", "device.core", "device.watch", "device.config", "device.cli"},
    "device.node": {"device", "device.core", "device.watch", "device.node", "device.config", "device.cli"},
    "device.web": {"device", "device.core", "device.web", "device.config", "device.cli",
                   "device.watch.journal", "device.watch.journal_view", "device.node.ledger",
                   "device.tools.bench", "device.tools.plots"},  # the Bench tab; the model card's charts
    "device.tools": None,
}
PACKAGES = {"device.core", "device.watch", "device.node", "device.web", "device.tools"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def device_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """Every module of device that ``source`` (the text of ``module``) imports, lazily inside
    functions too."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from device.core import dicom` imports device.core.dicom
                candidate = ROOT.joinpath(*f"{base}.{alias.name}".split("."))
                found.append(f"{base}.{alias.name}" if candidate.with_suffix(".py").is_file() or candidate.is_dir() else base)
    return list(dict.fromkeys(name for name in found if name == "device" or name.startswith("device.")))


def part_of(module: str) -> str:
    for package in PACKAGES:
        if module == package or module.startswith(package + "."):
            return package
    return module


def allowed(target: str, rule: set[str]) -> bool:
    return any(target == name or (name in PACKAGES and target.startswith(name + ".")) for name in rule)


def wrong_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    rule = IMPORT_RULES.get(part_of(module), set())  # a stray module: see the test below
    if rule is None:
        return []
    return [f"{module} imports {target}" for target in device_imports(source, module, is_package) if not allowed(target, rule)]


def test_every_device_module_lives_in_a_subpackage_or_is_cli_or_config():
    strays = [module_name(p) for p in (ROOT / "device").rglob("*.py") if part_of(module_name(p)) not in IMPORT_RULES]
    assert strays == [], f"modules outside device's subpackages: {strays}; put each in the one its idea belongs to"


def test_subpackages_import_only_in_the_stated_directions():
    wrong = []
    for path in sorted((ROOT / "device").rglob("*.py")):
        wrong += wrong_imports(path.read_text(), module_name(path), path.name == "__init__.py")
    assert wrong == [], "imports against device/__init__.py's rules:\n" + "\n".join(wrong)


def test_the_import_rules_catch_a_wrong_direction():
    """The check itself sees the core importing the watch service (directly, lazily, relatively)
    and the page's helpers importing the DICOM node's daemon, and lets the allowed ones pass."""
    core = "from device.core import band\nfrom . import dicom\ndef f():\n    from device.watch.journal import Journal\n" \
           "import device.tools.plots\nfrom ..watch import storage\n"
    assert sorted(wrong_imports(core, "device.core.example")) == [
        "device.core.example imports device.tools.plots",
        "device.core.example imports device.watch.journal",
        "device.core.example imports device.watch.storage",
    ]
    web = "from device.node.ledger import Ledger\nfrom device.watch.journal import Journal\nfrom device.node import daemon\n"
    assert wrong_imports(web, "device.web.example") == ["device.web.example imports device.node.daemon"]
    assert wrong_imports("from device import __version__\n", "device.core.example") == ["device.core.example imports device"]
    assert wrong_imports("from device.node.daemon import Node\n", "device.tools.example") == []

"""Every unit in systemd/ passes `systemd-analyze verify` and rates exposure <= 2.0 offline."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from deploy.stage import render_unit

UNITS = sorted((Path(__file__).resolve().parents[1] / "systemd").glob("*.service"))
MAX_EXPOSURE = 2.0

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (Debian: systemd)"),
]


def installed(unit: Path, root: Path) -> Path:
    """The unit as deploy/release.sh installs it: /opt/ctpi and /var/lib/ctpi replaced by a
    prefix, so that `verify` finds the executables it checks (stand-ins here)."""
    prefix, data = root / "opt", root / "data"
    for name in ("ctpi", "python", "streamlit"):
        stub = prefix / "current" / "bin" / name
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    text = render_unit(unit.read_text(), "mobilenetv2", "0" * 64)  # what deploy/stage.py ships
    text = text.replace("/opt/ctpi", str(prefix)).replace("/var/lib/ctpi", str(data))
    target = root / unit.name
    target.write_text(text)
    return target


def test_there_is_a_watch_unit():
    assert "ctpi-watch.service" in [unit.name for unit in UNITS]


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_unit_passes_systemd_analyze_verify(unit, tmp_path):
    result = subprocess.run(["systemd-analyze", "verify", str(installed(unit, tmp_path))], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and unit.name not in result.stderr, result.stderr


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_unit_exposure_is_at_most_two(unit, tmp_path):
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(installed(unit, tmp_path))],
        capture_output=True, text=True, timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout

"""``systemd/ctpi-ui.service``: valid for systemd and hardened (exposure at most 2.0)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "ctpi-ui.service"
PREFIX = "/opt/ctpi"  # deploy/release.sh replaces it with the install prefix

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (Debian: systemd)"),
]


def installed_copy(tmp_path: Path) -> Path:
    """The unit as deploy/release.sh installs it: prefix substituted, with the ``ctpi``
    launcher it starts present (verify checks that ExecStart is executable)."""
    launcher = tmp_path / "current" / "bin" / "ctpi"
    launcher.parent.mkdir(parents=True)
    launcher.write_text("#!/bin/sh\n")
    launcher.chmod(0o755)
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(PREFIX, str(tmp_path)))
    return unit


def test_ui_unit_passes_systemd_verify(tmp_path):
    done = subprocess.run(["systemd-analyze", "verify", str(installed_copy(tmp_path))], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_ui_unit_exposure_is_at_most_2(tmp_path):
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(installed_copy(tmp_path))], capture_output=True, text=True, timeout=60
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= 2.0, done.stdout


def test_ui_unit_serves_the_page_with_only_inbox_and_state_writable():
    settings = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    assert settings["ExecStart"][0].startswith(f"{PREFIX}/current/bin/ctpi ui ")
    assert settings["ProtectSystem"] == ["strict"] and settings["User"] == ["ctpi"]
    assert settings["ReadWritePaths"] == ["/var/lib/ctpi/inbox /var/lib/ctpi/state"]
    assert "--password-file /var/lib/ctpi/ui-password" in settings["ExecStart"][0]

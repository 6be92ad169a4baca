"""Units follow the release: `make deploy MODEL=models/<any>` ships units that run that bundle.

Each shipped bundle is staged as a release with the real ``deploy/stage.py``; every unit of the
release must name the bundle it ships (and its identity), and the watch unit's own ExecStart,
with the paths release.sh substitutes, must really start and triage the release's health slice
with exactly that bundle."""

from __future__ import annotations

import json
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.stage import HEALTH_SLICE, UNIT_PLACEHOLDERS, stage
from device.bundle import find_bundles, load_bundle

REPO = Path(__file__).resolve().parents[1]
SHIPPED = find_bundles(REPO / "models")


def exec_start(unit: Path) -> list[str]:
    (line,) = [line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
    return shlex.split(line[len("ExecStart="):])


def test_every_repository_unit_takes_its_model_from_the_release():
    for unit in (REPO / "systemd").glob("*.service"):
        command = exec_start(unit)
        if "--model" in command:
            assert command[command.index("--model") + 1] == "/opt/ctpi/current/models/@BUNDLE@", unit.name
            assert command[command.index("--bundle-sha256") + 1] == "@BUNDLE_SHA256@", unit.name


@pytest.mark.slow
@pytest.mark.parametrize("model", SHIPPED, ids=[m.name for m in SHIPPED])
def test_release_units_run_the_bundle_the_release_ships(model, tmp_path):
    release = stage(REPO, model, tmp_path / "releases", extras=[]).path
    identity = load_bundle(model).digest
    assert json.loads((release / "RELEASE.json").read_text())["model"]["bundle_sha256"] == identity
    units = sorted((release / "systemd").glob("*.service"))
    assert {u.name for u in units} >= {"ctpi-watch.service", "ctpi-ui.service", "ctpi-dicom.service"}
    for unit in units:
        text = unit.read_text()
        assert not any(placeholder in text for placeholder in UNIT_PLACEHOLDERS), unit.name
        command = exec_start(unit)
        shipped = command[command.index("--model") + 1].replace("/opt/ctpi/current", str(release))
        assert Path(shipped) == release / "models" / model.name and load_bundle(shipped).digest == identity
        assert command[command.index("--bundle-sha256") + 1] == identity

    # The watch unit's ExecStart, as release.sh installs it (prefix and data folder substituted),
    # started for real; bin/ctpi (written on the Pi) runs `python -m device.cli` of the release.
    data = tmp_path / "data"
    (data / "inbox" / "health").mkdir(parents=True)
    (data / "inbox" / "health" / "slice.png").write_bytes((release / HEALTH_SLICE).read_bytes())
    command = [part.replace("/opt/ctpi/current", str(release)).replace("/var/lib/ctpi", str(data))
               for part in exec_start(release / "systemd" / "ctpi-watch.service")]
    assert command[0] == f"{release}/bin/ctpi"
    done = subprocess.run([sys.executable, "-m", "device.cli", *command[1:], "--once", "--settle-seconds", "0"],
                          cwd=release, env={"PYTHONPATH": str(release), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    (ready,) = [event for event in events if event.get("event") == "ready"]
    assert ready["bundle"] == str(release / "models" / model.name) and ready["bundle_sha256"] == identity
    with sqlite3.connect(data / "state" / "journal.sqlite") as db:
        (path,) = db.execute("SELECT path FROM slices").fetchone()
    assert path == "health/slice.png"  # triaged (or refused by the guard) and recorded once

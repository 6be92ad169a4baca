"""Units follow the release: `make deploy MODEL=models/<any>` ships units that run that bundle.

Each shipped bundle is staged as a release with the real ``deploy/stage.py``; every unit of the
release must name the bundle it ships (and its identity), and the watch unit's own ExecStart,
with the paths release.sh substitutes, must really start and triage the release's health slice
with exactly that bundle."""

from __future__ import annotations

import json
import re
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.stage import HEALTH_SLICE, UNIT_PLACEHOLDERS, health_slice, stage
from device.core.bundle import find_bundles, load_bundle

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
    # the units' Documentation= is the release's README, and every page it links to ships with it
    links = re.findall(r"\]\((docs/[^)#]+)", (release / "README.md").read_text())
    assert links and all((release / link).is_file() for link in links), [link for link in links if not (release / link).is_file()]
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
        rows = db.execute("SELECT path, status, reason FROM slices").fetchall()
    assert rows == [("health/slice.png", "ok", None)]  # scored (the guard took it for chest CT), recorded once


# The shipped bundles' guards accept real val slices at a median normalised distance of about
# 0.27 (covid-ct) and 0.17 (sarscov2-ct); 1.0 is the edge. The health slice must sit well inside,
# so a refitted guard (same code, same data) still takes it.
HEALTH_MARGIN = 0.5


@pytest.mark.parametrize("model", SHIPPED, ids=[m.name for m in SHIPPED])
def test_every_shipped_guard_accepts_the_health_slice_well_inside(model):
    from device.core.guard import load_guard
    from device.core.preprocess import decode_slice

    guard = load_guard(load_bundle(model))
    assert guard is not None, f"{model.name} carries no input guard"
    verdict = guard.check(decode_slice(health_slice()))
    assert verdict.accepted, f"{model.name} refuses the deploy's health slice: {verdict.check} {verdict.message}"
    assert verdict.distance <= HEALTH_MARGIN, f"{model.name}: health slice at {verdict.distance:.2f} of the guard's limit"


@pytest.mark.parametrize("model", SHIPPED, ids=[m.name for m in SHIPPED])
def test_every_shipped_guard_accepts_the_phantom_as_dicom_and_png_alike(model, tmp_path):
    pytest.importorskip("pydicom")
    from device.core.guard import load_guard
    from device.core.preprocess import decode_slice
    from tests.dicomtools import write_series

    guard = load_guard(load_bundle(model))
    files = write_series(tmp_path / "ct", 4, size=512, seed=7) + write_series(tmp_path / "covid", 4, label="COVID", size=256)
    verdicts = [guard.check(decode_slice(path)) for path in files]
    assert all(v.accepted and v.distance <= HEALTH_MARGIN for v in verdicts), [(v.check, v.distance) for v in verdicts]

"""The emulated Raspberry Pi OS (Bookworm arm64) target: ``make pi-emu`` (tests/pi_emu.py) end to end.

Run with ``CTPI_PI_EMU=1`` (marker ``pi_emu``; ``.ci/run`` sets it, with ``CTPI_PI_EMU_LOST_WHEEL=0``,
which deselects the lost-wheel test, marker ``pi_emu_lost_wheel``): it takes minutes under QEMU, so
``make test`` without it deselects it (``pytest_collection_modifyitems`` in tests/conftest.py)
instead of skipping it, which ``--no-skips`` would turn into a failure.
It runs the real ``python -m tests.pi_emu`` as ``make pi-emu`` does, then checks what happened
inside the arm64 root it leaves in ``CACHE/run/``: the files there, not only the script's own
word. It skips (marked ``system``) only where binfmt_misc cannot be mounted; anything else that
stops the emulated Pi (no root, no apt, an old QEMU) fails.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pi_emu import CANNOT_EMULATE, DESKTOP, LOST_WHEEL, MODEL, ROOT, RUN

pytestmark = [pytest.mark.pi_emu, pytest.mark.system, pytest.mark.slow, pytest.mark.timeout(3600)]
REPO = Path(__file__).resolve().parent.parent
AARCH64 = 183  # e_machine of an ELF file for ARM 64-bit (the ELF specification's EM_AARCH64)


def elf_machine(path: Path) -> int:
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF", path
    return int.from_bytes(header[18:20], "little")


@pytest.fixture(scope="module")
def emulated():
    assert os.geteuid() == 0, "the emulated Pi needs root (apt, binfmt_misc, chroot, network namespace)"
    done = subprocess.run([sys.executable, "-m", "tests.pi_emu"], cwd=REPO, capture_output=True, text=True, timeout=3500)
    print(done.stdout[-20000:], done.stderr[-5000:])
    if done.returncode == CANNOT_EMULATE:
        pytest.skip(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    summary = json.loads((RUN / "summary.json").read_text())
    return {"done": done, "summary": summary}


def test_the_release_is_installed_for_aarch64_inside_the_root(emulated):
    summary = emulated["summary"]
    assert summary["platform"][0] == "aarch64" and summary["platform"][1].startswith("3.11.")
    current = ROOT / "opt/ctpi" / summary["current"]
    assert summary["deploy"] == f"deployed {current.name}" and (current / ".complete").exists()
    assert (current / "models" / MODEL.name / "manifest.json").is_file()
    venv = (current / "venv").resolve()
    assert venv.parent == (ROOT / "opt/ctpi/venvs").resolve()
    assert "home = /usr/bin" in (venv / "pyvenv.cfg").read_text()  # made from the root's own python3.11
    assert elf_machine(ROOT / "usr/bin/python3.11") == AARCH64
    site = next((venv / "lib").glob("python3.11/site-packages"))
    for extension in ("numpy/_core/_multiarray_umath.cpython-311-aarch64-linux-gnu.so",):
        assert elf_machine(site / extension) == AARCH64
    assert list(site.glob("ai_edge_litert/**/*.so")) and all(elf_machine(p) == AARCH64 for p in site.glob("ai_edge_litert/**/*.so"))
    # exactly the aarch64 Pi lock's pins
    pins = {}
    for line in (REPO / "requirements" / "pi-cp311-aarch64.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.strip().split("==")
            pins[name.replace("-", "_").lower()] = version
    installed = dict(wheel.split("==") for wheel in summary["wheels"])
    for name, version in installed.items():
        assert pins.get(name.replace("-", "_").lower()) == version, (name, version)
    assert {"numpy", "pillow", "pydicom", "ai_edge_litert", "streamlit"} <= {name.lower() for name in installed}
    wheelhouse = list((DESKTOP / "wheels").glob("cp311-aarch64-*/*.whl"))
    assert len(installed) == len(wheelhouse) and all("aarch64" in w.name or w.name.endswith("-none-any.whl") for w in wheelhouse)


def test_the_health_check_ran_inside_the_root(emulated):
    out = emulated["done"].stdout
    assert "health: ctpi predict with models/mobilenetv2 on health/slice.png" in out
    assert "health: ctpi bench --runs 3" in out and any("3 runs" in line for line in emulated["summary"]["bench"])
    for unit in ("ctpi-watch.service", "ctpi-dicom.service", "ctpi-ui.service"):
        assert f"health: unit {unit} active" in out
    assert emulated["summary"]["page"] == "ok"


def test_watch_once_triaged_slices_and_a_dicom_inside_the_root(emulated):
    journal = ROOT / "tmp/pi-emu-watch/state/journal.sqlite"
    with sqlite3.connect(f"file:{journal}?mode=ro", uri=True) as db:
        rows = dict(db.execute("SELECT path, status FROM slices").fetchall())
    assert rows == {"study-png/slice-11.png": "ok", "study-png/slice-12.png": "ok", "study-png/slice-13.png": "ok",
                    "study-dicom/0000.dcm": "ok"}


@pytest.mark.pi_emu_lost_wheel
def test_a_release_whose_wheel_is_missing_stops_at_pip_and_changes_nothing(emulated):
    summary, out = emulated["summary"], emulated["done"].stdout
    assert summary["lost_wheel"].startswith("failed (line ") and "pip" in summary["lost_wheel"]
    assert f"ERROR: Cannot install {LOST_WHEEL}" in out and "ResolutionImpossible" in out  # the Pi's pip --no-index said it
    lost = ROOT / "opt/ctpi/releases" / summary["lost_wheel_release"]
    assert lost.is_dir() and not (lost / ".complete").exists()  # unpacked, never installed
    assert sorted(summary["lost_wheel_units"]) == ["ctpi-dicom.service", "ctpi-ui.service", "ctpi-watch.service"]
    # the virtualenv the good release runs has the lock's numpy, not the lost one
    site = next((ROOT / "opt/ctpi" / summary["current"] / "venv/lib").glob("python3.11/site-packages"))
    assert [p.name for p in site.glob(f"{LOST_WHEEL}-*.dist-info")] == [f"{LOST_WHEEL}-{dict(w.split('==') for w in summary['wheels'])[LOST_WHEEL]}.dist-info"]


def test_a_broken_release_rolls_back_inside_the_root(emulated):
    summary, out = emulated["summary"], emulated["done"].stdout
    broken = summary["rollback"].split()[1]
    assert summary["rollback"] == f"rolled-back {broken} -> {Path(summary['current']).name}"
    assert "this release cannot classify" in out  # the health check's own evidence
    assert os.readlink(ROOT / "opt/ctpi/current") == summary["current"]
    assert (ROOT / "opt/ctpi/releases" / broken / ".complete").exists()  # it was installed, then left

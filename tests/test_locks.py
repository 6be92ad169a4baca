"""Version locks (requirements/, deploy/locks.py): the committed locks are the locks of today's
pyproject.toml, the desktop install and a deploy find theirs by Python and machine, and a deploy
refuses, before anything on a Pi changes, a Pi without a lock, a stale lock or extras the lock
does not pin. No network: resolving (``make lock``) and downloading wheels are exercised by the
loopback deploy in tests/test_deploy.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy import locks
from deploy.stage import StageError, Target, build_wheelhouse, pi_lock, stage
from device.core.bundle import find_bundles

REPO = Path(__file__).resolve().parents[1]
MODEL = find_bundles(REPO / "models")[0]
PI_OS = Target.parse("3 11 aarch64 glibc 2.36")  # Raspberry Pi OS Bookworm, 64-bit


def source_tree(target: Path) -> Path:
    for name in ("device", "pyproject.toml", "systemd", "requirements"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, target / name)
    return target


@pytest.mark.parametrize("spec", locks.SPECS, ids=[spec.name for spec in locks.SPECS])
def test_every_committed_lock_is_the_lock_of_todays_pyproject(spec):
    lock = REPO / locks.FOLDER / spec.name
    assert lock.is_file(), f"{spec.name} missing: run `make lock`"
    info = locks.header(lock)
    assert info["pyproject"] == locks.fingerprint(REPO / "pyproject.toml"), "pyproject.toml's dependencies changed: run `make lock`"
    assert info["extras"] == list(spec.extras) and info["machine"] == spec.machine
    pinned = locks.pins(lock)
    assert len(pinned) > 5 and "numpy" in pinned and "ai-edge-litert" in pinned
    requirement_lines = [line for line in lock.read_text().splitlines() if line[:1].isalnum()]
    assert len(requirement_lines) == len(pinned)  # resolved for one platform: every line a plain pin,
    assert not [line for line in requirement_lines if ";" in line or " @ " in line]  # no markers, no URLs
    if spec.role == "pi":
        assert "streamlit" in pinned and "tensorflow" not in pinned and "tensorflow-cpu" not in pinned


def test_desktop_and_pi_locks_agree_where_both_pin_a_package():
    """One set of versions is tested on the desktop and shipped to the Pis."""
    desktop = locks.pins(REPO / locks.FOLDER / "desktop-cp311-x86_64.txt")
    for spec in locks.SPECS:
        if spec.role == "pi":
            pinned = locks.pins(REPO / locks.FOLDER / spec.name)
            assert {name: version for name, version in pinned.items() if desktop.get(name) != version} == {}, spec.name


def test_the_desktop_install_takes_this_interpreters_lock():
    done = subprocess.run([sys.executable, "-m", "deploy.locks", "desktop"], cwd=REPO, capture_output=True, text=True)
    python, machine = locks.this_interpreter()
    expected = f"{locks.FOLDER}/{locks.lock_name('desktop', python, machine)}"
    if (REPO / expected).is_file():
        assert done.returncode == 0 and done.stdout.strip() == expected, done.stderr
    else:
        assert done.returncode == 2 and "make lock" in done.stderr
    makefile = (REPO / "Makefile").read_text()
    assert "-m deploy.locks desktop" in makefile and "pip install -q -c $$lock -e" in makefile


def test_a_release_ships_the_pi_locks_and_each_pi_takes_its_own(tmp_path):
    release = stage(source_tree(tmp_path / "src"), MODEL, tmp_path / "releases", ["ui"]).path
    shipped = sorted(p.name for p in (release / locks.FOLDER).iterdir())
    assert shipped == sorted(spec.name for spec in locks.SPECS if spec.role == "pi")
    assert pi_lock(release, PI_OS).name == "pi-cp311-aarch64.txt"
    assert (release / locks.FOLDER / "pi-cp311-aarch64.txt").read_bytes() == (REPO / locks.FOLDER / "pi-cp311-aarch64.txt").read_bytes()
    # the Pi side picks by its own interpreter and installs under it as constraints
    script = (release / "release.sh").read_text()
    assert '-r "$release/requirements.txt" -c "$lock"' in script and "make lock" in script


def test_a_pi_without_a_lock_is_refused_before_anything_is_built(tmp_path):
    release = stage(source_tree(tmp_path / "src"), MODEL, tmp_path / "releases", []).path
    armv7 = Target.parse("3 11 armv7l glibc 2.36")  # 32-bit Raspberry Pi OS
    with pytest.raises(StageError, match=r"cp311-armv7l.*make lock"):
        pi_lock(release, armv7)
    with pytest.raises(StageError, match="make lock"):
        build_wheelhouse(release / "requirements.txt", Target.parse("3 12 aarch64 glibc 2.39"), tmp_path / "wheels")
    assert not (tmp_path / "wheels").exists()


def test_a_lock_older_than_pyproject_is_refused(tmp_path):
    source = source_tree(tmp_path / "src")
    pyproject = source / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"pillow>=10.0",', '"pillow>=10.0",\n    "requests>=2",'))
    with pytest.raises(StageError, match=r"other pyproject.toml dependencies.*make lock"):
        stage(source, MODEL, tmp_path / "releases", [])


def test_extras_the_pi_lock_does_not_pin_are_refused(tmp_path):
    with pytest.raises(StageError, match=r"not \['onnx'\].*make lock"):
        stage(source_tree(tmp_path / "src"), MODEL, tmp_path / "releases", ["ui", "onnx"])


def test_a_file_not_written_by_make_lock_is_no_lock(tmp_path):
    source = source_tree(tmp_path / "src")
    (source / locks.FOLDER / "pi-cp311-aarch64.txt").write_text("numpy==2.4.6\n")
    with pytest.raises(StageError, match="make lock"):
        stage(source, MODEL, tmp_path / "releases", [])

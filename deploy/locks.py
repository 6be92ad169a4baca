"""The dependency locks in ``requirements/``: one per interpreter and platform, for the desktop
(every extra) and for the Pis a deploy targets (the device and the page), written by
``make lock`` with ``uv pip compile``.

Why locks: without them a fresh ``make test`` and every wheelhouse a deploy builds take whatever
was released that morning; an appliance fleet needs the versions its tests passed with. The
desktop venv installs with its lock as pip constraints; a deploy downloads the Pi's wheels and
installs them on the Pi under the Pi lock of the Pi's own Python and machine, so a Pi gets
exactly the pinned versions, or the deploy stops before anything on the Pi has changed.

Each lock starts with a header naming its extras and a fingerprint of ``pyproject.toml``'s
dependency lists, so a lock older than the dependencies it claims to pin is refused (run
``make lock``) instead of silently leaving new dependencies unpinned. ``make lock`` keeps the
existing pins wherever ``pyproject.toml`` still allows them (uv prefers the versions already in
its output file); ``make lock UPGRADE=1`` moves every pin to the newest release.

Stdlib only: the Makefile runs this before the venv has anything installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FOLDER = "requirements"  # under a source tree, and under a staged release (the Pi locks)
HEADER = "# ctpi-lock:"  # the machine-read header line: json after the colon


@dataclass(frozen=True)
class Spec:
    """One lock: ``<role>-cp<XY>-<machine>.txt``, resolved by uv for ``uv_platform``."""

    role: str  # desktop or pi
    python: tuple[int, int]
    machine: str
    extras: tuple[str, ...]
    uv_platform: str  # uv's --python-platform; the manylinux floor is the oldest glibc served

    @property
    def name(self) -> str:
        return lock_name(self.role, self.python, self.machine)


# The locks `make lock` writes. A desktop or Pi of another Python or machine needs a line here.
SPECS = (
    # this desktop (Debian 12's glibc 2.36, but manylinux_2_28 so any current distribution fits)
    Spec("desktop", (3, 11), "x86_64", ("dev",), "x86_64-manylinux_2_28"),
    # Raspberry Pi OS Bookworm, 64-bit: Python 3.11, glibc 2.36
    Spec("pi", (3, 11), "aarch64", ("ui",), "aarch64-manylinux_2_36"),
    # an x86-64 Debian 12 box as the "Pi" (the loopback deploy tests; a bench PC)
    Spec("pi", (3, 11), "x86_64", ("ui",), "x86_64-manylinux_2_36"),
)


class LockError(Exception):
    """No usable lock: missing, stale against pyproject.toml, or not covering the extras."""


def lock_name(role: str, python: tuple[int, int], machine: str) -> str:
    return f"{role}-cp{python[0]}{python[1]}-{machine}.txt"


def _toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the tomli backport, a dependency there
        import tomli as tomllib
    return tomllib.loads(path.read_text(encoding="utf-8"))


def fingerprint(pyproject: Path) -> str:
    """16 hex over what a lock is resolved from: requires-python and the dependency lists (not
    the rest of pyproject.toml, so a ruff or pytest setting does not stale the locks)."""
    project = _toml(pyproject)["project"]
    keys = ("requires-python", "dependencies", "optional-dependencies")
    text = json.dumps({key: project.get(key) for key in keys}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def header(lock: Path) -> dict:
    for line in lock.read_text(encoding="utf-8").splitlines():
        if line.startswith(HEADER):
            return json.loads(line[len(HEADER) :])
    raise LockError(f"{lock} has no '{HEADER}' header: not written by `make lock`; run `make lock`")


def pins(lock: Path) -> dict[str, str]:
    """``{normalised name: version}`` of every ``name==version`` line."""
    found = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        if match:
            found[normalise(match[1])] = match[2]
    return found


def normalise(name: str) -> str:
    """PEP 503: ``Foo_Bar`` and ``foo-bar`` are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def find(folder: Path, role: str, python: tuple[int, int], machine: str, pyproject: Path, extras=()) -> Path:
    """The lock of ``role`` for this interpreter and machine under ``folder``, checked against
    ``pyproject`` and ``extras``; :class:`LockError` says what to do when there is none."""
    lock = folder / lock_name(role, python, machine)
    if not lock.is_file():
        have = sorted(p.name for p in folder.glob(f"{role}-*.txt")) if folder.is_dir() else []
        raise LockError(
            f"no {role} lock for cp{python[0]}{python[1]} {machine} ({lock.name}; {folder} has {have or 'none'}): "
            f"add a Spec for it in deploy/locks.py and run `make lock`"
        )
    info = header(lock)
    if info.get("pyproject") != fingerprint(pyproject):
        raise LockError(f"{lock.name} was compiled from other pyproject.toml dependencies than {pyproject}'s: run `make lock`")
    missing = sorted(set(extras) - set(info.get("extras", [])))
    if missing:
        raise LockError(f"{lock.name} pins the extras {info.get('extras')}, not {missing}: add them to its Spec in deploy/locks.py and run `make lock`")
    return lock


def compile_lock(spec: Spec, source: Path, upgrade: bool = False) -> Path:
    """Write ``source/requirements/<spec.name>`` with uv, keeping its existing pins unless ``upgrade``."""
    uv = Path(sys.executable).with_name("uv")
    uv = str(uv) if uv.exists() else shutil.which("uv")
    if not uv:
        raise LockError("uv is not installed: `pip install uv` (it is in the dev extra)")
    lock = source / FOLDER / spec.name
    lock.parent.mkdir(exist_ok=True)
    work = lock.with_name(f".{spec.name}.uv")
    if lock.is_file() and not upgrade:
        shutil.copy2(lock, work)  # uv prefers the pins already in its output file
    else:
        work.unlink(missing_ok=True)
    command = [uv, "pip", "compile", "pyproject.toml", "--quiet", "--output-file", str(work)]
    command += ["--python-version", f"{spec.python[0]}.{spec.python[1]}", "--python-platform", spec.uv_platform]
    command += [f"--extra={extra}" for extra in spec.extras]
    command += ["--custom-compile-command", "make lock", *(["--upgrade"] if upgrade else [])]
    done = subprocess.run(command, cwd=source, capture_output=True, text=True)
    if done.returncode != 0:
        work.unlink(missing_ok=True)
        raise LockError(f"uv could not resolve {spec.name}:\n{done.stderr.strip()[-3000:]}")
    info = {"role": spec.role, "python": f"{spec.python[0]}.{spec.python[1]}", "machine": spec.machine}
    info |= {"uv_platform": spec.uv_platform, "extras": list(spec.extras), "pyproject": fingerprint(source / "pyproject.toml")}
    body = [line for line in work.read_text(encoding="utf-8").splitlines(keepends=True) if not line.startswith("# ctpi")]
    intro = [
        f"{HEADER} {json.dumps(info)}\n",
        f"# ctpi {spec.role} lock: Python {info['python']} on {spec.machine} (uv platform {spec.uv_platform}), extras {', '.join(spec.extras)}.\n",
        "# ctpi Refresh with `make lock` (keeps these pins where pyproject.toml allows); `make lock UPGRADE=1` takes the newest.\n",
    ]
    lock.write_text("".join(intro + body), encoding="utf-8")
    work.unlink()
    return lock


def this_interpreter() -> tuple[tuple[int, int], str]:
    return (sys.version_info[0], sys.version_info[1]), platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.locks", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("compile", help="write every lock in SPECS (make lock)")
    write.add_argument("--upgrade", action="store_true", help="newest versions instead of keeping the pins")
    write.add_argument("names", nargs="*", help="only these locks, e.g. pi-cp311-aarch64.txt")
    sub.add_parser("desktop", help="print this interpreter's desktop lock (checked against pyproject.toml)")
    args = parser.parse_args(argv)
    try:
        if args.command == "desktop":
            python, machine = this_interpreter()
            print(find(REPO / FOLDER, "desktop", python, machine, REPO / "pyproject.toml").relative_to(REPO))
        else:
            for spec in SPECS:
                if not args.names or spec.name in args.names:
                    lock = compile_lock(spec, REPO, args.upgrade)
                    print(f"lock: {lock.relative_to(REPO)} ({len(pins(lock))} pins)")
    except LockError as error:
        print(f"lock: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

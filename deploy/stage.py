"""What a release is: the files shipped to a Pi, the model bundle, a synthetic health-check slice
and the requirements, under a version derived from their content; and the wheelhouse the Pi
installs them from.

The version is ``<ctpi version>-<12 hex of sha256 over every shipped file>``, so the same tree
and model always give the same release (re-deploying it is recognised and changes nothing) and
any changed byte gives a new one. ``git describe`` is recorded in ``RELEASE.json`` for people,
but is not part of the identity: committing a README change must not force a new release.

The wheelhouse is built here, on the desktop, with ``pip download --only-binary=:all:`` for the
Pi's own interpreter and platform (asked over SSH first), and installed on the Pi with
``pip install --no-index``. Both go by the Pi lock of that interpreter and platform
(``requirements/pi-cp<XY>-<machine>.txt``, :mod:`deploy.locks`), which the release ships: the
wheelhouse holds exactly the pinned versions the release needs and the Pi installs under the same
lock as pip constraints, so every Pi runs the versions the tests passed with. Why: a hospital Pi often has no route to PyPI; every Pi of a fleet
gets the same versions; a rollback never needs the network; and a dependency that has no wheel
for the Pi fails here, before anything on the Pi has changed, instead of half-way through.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from deploy import locks
from device import __version__
from device.core.bundle import BundleError, load_bundle
from device.core.phantom import chest_png

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport, a dependency there
    import tomli as tomllib

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
RELEASE_SCRIPT = Path(__file__).resolve().parent / "release.sh"
SHIPPED = ("device", "pyproject.toml", "streamlit_app.py", "systemd", "README.md", "docs")  # docs: README links into it
SKIPPED_NAMES = {"__pycache__", ".pytest_cache"}
SKIPPED_SUFFIXES = (".pyc", ".pyo")
HEALTH_SLICE = "health/slice.png"
HEALTH_SEED = 7  # the phantom drawn for the health check (device.core.phantom)
KEEP_STAGED = 5  # staged releases kept on the desktop
# One line the Pi's python3 prints: major minor machine libc libc-version, e.g. "3 11 aarch64 glibc 2.36".
PROBE = "import sys, platform; print(sys.version_info[0], sys.version_info[1], platform.machine(), *platform.libc_ver())"


UNIT_PLACEHOLDERS = ("@BUNDLE@", "@BUNDLE_SHA256@")  # in systemd/*.service, filled in by render_unit


class StageError(Exception):
    """A release that cannot be built on the desktop; nothing on any Pi has changed yet."""


@dataclass(frozen=True)
class Target:
    """The Pi's interpreter and platform, as the wheelhouse needs them."""

    python: tuple[int, int]
    machine: str
    glibc: tuple[int, int]

    @classmethod
    def parse(cls, probe_output: str) -> Target:
        """Read :data:`PROBE`'s output."""
        fields = probe_output.split()
        try:
            major, minor, machine, libc, libc_version = fields[:5]
            glibc = tuple(int(part) for part in libc_version.split(".")[:2])
        except ValueError:
            raise StageError(f"cannot read the Pi's platform from {probe_output!r}; is python3 installed there?") from None
        if libc != "glibc":
            raise StageError(f"the Pi's C library is {libc!r}; the wheelhouse needs glibc (Raspberry Pi OS has it)")
        return cls((int(major), int(minor)), machine, glibc)

    @property
    def tag(self) -> str:
        return f"cp{self.python[0]}{self.python[1]}-{self.machine}-glibc{self.glibc[0]}.{self.glibc[1]}"

    def pip_platforms(self) -> list[str]:
        """Every manylinux tag this glibc runs, newest first (pip takes them as alternatives)."""
        platforms = [f"manylinux_2_{minor}_{self.machine}" for minor in range(self.glibc[1], 4, -1)]
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
        platforms += [f"{name}_{self.machine}" for minor, name in legacy.items() if self.glibc >= (2, minor)]
        return platforms


@dataclass(frozen=True)
class Release:
    version: str
    path: Path
    requirements_sha256: str


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """The device requirements: ``[project].dependencies`` plus the named extras, with the
    project's own ``ctpi[...]`` references expanded. Markers stay; pip evaluates them."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    result: list[str] = list(project["dependencies"])
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop(0)
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in optional:
            raise StageError(f"pyproject.toml has no extra {extra!r} (it has {sorted(optional)})")
        for requirement in optional[extra]:
            if requirement.startswith(f"{project['name']}["):
                pending += requirement[len(project["name"]) + 1 : requirement.index("]")].split(",")
            elif requirement not in result:
                result.append(requirement)
    return result


def health_slice() -> bytes:
    """The release's own known input for the health check: the synthetic axial chest CT phantom
    of :mod:`device.core.phantom` (fixed seed) as a lung-window PNG, which every shipped bundle's input
    guard accepts. Never a data-set image."""
    return chest_png(seed=HEALTH_SEED)


def _shipped_files(source: Path) -> list[Path]:
    files = []
    for name in SHIPPED:
        path = source / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [
                p
                for p in sorted(path.rglob("*"))
                if p.is_file() and not SKIPPED_NAMES.intersection(p.relative_to(source).parts) and not p.name.endswith(SKIPPED_SUFFIXES)
            ]
    if not any(f.relative_to(source).parts[0] == "device" for f in files):
        raise StageError(f"{source} has no device/ folder: not a ctpi source tree")
    return files


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _git_describe(source: Path) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(source), "describe", "--always", "--dirty", "--tags"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def render_unit(text: str, bundle_folder: str, bundle_sha256: str) -> str:
    """A unit of the source tree as the release ships it: ``@BUNDLE@`` becomes the shipped
    bundle's folder under ``models/`` and ``@BUNDLE_SHA256@`` its identity, which the service
    then insists on (``--bundle-sha256``). Why at staging: a release carries its own units, so
    a rollback restarts the previous release with the previous release's model."""
    return text.replace("@BUNDLE_SHA256@", bundle_sha256).replace("@BUNDLE@", bundle_folder)


def stage(source: Path, model: Path, out: Path, extras: list[str]) -> Release:
    """Build the release folder ``out/<version>`` (reused when it already exists)."""
    source, model = Path(source), Path(model)
    try:
        bundle = load_bundle(model)
    except BundleError as error:
        raise StageError(f"cannot ship model {model}: {error}") from None
    work = out / ".staging"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for path in _shipped_files(source):
        target = work / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    # models/<bundle folder name>/: the layout `ctpi ui --models` and find_bundles read.
    shipped_model = work / "models" / model.resolve().name
    for name in [*bundle.manifest["files"], "manifest.json", "MODEL_CARD.md"]:
        if (model / name).is_file():
            (shipped_model / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(model / name, shipped_model / name)
    for unit in sorted((work / "systemd").glob("*.service")):
        unit.write_text(render_unit(unit.read_text(encoding="utf-8"), shipped_model.name, bundle.digest), encoding="utf-8")
    shutil.copy2(RELEASE_SCRIPT, work / "release.sh")
    (work / HEALTH_SLICE).parent.mkdir()
    (work / HEALTH_SLICE).write_bytes(health_slice())
    requirement_lines = requirements(source / "pyproject.toml", extras)
    (work / "requirements.txt").write_text("\n".join(requirement_lines) + "\n", encoding="utf-8")
    # Every Pi lock: the playbook stages once for a fleet of any platforms; each Pi takes its own.
    (work / locks.FOLDER).mkdir()
    for lock in pi_locks(source, extras):
        shutil.copy2(lock, work / locks.FOLDER / lock.name)

    digest = hashlib.sha256()
    for path in sorted(p for p in work.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(work).as_posix()}\0{_sha256(path)}\n".encode())
    version = f"{__version__}-{digest.hexdigest()[:12]}"
    requirements_sha256 = _sha256(work / "requirements.txt")
    (work / "VERSION").write_text(version + "\n", encoding="utf-8")
    (work / "RELEASE.json").write_text(
        json.dumps(
            {
                "version": version,
                "git_describe": _git_describe(source),
                "model": {
                    "path": shipped_model.relative_to(work).as_posix(),
                    "name": bundle.name,
                    "version": bundle.manifest["version"],
                    "sha256": bundle.sha256(),
                    "bundle_sha256": bundle.digest,
                },
                "extras": extras,
                "requirements_sha256": requirements_sha256,
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    final = out / version
    if final.is_dir():
        shutil.rmtree(work)
        final.touch()  # newest again, for the pruning below
    else:
        work.rename(final)
    log.info("staged release %s in %s", version, final)
    _prune_staged(out, keep=KEEP_STAGED)
    return Release(version=version, path=final, requirements_sha256=requirements_sha256)


def _prune_staged(out: Path, keep: int) -> None:
    """Keep the ``keep`` most recently staged releases (and their archives) on the desktop."""
    staged = sorted((p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in staged[keep:]:
        shutil.rmtree(old, ignore_errors=True)
        (out / f"{old.name}.tar").unlink(missing_ok=True)


def pi_locks(source: Path, extras: list[str]) -> list[Path]:
    """The source tree's Pi locks, each checked against its ``pyproject.toml`` and ``extras``."""
    folder = source / locks.FOLDER
    found = sorted(folder.glob("pi-*.txt"))
    if not found:
        raise StageError(f"{source} has no Pi lock ({locks.FOLDER}/pi-cp<XY>-<machine>.txt): run `make lock`")
    try:
        return [locks.find(folder, "pi", *_lock_key(lock), source / "pyproject.toml", extras) for lock in found]
    except locks.LockError as error:
        raise StageError(str(error)) from None


def _lock_key(lock: Path) -> tuple[tuple[int, int], str]:
    info = locks.header(lock)
    major, minor = info["python"].split(".")
    return (int(major), int(minor)), info["machine"]


def pi_lock(release: Path, target: Target) -> Path:
    """The lock a staged ``release`` ships for ``target``; :class:`StageError` naming ``make lock``
    when the Pi's Python or machine has none (before anything on the Pi has changed)."""
    try:
        return locks.find(release / locks.FOLDER, "pi", target.python, target.machine, release / "pyproject.toml")
    except locks.LockError as error:
        raise StageError(f"the Pi runs {target.tag}: {error}") from None


def _pip_for(target: Target) -> list[str]:
    """pip's options that make it choose wheels for the Pi instead of this desktop."""
    options = ["--only-binary=:all:", "--python-version", f"{target.python[0]}.{target.python[1]}", "--implementation", "cp"]
    options += ["--abi", f"cp{target.python[0]}{target.python[1]}"]
    for platform in target.pip_platforms():
        options += ["--platform", platform]
    return options


def locked_set(requirements_file: Path, lock: Path, target: Target, work: Path) -> list[str]:
    """``name==version`` of every distribution the Pi installs: pip resolves the release's
    requirements for the Pi under the lock, and each choice must be a pin of the lock (pip takes
    the lock as constraints, so only a package the lock does not name could differ)."""
    report = work / ".resolved.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report)]
    command += [*_pip_for(target), "-r", str(requirements_file), "-c", str(lock)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise StageError(
            f"pip could not resolve the release's requirements for the Pi ({target.tag}) under {lock.name}; it needs "
            f"the desktop's network and a wheel for every pin:\n{done.stderr.strip()[-2000:]}"
        )
    chosen = [(item["metadata"]["name"], item["metadata"]["version"]) for item in json.loads(report.read_text())["install"]]
    report.unlink()
    pinned = locks.pins(lock)
    unlocked = [f"{name} {version}" for name, version in chosen if pinned.get(locks.normalise(name)) != version]
    if unlocked:
        raise StageError(f"{lock.name} does not pin {', '.join(unlocked)}, which the release needs: run `make lock`")
    return sorted(f"{name}=={version}" for name, version in chosen)


def wheelhouse_stamp(folder: Path, requirements_file: Path, lock: Path) -> Path:
    """The file whose presence says ``folder`` holds every wheel these requirements need under
    ``lock`` (so the desktop downloads nothing); tests/pi_emu.py writes one to stage a lost wheel."""
    key = hashlib.sha256(requirements_file.read_bytes() + b"\0" + lock.read_bytes()).hexdigest()
    return folder / f".complete-{key[:16]}"


def build_wheelhouse(requirements_file: Path, target: Target, dest: Path) -> Path:
    """``dest/<target tag>/`` holding the wheel of every requirement and dependency, at exactly
    the versions of the release's Pi lock for ``target``; skipped when it was already built for
    these exact requirements and lock."""
    if not requirements_file.is_file():
        raise StageError(f"{requirements_file} does not exist; stage the release first")
    lock = pi_lock(requirements_file.parent, target)
    folder = dest / target.tag
    stamp = wheelhouse_stamp(folder, requirements_file, lock)
    if stamp.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    wanted = locked_set(requirements_file, lock, target, folder)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(folder), *_pip_for(target), *wanted]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise StageError(
            f"pip could not download wheels for the Pi ({target.tag}); it needs the desktop's network and a wheel "
            f"for every dependency:\n{done.stderr.strip()[-2000:]}"
        )
    stamp.touch()
    log.info("wheelhouse %s: %d wheels pinned by %s", folder.name, len(wanted), lock.name)
    return folder


def archive(folder: Path, target: Path) -> Path:
    """``folder``'s contents as one tar file (for Ansible, which copies one big file far faster
    than a tree of small ones); reused when it exists, since its name says what it holds."""
    if not target.is_file():
        partial = target.with_name(target.name + ".part")
        with tarfile.open(partial, "w") as tar:
            for path in sorted(folder.iterdir()):
                tar.add(path, arcname=path.name)
        partial.rename(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.stage", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    release = sub.add_parser("release", help="stage a release folder; prints its version and path as JSON")
    release.add_argument("--source", type=Path, default=REPO, help="source tree (default: this repository)")
    release.add_argument("--model", type=Path, required=True, help="bundle folder, e.g. models/mobilenetv2")
    release.add_argument("--out", type=Path, default=REPO / "var" / "deploy" / "releases")
    release.add_argument("--extras", default="ui", help="comma-separated pyproject extras to install on the Pi (default: ui)")
    release.add_argument("--archive", action="store_true", help="also write <version>.tar beside the folder")
    wheels = sub.add_parser("wheels", help="build the wheelhouse for a Pi; prints its folder as JSON")
    wheels.add_argument("--requirements", type=Path, required=True, help="a staged release's requirements.txt")
    wheels.add_argument("--probe", required=True, help=f"the output of `python3 -c {PROBE!r}` on the Pi")
    wheels.add_argument("--out", type=Path, default=REPO / "var" / "deploy" / "wheels")
    wheels.add_argument("--archive", action="store_true", help="also write the wheelhouse as one .tar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "release":
            extras = [extra for extra in args.extras.split(",") if extra]
            staged = stage(args.source, args.model, args.out, extras)
            answer = {"version": staged.version, "path": str(staged.path.resolve())}
            if args.archive:
                answer["archive"] = str(archive(staged.path, args.out / f"{staged.version}.tar").resolve())
        else:
            folder = build_wheelhouse(args.requirements, Target.parse(args.probe), args.out)
            answer = {"path": str(folder.resolve())}
            if args.archive:
                stamp = next(folder.glob(".complete-*")).name[len(".complete-") :]
                answer["archive"] = str(archive(folder, args.out / f"{folder.name}-{stamp}.tar").resolve())
        print(json.dumps(answer))
    except StageError as error:
        print(f"deploy: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

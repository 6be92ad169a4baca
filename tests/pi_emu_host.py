"""The host side of ``make pi-emu`` (tests/pi_emu.py): Debian packages, QEMU through binfmt_misc,
and the cached Bookworm arm64 root. Split from pi_emu.py so each stays readable: this part
changes with Debian, that one with the deploy."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

MIRROR = os.environ.get("CTPI_PI_EMU_MIRROR", "http://deb.debian.org/debian")
# Raspberry Pi OS Lite has these; python3-venv is what docs/deploy.md asks the owner to install.
ROOT_PACKAGES = ("python3", "python3-venv", "libstdc++6", "openssl", "ca-certificates")
HOST_TOOLS = {"qemu-aarch64-static": "qemu-user-static", "update-binfmts": "binfmt-support",
              "mmdebstrap": "mmdebstrap", "arch-test": "arch-test", "/usr/sbin/sshd": "openssh-server"}
# Bookworm's qemu-user-static 7.2 segfaults in LiteRT 2.3's Interpreter() (10.0 from bookworm-backports runs it).
QEMU_MINIMUM = (8, 0)
BACKPORTS = Path("/etc/apt/sources.list.d/ctpi-pi-emu-backports.list")


class CannotEmulate(Exception):
    """This machine cannot run arm64 binaries (binfmt_misc cannot be mounted); the message says why."""


def say(message: str) -> None:
    print(f"pi-emu: {message}", flush=True)


def run(command: list[str] | str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, text=True, **kwargs)
    if check and done.returncode != 0:
        raise RuntimeError(f"{command if isinstance(command, str) else shlex.join(command)} exited {done.returncode}")
    return done


def qemu_version() -> tuple[int, ...]:
    done = run(["qemu-aarch64-static", "--version"], check=False, capture_output=True) if shutil.which("qemu-aarch64-static") else None
    words = done.stdout.split() if done and done.returncode == 0 else []
    return tuple(int(part) for part in words[2].split(".")[:2]) if len(words) > 2 and words[1] == "version" else ()


def apt_install(packages: list[str], release: str | None = None) -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError(f"needs root and apt to install {' '.join(packages)}")
    say(f"installing {' '.join(packages)} with apt" + (f" from {release}" if release else ""))
    run(["apt-get", "update", "-qq"])
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *(["-t", release] if release else []), *packages],
        stdout=subprocess.DEVNULL, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def ensure_host() -> None:
    missing = sorted({package for tool, package in HOST_TOOLS.items() if shutil.which(tool) is None and not os.access(tool, os.X_OK)})
    if missing:
        apt_install(missing)
    if qemu_version() < QEMU_MINIMUM:
        os_release = Path("/etc/os-release").read_text() if Path("/etc/os-release").exists() else ""
        if "VERSION_CODENAME=bookworm" not in os_release:
            raise RuntimeError(f"QEMU {qemu_version()} is older than {QEMU_MINIMUM} (LiteRT crashes under it); install a newer qemu-user-static")
        BACKPORTS.write_text("# make pi-emu (tests/pi_emu.py): qemu-user-static >= 8, bookworm's 7.2 crashes in LiteRT\n"
                             "deb http://deb.debian.org/debian bookworm-backports main\n")
        apt_install(["qemu-user-static"], release="bookworm-backports")
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "status").exists():
        mounted = run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)], check=False, capture_output=True)
        if mounted.returncode != 0:
            raise CannotEmulate(f"binfmt_misc cannot be mounted here: {mounted.stderr.strip()}")
    # Registered afresh: with the F flag the kernel keeps the emulator file it opened when the entry
    # was made, so after an upgrade an old entry would go on running the old QEMU.
    run(["update-binfmts", "--disable", "qemu-aarch64"], check=False, capture_output=True)
    run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True)
    if "enabled" not in (binfmt / "qemu-aarch64").read_text():
        raise RuntimeError("update-binfmts could not enable qemu-aarch64")
    say(f"QEMU {'.'.join(map(str, qemu_version()))} runs aarch64 binaries through binfmt_misc")


def base_root(cache: Path) -> Path:
    """The cached arm64 root under ``cache``, built by mmdebstrap when this package set has none yet."""
    key = hashlib.sha256(f"bookworm arm64 minbase {' '.join(ROOT_PACKAGES)}".encode()).hexdigest()[:12]
    base = cache / f"bookworm-arm64-{key}"
    if (base / ".complete").exists():
        say(f"reusing the cached arm64 root {base}")
        return base
    partial = base.with_name(base.name + ".partial")
    remove_tree(partial)
    say(f"building a Bookworm arm64 root with mmdebstrap (minbase + {', '.join(ROOT_PACKAGES)})")
    command = ["mmdebstrap", "--quiet", "--arch=arm64", "--variant=minbase", f"--include={','.join(ROOT_PACKAGES)}",
               '--aptopt=Acquire::Check-Valid-Until "false"']
    command += [f"--dpkgopt=path-exclude=/usr/share/{folder}/*" for folder in ("man", "doc", "locale", "info")]
    run([*command, "bookworm", str(partial), MIRROR])
    (partial / ".complete").write_text(json.dumps({"mirror": MIRROR, "packages": ROOT_PACKAGES}) + "\n")
    partial.rename(base)
    return base


def remove_tree(folder: Path) -> None:
    """rm -rf that refuses a folder with anything mounted under it (a bound /dev must never be emptied)."""
    if not folder.exists():
        return
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    inside = [mount for mount in mounts if mount == str(folder) or mount.startswith(f"{folder}/")]
    if inside:
        raise RuntimeError(f"not removing {folder}: mounted under it: {inside}")
    run(["rm", "-rf", "--one-file-system", str(folder)])

"""``make pi-emu``: the real deploy path against an emulated Raspberry Pi OS (Bookworm, arm64).

Why: every Pi-side step (the aarch64 wheelhouse, ``pip install --no-index`` from it, LiteRT's
aarch64 build, the health check) otherwise only ever runs on x86-64, and a wheel that does not
exist for cp311 aarch64 or a build that misbehaves on ARM would first show up on a hospital's Pi.

What it does, each phase timed:

1. host: Debian's ``qemu-user-static`` (8 or newer: from bookworm-backports on Bookworm, whose
   7.2 crashes in LiteRT), ``binfmt-support``, ``mmdebstrap`` (with ``arch-test``), ``openssh-server``
   installed with apt where missing; ``binfmt_misc`` mounted and ``qemu-aarch64`` enabled (a
   machine that cannot mount it exits with :data:`CANNOT_EMULATE` and says why).
2. root: a Debian Bookworm arm64 root (what Raspberry Pi OS 64-bit is built on) with Python 3.11,
   built once by mmdebstrap and cached under ``.cache/pi-emu/``; each run copies it to a fresh "Pi".
3. pi: the "Pi" is reached as a real one is: an sshd on a loopback port whose every session runs
   in the arm64 root (``session.sh``: its own mount namespace with proc, sys and dev mounted, the
   Pi's own network namespace so its units' ports never meet this machine's, and ``env -i``).
4. deploy: ``make deploy PI=127.0.0.1 PI_PORT=...`` of the shipped default bundle: the desktop
   asks the Pi its platform, builds the wheelhouse for it from ``requirements/pi-cp311-aarch64.txt``
   and ``release.sh`` installs, switches and health-checks inside the root, with
   ``tests/servicectl.py`` (run by the root's arm64 python) as its systemctl.
5. check: inside the root, ``ctpi watch --once`` over synthetic slices and a DICOM, ``ctpi results``,
   and the page's health endpoint.
6. rollback: a release whose ``ctpi predict`` fails is deployed and must roll back to the first.

Emulated timings are a function check only, never Pi latency. The run's root stays in
``.cache/pi-emu/run/`` for inspection (``summary.json``) until the next run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "pi-emu"
RUN = CACHE / "run"
ROOT = RUN / "root"
DESKTOP = CACHE / "desktop"  # DEPLOY_WORK: staged releases and the aarch64 wheelhouse, kept between runs
NETNS = "ctpi-pi-emu"
MIRROR = os.environ.get("CTPI_PI_EMU_MIRROR", "http://deb.debian.org/debian")
# Raspberry Pi OS Lite has these; python3-venv is what docs/deploy.md asks the owner to install.
ROOT_PACKAGES = ("python3", "python3-venv", "libstdc++6", "openssl", "ca-certificates")
HOST_TOOLS = {"qemu-aarch64-static": "qemu-user-static", "update-binfmts": "binfmt-support",
              "mmdebstrap": "mmdebstrap", "arch-test": "arch-test", "/usr/sbin/sshd": "openssh-server"}
MODEL = REPO / "models" / "mobilenetv2"  # the shipped default bundle
SERVICECTL_IN_ROOT = "/usr/local/lib/ctpi-pi-emu/servicectl.py"
SETTINGS = {  # release.sh's settings (forwarded by deploy.ship); the rest keep their Pi defaults
    "CTPI_SERVICE_MANAGER": f"python3 {SERVICECTL_IN_ROOT} --units /etc/systemd/system --state /var/lib/ctpi-pi-emu/units",
    "CTPI_HEALTH_TIMEOUT": "300",
    "CTPI_BENCH_RUNS": "3",
}
# Bookworm's qemu-user-static 7.2 segfaults in LiteRT 2.3's Interpreter() (10.0 from bookworm-backports runs it).
QEMU_MINIMUM = (8, 0)
BACKPORTS = Path("/etc/apt/sources.list.d/ctpi-pi-emu-backports.list")
PAGE_HEALTH = "http://127.0.0.1:8501/_stcore/health"
CANNOT_EMULATE = 77  # the test skips on this exit status (and only on it)


class CannotEmulate(Exception):
    """This machine cannot run arm64 binaries (no binfmt_misc); the message says why."""


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
        raise CannotEmulate(f"needs root and apt to install {' '.join(packages)}")
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
            raise CannotEmulate(f"QEMU {qemu_version()} is older than {QEMU_MINIMUM} (LiteRT crashes under it); install a newer qemu-user-static")
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
        raise CannotEmulate("update-binfmts could not enable qemu-aarch64")
    say(f"QEMU {'.'.join(map(str, qemu_version()))} runs aarch64 binaries through binfmt_misc")


def base_root() -> Path:
    """The cached arm64 root, built by mmdebstrap when this package set has none yet."""
    key = hashlib.sha256(f"bookworm arm64 minbase {' '.join(ROOT_PACKAGES)}".encode()).hexdigest()[:12]
    base = CACHE / f"bookworm-arm64-{key}"
    if (base / ".complete").exists():
        say(f"reusing the cached arm64 root {base.relative_to(REPO)}")
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


class EmulatedPi:
    """The arm64 root behind a loopback sshd; ``ssh()`` runs a command inside it as root."""

    def __init__(self, base: Path):
        self.base, self.port, self.sshd = base, None, None

    def start(self) -> None:
        stop_leftovers()
        remove_tree(RUN)
        RUN.mkdir(parents=True)
        run(["cp", "-a", "--reflink=auto", str(self.base), str(ROOT)])
        (ROOT / ".complete").unlink()
        servicectl = ROOT / SERVICECTL_IN_ROOT.lstrip("/")
        servicectl.parent.mkdir(parents=True)
        shutil.copy2(REPO / "tests" / "servicectl.py", servicectl)
        (ROOT / "etc/systemd/system").mkdir(parents=True, exist_ok=True)
        (ROOT / "etc/hostname").write_text("ctpi-pi-emu\n")
        run(["ip", "netns", "add", NETNS])
        run(["ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up"])
        session = RUN / "session.sh"
        inner = (f"mount -t proc proc {ROOT}/proc && mount --rbind /sys {ROOT}/sys && mount --rbind /dev {ROOT}/dev && "
                 f"exec chroot {ROOT} /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "
                 'HOME=/root USER=root LOGNAME=root LANG=C.UTF-8 /bin/sh -c "$SSH_ORIGINAL_COMMAND"')
        session.write_text(
            "#!/bin/sh\n# One ssh session of the emulated Pi: the Pi's network namespace, a private mount namespace\n"
            "# with proc, sys (XNNPACK reads the CPU list there) and dev, the arm64 root, a cleared environment.\n"
            f"exec ip netns exec {NETNS} unshare --mount --propagation private sh -c {shlex.quote(inner)}\n"
        )
        session.chmod(0o755)
        for key in ("host_key", "user_key"):
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(RUN / key)])
        (RUN / "authorized_keys").write_text((RUN / "user_key.pub").read_text())
        self.port = free_port()
        (RUN / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {RUN}/host_key\nPidFile {RUN}/sshd.pid\n"
            f"AuthorizedKeysFile {RUN}/authorized_keys\nUsePAM no\nStrictModes no\nPasswordAuthentication no\n"
            f"KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nForceCommand {session}\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)
        self.sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(RUN / "sshd_config")],
                                     stderr=open(RUN / "sshd.log", "w"))
        deadline = time.monotonic() + 30
        while self.ssh("true", check=False).returncode != 0:
            if self.sshd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the emulated Pi's sshd did not answer: {(RUN / 'sshd.log').read_text()[-2000:]}")
            time.sleep(0.5)

    def ssh_options(self) -> list[str]:
        return ["-i", str(RUN / "user_key"), "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={RUN}/known_hosts",
                "-o", "StrictHostKeyChecking=accept-new"]

    def ssh(self, command: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        done = run(["ssh", "-o", "BatchMode=yes", "-p", str(self.port), *self.ssh_options(), "root@127.0.0.1", command],
                   check=False, capture_output=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"on the emulated Pi, {command!r} exited {done.returncode}:\n{done.stdout}{done.stderr}")
        return done

    def make_deploy(self, source: Path) -> subprocess.CompletedProcess:
        venv = os.path.relpath(Path(sys.executable).parent.parent, REPO)  # make pi-emu installed it (stamp-dev)
        command = ["make", "--no-print-directory", "-o", f"{venv}/.stamp-ui", "deploy", "PI=127.0.0.1", f"PI_PORT={self.port}", "PI_USER=root",
                   f"SSH_OPTS={shlex.join(self.ssh_options())}", f"MODEL={os.path.relpath(MODEL, REPO)}",
                   f"SOURCE={source}", f"DEPLOY_WORK={DESKTOP}", f"VENV={venv}"]
        done = run(command, check=False, cwd=REPO, env={**os.environ, **SETTINGS}, capture_output=True, timeout=3600)
        print(done.stdout + done.stderr, flush=True)
        return done

    def stop(self) -> None:
        if self.sshd and self.sshd.poll() is None:
            units = " ".join(path.name for path in (ROOT / "etc/systemd/system").glob("ctpi-*.service"))
            if units:
                self.ssh(f"{SETTINGS['CTPI_SERVICE_MANAGER']} stop {units}", check=False, timeout=300)
        if self.sshd:
            self.sshd.terminate()
            self.sshd.wait(timeout=30)
        stop_leftovers()


def stop_leftovers() -> None:
    """End processes of an earlier run still inside the emulated root (by their root folder: ours
    only), then remove the Pi's network namespace."""
    if ROOT.exists():
        ours = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and os.readlink(proc / "root") == str(ROOT):
                    ours.append(int(proc.name))
            except OSError:
                continue
        for pid in ours:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    run(["ip", "netns", "delete", NETNS], check=False, capture_output=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def result_of(done: subprocess.CompletedProcess) -> str:
    lines = [line.split("RESULT: ", 1)[1] for line in done.stdout.splitlines() if "RESULT: " in line]
    return lines[-1] if lines else ""


def snapshots(folder: Path) -> tuple[Path, Path]:
    """Frozen copies of what a deploy ships, taken together (others edit and commit in the working
    tree meanwhile): the release, and the same with a ``ctpi predict`` that fails, which the health
    check must catch and roll back. Only that file differs, so both share one virtualenv."""
    from tests.test_deploy import snapshot_source

    good = snapshot_source(folder / "source-a")
    broken = folder / "source-broken"
    shutil.copytree(good, broken)
    with open(broken / "device/tools/predict.py", "a", encoding="utf-8") as handle:
        handle.write('\ndef run(args):\n    raise RuntimeError("this release cannot classify")\n')
    return good, broken


def bench_table(deploy_output: str) -> list[str]:
    """The health check's ``ctpi bench`` output, as release.sh printed it back."""
    lines, inside = [], False
    for line in deploy_output.splitlines():
        text = line.split("] ", 1)[1] if line.startswith("[") and "] " in line else line
        if "health: ctpi bench --runs" in text:
            inside = True
        elif inside and text.startswith("    "):
            lines.append(text[4:])
        elif inside:
            break
    return lines


def installed_wheels() -> list[str]:
    """``name==version`` of every distribution the wheelhouse put in the current release's virtualenv
    (not the virtualenv's own pip and setuptools, which come from the root's python3-venv)."""
    site = next((ROOT / "opt/ctpi/current/venv/lib").glob("python3*/site-packages"))
    found = []
    for info in sorted(site.glob("*.dist-info")):
        name, version = info.name[: -len(".dist-info")].rsplit("-", 1)
        if name not in ("pip", "setuptools"):
            found.append(f"{name}=={version}")
    return found


def watch_check(pi: EmulatedPi) -> list[dict]:
    """``ctpi watch --once`` inside the root over three phantom slices and one DICOM instance."""
    from device.core.phantom import chest_png
    from tests.dicomtools import write_series

    inbox = ROOT / "tmp/pi-emu-watch/inbox"
    (inbox / "study-png").mkdir(parents=True)
    for seed, ground_glass in ((11, False), (12, False), (13, True)):
        (inbox / "study-png" / f"slice-{seed}.png").write_bytes(chest_png(seed=seed, ground_glass=ground_glass))
    write_series(inbox / "study-dicom", 1)
    ctpi = "/opt/ctpi/current/bin/ctpi"
    folders = "--inbox /tmp/pi-emu-watch/inbox --state /tmp/pi-emu-watch/state"
    watched = pi.ssh(f"{ctpi} watch --once --model /opt/ctpi/current/models/{MODEL.name} {folders} --settle-seconds 0")
    print(watched.stdout[-3000:] + watched.stderr[-3000:], flush=True)
    results = json.loads(pi.ssh(f"{ctpi} results --state /tmp/pi-emu-watch/state --json").stdout)
    slices = results["slices"] if isinstance(results, dict) else results
    for record in slices:
        say(f"watch --once: {record.get('path')}: {record.get('status')} {record.get('label', '')} {record.get('positive_probability', '')}")
    return slices


def page_health(pi: EmulatedPi, seconds: float = 300) -> str:
    """The page unit's health endpoint, asked from inside the Pi's network namespace."""
    ask = f"python3 -c {shlex.quote(f'import urllib.request; print(urllib.request.urlopen({PAGE_HEALTH!r}, timeout=10).read().decode())')}"
    deadline = time.monotonic() + seconds
    while True:
        done = pi.ssh(ask, check=False)
        if done.returncode == 0 or time.monotonic() > deadline:
            return done.stdout.strip() if done.returncode == 0 else f"no answer: {done.stderr.strip()[-300:]}"
        time.sleep(3)


@contextlib.contextmanager
def timed(name: str, seconds: dict[str, float]):
    """One phase: its wall time goes into ``seconds`` and is printed as it ends."""
    say(f"[{name}] ...")
    started, failed = time.monotonic(), True
    try:
        yield
        failed = False
    finally:
        seconds[name] = round(time.monotonic() - started, 1)
        say(f"[{name}] {'failed' if failed else 'done'} in {seconds[name]:.1f} s")


def require(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(message)


def main() -> int:
    CACHE.mkdir(parents=True, exist_ok=True)
    lock = open(CACHE / ".lock", "w")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        say("another make pi-emu is running on this machine (it owns .cache/pi-emu); not starting a second")
        return 1
    seconds: dict[str, float] = {}
    summary: dict = {"phases": seconds}
    try:
        with timed("host", seconds):
            ensure_host()
    except CannotEmulate as error:
        say(f"cannot emulate an arm64 Pi on this machine: {error}")
        return CANNOT_EMULATE
    pi, code = None, 0
    try:
        with timed("root", seconds):
            base = base_root()
        with timed("pi", seconds):
            pi = EmulatedPi(base)
            pi.start()
            summary["platform"] = pi.ssh("uname -m; python3 -c 'import sys; print(sys.version.split()[0])'").stdout.split()
            say(f"emulated Pi answers over ssh on 127.0.0.1:{pi.port}: {' '.join(summary['platform'])}")
            require(summary["platform"][0] == "aarch64", f"the root is not aarch64: {summary['platform']}")
        with timed("deploy", seconds):
            source, broken = snapshots(RUN)
            done = pi.make_deploy(source)
            summary["deploy"] = result_of(done)
            require(done.returncode == 0 and summary["deploy"].startswith("deployed "), f"make deploy: {summary['deploy'] or done.returncode}")
            summary["bench"], summary["wheels"] = bench_table(done.stdout), installed_wheels()
            summary["current"] = os.readlink(ROOT / "opt/ctpi/current")
        with timed("check", seconds):
            summary["watch"] = watch_check(pi)
            require(len(summary["watch"]) == 4 and all(r.get("status") == "ok" for r in summary["watch"]), "ctpi watch --once did not triage all 4 files")
            summary["page"] = page_health(pi)
            say(f"page {PAGE_HEALTH}: {summary['page']}")
            require(summary["page"] == "ok", f"the page's health endpoint: {summary['page']}")
        with timed("rollback", seconds):
            done = pi.make_deploy(broken)
            summary["rollback"] = result_of(done)
            require(done.returncode != 0 and summary["rollback"].startswith("rolled-back "), f"broken release: {summary['rollback']}")
            require(os.readlink(ROOT / "opt/ctpi/current") == summary["current"], "the previous release is not current again")
    except Exception as error:  # noqa: BLE001 - reported, the units stopped, exit 1
        say(f"FAILED: {error}")
        summary["error"], code = str(error), 1
    finally:
        with timed("stop", seconds):
            if pi:
                pi.stop()
        summary["total_seconds"] = round(sum(seconds.values()), 1)
        if RUN.is_dir():
            (RUN / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    say("wall time: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in seconds.items()) + f"; total {summary['total_seconds']:.1f} s")
    if summary.get("wheels"):
        say(f"aarch64 wheels installed ({len(summary['wheels'])}): {' '.join(summary['wheels'])}")
    say(("PASSED" if code == 0 else "FAILED") + f" (summary: {os.path.relpath(RUN / 'summary.json', REPO)})")
    return code


if __name__ == "__main__":
    sys.exit(main())

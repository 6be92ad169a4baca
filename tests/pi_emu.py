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
   built once by mmdebstrap and cached under :data:`CACHE` (outside the clone, so a clean CI clone
   finds it); each run copies it to a fresh "Pi", seeded with the virtualenv an earlier run's
   ``pip install`` made for the same lock (``/opt/ctpi/venvs/<key>``, as on a Pi deployed before).
3. pi: the "Pi" is reached as a real one is: an sshd on a loopback port whose every session runs
   in the arm64 root (``session.sh``: its own mount namespace with proc, sys and dev mounted, the
   Pi's own network namespace so its units' ports never meet this machine's, and ``env -i``).
4. deploy: ``make deploy PI=127.0.0.1 PI_PORT=...`` of the shipped default bundle: the desktop
   asks the Pi its platform, builds the wheelhouse for it from ``requirements/pi-cp311-aarch64.txt``
   and ``release.sh`` installs, switches and health-checks inside the root, with
   ``tests/servicectl.py`` (run by the root's arm64 python) as its systemctl.
5. check: inside the root, ``ctpi watch --once`` over synthetic slices and a DICOM, ``ctpi results``,
   and the page's health endpoint; beside step 6, which never touches the running release.
6. lost-wheel (unless ``CTPI_PI_EMU_LOST_WHEEL=0``, as in ``.ci/run``): a release whose lock pins
   a numpy the wheelhouse has no aarch64 wheel of must fail at the Pi's ``pip install --no-index``,
   before the switch, leaving the first release current.
7. rollback: a release whose ``ctpi predict`` fails is deployed and must roll back to the first.

Emulated timings are a function check only, never Pi latency. The run's root stays in
``CACHE/run/`` for inspection (``summary.json``) until the next run.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
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

from deploy.stage import PROBE
from tests.pi_emu_host import CannotEmulate, base_root, ensure_host, remove_tree, run, say

REPO = Path(__file__).resolve().parent.parent
# Outside the clone: CI starts from a clean clone, and the root, the wheelhouse and the venv are slow to make.
CACHE = Path(os.environ.get("CTPI_PI_EMU_CACHE") or "/var/cache/ctpi-pi-emu")
VENVS = CACHE / "venvs"  # /opt/ctpi/venvs/<key> of the last passing run, hard links, seeded into each fresh Pi
RUN = CACHE / "run"
ROOT = RUN / "root"
DESKTOP = CACHE / "desktop"  # DEPLOY_WORK: staged releases and the aarch64 wheelhouse, kept between runs
NETNS = "ctpi-pi-emu"
MODEL = REPO / "models" / "mobilenetv2"  # the shipped default bundle
SERVICECTL_IN_ROOT = "/usr/local/lib/ctpi-pi-emu/servicectl.py"
SETTINGS = {  # release.sh's settings (forwarded by deploy.ship); the rest keep their Pi defaults
    "CTPI_SERVICE_MANAGER": f"python3 {SERVICECTL_IN_ROOT} --units /etc/systemd/system --state /var/lib/ctpi-pi-emu/units",
    "CTPI_HEALTH_TIMEOUT": "300",
    "CTPI_BENCH_RUNS": "3",
}
PAGE_HEALTH = "http://127.0.0.1:8501/_stcore/health"
CANNOT_EMULATE = 77  # the test skips on this exit status (and only on it)
LOST_WHEEL = "numpy"  # the pin the lost-wheel release moves to a version no wheelhouse holds
# CTPI_PI_EMU_LOST_WHEEL=0 (.ci/run) leaves the lost-wheel release out: the rollback is the broken
# release CI needs, and the lost wheel's virtualenv, made under QEMU before pip can fail, is the
# dearest minute of CPU in the run.
LOST_WHEEL_CASE = os.environ.get("CTPI_PI_EMU_LOST_WHEEL", "1") != "0"


class EmulatedPi:
    """The arm64 root behind a loopback sshd; ``ssh()`` runs a command inside it as root."""

    def __init__(self, base: Path):
        self.base, self.port, self.sshd, self.seeded, self.timelines = base, None, None, [], []

    def start(self) -> None:
        stop_leftovers()
        remove_tree(RUN)
        RUN.mkdir(parents=True)
        run(["cp", "-a", "--reflink=auto", str(self.base), str(ROOT)])
        (ROOT / ".complete").unlink()
        self.seeded = []
        for venv in sorted(VENVS.glob("*/.complete")):  # hard links: the Pi only adds files there (new .pyc), never rewrites one
            (ROOT / "opt/ctpi/venvs").mkdir(parents=True, exist_ok=True)
            run(["cp", "-al", str(venv.parent), str(ROOT / "opt/ctpi/venvs" / venv.parent.name)])
            self.seeded.append(venv.parent.name)
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

    def make_deploy(self, source: Path, work: Path = DESKTOP) -> subprocess.CompletedProcess:
        venv = os.path.relpath(Path(sys.executable).parent.parent, REPO)  # make pi-emu installed it (stamp-dev)
        command = ["make", "--no-print-directory", "-o", f"{venv}/.stamp-ui", "deploy", "PI=127.0.0.1", f"PI_PORT={self.port}", "PI_USER=root",
                   f"SSH_OPTS={shlex.join(self.ssh_options())}", f"MODEL={os.path.relpath(MODEL, REPO)}",
                   f"SOURCE={source}", f"DEPLOY_WORK={work}", f"VENV={venv}"]
        started, lines, steps = time.monotonic(), [], []
        with subprocess.Popen(command, cwd=REPO, env={**os.environ, **SETTINGS}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) as process:
            for line in process.stdout:  # streamed, each step's time since make started
                lines.append(line)
                at = round(time.monotonic() - started, 1)
                print(f"[+{at:6.1f} s] {line}", end="", flush=True)
                text = line.split("] ", 1)[1] if line.startswith("[") else line
                if text.startswith(("deploy:", "ctpi-release:", "RESULT:")):
                    steps.append([at, text.strip()[:120]])
        self.timelines.append(steps)
        return subprocess.CompletedProcess(command, process.returncode, "".join(lines), "")

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


def snapshots(folder: Path) -> tuple[Path, Path, Path]:
    """Frozen copies of what a deploy ships, taken together (others edit and commit in the working
    tree meanwhile): the release; the same with a ``ctpi predict`` that fails, which the health
    check must catch and roll back (only that file differs, so both share one virtualenv); and the
    same with a lock whose :data:`LOST_WHEEL` pin has no wheel anywhere (see :func:`lost_wheel_work`)."""
    from tests.test_deploy import snapshot_source

    good = snapshot_source(folder / "source-a")
    broken, lost = folder / "source-broken", folder / "source-lost-wheel"
    shutil.copytree(good, broken)
    with open(broken / "device/tools/predict.py", "a", encoding="utf-8") as handle:
        handle.write('\ndef run(args):\n    raise RuntimeError("this release cannot classify")\n')
    shutil.copytree(good, lost)
    lock = lost / "requirements/pi-cp311-aarch64.txt"
    lines = [f"{line}.post999" if line.startswith(f"{LOST_WHEEL}==") else line for line in lock.read_text().splitlines()]
    require(any(line.endswith(".post999") for line in lines), f"{lock.name} pins no {LOST_WHEEL}")
    lock.write_text("\n".join(lines) + "\n")
    return good, broken, lost


def lost_wheel_work(source: Path, target_probe: str) -> Path:
    """DEPLOY_WORK for ``source`` whose wheelhouse lost the wheel of its :data:`LOST_WHEEL` pin: every
    wheel of the good wheelhouse and a stamp saying it is complete for this release (as a wheelhouse
    copied between desktops, or pruned by hand, says). Without the stamp the desktop's own resolve
    stops the deploy before the Pi is touched; this is the Pi-side guard: nothing is switched when
    ``pip install --no-index`` cannot find a wheel."""
    from deploy.stage import Target, pi_lock, stage, wheelhouse_stamp

    work, target = RUN / "desktop-lost-wheel", Target.parse(target_probe)
    release = stage(source, MODEL, work / "releases", ["ui"])  # what make deploy stages again (same version)
    folder = work / "wheels" / target.tag
    folder.mkdir(parents=True)
    for wheel in (DESKTOP / "wheels" / target.tag).glob("*.whl"):
        os.link(wheel, folder / wheel.name)
    wheelhouse_stamp(folder, release.path / "requirements.txt", pi_lock(release.path, target)).touch()
    return work


def keep_venv(output: str) -> str:
    """Keep the current release's virtualenv for the next fresh Pi (replacing older ones); says
    whether this run's pip made it or the cache gave it."""
    key = Path(os.readlink(ROOT / "opt/ctpi/current/venv")).name
    made = f"creating virtualenv venvs/{key}" in output
    if made or not (VENVS / key / ".complete").exists():
        remove_tree(VENVS)
        VENVS.mkdir(parents=True)
        run(["cp", "-al", str(ROOT / "opt/ctpi/venvs" / key), str(VENVS / f".{key}")])
        (VENVS / f".{key}").rename(VENVS / key)
    return f"{key}: " + ("installed by pip under QEMU in this run" if made else "reused (an earlier run's pip install, as on a Pi deployed before)")


def units_active(pi: EmulatedPi) -> list[str]:
    """The units the service manager in the root reports active."""
    units = sorted(path.name for path in (ROOT / "etc/systemd/system").glob("ctpi-*.service"))
    manager = SETTINGS["CTPI_SERVICE_MANAGER"]
    return [unit for unit in units if pi.ssh(f"{manager} is-active --quiet {unit}", check=False).returncode == 0]


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
    # No study heatmaps here: --once would make one per study before exiting, 50 invokes each,
    # which under QEMU (1.3-4.9 s an invoke) is minutes and checks nothing the triage does not.
    (ROOT / "tmp/pi-emu-watch/ctpi.toml").write_text("[watch]\nstudy_heatmaps = false\n")
    ctpi = "/opt/ctpi/current/bin/ctpi"
    folders = "--inbox /tmp/pi-emu-watch/inbox --state /tmp/pi-emu-watch/state --config /tmp/pi-emu-watch/ctpi.toml"
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


def lost_wheel(pi: EmulatedPi, source: Path, summary: dict, seconds: dict[str, float]) -> None:
    """The release whose wheel is missing stops at the Pi's pip; the first release stays current and running."""
    with timed("lost-wheel", seconds):
        probe = pi.ssh(f"python3 -c {shlex.quote(PROBE)}").stdout.strip()
        done = pi.make_deploy(source, lost_wheel_work(source, probe))
        summary["lost_wheel"], summary["lost_wheel_units"] = result_of(done), units_active(pi)
        summary["lost_wheel_release"] = next(line.split()[2] for line in done.stdout.splitlines() if line.startswith("deploy: release "))
        require(done.returncode != 0 and summary["lost_wheel"].startswith("failed "), f"release with a lost wheel: {summary['lost_wheel'] or done.returncode}")
        require(f"ERROR: Cannot install {LOST_WHEEL}" in done.stdout and "ResolutionImpossible" in done.stdout, "the Pi's pip did not stop at the lost wheel")
        require(os.readlink(ROOT / "opt/ctpi/current") == summary["current"], "a release with a lost wheel was switched to")
        require(len(summary["lost_wheel_units"]) == 3, f"units active after the lost wheel: {summary['lost_wheel_units']}")


def require(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(message)


def main() -> int:
    CACHE.mkdir(parents=True, exist_ok=True)
    lock = open(CACHE / ".lock", "w")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        say(f"another make pi-emu is running on this machine (it owns {CACHE}); not starting a second")
        return 1
    (RUN / "summary.json").unlink(missing_ok=True)  # never a stale one for the test to read
    seconds: dict[str, float] = {}
    summary: dict = {"phases": seconds}
    started = time.monotonic()
    pi, code = None, 0
    try:
        with timed("host", seconds):
            ensure_host()
        with timed("root", seconds):
            base = base_root(CACHE)
        with timed("pi", seconds):
            pi = EmulatedPi(base)
            pi.start()
            summary["platform"] = pi.ssh("uname -m; python3 -c 'import sys; print(sys.version.split()[0])'").stdout.split()
            say(f"emulated Pi answers over ssh on 127.0.0.1:{pi.port}: {' '.join(summary['platform'])}")
            require(summary["platform"][0] == "aarch64", f"the root is not aarch64: {summary['platform']}")
        with timed("deploy", seconds):
            source, broken, lost = snapshots(RUN)
            done = pi.make_deploy(source)
            summary["deploy"] = result_of(done)
            require(done.returncode == 0 and summary["deploy"].startswith("deployed "), f"make deploy: {summary['deploy'] or done.returncode}")
            summary["bench"], summary["wheels"] = bench_table(done.stdout), installed_wheels()
            summary["current"] = os.readlink(ROOT / "opt/ctpi/current")
            summary["venv"] = keep_venv(done.stdout)
            say(f"virtualenv {summary['venv']}")

        def check() -> None:
            with timed("check", seconds):
                summary["watch"] = watch_check(pi)
                require(len(summary["watch"]) == 4 and all(r.get("status") == "ok" for r in summary["watch"]), "ctpi watch --once did not triage all 4 files")
                summary["page"] = page_health(pi)
                say(f"page {PAGE_HEALTH}: {summary['page']}")
                require(summary["page"] == "ok", f"the page's health endpoint: {summary['page']}")

        if LOST_WHEEL_CASE:
            # Beside the lost-wheel deploy, which never touches the running release or its units: the
            # two share nothing but the CPU (watch --once has its own inbox and state).
            with concurrent.futures.ThreadPoolExecutor(1) as pool, timed("check + lost-wheel", seconds):
                checked = pool.submit(check)
                lost_wheel(pi, lost, summary, seconds)
                checked.result()
        else:
            check()
            summary["lost_wheel"] = "not run (CTPI_PI_EMU_LOST_WHEEL=0)"
        with timed("rollback", seconds):
            done = pi.make_deploy(broken)
            summary["rollback"] = result_of(done)
            require(done.returncode != 0 and summary["rollback"].startswith("rolled-back "), f"broken release: {summary['rollback']}")
            require(os.readlink(ROOT / "opt/ctpi/current") == summary["current"], "the previous release is not current again")
    except CannotEmulate as error:
        say(f"cannot emulate an arm64 Pi on this machine: {error}")
        return CANNOT_EMULATE
    except Exception as error:  # noqa: BLE001 - reported, the units stopped, exit 1
        say(f"FAILED: {error}")
        summary["error"], code = str(error), 1
    finally:
        with timed("stop", seconds):
            if pi:
                pi.stop()
        summary["total_seconds"] = round(time.monotonic() - started, 1)
        summary["deploy_timelines"] = pi.timelines if pi else []
        if RUN.is_dir():
            (RUN / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    say("wall time: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in seconds.items()) + f"; total {summary['total_seconds']:.1f} s")
    if summary.get("wheels"):
        say(f"aarch64 wheels installed ({len(summary['wheels'])}): {' '.join(summary['wheels'])}")
    say(("PASSED" if code == 0 else "FAILED") + f" (summary: {RUN / 'summary.json'})")
    return code


if __name__ == "__main__":
    sys.exit(main())

"""``make deploy`` / ``make rollback``: one Pi over SSH, running ``deploy/release.sh`` there.

The desktop side only stages, uploads and reports; every step on the Pi is in ``release.sh``,
which the Ansible playbook runs too. SSH runs with ``BatchMode=yes`` (keys or an agent, never a
password prompt and never a secret in this repository); a login that is not root and cannot
write the prefix uses ``sudo -n``. Uploads are tar streams (no rsync needed on either side),
unpacked under the prefix so moving a staged release into ``releases/`` is a rename. Nothing is uploaded when the Pi already runs
the staged version; only wheels the Pi lacks are sent.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from deploy.stage import PROBE, REPO, StageError, Target, build_wheelhouse, pi_lock, stage

# Pi-side settings of release.sh that the desktop forwards when set in its environment.
FORWARDED = (
    "CTPI_PREFIX",
    "CTPI_SERVICE_MANAGER",
    "CTPI_UNIT_DIR",
    "CTPI_SERVICE_USER",
    "CTPI_DATA_DIR",
    "CTPI_CONFIG_DIR",
    "CTPI_PYTHON",
    "CTPI_HEALTH_TIMEOUT",
    "CTPI_BENCH_RUNS",
    "CTPI_KEEP_RELEASES",
)
DEFAULT_PREFIX = "/opt/ctpi"


class DeployError(Exception):
    """The desktop could not reach or prepare the Pi; the message says which step."""


@dataclass
class Pi:
    host: str
    user: str = ""
    port: int | None = None
    ssh_options: list[str] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)
    use_sudo: bool = False

    @property
    def prefix(self) -> str:
        return self.settings.get("CTPI_PREFIX", DEFAULT_PREFIX)

    def ssh_command(self, command: str) -> list[str]:
        destination = f"{self.user}@{self.host}" if self.user else self.host
        port = ["-p", str(self.port)] if self.port else []  # else ssh's own (~/.ssh/config, 22)
        return ["ssh", "-o", "BatchMode=yes", *port, *self.ssh_options, destination, command]

    def as_root(self, command: str) -> str:
        return f"sudo -n sh -c {shlex.quote(command)}" if self.use_sudo else command

    def run(self, command: str, stdin=None) -> subprocess.CompletedProcess:
        done = subprocess.run(self.ssh_command(command), stdin=stdin, capture_output=True, text=True)
        if done.returncode == 255:
            raise DeployError(f"ssh to {self.host} failed: {done.stderr.strip()} (keys set up? `ssh-copy-id`)")
        return done

    def release_script(self, script: str, *args: str) -> tuple[int, str]:
        """Run release.sh with the forwarded settings, streaming its output; returns the exit
        status and the RESULT line."""
        environment = " ".join(f"{key}={shlex.quote(value)}" for key, value in sorted(self.settings.items()))
        command = self.as_root(f"env {environment} bash {shlex.quote(script)} {' '.join(map(shlex.quote, args))}")
        result = ""
        with subprocess.Popen(self.ssh_command(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
            for line in process.stdout:
                sys.stdout.write(f"[{self.host}] {line}")
                sys.stdout.flush()
                if line.startswith("RESULT: "):
                    result = line[len("RESULT: ") :].strip()
        if process.returncode == 255 and not result:
            raise DeployError(f"ssh to {self.host} failed while running release.sh")
        return process.returncode, result


@dataclass(frozen=True)
class PiState:
    target: Target
    use_sudo: bool
    current: str
    current_complete: bool
    wheels: frozenset[str]


def probe(pi: Pi) -> PiState:
    """One round trip: the Pi's python and platform, whether sudo is needed, the current
    release and the wheels it holds."""
    python = shlex.quote(pi.settings.get("CTPI_PYTHON", "python3"))
    prefix = shlex.quote(pi.prefix)
    script = (
        f'echo "probe: $({python} -c {shlex.quote(PROBE)})"; echo "uid: $(id -u)"; '
        f'echo "current: $(readlink {prefix}/current)"; '
        f"p={prefix}; while [ ! -e \"$p\" ]; do p=$(dirname \"$p\"); done; test -w \"$p\" && echo 'writable: yes'; "
        f'test -e {prefix}/current/.complete && echo "complete: yes"; '
        f"ls -1 {prefix}/wheels 2>/dev/null | sed 's/^/wheel: /'; true"
    )
    done = pi.run(script)
    fields: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition(": ")
        fields.setdefault(key, []).append(value)
    if not fields.get("probe", [""])[0].strip():
        raise DeployError(f"{pi.host} has no working {python} ({done.stderr.strip()}); install Raspberry Pi OS's python3")
    return PiState(
        target=Target.parse(fields["probe"][0]),
        # sudo only when needed: not root, and the prefix is not the login's own (a test prefix)
        use_sudo=fields.get("uid", [""])[0] != "0" and fields.get("writable") != ["yes"],
        current=fields.get("current", [""])[0],
        current_complete=fields.get("complete") == ["yes"],
        wheels=frozenset(fields.get("wheel", [])),
    )


def upload(pi: Pi, local_folder: Path, names: list[str], remote_folder: str, replace: bool) -> None:
    """Stream ``names`` under ``local_folder`` into ``remote_folder`` as a tar archive."""
    reset = f"rm -rf {shlex.quote(remote_folder)} && " if replace else ""
    remote = pi.as_root(f"{reset}mkdir -p {shlex.quote(remote_folder)} && tar --no-same-owner -xf - -C {shlex.quote(remote_folder)}")
    with subprocess.Popen(["tar", "-C", str(local_folder), "-cf", "-", "--", *names], stdout=subprocess.PIPE) as archive:
        done = pi.run(remote, stdin=archive.stdout)
    if archive.returncode != 0 or done.returncode != 0:
        raise DeployError(f"upload to {pi.host}:{remote_folder} failed: {done.stderr.strip()}")


def deploy(pi: Pi, model: Path, extras: list[str], source: Path, work: Path, wheelhouse: bool) -> int:
    state = probe(pi)
    pi.use_sudo = state.use_sudo
    release = stage(source, model, work / "releases", extras)
    lock = pi_lock(release.path, state.target)  # no lock for the Pi's platform: stop here, the Pi untouched
    print(f"deploy: release {release.version} to {pi.host} ({state.target.tag}, {lock.name}), current {Path(state.current).name or 'none'}")
    installed = f"{pi.prefix}/releases/{release.version}"
    if state.current == f"releases/{release.version}" and state.current_complete:
        code, result = pi.release_script(f"{installed}/release.sh", "install", installed)
    else:
        if wheelhouse:
            wheels = build_wheelhouse(release.path / "requirements.txt", state.target, work / "wheels")
            missing = sorted(p.name for p in wheels.glob("*.whl") if p.name not in state.wheels)
            if missing:
                print(f"deploy: uploading {len(missing)} wheels")
                upload(pi, wheels, missing, f"{pi.prefix}/wheels", replace=False)
        incoming = f"{pi.prefix}/incoming/{release.version}"
        upload(pi, release.path, ["."], incoming, replace=True)
        code, result = pi.release_script(f"{incoming}/release.sh", "install", incoming)
    print(f"deploy: {pi.host}: {result or 'no result (see the output above)'}")
    return code


def rollback(pi: Pi) -> int:
    state = probe(pi)
    pi.use_sudo = state.use_sudo
    if not state.current:
        raise DeployError(f"{pi.host} has no release under {pi.prefix} to roll back from")
    code, result = pi.release_script(f"{pi.prefix}/current/release.sh", "rollback")
    print(f"rollback: {pi.host}: {result or 'no result (see the output above)'}")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.ship", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("deploy", "rollback"))
    parser.add_argument("--host", required=True, help="the Pi (name or address; an ~/.ssh/config alias works)")
    parser.add_argument("--user", default="", help="SSH login (default: ssh's own default)")
    parser.add_argument("--port", type=int, default=None, help="SSH port (default: ssh's own, normally 22)")
    parser.add_argument("--ssh-options", default="", help="extra ssh arguments, e.g. '-i ~/.ssh/pi_ed25519'")
    parser.add_argument("--model", type=Path, default=REPO / "models" / "mobilenetv2")
    parser.add_argument("--extras", default="ui", help="pyproject extras for the Pi (default: ui)")
    parser.add_argument("--source", type=Path, default=REPO, help="source tree to ship (default: this repository)")
    parser.add_argument("--work", type=Path, default=REPO / "var" / "deploy", help="desktop folder for releases and wheelhouses")
    parser.add_argument("--no-wheelhouse", action="store_true", help="let the Pi install from its package index (needs its network)")
    args = parser.parse_args(argv)
    if not args.host:
        parser.error("no Pi given: make deploy PI=hostname")
    settings = {key: os.environ[key] for key in FORWARDED if os.environ.get(key)}
    pi = Pi(args.host, args.user, args.port, shlex.split(args.ssh_options), settings)
    try:
        if args.action == "rollback":
            return rollback(pi)
        extras = [extra for extra in args.extras.split(",") if extra]
        return deploy(pi, args.model, extras, args.source, args.work, not args.no_wheelhouse)
    except (DeployError, StageError) as error:
        print(f"{args.action}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

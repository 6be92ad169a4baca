#!/usr/bin/env python3
"""A stand-in for ``systemctl`` that really runs units: the service manager of the loopback "Pi".

systemd cannot be this test machine's service manager, yet a deploy is only proven when the units
it installs start and keep running. deploy/release.sh calls its service manager as
``$CTPI_SERVICE_MANAGER VERB ARGS``; the deploy tests point that at
``python3 tests/servicectl.py --units UNIT_DIR --state STATE_DIR [--log CALLS]``, and this script
does what systemd would with each installed unit:

- ``start``/``restart UNIT...``: the unit file as loaded (``daemon-reload``, or from disk the first
  time) is parsed; its ExecStart is started as the real process it names, in WorkingDirectory,
  with only the unit's Environment= plus PATH, LANG and NOTIFY_SOCKET (as systemd does, nothing
  of the caller's environment), its output kept in STATE_DIR/UNIT/journal. Like ``systemctl``,
  the call waits: for Type=notify until the process sends ``READY=1`` (from its main PID:
  NotifyAccess=main), for Type=simple/exec until it runs. A process that exits first, or sends
  no READY=1 within TimeoutStartSec (then it is killed), fails the job: exit status 1.
- ``stop``: SIGTERM to the unit's process group, SIGKILL after TimeoutStopSec.
- ``is-active [--quiet] UNIT``: 0 only while the process lives and, for Type=notify, after its
  READY=1; else 3 (``activating``, ``failed``, ``inactive``).
- ``status UNIT``: state, main PID, whether READY=1 came, the STATUS= text and the journal's tail.
- ``daemon-reload`` loads the unit files, ``enable``/``disable`` are recorded (``--now`` stops).
- WatchdogSec=: WATCHDOG_USEC is set and a process silent for that long is killed (SIGABRT).

Each started unit has a small supervisor (this script, ``_supervise``) as the parent of its
process: it owns the notify socket, reaps the process and writes STATE_DIR/UNIT/state.json.

Ignored, because the loopback Pi cannot give them or they do not decide whether a unit runs:
User=/Group= (the ``ctpi`` account does not exist here; the unit runs as the deploying user),
the sandbox and hardening directives (Protect*, Private*, Restrict*, ReadWritePaths=,
SystemCallFilter=, Capability*, IPAddress*, NoNewPrivileges=, UMask=, ...: they need PID 1's
namespaces and cgroups), resource limits (Memory*, TasksMax=, Nice=, IOScheduling*), Restart=
and StartLimit* (a unit that dies stays failed, which is what a deploy's health check must see),
[Unit] ordering (units start in the order named) and [Install].
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SUPPORTED_TYPES = ("simple", "exec", "notify")


class UnitError(Exception):
    """A unit this stand-in cannot run; the message says why."""


def seconds(span: str, default: float) -> float | None:
    """A systemd time span ("90", "5s", "2min", "500ms", "infinity") in seconds (None: no limit)."""
    if not span:
        return default
    if span == "infinity":
        return None
    units = {"": 1, "s": 1, "sec": 1, "ms": 0.001, "m": 60, "min": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span):
        if unit not in units:
            raise UnitError(f"time span {span!r}: unknown unit {unit!r}")
        total += float(number) * units[unit]
    return total


class Unit:
    """The [Service] settings this stand-in honours, read from a unit file."""

    def __init__(self, name: str, text: str):
        sections: dict[str, dict[str, list[str]]] = {}
        current = None
        for line in text.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("[") and line.endswith("]"):
                current = sections.setdefault(line[1:-1], {})
            elif current is not None and "=" in line:
                key, value = (part.strip() for part in line.split("=", 1))
                current.setdefault(key, []).append(value)
        service = sections.get("Service", {})
        last = lambda key, default="": (service.get(key) or [default])[-1]  # noqa: E731
        self.name = name
        self.description = (sections.get("Unit", {}).get("Description") or [name])[-1]
        self.type = last("Type", "simple")
        if self.type not in SUPPORTED_TYPES:
            raise UnitError(f"{name}: Type={self.type} is not supported here ({', '.join(SUPPORTED_TYPES)})")
        starts = [value for value in service.get("ExecStart", []) if value]
        if len(starts) != 1:
            raise UnitError(f"{name}: needs exactly one ExecStart=, has {len(starts)}")
        self.command = shlex.split(starts[0])
        if not self.command or self.command[0][0] in "-@+!:":
            raise UnitError(f"{name}: ExecStart prefix {self.command[0][0]!r} is not supported here")
        self.environment: dict[str, str] = {}
        for value in service.get("Environment", []):
            if not value:  # an empty assignment resets the list, as in systemd
                self.environment.clear()
            for assignment in shlex.split(value):
                key, _, setting = assignment.partition("=")
                self.environment[key] = setting
        self.working_directory = last("WorkingDirectory") or None
        self.notify_access = last("NotifyAccess", "main" if self.type == "notify" else "none")
        self.start_timeout = seconds(last("TimeoutStartSec"), 90.0)
        self.stop_timeout = seconds(last("TimeoutStopSec"), 90.0)
        self.watchdog = seconds(last("WatchdogSec"), 0.0) or None


class Manager:
    """The verbs, over STATE_DIR/UNIT/{unit,state.json,journal}."""

    def __init__(self, units: Path, state: Path):
        self.units, self.state = Path(units), Path(state)

    def folder(self, name: str) -> Path:
        return self.state / name

    def read(self, name: str) -> dict:
        try:
            return json.loads((self.folder(name) / "state.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def write(self, name: str, **changes) -> dict:
        state = {**self.read(name), **changes}
        temporary = self.folder(name) / f".state.json.{os.getpid()}"
        temporary.write_text(json.dumps(state))
        temporary.replace(self.folder(name) / "state.json")
        return state

    def journal(self, name: str, line: str) -> None:
        with open(self.folder(name) / "journal", "a", encoding="utf-8") as handle:
            handle.write(f"servicectl: {line}\n")

    # -- loading -----------------------------------------------------------------------------

    def daemon_reload(self) -> None:
        for path in sorted(self.units.glob("*.service")):
            self.folder(path.name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, self.folder(path.name) / "unit")

    def load(self, name: str) -> Unit:
        """The unit as loaded; a unit never loaded is read from disk now (systemd loads on demand)."""
        loaded, on_disk = self.folder(name) / "unit", self.units / name
        if not loaded.exists():
            if not on_disk.exists():
                raise UnitError(f"Unit {name} not found.")
            self.folder(name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(on_disk, loaded)
        elif on_disk.exists() and on_disk.read_bytes() != loaded.read_bytes():
            print(f"Warning: The unit file of {name} changed on disk. Run 'systemctl daemon-reload' to reload units.", file=sys.stderr)
        return Unit(name, loaded.read_text(encoding="utf-8"))

    # -- state -------------------------------------------------------------------------------

    def active_state(self, name: str) -> str:
        state = self.read(name)
        if state.get("result") != "running":
            return "failed" if state.get("failed") else "inactive"
        if not alive(state.get("supervisor")) or not alive(state.get("pid")):
            return "failed"  # the supervisor itself was killed: nothing watches the unit
        return "active" if state.get("ready") else "activating"

    # -- verbs -------------------------------------------------------------------------------

    def start(self, names: list[str]) -> int:
        """Start every unit not running yet, then wait for each as systemctl does."""
        supervisors = {}
        for name in names:
            self.load(name)  # an unknown or unreadable unit fails here, before anything starts
            if self.read(name).get("result") == "running" and self.active_state(name) != "failed":
                continue
            self.write(name, result="starting", ready=False, failed=False, timed_out=False, pid=None, exit="", status="",
                       supervisor=None, journal_offset=journal_size(self.folder(name)))
            with open(self.folder(name) / "journal", "ab") as journal:  # the supervisor's own errors go there too
                supervisors[name] = subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "--units", str(self.units), "--state", str(self.state), "_supervise", name],
                    stdin=subprocess.DEVNULL, stdout=journal, stderr=journal, start_new_session=True,  # outlives this call and ssh
                )
        failed = 0
        for name in names:
            while self.read(name).get("result") == "starting" or self.active_state(name) == "activating":
                if name in supervisors and supervisors[name].poll() is not None and self.read(name).get("result") == "starting":
                    self.write(name, result="exited", failed=True, exit="the stand-in's supervisor failed (see the journal)")
                time.sleep(0.1)
            if self.active_state(name) != "active":
                why = "a timeout was exceeded" if self.read(name).get("timed_out") else "the control process exited with error code"
                print(f"Job for {name} failed because {why}.\nSee \"systemctl status {name}\" for details.", file=sys.stderr)
                failed = 1
        return failed

    def stop(self, names: list[str]) -> int:
        for name in names:
            state = self.read(name)
            if state.get("result") in ("running", "starting") and alive(state.get("supervisor")):
                os.kill(state["supervisor"], signal.SIGTERM)
                while self.read(name).get("result") in ("running", "starting") and alive(state["supervisor"]):
                    time.sleep(0.1)
            if self.read(name).get("result") in ("running", "starting"):  # its supervisor was gone
                self.write(name, result="stopped")
        return 0

    def status(self, name: str, lines: int) -> int:
        unit, state, active = self.load(name), self.read(name), self.active_state(name)
        print(f"● {name} - {unit.description}")
        print(f"     Loaded: loaded ({self.units / name}; Type={unit.type})")
        shown = {"active": "active (running)", "activating": "activating (start)", "inactive": "inactive (dead)"}
        print(f"     Active: {shown.get(active, active)}" + (f" ({state['exit']})" if state.get("exit") else ""))
        if state.get("pid"):
            print(f"   Main PID: {state['pid']} ({' '.join(unit.command)})")
        if unit.type == "notify":
            print(f"     Notify: READY=1 {'received' if state.get('ready') else 'not received'}")
        if state.get("status"):
            print(f"     Status: \"{state['status']}\"")
        journal = self.folder(name) / "journal"
        if journal.exists():
            with open(journal, "rb") as handle:
                handle.seek(state.get("journal_offset", 0))
                tail = handle.read().decode("utf-8", "replace").splitlines()[-lines:] if lines > 0 else []
            print("\n".join(tail))
        return 0 if active == "active" else 3


def journal_size(folder: Path) -> int:
    try:
        return (folder / "journal").stat().st_size
    except FileNotFoundError:
        return 0


def alive(pid) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (TypeError, ValueError, OSError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def signal_group(pid: int, number: int) -> None:
    try:
        os.killpg(pid, number)
    except ProcessLookupError:  # it ended meanwhile
        pass


def supervise(manager: Manager, name: str) -> int:
    """The parent of one unit's process: notify socket, start and stop timeouts, watchdog, exit."""
    manager.write(name, supervisor=os.getpid())
    unit = manager.load(name)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the sender's PID comes with each message
    address = f"@ctpi-servicectl/{os.getpid()}/{name}"  # abstract: no path length limit, nothing to clean up
    listener.bind("\0" + address[1:])
    environment = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8", **unit.environment}
    if unit.notify_access != "none":
        environment["NOTIFY_SOCKET"] = address
    if unit.watchdog:
        environment["WATCHDOG_USEC"] = str(int(unit.watchdog * 1e6))
    with open(manager.folder(name) / "journal", "ab") as journal:
        try:
            process = subprocess.Popen(unit.command, cwd=unit.working_directory, env=environment, stdin=subprocess.DEVNULL,
                                       stdout=journal, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as error:  # systemd: status=203/EXEC or 200/CHDIR
            manager.journal(name, f"Failed to execute {unit.command[0]}: {error}")
            manager.write(name, result="exited", failed=True, exit=f"could not start: {error}")
            return 1
    manager.journal(name, f"Started {name}: PID {process.pid}: {' '.join(unit.command)}")
    state = manager.write(name, result="running", pid=process.pid, ready=unit.type != "notify")
    started = last_ping = time.monotonic()
    deadline = None  # of the stop in progress
    while process.poll() is None:
        now = time.monotonic()
        if (stopping or not state["ready"] and unit.start_timeout and now - started > unit.start_timeout) and deadline is None:
            if not stopping:
                manager.journal(name, "start operation timed out (no READY=1). Terminating.")
                state = manager.write(name, timed_out=True)
            signal_group(process.pid, signal.SIGTERM)
            deadline = now + (unit.stop_timeout or 1e9)
        elif deadline is not None and now > deadline:
            manager.journal(name, "State 'stop-sigterm' timed out. Killing.")
            signal_group(process.pid, signal.SIGKILL)
            deadline = float("inf")
        elif unit.watchdog and state["ready"] and now - last_ping > unit.watchdog and deadline is None:
            manager.journal(name, "Watchdog timeout! Killing process.")
            signal_group(process.pid, signal.SIGABRT)
            deadline = now + (unit.stop_timeout or 1e9)
        if select.select([listener], [], [], 0.1)[0]:
            message, ancillary, _flags, _address = listener.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
            sender = next((struct.unpack("3i", data[:12])[0] for level, kind, data in ancillary
                           if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), None)
            if unit.notify_access == "main" and sender != process.pid:
                manager.journal(name, f"Got notification message from PID {sender}, but reception only permitted for main PID {process.pid}")
                continue
            fields = dict(line.split("=", 1) for line in message.decode("utf-8", "replace").splitlines() if "=" in line)
            if fields.get("READY") == "1" and not state["ready"]:
                manager.journal(name, "READY=1 received")
                state = manager.write(name, ready=True)
            if "STATUS" in fields:
                state = manager.write(name, status=fields["STATUS"])
            if "WATCHDOG" in fields or "READY" in fields:
                last_ping = time.monotonic()
    code = process.returncode
    signal_group(process.pid, signal.SIGKILL)  # what is left of its process group goes too (KillMode=control-group)
    how = f"code=exited, status={code}" if code >= 0 else f"code=killed, signal={signal.Signals(-code).name}"
    manager.journal(name, f"Main process exited, {how}")
    failed = not stopping and (code != 0 or state.get("timed_out") or unit.type == "notify" and not state["ready"])
    if state.get("timed_out"):
        how = f"Result: timeout, {how}"
    manager.write(name, result="stopped" if stopping else "exited", failed=bool(failed), exit=how)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="servicectl", description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=Path, required=True, help="where the unit files are installed (CTPI_UNIT_DIR)")
    parser.add_argument("--state", type=Path, required=True, help="this stand-in's own folder: loaded units, state, journals")
    parser.add_argument("--log", type=Path, default=None, help="append every call (verb and arguments) to this file")
    parser.add_argument("verb")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="systemctl's: unit names and flags")
    options = parser.parse_args(argv)
    args = list(options.args)
    lines = 10
    if "--lines" in args:  # the one flag with a value (-n N)
        at = args.index("--lines")
        lines = int(args[at + 1])
        del args[at : at + 2]
    flags = {arg for arg in args if arg.startswith("-")}
    names = [arg for arg in args if not arg.startswith("-")]
    if options.log is not None and options.verb != "_supervise":
        with open(options.log, "a", encoding="utf-8") as handle:
            handle.write(" ".join([options.verb, *options.args]) + "\n")
    manager = Manager(options.units, options.state)
    manager.state.mkdir(parents=True, exist_ok=True)
    try:
        if options.verb == "_supervise":
            return supervise(manager, names[0])
        if options.verb == "daemon-reload":
            manager.daemon_reload()
            return 0
        if options.verb == "enable":
            return 0
        if options.verb == "disable":
            return manager.stop(names) if "--now" in flags else 0
        if options.verb == "start":
            return manager.start(names)
        if options.verb == "stop":
            return manager.stop(names)
        if options.verb == "restart":
            manager.stop(names)
            return manager.start(names)
        if options.verb == "is-active":
            states = [manager.active_state(name) for name in names]
            if not flags & {"--quiet", "-q"}:
                print("\n".join(states))
            return 0 if states and all(state == "active" for state in states) else 3
        if options.verb == "status":
            return max(manager.status(name, lines) for name in names)
    except UnitError as error:
        print(f"servicectl: {error}", file=sys.stderr)
        return 1
    print(f"servicectl: unknown verb {options.verb!r}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

"""Helpers for the watch-daemon tests: real daemon processes, a real notify socket, slices."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tests.synthetic import slice_array

REPO = Path(__file__).resolve().parents[1]


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def slice_png(label: str, seed: int, size: tuple[int, int] = (96, 128)) -> bytes:
    array = slice_array(label, np.random.default_rng(seed), *size)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def drop(inbox: Path, relative: str, data: bytes) -> Path:
    """Drop a file the way a careful copier does: write a temporary name, then rename."""
    target = inbox / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    partial.write_bytes(data)
    os.rename(partial, target)
    return target


def inbox_files(inbox: Path) -> list[Path]:
    return sorted(p for p in inbox.rglob("*") if p.is_file() or p.is_symlink())


def rows(state: Path, sql: str = "SELECT * FROM slices ORDER BY id", args=()) -> list[dict]:
    path = state / "journal.sqlite"
    if not path.exists():
        return []
    connection = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=10)
    connection.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in connection.execute(sql, args)]
    except sqlite3.OperationalError:  # schema not created yet
        return []
    finally:
        connection.close()


class NotifySocket:
    """A real AF_UNIX datagram socket standing where systemd's would be."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="sdn")
        self.path = os.path.join(self.folder, "notify")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.socket.settimeout(0.1)
        self.messages: list[str] = []

    def receive(self, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.messages.append(self.socket.recv(4096).decode())
            except TimeoutError:
                break
        return self.messages

    def wait(self, text: str, timeout: float) -> None:
        wait_for(lambda: any(text in m.split("\n") for m in self.receive(0.1)), timeout, what=f"sd_notify {text}")

    def close(self) -> None:
        self.socket.close()
        os.unlink(self.path)
        os.rmdir(self.folder)


class DaemonProcess:
    """``ctpi watch`` as a real child process, ready when it has sent READY=1."""

    def __init__(self, inbox: Path, state: Path, model: Path, *extra: str, settle: float = 0.3, env: dict | None = None,
                 prefix: list[str] | None = None, log: Path | None = None):
        self.notify = NotifySocket()
        environment = dict(os.environ, NOTIFY_SOCKET=self.notify.path, PYTHONUNBUFFERED="1", **(env or {}))
        command = [sys.executable, "-m", "device.cli", "watch", "--inbox", str(inbox), "--state", str(state),
                   "--model", str(model), "--settle-seconds", str(settle), "--threads", "1", *extra]
        self.log_path = log or Path(tempfile.mkstemp(prefix="ctpi-watch-", suffix=".log")[1])
        self.log_handle = open(self.log_path, "ab")
        self.process = subprocess.Popen((prefix or []) + command, cwd=REPO, env=environment, stdout=self.log_handle,
                                        stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60.0) -> DaemonProcess:
        def ready():
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited with {self.process.returncode}:\n{self.output()}")
            return any("READY=1" in m.split("\n") for m in self.notify.receive(0.1))

        wait_for(ready, timeout, what="daemon readiness")
        return self

    def output(self) -> str:
        self.log_handle.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def terminate(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)

    def close(self) -> None:
        self.kill()
        self.log_handle.close()
        self.notify.close()

"""``ctpi run`` (what ``make run`` starts): watch daemon and web page together, stopped together."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.synthetic import POSITIVE, png_bytes, slice_array
from tests.test_browser import free_port

pytestmark = pytest.mark.slow


def wait_for(condition, seconds: float, what: str, process: subprocess.Popen, log: Path):
    deadline = time.monotonic() + seconds
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen (ctpi run exit {process.poll()}):\n{log.read_text()}")
        time.sleep(0.3)


def page_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
            return response.read().strip() == b"ok"
    except OSError:
        return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())


def test_run_starts_daemon_and_page_on_first_use_and_ctrl_c_stops_both(tmp_path, tiny_bundle):
    from device.watch.journal import Journal, JournalError

    inbox, state = tmp_path / "var" / "inbox", tmp_path / "var" / "state"  # not there yet: created on first use
    password_file = tmp_path / "config" / "ui-password"
    port = free_port()
    log = tmp_path / "run.log"
    command = [
        sys.executable, "-m", "device.cli", "run", "--model", str(tiny_bundle), "--models", str(tiny_bundle.parent),
        "--inbox", str(inbox), "--state", str(state), "--host", "127.0.0.1", "--port", str(port),
        "--password-file", str(password_file),
    ]  # fmt: skip
    with open(log, "w") as output:
        supervisor = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, env=dict(os.environ, HOME=str(tmp_path)))
    try:
        wait_for(lambda: page_answers(f"http://127.0.0.1:{port}"), 120, "the page answering", supervisor, log)
        assert inbox.is_dir() and state.is_dir()
        text = log.read_text()
        assert "no UI password is set yet" in text and f"ctpi passwd --password-file {password_file}" in text
        pids = [int(pid) for pid in re.findall(r"\(pid (\d+)\)", text)]
        assert len(pids) == 2 and all(alive(pid) for pid in pids)

        (inbox / ".covid.png.part").write_bytes(png_bytes(slice_array(POSITIVE, np.random.default_rng(9))))
        (inbox / ".covid.png.part").rename(inbox / "covid.png")

        def recorded() -> bool:
            try:
                with Journal.open_readonly(state) as journal:
                    return journal.counts()["ok"] == 1
            except JournalError:
                return False

        wait_for(recorded, 120, "the dropped slice being recorded", supervisor, log)

        supervisor.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
        assert supervisor.wait(timeout=40) == 0, log.read_text()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in pids), log.read_text()
        assert not page_answers(f"http://127.0.0.1:{port}")
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()


def test_run_refuses_a_missing_model_before_starting_anything(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "device.cli", "run", "--model", str(tmp_path / "no-such-bundle"), "--inbox", str(tmp_path / "inbox"),
         "--state", str(tmp_path / "state"), "--password-file", str(tmp_path / "pw")],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "no-such-bundle does not exist" in done.stderr
    assert not (tmp_path / "inbox").exists()


def test_run_stops_the_daemon_when_the_page_cannot_start(tmp_path, tiny_bundle):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "device.cli", "run", "--model", str(tiny_bundle), "--inbox", str(tmp_path / "inbox"),
             "--state", str(tmp_path / "state"), "--port", str(port), "--password-file", str(tmp_path / "pw")],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120, env=dict(os.environ, HOME=str(tmp_path)),
        )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "the web page exited with status 1; stopping the other" in done.stderr
    pids = [int(pid) for pid in re.findall(r"\(pid (\d+)\)", done.stderr)]
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)


def echo(port: int) -> bool:
    """C-ECHO from ``ECHO`` to ``CTPI`` at 127.0.0.1:``port`` (pynetdicom, a real association)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="ECHO")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="CTPI")
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return status is not None and status.Status == 0x0000
    finally:
        assoc.release()


def test_run_starts_the_dicom_node_when_the_config_names_a_port_and_stops_it_with_the_rest(tmp_path, tiny_bundle):
    pytest.importorskip("pynetdicom")
    page_port, dicom_port = free_port(), free_port()
    config = tmp_path / "ctpi.toml"
    config.write_text(f'[dicom]\nport = {dicom_port}\nallow = ["ECHO"]\n')
    log = tmp_path / "run.log"
    command = [
        sys.executable, "-m", "device.cli", "run", "--config", str(config), "--model", str(tiny_bundle), "--models", str(tiny_bundle.parent),
        "--inbox", str(tmp_path / "inbox"), "--state", str(tmp_path / "state"), "--host", "127.0.0.1", "--port", str(page_port),
        "--password-file", str(tmp_path / "pw"),
    ]  # fmt: skip
    with open(log, "w") as output:
        supervisor = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, env=dict(os.environ, HOME=str(tmp_path)))
    try:
        wait_for(lambda: echo(dicom_port), 120, "the DICOM node answering C-ECHO", supervisor, log)
        wait_for(lambda: page_answers(f"http://127.0.0.1:{page_port}"), 120, "the page answering", supervisor, log)
        text = log.read_text()
        assert re.search(rf"DICOM node \(pid \d+\) CTPI on 127\.0\.0\.1:{dicom_port}", text), text
        pids = [int(pid) for pid in re.findall(r"\(pid (\d+)\)", text)]
        assert len(pids) == 3 and all(alive(pid) for pid in pids)

        supervisor.send_signal(signal.SIGTERM)  # what systemd or kill sends
        assert supervisor.wait(timeout=60) == 0, log.read_text()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in pids), log.read_text()
        assert "stopping the watch daemon, the web page and the DICOM node" in log.read_text()
        assert "DICOM node stopped" in log.read_text()  # its own clean stop, not a kill
        assert not echo(dicom_port)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()

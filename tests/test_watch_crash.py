"""Crashes at the dangerous moments, for real: the daemon is SIGKILLed (kill -9) exactly between
"journal committed" and "file moved", and three times while decoding one file.

The daemon stops itself (SIGSTOP) at a named point when ``CTPI_TEST_PAUSE_AT`` asks for it
(:func:`device.watch.pause.pause_point`); the test then kills it there. Nothing is faked: the process,
its journal, its half-done moves and the restart are real."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from device.watch.pause import PAUSE_ENVIRONMENT
from tests.synthetic import NEGATIVE, POSITIVE
from tests.watchtools import DaemonProcess, drop, inbox_files, rows, sha256, slice_png, wait_for


def stopped(process) -> bool:
    """True once the process has stopped itself (state T in /proc), i.e. is parked at the point."""
    try:
        stat = Path(f"/proc/{process.pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] == "T"


def kill_at(daemon: DaemonProcess, timeout: float = 60.0) -> None:
    def parked():
        assert daemon.alive(), f"daemon exited before its pause point:\n{daemon.output()}"
        return stopped(daemon.process)

    wait_for(parked, timeout, what="the daemon to reach its pause point")
    os.kill(daemon.process.pid, signal.SIGKILL)
    daemon.process.wait(10)
    assert daemon.process.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_kill_between_commit_and_move_is_recovered_once(tmp_path, tiny_bundle):
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    contents = {f"study/s{i}.png": slice_png(POSITIVE if i % 2 else NEGATIVE, 40 + i) for i in range(6)}
    for name, data in contents.items():
        drop(inbox, name, data)
    daemon = DaemonProcess(inbox, state, tiny_bundle, settle=0.1, env={PAUSE_ENVIRONMENT: "committed"})
    try:
        kill_at(daemon)
        log = daemon.output()
    finally:
        daemon.close()
    assert "stopped at committed" in log
    committed = rows(state)
    # the dangerous state was really reached: results committed, files still in the inbox, none marked moved
    assert committed and all(r["moved_at"] is None for r in committed)
    assert all((inbox / r["path"]).exists() and not (state / r["stored_as"]).exists() for r in committed)

    daemon = DaemonProcess(inbox, state, tiny_bundle, settle=0.1)
    try:
        daemon.wait_ready()
        wait_for(lambda: not inbox_files(inbox) and len(rows(state)) == len(contents), 60, what="the restart")
        assert daemon.terminate() == 0
        log = daemon.output()
    finally:
        daemon.close()
    assert log.count("finished interrupted move") == len(committed)
    records = rows(state)
    assert len(records) == len(contents) and {r["path"]: r["sha256"] for r in records} == {
        name: sha256(data) for name, data in contents.items()
    }
    assert all(r["moved_at"] and sha256((state / r["stored_as"]).read_bytes()) == r["sha256"] for r in records)


@pytest.mark.slow
def test_three_real_crashes_on_one_file_set_it_aside(tmp_path, tiny_bundle):
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    drop(inbox, "s/poison.png", slice_png(POSITIVE, 1))
    pause = {PAUSE_ENVIRONMENT: "decoding:s/poison.png"}
    for _life in range(3):  # max_attempts: three deaths while decoding it
        daemon = DaemonProcess(inbox, state, tiny_bundle, settle=0.1, env=pause)
        try:
            kill_at(daemon)
        finally:
            daemon.close()
        assert (inbox / "s" / "poison.png").exists() and not [r for r in rows(state) if r["path"] == "s/poison.png"]
    drop(inbox, "s/healthy.png", slice_png(NEGATIVE, 2))
    daemon = DaemonProcess(inbox, state, tiny_bundle, settle=0.1, env=pause)  # would stop again if it decoded it
    try:
        daemon.wait_ready()
        wait_for(lambda: not inbox_files(inbox), 60, what="both files to leave the inbox")
        assert not stopped(daemon.process)
        assert daemon.terminate() == 0
    finally:
        daemon.close()
    records = {r["path"]: r for r in rows(state)}
    poison = records["s/poison.png"]
    assert poison["status"] == "rejected" and poison["reason"] == "crashed-daemon"
    assert "stopped 3 times" in poison["message"]
    assert (state / poison["stored_as"]).is_file() and "rejected" in poison["stored_as"]
    assert records["s/healthy.png"]["status"] == "ok"  # the daemon goes on with the rest

"""Crash safety: files keep arriving while the daemon is SIGKILLed and restarted every second.

Every third life is killed exactly between "journal committed" and "file moved" (the daemon
parks itself there when asked, see tests/test_watch_crash.py); the others at a random moment."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from device.watch.pause import PAUSE_ENVIRONMENT
from tests.synthetic import NEGATIVE, POSITIVE
from tests.test_watch_crash import stopped
from tests.watchtools import DaemonProcess, drop, inbox_files, rows, sha256, slice_png, wait_for

FILES = 300
KILLS = 12
DUPLICATE_CONTENT = 10  # the last files repeat earlier content under new names: separate drops


@pytest.mark.slow
def test_killed_daemon_loses_no_slice(tmp_path, tiny_bundle):
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    contents = [slice_png(POSITIVE if i % 3 == 0 else NEGATIVE, i) for i in range(FILES - DUPLICATE_CONTENT)]
    contents += contents[:DUPLICATE_CONTENT]
    names = [f"study{i % 7}/slice_{i:04d}.png" for i in range(FILES)]
    expected = dict(zip(names, (sha256(c) for c in contents), strict=True))

    def writer():
        for name, data in zip(names, contents, strict=True):
            drop(inbox, name, data)
            time.sleep(0.03)  # about 10 s of arrivals

    arrivals = threading.Thread(target=writer)
    arrivals.start()
    rng = random.Random(5)
    kills, window_kills, logs, deadline = 0, 0, [], time.monotonic() + 120
    while kills < KILLS or arrivals.is_alive() or inbox_files(inbox):
        assert time.monotonic() < deadline, f"soak did not finish: {len(inbox_files(inbox))} files left"
        in_window = kills < KILLS and kills % 3 == 2 and (arrivals.is_alive() or bool(inbox_files(inbox)))
        env = {PAUSE_ENVIRONMENT: "committed"} if in_window else None
        daemon = DaemonProcess(inbox, state, tiny_bundle, "--log-format", "json", settle=0.2, env=env)
        try:
            daemon.wait_ready()
            if in_window:
                wait_for(lambda process=daemon.process: stopped(process), 30, what="the daemon to park after a commit")
                os.kill(daemon.process.pid, signal.SIGKILL)  # committed, not moved
                daemon.process.wait(10)
                window_kills += 1
                kills += 1
            elif kills < KILLS:
                time.sleep(rng.uniform(0.3, 1.0))
                daemon.kill()  # SIGKILL: no cleanup, mid-commit or mid-move
                kills += 1
            else:
                wait_for(lambda: not arrivals.is_alive() and not inbox_files(inbox), 60, what="the last files")
                assert daemon.terminate() == 0
        finally:
            daemon.close()
            logs.append(daemon.log_path.read_text(errors="replace"))
    arrivals.join()
    recovered = sum(log.count('"event": "recovered"') for log in logs)
    print(f"{kills} kills, {window_kills} between commit and move, {recovered} interrupted moves recovered")
    assert window_kills >= 2 and recovered >= window_kills  # each window kill left at least one move to finish
    records = rows(state)
    assert len(records) == FILES, f"{len(records)} records for {FILES} files"
    assert len({r["path"] for r in records}) == FILES, "a file was recorded twice"
    assert {r["path"]: r["sha256"] for r in records} == expected
    assert all(r["status"] == "ok" and r["moved_at"] for r in records)
    for record in records:
        assert sha256((state / record["stored_as"]).read_bytes()) == record["sha256"]
    stored = [p for p in (state / "done").rglob("*") if p.is_file()]
    assert len(stored) == FILES and inbox_files(inbox) == []

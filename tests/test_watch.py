"""The watch daemon: every dropped slice triaged exactly once, with real files, SQLite and processes."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from device.config import WatchConfig
from device.watch.journal import Journal
from tests.synthetic import NEGATIVE, POSITIVE
from tests.watchtools import REPO, DaemonProcess, drop, inbox_files, rows, sha256, slice_png, wait_for


@pytest.fixture()
def folders(tmp_path):
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    return inbox, state


def ctpi(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "device.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def run_once(inbox: Path, state: Path, model: Path, *extra: str) -> subprocess.CompletedProcess:
    return ctpi("watch", "--inbox", str(inbox), "--state", str(state), "--model", str(model), "--once",
                "--settle-seconds", "0.2", "--threads", "1", *extra)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares a size and holds no pixels (a decompression-bomb header)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def image_bytes(array: np.ndarray, fmt: str = "PNG", mode: str | None = None, **save) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def test_once_triages_every_slice_and_moves_it(folders, tiny_bundle):
    inbox, state = folders
    drop(inbox, "covid.png", slice_png(POSITIVE, 1))
    drop(inbox, "normal.png", slice_png(NEGATIVE, 2))
    result = run_once(inbox, state, tiny_bundle)
    assert result.returncode == 0, result.stderr
    records = {r["path"]: r for r in rows(state)}
    assert records["covid.png"]["label"] == POSITIVE and records["normal.png"]["label"] == NEGATIVE
    assert all(r["status"] == "ok" and r["moved_at"] for r in records.values())
    assert inbox_files(inbox) == []
    for record in records.values():
        assert sha256((state / record["stored_as"]).read_bytes()) == record["sha256"]
        assert record["model_sha256"] and len(record["model_sha256"]) == 64


def test_slow_writer_gets_one_record_of_the_complete_file(folders, tiny_bundle):
    inbox, state = folders
    data = slice_png(POSITIVE, 7, size=(384, 384))
    daemon = DaemonProcess(inbox, state, tiny_bundle, settle=1.0).wait_ready()
    try:
        target = inbox / "slow.png"
        chunks = [data[i : i + len(data) // 8 + 1] for i in range(0, len(data), len(data) // 8 + 1)]
        for chunk in chunks:  # open, append, close: every chunk is a close-write event
            with open(target, "ab") as handle:
                handle.write(chunk)
            time.sleep(0.4)
        wait_for(lambda: rows(state) and not target.exists(), 30, what="the slow file to be recorded")
        time.sleep(1.5)  # nothing more may be recorded afterwards
        records = rows(state)
        assert len(records) == 1
        assert records[0]["status"] == "ok" and records[0]["sha256"] == sha256(data) and records[0]["size"] == len(data)
    finally:
        assert daemon.terminate() == 0, daemon.output()
        daemon.close()


def test_bad_inputs_are_rejected_with_a_reason_and_the_daemon_keeps_working(folders, tiny_bundle, tmp_path):
    inbox, state = folders
    rng = np.random.default_rng(3)
    grey = rng.integers(0, 255, (64, 64), dtype=np.uint8)
    good = slice_png(POSITIVE, 4)
    outside = tmp_path / "outside.png"
    outside.write_bytes(good)
    expected = {
        "zero.png": ("rejected", "empty"),
        "truncated.png": ("rejected", "truncated"),
        "text.png": ("rejected", "not-an-image"),
        "one_pixel.png": ("rejected", "too-small"),
        "bomb.png": ("rejected", "too-large"),
        "link_outside.png": ("rejected", "symlink-outside-inbox"),
        "sixteen_bit.png": ("ok", None),
        "rgba.png": ("ok", None),
        "palette.png": ("ok", None),
        "photo.jpg": ("ok", None),
        "study 1/ünïcödé slice ✓.png": ("ok", None),
        "study 1/name with  spaces.png": ("ok", None),
    }
    daemon = DaemonProcess(inbox, state, tiny_bundle).wait_ready()
    try:
        drop(inbox, "good_before.png", good)
        (inbox / "zero.png").write_bytes(b"")
        drop(inbox, "truncated.png", good[: len(good) // 2])
        drop(inbox, "text.png", b"this is a radiology report, not an image\n" * 10)
        drop(inbox, "one_pixel.png", image_bytes(np.zeros((1, 1), np.uint8)))
        drop(inbox, "bomb.png", png_header(30000, 30000))
        (inbox / "link_outside.png").symlink_to(outside)
        drop(inbox, "sixteen_bit.png", image_bytes(grey.astype(np.uint16) * 200))
        drop(inbox, "rgba.png", image_bytes(np.dstack([grey, grey, grey, np.full_like(grey, 200)])))
        drop(inbox, "palette.png", image_bytes(np.dstack([grey] * 3), mode="P"))
        drop(inbox, "photo.jpg", image_bytes(grey, "JPEG"))
        drop(inbox, "study 1/ünïcödé slice ✓.png", slice_png(NEGATIVE, 5))
        drop(inbox, "study 1/name with  spaces.png", slice_png(NEGATIVE, 6))
        vanishing = inbox / "vanishing.png"
        vanishing.write_bytes(good)
        vanishing.unlink()  # deleted before it could be read
        drop(inbox, "good_after.png", slice_png(NEGATIVE, 8))
        wait_for(lambda: not inbox_files(inbox), 60, what="the inbox to empty")
        assert daemon.alive()
        records = {r["path"]: r for r in rows(state)}
        for name, (status, reason) in expected.items():
            assert records[name]["status"] == status, (name, records[name])
            assert records[name]["reason"] == reason, (name, records[name])
            if status == "rejected":
                assert records[name]["message"]
        assert records["good_before.png"]["status"] == records["good_after.png"]["status"] == "ok"
        assert "vanishing.png" not in records or records["vanishing.png"]["reason"] == "missing"
        assert outside.read_bytes() == good  # a link's target is never moved or read
        assert (state / records["link_outside.png"]["stored_as"]).is_symlink()
        assert len(records) == len(rows(state)) and len(records) in (len(expected) + 2, len(expected) + 3)
        drop(inbox, "still_alive.png", good)  # still taking files
        wait_for(lambda: len(rows(state, "SELECT id FROM slices WHERE path = 'still_alive.png'")) == 1, 30, what="one more slice")
    finally:
        assert daemon.terminate() == 0, daemon.output()
        daemon.close()


def test_sigterm_finishes_the_current_slice_and_exits_cleanly(folders, tiny_bundle):
    inbox, state = folders
    names = [f"s{index:03d}.png" for index in range(40)]
    for index, name in enumerate(names):
        drop(inbox, name, slice_png(POSITIVE if index % 2 else NEGATIVE, index, size=(256, 256)))
    daemon = DaemonProcess(inbox, state, tiny_bundle, "--log-format", "json").wait_ready()
    try:
        wait_for(lambda: rows(state), 30, what="a first record")
        assert daemon.terminate(timeout=15) == 0
        daemon.notify.wait("STOPPING=1", 5)
        log = [json.loads(line) for line in daemon.output().splitlines() if line.startswith("{")]
        assert any(entry.get("event") == "stopped" for entry in log)
    finally:
        daemon.close()
    records = rows(state)
    assert all(r["moved_at"] for r in records), "every record's file was moved before exiting"
    left = {p.name for p in inbox_files(inbox)}
    assert left.isdisjoint({r["path"] for r in records}) and len(left) + len(records) == len(names)
    with Journal.open_readonly(state) as journal:
        assert journal.heartbeat()["state"] == "stopped"
    assert run_once(inbox, state, tiny_bundle).returncode == 0
    assert sorted(r["path"] for r in rows(state)) == names


def test_sd_notify_ready_watchdog_and_stopping_arrive_on_a_real_socket(folders, tiny_bundle):
    inbox, state = folders
    daemon = DaemonProcess(inbox, state, tiny_bundle, env={"WATCHDOG_USEC": "200000"})
    try:
        daemon.wait_ready()
        ready_at = len(daemon.notify.messages)
        assert rows(state, "SELECT * FROM heartbeat"), "READY=1 only after the journal is open"
        daemon.notify.wait("WATCHDOG=1", 5)
        time.sleep(1.0)
        pings = [m for m in daemon.notify.receive(0.2)[ready_at:] if m == "WATCHDOG=1"]
        assert len(pings) >= 5, "pinged at half of WATCHDOG_USEC"
        assert daemon.terminate() == 0
        daemon.notify.wait("STOPPING=1", 5)
    finally:
        daemon.close()


def test_read_only_state_folder_stops_intake_and_loses_nothing(folders, tiny_bundle):
    inbox, state = folders
    assert run_once(inbox, state, tiny_bundle).returncode == 0  # the journal exists
    drop(inbox, "a.png", slice_png(POSITIVE, 1))
    drop(inbox, "b.png", slice_png(NEGATIVE, 2))
    if os.geteuid() == 0:  # root writes through permissions: mount the folder read-only instead
        if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
            pytest.skip("running as root without unshare(1) user namespaces: cannot make a read-only folder")
        script = f'mount --bind "{state}" "{state}" && mount -o remount,bind,ro "{state}" && exec "$@"'
        prefix = ["unshare", "-rm", "sh", "-c", script, "sh"]
    else:
        state.chmod(0o555)
        prefix = []
    try:
        daemon = DaemonProcess(inbox, state, tiny_bundle, prefix=prefix)
        try:
            code = daemon.process.wait(60)
            output = daemon.output()
        finally:
            daemon.close()
    finally:
        state.chmod(0o755)
    assert code == 1, output
    assert "read-only" in output and "no file was taken" in output
    assert {p.name for p in inbox_files(inbox)} == {"a.png", "b.png"} and rows(state) == []
    assert run_once(inbox, state, tiny_bundle).returncode == 0
    assert sorted(r["path"] for r in rows(state)) == ["a.png", "b.png"] and inbox_files(inbox) == []


def test_low_disk_space_pauses_intake_until_space_returns(folders, tiny_bundle, caplog):
    from device.tools.results import gather_status
    from device.watch.daemon import Daemon

    inbox, state = folders
    config = WatchConfig(inbox=inbox, state=state, model=tiny_bundle, threads=1, settle_seconds=0.2,
                         heartbeat_seconds=0.2, retry_seconds=0.2)
    daemon = Daemon(config)
    checks = {}

    def operator():
        try:
            wait_for(lambda: rows(state, "SELECT * FROM heartbeat"), 30, what="heartbeat")
            daemon.config = replace(config, min_free_mb=1e12)  # more than any disk has
            wait_for(lambda: daemon.blocked, 10, what="intake to stop")
            drop(inbox, "a.png", slice_png(POSITIVE, 1))
            drop(inbox, "b.png", slice_png(NEGATIVE, 2))
            time.sleep(1.5)
            checks["paused"] = (rows(state), sorted(p.name for p in inbox_files(inbox)), daemon.blocked)
            checks["status"] = gather_status(state)
            daemon.config = config  # space is back
            wait_for(lambda: not inbox_files(inbox), 30, what="the inbox to empty")
            wait_for(lambda: len(rows(state)) == 2, 10, what="two records")
        finally:
            daemon.request_stop()

    helper = threading.Thread(target=operator)
    helper.start()
    with caplog.at_level("ERROR", logger="device.watch"):
        code = daemon.run()
    helper.join()
    assert code == 0
    recorded, waiting, message = checks["paused"]
    assert recorded == [] and waiting == ["a.png", "b.png"]
    assert "min_free_mb" in message and any("stopped taking files" in r.getMessage() for r in caplog.records)
    assert sorted(r["path"] for r in rows(state)) == ["a.png", "b.png"]
    status = checks["status"]
    assert status["daemon"] == "blocked" and not status["healthy"] and "min_free_mb" in status["heartbeat"]["message"]


def test_study_verdict_follows_its_slices_as_they_arrive(folders, tiny_bundle):
    inbox, state = folders
    for index in range(3):
        drop(inbox, f"patient-1/n{index}.png", slice_png(NEGATIVE, 10 + index))
    drop(inbox, "patient-2/n0.png", slice_png(NEGATIVE, 20))
    assert run_once(inbox, state, tiny_bundle).returncode == 0
    with Journal.open_readonly(state) as journal:
        first = journal.study("patient-1")
        assert first["label"] == NEGATIVE and first["slices"] == 3 and first["positive_slices"] == 0
        assert first["rule"] == "max"
    drop(inbox, "patient-1/p0.png", slice_png(POSITIVE, 30))
    drop(inbox, "patient-1/broken.png", b"not an image")
    assert run_once(inbox, state, tiny_bundle).returncode == 0
    with Journal.open_readonly(state) as journal:
        study = journal.study("patient-1")
        slices = journal.query_slices(study="patient-1")
        other = journal.study("patient-2")
    readable = [s for s in slices if s["status"] == "ok"]
    assert study["label"] == POSITIVE and study["slices"] == 4 and study["rejected"] == 1 and study["positive_slices"] == 1
    assert study["probability"] == pytest.approx(max(s["positive_probability"] for s in readable))
    assert study["top_slice_id"] == next(s["id"] for s in readable if s["path"] == "patient-1/p0.png")
    assert other["label"] == NEGATIVE and other["slices"] == 1


def test_results_and_status_report_what_the_journal_holds(folders, tiny_bundle):
    inbox, state = folders
    drop(inbox, "st/a.png", slice_png(POSITIVE, 1))
    drop(inbox, "st/b.png", slice_png(NEGATIVE, 2))
    drop(inbox, "junk.png", b"junk")
    assert run_once(inbox, state, tiny_bundle).returncode == 0
    as_json = json.loads(ctpi("results", "--state", str(state), "--json").stdout)
    assert sorted(s["path"] for s in as_json["slices"]) == ["junk.png", "st/a.png", "st/b.png"]
    assert as_json["studies"][0]["name"] == "st" and as_json["studies"][0]["label"] == POSITIVE
    table = list(csv.DictReader(io.StringIO(ctpi("results", "--state", str(state), "--csv", "--study", "st").stdout)))
    assert sorted(r["path"] for r in table) == ["st/a.png", "st/b.png"] and all(len(r["model_sha256"]) == 64 for r in table)
    assert json.loads(ctpi("results", "--state", str(state), "--json", "--since", "1h").stdout)["slices"]
    assert json.loads(ctpi("results", "--state", str(state), "--json", "--since", "2999-01-01").stdout)["slices"] == []
    text = ctpi("results", "--state", str(state)).stdout
    assert "REJECTED" in text and "not-an-image" in text and "st/a.png" in text
    status = ctpi("status", "--state", str(state), "--json")
    assert status.returncode == 1  # the --once daemon has stopped
    report = json.loads(status.stdout)
    assert report["daemon"] == "stopped" and report["counts"]["ok"] == 2 and report["counts"]["rejected"] == 1
    assert report["heartbeat"]["model"]["name"] == "tiny-texture" and report["disk"]["free_mb"] > 0
    daemon = DaemonProcess(inbox, state, tiny_bundle).wait_ready()
    try:
        running = ctpi("status", "--state", str(state))
        assert running.returncode == 0, running.stdout
        assert "running" in running.stdout and "tiny-texture" in running.stdout and "disk free" in running.stdout
    finally:
        daemon.terminate()
        daemon.close()
    missing = ctpi("status", "--state", str(state.parent / "nowhere"))
    assert missing.returncode == 2 and "has `ctpi watch" in missing.stderr


def test_temporary_names_are_never_read(folders, tiny_bundle):
    inbox, state = folders
    for name in (".hidden.png", "copying.png.part", "x.tmp", "download.png.crdownload", ".sync/inner.png"):
        (inbox / name).parent.mkdir(parents=True, exist_ok=True)
        (inbox / name).write_bytes(slice_png(POSITIVE, 1))
    drop(inbox, "real.png", slice_png(POSITIVE, 1))
    assert run_once(inbox, state, tiny_bundle).returncode == 0
    assert [r["path"] for r in rows(state)] == ["real.png"]
    assert len(inbox_files(inbox)) == 5


def test_a_restart_finishes_an_interrupted_move_without_a_second_record(folders, tiny_bundle):
    """The crash window between commit and move: the record exists, the file is still in the inbox."""
    inbox, state = folders
    data = slice_png(POSITIVE, 1)
    drop(inbox, "a.png", data)
    assert run_once(inbox, state, tiny_bundle).returncode == 0
    (record,) = rows(state)
    stored = state / record["stored_as"]
    os.rename(stored, inbox / "a.png")  # as if the power went after the commit, before the rename
    with Journal.open(state) as journal:
        journal._write(lambda db: db.execute("UPDATE slices SET moved_at = NULL"))
    assert run_once(inbox, state, tiny_bundle).returncode == 0
    (again,) = rows(state)
    assert again["id"] == record["id"] and again["moved_at"] and stored.read_bytes() == data
    drop(inbox, "a.png", data)  # the same content dropped again later is a new drop
    assert run_once(inbox, state, tiny_bundle).returncode == 0
    assert [r["path"] for r in rows(state)] == ["a.png", "a.png"]


def test_config_file_sets_the_daemon_and_flags_override_it(folders, tiny_bundle, tmp_path):
    inbox, state = folders
    config = tmp_path / "ctpi.toml"
    config.write_text(f'[watch]\ninbox = "{inbox}"\nstate = "{tmp_path / "elsewhere"}"\nmodel = "{tiny_bundle}"\n'
                      'settle_seconds = 0.2\nlog_format = "json"\n')
    drop(inbox, "a.png", slice_png(POSITIVE, 1))
    result = ctpi("watch", "--config", str(config), "--state", str(state), "--once")
    assert result.returncode == 0, result.stderr
    assert [r["path"] for r in rows(state)] == ["a.png"] and not (tmp_path / "elsewhere").exists()
    assert any(json.loads(line).get("event") == "slice" for line in result.stderr.splitlines() if line.startswith("{"))
    config.write_text('[watch]\nsettle_secnds = 1\n')
    bad = ctpi("watch", "--config", str(config), "--once")
    assert bad.returncode == 2 and "settle_secnds" in bad.stderr


def test_a_file_rewritten_after_it_was_read_is_not_moved_under_the_old_record(folders, tiny_bundle):
    from device.watch.daemon import Daemon

    inbox, state = folders
    first, second = slice_png(POSITIVE, 1), slice_png(NEGATIVE, 2)
    drop(inbox, "a.png", first)
    daemon = Daemon(WatchConfig(inbox=inbox, state=state, model=tiny_bundle, threads=1, settle_seconds=0.1))
    daemon.check_storage()
    item = daemon.reader.read("a.png", time.time())
    drop(inbox, "a.png", second)  # the writer came back after the settle time
    daemon.batch = [daemon.infer(item)]
    daemon.flush()
    daemon.journal.close()
    (record,) = rows(state)
    assert record["sha256"] == sha256(first) and record["moved_at"] and (inbox / "a.png").read_bytes() == second
    assert run_once(inbox, state, tiny_bundle).returncode == 0
    assert [r["sha256"] for r in rows(state)] == [sha256(first), sha256(second)] and inbox_files(inbox) == []


def test_a_file_that_keeps_killing_the_daemon_is_set_aside(folders, tiny_bundle):
    """A poison file (decoder crash, memory limit) must not hold the appliance in a restart loop."""
    from device.watch.journal import Journal as WritableJournal

    inbox, state = folders
    drop(inbox, "poison.png", slice_png(POSITIVE, 1))
    drop(inbox, "fine.png", slice_png(NEGATIVE, 2))
    info = os.lstat(inbox / "poison.png")
    signature = json.dumps([info.st_size, info.st_mtime_ns, info.st_ino])
    state.mkdir()
    with WritableJournal.open(state) as journal:
        for _ in range(3):  # three lives that died while decoding it
            journal.claim("poison.png", signature)
    assert run_once(inbox, state, tiny_bundle).returncode == 0
    records = {r["path"]: r for r in rows(state)}
    assert records["poison.png"]["reason"] == "crashed-daemon" and records["fine.png"]["status"] == "ok"
    assert rows(state, "SELECT * FROM claims") == []


def test_config_errors_name_the_file_and_key(tmp_path):
    from device.config import ConfigError, LogFormat, load_config

    path = tmp_path / "ctpi.toml"
    path.write_text('[watch]\nsettle_seconds = 2\nignore = ["*.part"]\nlog_format = "json"\n')
    watch = load_config(path).watch
    assert watch.settle_seconds == 2.0 and watch.ignore == ("*.part",) and watch.log_format is LogFormat.JSON
    for text, message in (
        ('[wach]\n', "unknown section"),
        ('[watch]\nsettle_seconds = "soon"\n', "settle_seconds: expected a number"),
        ('[watch]\nlog_format = "xml"\n', "log_format: 'xml' is not one of"),
        ('[watch]\nbatch_size = 1.5\n', "batch_size: expected int"),
        ("[watch\n", "not valid TOML"),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError, match=message) as error:
            load_config(path)
        assert str(path) in str(error.value)


def test_ctpi_config_names_the_file_read_when_it_exists(tmp_path, monkeypatch):
    """The units set CTPI_CONFIG (a deploy moves its folder); the file stays optional."""
    from device.config import DEFAULT_PATHS, find_config, load_config

    path = tmp_path / "ctpi.toml"
    path.write_text("[ui]\nport = 18501\n")
    monkeypatch.setenv("CTPI_CONFIG", str(path))
    assert find_config() == path and load_config().ui.port == 18501
    monkeypatch.setenv("CTPI_CONFIG", str(tmp_path / "absent.toml"))  # a Pi without settings: the defaults
    assert find_config() == next((p for p in DEFAULT_PATHS if p.is_file()), None)


def test_sd_notify_reaches_an_abstract_socket_and_is_silent_outside_systemd():
    import socket
    import uuid

    from device.watch.sdnotify import Notifier

    name = f"ctpi-test-{uuid.uuid4().hex}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name)
    receiver.settimeout(5)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "30000000"})
        assert notifier.ready(status="watching") and notifier.ping_interval == 15.0
        assert receiver.recv(4096) == b"READY=1\nSTATUS=watching"
    finally:
        receiver.close()
    outside = Notifier({})
    assert not outside.enabled and not outside.ready() and outside.ping_interval is None


def test_retention_deletes_old_triaged_images_and_keeps_their_results(folders, tiny_bundle):
    inbox, state = folders
    drop(inbox, "patient-1/a.png", slice_png(POSITIVE, 1))
    drop(inbox, "patient-1/b.png", slice_png(NEGATIVE, 2))
    drop(inbox, "junk.png", b"junk")
    assert run_once(inbox, state, tiny_bundle).returncode == 0  # default: keep every image
    before = {r["path"]: r for r in rows(state)}
    assert all((state / r["stored_as"]).is_file() for r in before.values())

    time.sleep(1.2)
    drop(inbox, "patient-2/c.png", slice_png(NEGATIVE, 3))  # arrives now: younger than the cutoff
    result = run_once(inbox, state, tiny_bundle, "--keep-done-days", str(1.0 / 86400))
    assert result.returncode == 0, result.stderr
    after = {r["path"]: r for r in rows(state)}
    for path in ("patient-1/a.png", "patient-1/b.png"):
        assert not (state / before[path]["stored_as"]).exists() and after[path]["pruned_at"]
        assert after[path]["label"] == before[path]["label"] and after[path]["sha256"] == before[path]["sha256"]
    assert not (state / "done" / "patient-1").exists()  # the emptied study folder goes too
    assert (state / after["junk.png"]["stored_as"]).is_file() and after["junk.png"]["pruned_at"] is None
    assert (state / after["patient-2/c.png"]["stored_as"]).is_file() and after["patient-2/c.png"]["pruned_at"] is None
    with Journal.open_readonly(state) as journal:
        assert journal.study("patient-1")["slices"] == 2 and journal.counts()["pruned"] == 2
    assert "deleted by retention" in ctpi("status", "--state", str(state)).stdout


def test_a_refused_file_does_not_keep_its_decoded_image_alive(tmp_path):
    """A refusal travels through the reader's bounded queue as an item; its error must not
    carry the traceback, whose frame holds the file's bytes and its full-size decoded image
    (a queue of refused 512x512 slices doubled the daemon's memory)."""
    import gc
    import time
    import weakref

    import numpy as np

    from device.core.preprocess import BadSliceError, PreprocessSpec
    from device.watch.reader import Reader
    from tests.synthetic import png_bytes

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "photo.png").write_bytes(png_bytes(np.random.default_rng(0).integers(0, 256, (512, 512), dtype=np.uint8)))
    decoded_seen = []

    def refuse(decoded):
        decoded_seen.append(weakref.ref(decoded.pixels))
        raise BadSliceError("not-ct", "looks like noise, not a CT slice")

    reader = Reader(inbox, PreprocessSpec(32, 32, 1), queue_size=4)
    reader.check = refuse
    item = reader.read("photo.png", time.time())
    assert item.error.reason == "not-ct" and item.pixels is None
    assert item.error.__traceback__ is None
    gc.collect()
    assert decoded_seen and decoded_seen[0]() is None  # the decoded image is gone with the frame

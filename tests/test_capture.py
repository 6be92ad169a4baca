"""``ctpi capture``: stills land in the inbox atomically, on schedule, from the camera the seam names.

The camera is the one fake the project allows: :class:`StandInCamera` sits at the seam
(``--camera tests.test_capture:StandInCamera`` or ``CTPI_CAMERA``) and returns numpy frames.
Everything else is real: files, renames, inotify (watchdog), signals, the CLI.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from device.cli import main
from device.tools.capture import camera_available, capture_once, capture_stills

REPO = Path(__file__).resolve().parent.parent
SEAM = "tests.test_capture:StandInCamera"


class StandInCamera:
    """Returns seeded RGB noise frames (big enough that writing one takes a while) and records
    when each was taken. ``capture_seconds`` makes the camera slow, like a real exposure."""

    instances: list[StandInCamera] = []
    shape = (600, 800, 3)
    capture_seconds = 0.0

    def __init__(self):
        self.rng = np.random.default_rng(len(StandInCamera.instances))
        self.frames: list[np.ndarray] = []
        self.times: list[float] = []
        self.closed = False
        StandInCamera.instances.append(self)

    def capture(self) -> np.ndarray:
        self.times.append(time.monotonic())
        time.sleep(self.capture_seconds)
        frame = self.rng.integers(0, 256, size=self.shape, dtype=np.uint8)
        self.frames.append(frame)
        return frame

    def close(self) -> None:
        self.closed = True


@pytest.fixture(autouse=True)
def fresh_stand_in():
    StandInCamera.instances.clear()
    StandInCamera.capture_seconds = 0.0
    yield
    StandInCamera.instances.clear()


def is_temporary(name: str) -> bool:
    """What the watch daemon ignores."""
    return name.startswith(".") or name.endswith((".part", ".tmp", ".crdownload"))


class Recorder(FileSystemEventHandler):
    def __init__(self):
        self.events = []

    def on_any_event(self, event):
        self.events.append(event)


def test_stills_appear_in_the_inbox_only_by_rename_from_a_hidden_part_file(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    recorder = Recorder()
    observer = Observer()
    observer.schedule(recorder, str(inbox))
    observer.start()
    try:
        camera = StandInCamera()
        written = capture_stills(camera, inbox, every=0.0, count=5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            moved = [e for e in recorder.events if e.event_type == "moved"]
            if len(moved) >= 5:
                break
            time.sleep(0.05)
    finally:
        observer.stop()
        observer.join()

    assert len(written) == 5 and all(path.parent == inbox for path in written)
    final_names = {path.name for path in written}
    file_events = [e for e in recorder.events if not e.is_directory]
    for event in file_events:
        if event.event_type == "moved":
            assert is_temporary(Path(event.src_path).name), event
            assert Path(event.dest_path).name in final_names, event
        elif event.event_type != "deleted":
            # created / modified / closed / opened: only ever under the temporary name
            assert is_temporary(Path(event.src_path).name), f"{event.event_type} under a final name: {event.src_path}"
    assert sorted(Path(e.dest_path).name for e in file_events if e.event_type == "moved") == sorted(final_names)
    assert any(e.event_type == "modified" for e in file_events), "inotify saw no writes at all: the check proves nothing"
    assert sorted(p.name for p in inbox.iterdir()) == sorted(final_names), "temporary files were left behind"
    for path, frame in zip(written, camera.frames, strict=True):
        assert np.array_equal(np.asarray(Image.open(path)), frame)


def test_every_and_count_take_that_many_stills_into_the_inbox(tmp_path, capsys):
    StandInCamera.capture_seconds = 0.05
    code = main(["capture", "--inbox", str(tmp_path / "inbox"), "--every", "0.1", "--count", "4", "--camera", SEAM])
    assert code == 0
    camera = StandInCamera.instances[0]
    assert camera.closed and len(camera.times) == 4
    assert all(later > earlier for earlier, later in zip(camera.times, camera.times[1:], strict=False))
    printed = capsys.readouterr().out.split()
    assert len(printed) == 4 and all(Path(p).is_file() for p in printed)
    assert sorted(p.name for p in (tmp_path / "inbox").iterdir()) == sorted(Path(p).name for p in printed)


class SimulatedTime:
    """A clock that only moves when the code waits (``wait``) or the camera works (``spend``):
    the schedule is then checked exactly, whatever the machine's load."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds

    def is_set(self) -> bool:  # the stop event's interface: never stopped
        return False

    def wait(self, seconds: float) -> bool:
        self.now += seconds
        return False


@pytest.mark.parametrize("capture_seconds", [0.0, 0.25, 0.7], ids=["instant", "slow", "slower-than-every"])
def test_stills_follow_a_fixed_schedule_that_slow_captures_do_not_drift(tmp_path, capture_seconds):
    from device.tools.capture import capture_stills

    time_source, taken = SimulatedTime(), []

    class TimedCamera:
        def capture(self):
            taken.append(time_source())
            time_source.spend(capture_seconds)  # the exposure and read-out
            return np.zeros((16, 16, 3), np.uint8)

    every, count = 0.5, 5
    capture_stills(TimedCamera(), tmp_path / "inbox", every, count, stop=time_source, clock=time_source)
    start = taken[0]
    # on schedule start + k * every while a capture fits in the interval; a drifting loop would
    # add capture_seconds per still. A capture longer than the interval takes the next still at once.
    expected = [start + k * max(every, capture_seconds) for k in range(count)]
    assert taken == pytest.approx(expected, abs=1e-9)
    assert len(list((tmp_path / "inbox").glob("*.png"))) == count


def test_count_zero_captures_until_terminated_and_exits_cleanly(tmp_path):
    inbox = tmp_path / "inbox"
    env = {**os.environ, "CTPI_CAMERA": SEAM, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "device.cli", "capture", "--inbox", str(inbox), "--every", "0.1", "--count", "0"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(inbox.glob("*.png"))) < 3:
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    stills = sorted(p.name for p in inbox.iterdir())
    assert len(stills) >= 3 and not any(is_temporary(name) for name in stills)
    assert sorted(Path(line).name for line in out.split()) == stills


@pytest.mark.skipif(importlib.util.find_spec("picamera2") is not None, reason="picamera2 is installed here")
def test_missing_picamera2_is_a_clear_error_and_never_falls_back(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CTPI_CAMERA", raising=False)
    code = main(["capture", "--inbox", str(tmp_path / "inbox")])
    assert code == 2
    assert "sudo apt install -y python3-picamera2" in capsys.readouterr().err
    assert not (tmp_path / "inbox").exists() or not any((tmp_path / "inbox").iterdir())


def test_camera_seam_names_its_camera_in_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CTPI_CAMERA", SEAM)
    assert main(["capture", "--inbox", str(tmp_path), "--count", "2"]) == 0
    assert len(StandInCamera.instances) == 1 and len(list(tmp_path.glob("capture-*.png"))) == 2


def test_unknown_camera_is_refused_with_the_choices(tmp_path, capsys):
    assert main(["capture", "--inbox", str(tmp_path), "--camera", "webcam"]) == 2
    assert "neither 'picamera2' nor 'module:factory'" in capsys.readouterr().err


def test_a_frame_that_is_not_an_image_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(StandInCamera, "shape", (4, 4, 5))
    assert main(["capture", "--inbox", str(tmp_path), "--camera", SEAM]) == 2
    assert "expected uint8" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_capture_stops_when_asked_between_stills(tmp_path):
    stop = threading.Event()
    camera = StandInCamera()
    threading.Timer(0.35, stop.set).start()
    written = capture_stills(camera, tmp_path, every=0.2, count=0, stop=stop)
    assert 1 <= len(written) <= 3 and len(camera.times) == len(written)


def test_a_capture_button_takes_one_still_and_knows_whether_a_camera_is_there(tmp_path, monkeypatch):
    monkeypatch.delenv("CTPI_CAMERA", raising=False)
    assert camera_available(SEAM)
    path = capture_once(tmp_path / "inbox", SEAM)
    assert path.parent == tmp_path / "inbox" and path.suffix == ".png"
    assert np.array_equal(np.asarray(Image.open(path)), StandInCamera.instances[-1].frames[0])
    assert all(camera.closed for camera in StandInCamera.instances)
    if importlib.util.find_spec("picamera2") is None:
        assert not camera_available("picamera2")

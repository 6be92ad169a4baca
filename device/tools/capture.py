"""``ctpi capture``: stills from a Raspberry Pi camera into the watch inbox, written atomically.

A camera on the Pi is one more source of slices: each still is encoded as PNG under a hidden
temporary name (``.<name>.part``) in the inbox and then renamed, so the watch daemon, which
ignores ``.*`` and ``*.part``, only ever sees complete files.

The camera sits behind one seam, :func:`open_camera`, chosen by ``--camera`` or the
``CTPI_CAMERA`` environment variable (read once, as the option's default):

- ``picamera2`` (the default): the Pi camera through Picamera2, imported here and only here,
  lazily, so nothing else in ``device/`` needs it. When it is absent the error says how to
  install it; there is never a silent fallback to anything else.
- ``module:factory``: any importable callable returning an object with ``capture()`` (an
  ``H x W`` or ``H x W x 3`` uint8 RGB array) and ``close()``. The tests use this for the one
  fake the project allows, a stand-in camera, the way gpiozero's ``MockFactory`` stands in for
  GPIO pins.
"""

from __future__ import annotations

import importlib
import io
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

CAMERA_ENV = "CTPI_CAMERA"
DEFAULT_CAMERA = "picamera2"
PICAMERA2_HINT = (
    "picamera2 is not installed in this Python. On Raspberry Pi OS: `sudo apt install -y python3-picamera2` "
    "(the deploy's virtualenv uses --system-site-packages, so the apt package is visible to it)"
)


class CameraError(RuntimeError):
    """No usable camera: module absent, camera not connected or busy, bad frame."""


class Picamera2Camera:
    """The Pi camera as a still source. Built once; ``capture()`` returns an RGB array."""

    def __init__(self, size: tuple[int, int] | None = None):
        try:
            from picamera2 import Picamera2  # lazily: only a Pi with the apt package has it
        except ImportError as error:
            raise CameraError(f"{PICAMERA2_HINT} ({error})") from None
        try:
            self._camera = Picamera2()
        except (IndexError, RuntimeError) as error:  # IndexError: no camera attached
            raise CameraError(f"no camera found or it is in use by another process ({error}); check the ribbon cable and `rpicam-hello --list-cameras`") from None
        main = {"format": "RGB888"}
        if size:
            main["size"] = size
        self._camera.configure(self._camera.create_still_configuration(main=main))
        self._camera.start()

    def capture(self) -> np.ndarray:
        # Picamera2's "RGB888" is stored B, G, R in memory (libcamera naming); flip to RGB.
        return self._camera.capture_array("main")[..., ::-1]

    def close(self) -> None:
        self._camera.stop()
        self._camera.close()


def open_camera(spec: str | None = None):
    """The camera named by ``spec`` (see the module docstring); raises :class:`CameraError`."""
    spec = spec or DEFAULT_CAMERA
    if spec == "picamera2":
        return Picamera2Camera()
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise CameraError(f"camera {spec!r} is neither 'picamera2' nor 'module:factory'")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise CameraError(f"camera {spec!r} cannot be loaded: {error}") from None
    return factory()


def camera_available(spec: str | None = None) -> bool:
    """Whether a camera can be opened now (the UI asks this before offering a capture button)."""
    try:
        camera = open_camera(spec)
    except CameraError as error:
        log.info("no camera: %s", error)
        return False
    camera.close()
    return True


def capture_once(inbox: Path, spec: str | None = None) -> Path:
    """One still into ``inbox`` with the camera ``spec`` names, opened and closed around it:
    what a capture button calls. Raises :class:`CameraError`."""
    camera = open_camera(spec)
    try:
        return capture_stills(camera, Path(inbox), every=0.0, count=1)[0]
    finally:
        camera.close()


def encode_png(frame: np.ndarray) -> bytes:
    """A frame as PNG bytes: 8-bit grey or RGB (a 4th channel, e.g. XRGB padding, is dropped)."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[2] not in (1, 3, 4)):
        raise CameraError(f"camera returned a {frame.dtype} array of shape {frame.shape}; expected uint8 HxW or HxWx3")
    if frame.ndim == 3:
        frame = frame[..., 0] if frame.shape[2] == 1 else frame[..., :3]
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_still(data: bytes, inbox: Path, stem: str) -> Path:
    """Write ``data`` to ``inbox/<stem>.png`` atomically: a hidden ``.part`` file in the same
    folder, fsync, rename, fsync of the folder. Never replaces an existing file."""
    handle = tempfile.NamedTemporaryFile(dir=inbox, prefix=f".{stem}.", suffix=".part", delete=False)
    try:
        with handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        target = inbox / f"{stem}.png"
        counter = 1
        while target.exists():
            target = inbox / f"{stem}-{counter}.png"
            counter += 1
        os.replace(handle.name, target)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    directory = os.open(inbox, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return target


def capture_stills(camera, inbox: Path, every: float, count: int, stop: threading.Event | None = None,
                   clock=time.monotonic) -> list[Path]:
    """Take ``count`` stills (0: until ``stop`` is set), one every ``every`` seconds on a fixed
    schedule (start + k * every, so slow captures do not drift it), into ``inbox``. ``clock``
    and ``stop.wait`` are the only time sources, so the schedule can be checked without timing."""
    stop = stop or threading.Event()
    inbox.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    start = clock()
    index = 0
    while not stop.is_set() and (count == 0 or index < count):
        delay = start + index * every - clock()
        if delay > 0 and stop.wait(delay):
            break
        frame = camera.capture()
        stem = "capture-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        path = write_still(encode_png(frame), inbox, stem)
        log.info("captured %s", path)
        written.append(path)
        index += 1
    return written


def register(subparsers) -> None:
    parser = subparsers.add_parser("capture", help="take camera stills into the watch inbox (Raspberry Pi camera)")
    parser.add_argument("--inbox", type=Path, required=True, metavar="DIR", help="the folder the watch daemon watches")
    parser.add_argument("--every", type=float, default=0.0, metavar="SEC", help="seconds between stills (default 0: back to back)")
    parser.add_argument("--count", type=int, default=1, metavar="N", help="number of stills, 0 = until stopped (default 1)")
    parser.add_argument(
        "--camera",
        default=os.environ.get(CAMERA_ENV, DEFAULT_CAMERA),
        help=f"'picamera2' or 'module:factory' (default: ${CAMERA_ENV} or {DEFAULT_CAMERA})",
    )
    parser.set_defaults(handler=run)


def run(args) -> int:
    from device.cli import EXIT_OK, EXIT_USAGE

    if args.every < 0 or args.count < 0:
        print("ctpi capture: --every and --count must not be negative", file=sys.stderr)
        return EXIT_USAGE
    if args.inbox.exists() and not args.inbox.is_dir():
        print(f"ctpi capture: inbox {args.inbox} is not a folder", file=sys.stderr)
        return EXIT_USAGE
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():  # TERM and Ctrl-C end the schedule cleanly
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, lambda *_: stop.set())
    try:
        camera = open_camera(args.camera)
        try:
            written = capture_stills(camera, args.inbox, args.every, args.count, stop)
        finally:
            camera.close()
    except CameraError as error:
        print(f"ctpi capture: {error}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for path in written:
        print(path)
    return EXIT_OK

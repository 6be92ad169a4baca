"""Reading: a thread reads, hashes (sha256), decodes, checks (the input guard) and preprocesses
each taken file into a bounded queue, so decoding the next slice overlaps inference of this one."""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from device.core.preprocess import BadSliceError, decode_slice, prepare, read_source
from device.watch.intake import claim
from device.watch.journal import Journal
from device.watch.pause import pause_point

log = logging.getLogger(__name__)


def file_identity(path: Path) -> str | None:
    """What a record's ``sha256`` holds: the content's sha256 for a regular file, the hash
    of ``symlink:<target>`` for a link (its target is never read), None if unreadable."""
    try:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            return hashlib.sha256(b"symlink:" + os.fsencode(os.readlink(path))).hexdigest()
        if not stat.S_ISREG(info.st_mode):
            return None
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    except OSError:
        return None


@dataclass
class Decoded:
    """What the reader hands to inference: pixels, or the reason the file was rejected."""

    path: str
    seen_at: float
    sha256: str | None = None
    size: int | None = None
    movable: bool = True
    pixels: object = None
    format: str | None = None
    mode: str | None = None
    error: BadSliceError | None = None
    latency_ms: dict = field(default_factory=dict)
    signature: tuple | None = None  # (size, mtime, inode) when read: a changed file is not moved


class Reader(threading.Thread):
    """Reads, hashes, decodes and preprocesses files off the main thread (Pillow and numpy
    release the GIL), into a bounded queue: backpressure instead of unbounded memory."""

    def __init__(self, inbox: Path, spec, queue_size: int, max_attempts: int = 3):
        super().__init__(name="ctpi-reader", daemon=True)
        self.max_attempts = max_attempts
        self.claims: Journal | None = None  # its own connection; set once the state folder works
        self.inbox = inbox
        self.inbox_real = inbox.resolve()
        self.spec = spec
        self.todo: queue.Queue = queue.Queue()
        self.done: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self.stop = threading.Event()
        self.busy = False
        self.check = None  # the classifier's input guard (decoded slice -> ms, or BadSliceError "not-ct")

    def idle(self) -> bool:
        return not self.busy and self.todo.empty() and self.done.empty()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                relative, seen_at = self.todo.get(timeout=0.2)
            except queue.Empty:
                continue
            self.busy = True
            item = self.read(relative, seen_at)
            while not self.stop.is_set():
                try:
                    self.done.put(item, timeout=0.2)
                    break
                except queue.Full:
                    continue
            self.busy = False

    def read(self, relative: str, seen_at: float) -> Decoded:
        path = self.inbox / relative
        item = Decoded(relative, seen_at)
        start = time.perf_counter()
        try:
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                item.movable = False
                raise BadSliceError("missing", "file disappeared before it could be read") from None
            item.size = info.st_size
            item.signature = (info.st_size, info.st_mtime_ns, info.st_ino)
            if stat.S_ISLNK(info.st_mode):
                item.sha256 = file_identity(path)
                target = path.resolve()
                if not target.is_relative_to(self.inbox_real):
                    raise BadSliceError("symlink-outside-inbox", "symbolic link points outside the inbox; only files inside it are read")
                info = os.stat(path)
            if not stat.S_ISREG(info.st_mode):
                raise BadSliceError("not-a-file", "not a regular file (a directory, pipe or device)")
            attempts = claim(self.claims, relative, item.signature)
            if attempts > self.max_attempts:
                raise BadSliceError(
                    "crashed-daemon",
                    f"the daemon stopped {attempts - 1} times while decoding this file (a decoder crash or the memory "
                    "limit); it was set aside without being decoded again",
                )
            pause_point("decoding", relative)
            if info.st_size > 0 and not os.access(path, os.R_OK):
                raise BadSliceError("unreadable", "permission denied")
            data = read_source(path)
            # a link inside the inbox keeps its link identity: that is what recovery compares
            item.sha256 = item.sha256 or hashlib.sha256(data).hexdigest()
            item.size = len(data)
            read_at = time.perf_counter()
            decoded = decode_slice(data, self.spec)
            item.format, item.mode = decoded.format, decoded.mode
            decoded_at = time.perf_counter()
            guard_ms = self.check(decoded) if self.check is not None else 0.0
            guarded_at = time.perf_counter()
            item.pixels = prepare(decoded.pixels, self.spec)
            item.latency_ms = {
                "read": (read_at - start) * 1000.0,
                "decode": (decoded_at - read_at) * 1000.0,
                "guard": guard_ms,
                "preprocess": (time.perf_counter() - guarded_at) * 1000.0,
            }
        except BadSliceError as error:
            # without its traceback: the traceback holds this frame, and with it the file's bytes
            # and the full-size decoded image, for as long as the item lives (in the bounded queue
            # that is queue_size refused files: measured +74 MB of daemon RSS for 512x512 slices)
            item.error = error.with_traceback(None)
        except Exception as error:  # one odd file must not stop the appliance
            log.exception("unexpected failure reading %s", relative)
            item.error = BadSliceError("decode-failed", f"could not be decoded ({type(error).__name__}: {error})")
        if item.error is not None and item.movable:
            item.sha256 = item.sha256 or file_identity(path)
            item.movable = os.path.lexists(path)
        return item

"""Intake: which inbox files the daemon takes and when. A file is noticed by watchdog (inotify)
or a rescan, taken once its size, mtime, inode and mode stayed unchanged for ``settle_seconds``,
never if its name is a temporary one (``.*``, ``*.part``, ``*.tmp``, ``*.crdownload``), and
claimed in the journal before it is decoded, so a file that keeps crashing the daemon is set
aside (see :mod:`device.watch.journal`).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import threading
import time
from pathlib import Path

from device.watch.journal import Journal, JournalError

log = logging.getLogger(__name__)


class Arrivals:
    """Files noticed in the inbox and whether they have settled. Thread-safe: watchdog's
    thread calls :meth:`notice`, the main loop calls :meth:`due`."""

    def __init__(self, inbox: Path, ignore: tuple[str, ...], settle_seconds: float):
        self.inbox = inbox
        self.ignore = tuple(pattern.lower() for pattern in ignore)
        self.settle_seconds = settle_seconds
        self._lock = threading.Lock()
        self._tracked: dict[str, list] = {}  # relative path -> [first seen, signature, stable since]

    def relative(self, path: str | Path) -> str | None:
        """The inbox-relative name of a candidate file, or None if it is to be ignored."""
        try:
            relative = Path(path).relative_to(self.inbox)
        except ValueError:
            return None
        parts = relative.parts
        if not parts or any(part.startswith(".") for part in parts[:-1]):
            return None
        name = parts[-1].lower()
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.ignore):
            return None
        return relative.as_posix()

    def notice(self, path: str | Path, activity: bool = True) -> None:
        relative = self.relative(path)
        if relative is None:
            return
        now = time.monotonic()
        with self._lock:
            entry = self._tracked.get(relative)
            if entry is None:
                self._tracked[relative] = [time.time(), None, now]
            elif activity:
                entry[2] = now

    def scan(self, folder: Path | None = None) -> int:
        """Notice every candidate under ``folder`` (default: the whole inbox); symlinks are
        noticed as files and never followed."""
        count = 0
        stack = [folder or self.inbox]
        while stack:
            current = stack.pop()
            try:
                entries = list(os.scandir(current))
            except OSError:
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                else:
                    self.notice(entry.path, activity=False)
                    count += 1
        return count

    def forget(self, relative: str) -> None:
        with self._lock:
            self._tracked.pop(relative, None)

    def due(self, skip: set[str]) -> list[tuple[str, float]]:
        """Files unchanged for ``settle_seconds`` (removed from tracking), as (path, first
        seen). Files that disappeared are forgotten: they never became a drop."""
        now = time.monotonic()
        with self._lock:
            items = [(k, v) for k, v in self._tracked.items() if k not in skip]
        ready = []
        for relative, entry in items:
            try:
                info = os.lstat(self.inbox / relative)
            except FileNotFoundError:
                self.forget(relative)
                continue
            except OSError:
                continue
            signature = (info.st_size, info.st_mtime_ns, info.st_ino, info.st_mode)
            with self._lock:
                if signature != entry[1]:  # first look, or still changing: restart the clock
                    entry[1], entry[2] = signature, now
                    continue
                if now - entry[2] >= self.settle_seconds:
                    self._tracked.pop(relative, None)
                    ready.append((relative, entry[0]))
        return ready

    def __len__(self) -> int:
        with self._lock:
            return len(self._tracked)


def claim(claims: Journal | None, relative: str, signature) -> int:
    """Count an attempt at reading ``relative`` before it is decoded (``claims``: the reader's own
    journal connection, None until the state folder works); returns the attempts so far."""
    if claims is None:
        return 1
    try:
        return claims.claim(relative, json.dumps(signature))
    except JournalError as error:  # storage trouble surfaces when the result is recorded
        log.debug("claim of %s not recorded: %s", relative, error)
        return 1


def watch_inbox(inbox: Path, arrivals: Arrivals):
    """Start watchdog's observer (inotify) on ``inbox``; its events go to ``arrivals``."""
    from watchdog.events import DirCreatedEvent, DirMovedEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event):
            if event.event_type in ("deleted", "closed_no_write", "opened"):
                return
            path = getattr(event, "dest_path", "") or event.src_path
            if isinstance(event, (DirCreatedEvent, DirMovedEvent)):
                arrivals.scan(Path(os.fsdecode(path)))  # files that landed before the watch existed
            elif not event.is_directory:
                arrivals.notice(os.fsdecode(path))

    observer = Observer()
    observer.schedule(Handler(), str(inbox), recursive=True)
    observer.daemon = True
    observer.start()
    return observer

"""``ctpi watch``: the appliance's daemon. Every slice dropped into the inbox is triaged once.

Pipeline (one process, the model loaded once):

- **arrivals**: watchdog (inotify) events and a periodic rescan notice files; a file is taken
  only after its size, mtime and inode stayed unchanged for ``settle_seconds`` and only if
  its name is not a temporary one (``.*``, ``*.part``, ``*.tmp``, ``*.crdownload``);
- **reader thread**: reads the bytes, hashes them (sha256), decodes and preprocesses, into a
  bounded queue, so decoding the next slice overlaps inference of this one;
- **main thread**: inference, then results are committed to the journal in small groups, then
  the files move to ``STATE/done/`` or ``STATE/rejected/``. The order (commit, move, fsync
  the folders, mark moved) is what makes it exactly-once; see :mod:`device.watch.journal`.

Retention: with ``keep_done_days`` set, images in ``STATE/done/`` older than that are deleted
(at start-up and hourly, a bounded batch per loop turn so triage never waits long); the
records stay. See :mod:`device.watch.journal`.

Operations: SIGTERM/SIGINT finish the current slice, commit, and exit 0. A full disk or a
read-only state folder stops intake (files stay in the inbox), is logged once as an error,
and is retried every ``retry_seconds``. ``READY=1`` goes to systemd only once the loop
runs, ``WATCHDOG=1`` from the loop itself (a hung loop gets restarted).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import logging
import os
import queue
import shutil
import signal
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from device import __version__
from device.config import ConfigError, LogFormat, WatchConfig, load_config, override
from device.core.bundle import load_bundle
from device.core.preprocess import BadSliceError, decode_slice, prepare, read_source
from device.watch.durable import fsync_dir
from device.watch.journal import Journal, JournalError, SliceResult
from device.watch.sdnotify import Notifier

log = logging.getLogger(__name__)

EXIT_OK, EXIT_STORAGE, EXIT_USAGE = 0, 1, 2
TICK_SECONDS = 0.1
PRUNE_SECONDS = 3600.0  # retention pass interval
PRUNE_BATCH = 200  # images deleted per loop turn at most (about 10-50 ms on an SD card)


class StorageError(RuntimeError):
    """The state folder cannot take more results (read-only, full, I/O error)."""


# Crash tests only: a named point where the daemon stops itself (SIGSTOP) so that a test can
# SIGKILL it exactly there, e.g. between "journal committed" and "file moved". The crash is a
# real kill -9; this only makes its timing deterministic. Read once, here; unset in production.
PAUSE_ENVIRONMENT = "CTPI_TEST_PAUSE_AT"  # "committed" or "decoding:<inbox-relative path>"
_PAUSE_AT = os.environ.get(PAUSE_ENVIRONMENT, "")


def pause_point(name: str, subject: str = "") -> None:
    """Stop this process at ``name`` when a crash test asked for it; otherwise nothing."""
    if _PAUSE_AT and _PAUSE_AT in (name, f"{name}:{subject}"):
        log.warning("stopped at %s %s for a crash test", name, subject, extra={"event": "paused", "point": name})
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGSTOP)


# -- logging ----------------------------------------------------------------------------------

_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(log_format: LogFormat, verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == LogFormat.JSON:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("watchdog").setLevel(logging.WARNING)


# -- files --------------------------------------------------------------------------------------


def memory_mb() -> tuple[float | None, float | None]:
    """Current and peak RSS of this process (Linux), in MB."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024.0, int(fields["VmHWM"].split()[0]) / 1024.0
    except (OSError, KeyError, ValueError):
        return None, None


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


def move_file(source: Path, target: Path) -> bool:
    """Move ``source`` to ``target`` (rename, or copy + fsync + rename + unlink across file
    systems). Returns False if ``source`` is gone. Never overwrites a complete ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(source, target)
        return True
    except FileNotFoundError:
        return False
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
    partial = target.with_name(f".{target.name}.partial")
    try:
        if os.path.islink(source):
            if os.path.lexists(partial):
                os.unlink(partial)
            os.symlink(os.readlink(source), partial)
        else:
            with open(source, "rb") as reader, open(partial, "wb") as writer:
                shutil.copyfileobj(reader, writer, 1 << 20)
                writer.flush()
                os.fsync(writer.fileno())
        os.rename(partial, target)
    except OSError:
        # A full disk mid-copy: the half copy would keep the space the retry needs.
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    fsync_dir(target.parent)
    os.unlink(source)
    return True


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

    def claim(self, relative: str, signature) -> int:
        if self.claims is None:
            return 1
        try:
            return self.claims.claim(relative, json.dumps(signature))
        except JournalError as error:  # storage trouble surfaces when the result is recorded
            log.debug("claim of %s not recorded: %s", relative, error)
            return 1

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
            attempts = self.claim(relative, item.signature)
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


# -- the daemon -------------------------------------------------------------------------------


class Daemon:
    """The watch loop. ``run()`` returns an exit status; see the module docstring."""

    def __init__(self, config: WatchConfig, once: bool = False, notifier: Notifier | None = None):
        from device.core.classifier import Classifier  # the slow import: after config errors are reported

        self.config = config
        self.once = once
        self.inbox = Path(config.inbox).absolute()
        self.state = Path(config.state).absolute()
        self._check_folders()
        self.notifier = notifier or Notifier()
        bundle = load_bundle(config.model, expected_sha256=config.bundle_sha256 or None)
        self.classifier = Classifier(bundle, config.format, config.threads, None)
        self.site_error = self.use_site_profile()
        bundle = self.classifier.bundle
        self.positive_label = bundle.positive_label
        others = [label for label in bundle.labels if label != bundle.positive_label]
        self.negative_label = others[0]
        self.arrivals = Arrivals(self.inbox, config.ignore, config.settle_seconds)
        self.reader = Reader(self.inbox, bundle.spec, config.queue_size, config.max_attempts)
        self.reader.check = self.classifier.check
        self.in_flight: set[str] = set()
        self.signatures: dict[str, tuple | None] = {}
        self.batch: list[SliceResult] = []
        self.batch_started = 0.0
        self.stop_requested = False
        self.blocked: str | None = None
        self.processed = {"ok": 0, "rejected": 0}
        self.started_at = time.time()
        self.journal: Journal | None = None

    def use_site_profile(self) -> str | None:
        """Decide with ``STATE/site-profile.json`` (``ctpi site-check --accept``) when it was
        accepted for this model; a profile for another model is refused (logged, shown by
        ``ctpi status`` and the page) and the bundle's own threshold applies."""
        from device.tools.sitecheck import SiteProfileError, load_site_profile

        try:
            profile = load_site_profile(self.state)
            self.classifier.use_site_profile(profile)
        except SiteProfileError as error:
            log.error("%s", error, extra={"event": "site-profile-refused"})
            return str(error)
        if profile is not None:
            log.info("%s (%s)", profile.describe(), profile.path, extra={"event": "site-profile"})
        return None

    def _check_folders(self) -> None:
        if not self.inbox.is_dir():
            raise ConfigError(f"inbox {self.inbox} is not a folder; create it or set [watch] inbox / --inbox")
        inbox, state = self.inbox.resolve(), self.state.resolve()
        if state.is_relative_to(inbox) or inbox.is_relative_to(state):
            raise ConfigError(f"state folder {state} and inbox {inbox} must not contain one another")

    # -- signals and heartbeat --------------------------------------------------------------

    def request_stop(self, signum=None, frame=None) -> None:
        if not self.stop_requested:
            log.info("stop requested (signal %s): finishing the current slice", signum, extra={"event": "stopping"})
        self.stop_requested = True

    def heartbeat_data(self, state: str) -> dict:
        rss, peak = memory_mb()
        return {
            "pid": os.getpid(),
            "state": state,
            "message": self.blocked,
            "version": __version__,
            "started_at": self.started_at,
            "inbox": str(self.inbox),
            "model": {
                "name": self.classifier.bundle.name,
                "path": str(self.classifier.bundle.path),
                "format": self.classifier.format,
                "sha256": self.classifier.sha256,
                "threshold": self.classifier.threshold,
                "uncertain_band": self.classifier.band.to_manifest() if self.classifier.band is not None else None,
                "site_profile": self.classifier.site.describe() if self.classifier.site is not None else None,
                "site_profile_error": self.site_error,
                "backend": self.classifier.backend.name,
                "threads": self.classifier.threads,
            },
            "queue": self.reader.todo.qsize() + self.reader.done.qsize() + len(self.batch),
            "waiting": len(self.arrivals),
            "processed": dict(self.processed),
            "rss_mb": rss,
            "peak_rss_mb": peak,
            "heartbeat_seconds": self.config.heartbeat_seconds,
        }

    def beat(self, state: str) -> None:
        if self.journal is None:
            return
        try:
            self.journal.beat(self.heartbeat_data(state))
        except JournalError as error:
            if self.blocked is None:
                self.block(str(error))
            else:  # already blocked: the heartbeat goes stale, which `ctpi status` reports
                log.debug("heartbeat not written: %s", error)

    # -- storage ----------------------------------------------------------------------------

    def check_storage(self) -> None:
        """Raise :class:`StorageError` unless the state folder can take more results."""
        try:
            for folder in (self.state, self.state / "done", self.state / "rejected"):
                folder.mkdir(parents=True, exist_ok=True)
            self.check_free_space()
        except OSError as error:
            raise StorageError(f"state folder {self.state} is not usable: {error.strerror or error}") from None
        if not os.access(self.state, os.W_OK):
            raise StorageError(f"state folder {self.state} is read-only; make it writable for the daemon's user")
        if self.journal is None:
            try:
                self.journal = Journal.open(self.state)
                self.reader.claims = Journal.open(self.state, synchronous="NORMAL")
            except JournalError as error:
                raise StorageError(str(error)) from None
        try:
            self.journal.beat(self.heartbeat_data("running"))
        except JournalError as error:
            raise StorageError(str(error)) from None

    def block(self, message: str) -> None:
        """Stop intake after a storage failure: unrecorded work is dropped from memory (its
        files are still in the inbox) and retried after ``retry_seconds``."""
        if self.blocked is None:
            log.error("stopped taking files: %s (nothing is lost: files stay in the inbox; retrying every %.0f s)",
                      message, self.config.retry_seconds, extra={"event": "blocked"})
            self.notifier.status(f"blocked: {message}")
        self.blocked = message
        self.batch.clear()
        self.in_flight.clear()
        self.signatures.clear()
        while True:  # drain what the reader already decoded; the files will be read again
            try:
                self.reader.done.get_nowait()
            except queue.Empty:
                break
        while True:
            try:
                self.reader.todo.get_nowait()
            except queue.Empty:
                break

    def recover(self) -> None:
        """Finish moves a crash or a storage error interrupted (records not marked moved)."""
        assert self.journal is not None
        finished = []
        for record in self.journal.unmoved():
            source = self.inbox / record["path"]
            if os.path.lexists(source):
                if record["sha256"] is not None and file_identity(source) != record["sha256"]:
                    log.warning("%s was replaced before its recorded drop was moved; the new file is a new drop",
                                record["path"], extra={"event": "replaced", "record": record["id"]})
                    finished.append(record["id"])
                    continue
                move_file(source, self.state / record["stored_as"])
                fsync_dir(source.parent)
                fsync_dir((self.state / record["stored_as"]).parent)
                log.info("finished interrupted move of %s", record["path"], extra={"event": "recovered", "record": record["id"]})
            finished.append(record["id"])
        self.journal.mark_moved(finished)

    def prune(self) -> bool:
        """Delete up to :data:`PRUNE_BATCH` images older than ``keep_done_days`` from
        ``done/`` (the file first, then the record's mark; see :mod:`device.watch.journal`) and the
        study folders that leaves empty. True if more may be due."""
        days = self.config.keep_done_days
        if days <= 0 or self.journal is None:
            return False
        due = self.journal.prunable(time.time() - days * 86400.0, PRUNE_BATCH)
        done_root = self.state / "done"
        real_done = done_root.resolve()
        pruned, freed = [], 0
        for record in due:
            target = self.state / record["stored_as"]
            try:
                if not target.resolve().is_relative_to(real_done):
                    raise ValueError(f"{record['stored_as']} is not under {done_root}")
                freed += target.lstat().st_size
                target.unlink()
            except FileNotFoundError:
                pass  # deleted by hand, or by a pass a crash interrupted before its mark
            except (OSError, ValueError) as error:
                log.warning("retention: cannot delete %s: %s", target, error, extra={"event": "prune-error", "record": record["id"]})
                continue
            pruned.append(record["id"])
            folder = target.parent
            while folder != done_root and folder.is_relative_to(done_root):
                try:
                    folder.rmdir()  # only succeeds once the study folder is empty
                except OSError:
                    break
                folder = folder.parent
        if pruned:
            fsync_dir(done_root)
            self.journal.mark_pruned(pruned)
            log.info("retention: deleted %d image(s) older than %g days from %s (%.1f MB); their results are kept",
                     len(pruned), days, done_root, freed / 1e6, extra={"event": "pruned", "count": len(pruned)})
        return len(due) == PRUNE_BATCH

    def try_resume(self) -> bool:
        try:
            with contextlib.suppress(JournalError):
                self.prune()  # a full disk may be what retention frees
            self.check_storage()
            self.recover()
        except (StorageError, JournalError, OSError) as error:
            self.block(str(error) if not isinstance(error, OSError) else f"cannot move files into {self.state}: {error}")
            return False
        if self.blocked is not None:
            log.info("storage usable again; taking files", extra={"event": "resumed"})
            self.notifier.status("running")
        self.blocked = None
        self.arrivals.scan()
        return True

    # -- processing -------------------------------------------------------------------------

    def infer(self, item: Decoded) -> SliceResult:
        result = SliceResult(path=item.path, sha256=item.sha256, size=item.size, status="rejected", seen_at=item.seen_at,
                             movable=item.movable)
        if item.error is not None:
            result.reason, result.message = item.error.reason, str(item.error)
            self.signatures[item.path] = item.signature
            return result
        self.signatures[item.path] = item.signature
        prediction = self.classifier.predict_pixels(item.pixels, item.latency_ms)
        result.status = "ok"
        result.label = prediction.label
        result.positive = prediction.label == self.positive_label
        result.positive_probability = prediction.positive_probability
        result.probabilities = prediction.probabilities
        result.threshold = prediction.threshold
        result.model_name = self.classifier.bundle.name
        result.model_sha256 = prediction.model_sha256
        result.format, result.mode = item.format, item.mode
        result.latency_ms = prediction.latency_ms
        result.uncertain_band = prediction.uncertain_band
        result.bundle_sha256 = prediction.bundle_sha256
        return result

    def flush(self) -> None:
        """Commit the group, move its files, fsync the folders, mark them moved."""
        if not self.batch or self.journal is None:
            return
        results = list(self.batch)
        try:
            recorded = self.journal.record(results, self.positive_label, self.negative_label)
        except JournalError as error:
            self.block(str(error))
            return
        self.batch.clear()
        pause_point("committed")  # the dangerous window: recorded, not yet moved
        moved, folders = [], set()
        try:
            for record in recorded:
                if record.moved or record.stored_as is None:
                    continue
                source = self.inbox / record.path
                target = self.state / record.stored_as
                if self.changed_since_read(record.path):
                    log.warning("%s changed after it was read; the recorded version is gone and the new one will be a "
                                "new drop", record.path, extra={"event": "replaced", "record": record.id})
                elif move_file(source, target):
                    folders.update({source.parent, target.parent})
                moved.append(record.id)
            for folder in folders:  # the renames must be durable before the journal says so
                fsync_dir(folder)
            self.journal.mark_moved(moved)
        except (OSError, JournalError) as error:
            self.block(f"cannot move files into {self.state}: {error}")
            return
        finally:
            for record in recorded:
                self.in_flight.discard(record.path)
        for result in results:
            self.processed[result.status] += 1
            extra = {"event": "slice", "path": result.path, "study": result.study, "status": result.status,
                     "sha256": result.sha256}
            if result.status == "ok":
                extra.update(label=result.label, positive_probability=round(result.positive_probability, 4),
                             model_sha256=result.model_sha256, bundle_sha256=result.bundle_sha256)
                log.info("%s: %s P=%.3f (model %s)", result.path, result.label, result.positive_probability,
                         (result.model_sha256 or "")[:12], extra=extra)
            else:
                extra.update(reason=result.reason)
                log.warning("%s: rejected (%s) %s", result.path, result.reason, result.message, extra=extra)

    def changed_since_read(self, relative: str) -> bool:
        expected = self.signatures.pop(relative, None)
        try:
            info = os.lstat(self.inbox / relative)
        except FileNotFoundError:
            return False
        return expected is not None and (info.st_size, info.st_mtime_ns, info.st_ino) != expected

    def step(self) -> None:
        """One turn of the loop: feed settled files to the reader, infer what is decoded,
        commit when the group is full, old or the pipeline idle."""
        for relative, seen_at in self.arrivals.due(skip=self.in_flight):
            self.in_flight.add(relative)
            self.reader.todo.put((relative, seen_at))
        deadline = time.monotonic() + TICK_SECONDS
        while not self.stop_requested and self.blocked is None:
            try:
                item = self.reader.done.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if not self.batch:
                self.batch_started = time.monotonic()
            self.batch.append(self.infer(item))
            if len(self.batch) >= self.config.batch_size:
                self.flush()
            if time.monotonic() >= deadline:
                break
        if self.batch and (self.stop_requested or self.reader.idle() or self.batch_age() >= self.config.batch_seconds):
            self.flush()

    def batch_age(self) -> float:
        return time.monotonic() - self.batch_started if self.batch else 0.0

    def start_observer(self):
        from watchdog.events import DirCreatedEvent, DirMovedEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        arrivals = self.arrivals

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
        observer.schedule(Handler(), str(self.inbox), recursive=True)
        observer.daemon = True
        observer.start()
        return observer

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        observer = None
        try:
            try:
                self.check_storage()
                self.recover()
            except (StorageError, JournalError, OSError) as error:
                log.error("cannot start: %s; no file was taken", error, extra={"event": "storage-error"})
                return EXIT_STORAGE
            self.reader.start()
            if not self.once:
                observer = self.start_observer()
            self.arrivals.scan()
            model = self.classifier.bundle.describe(self.classifier.format)
            log.info("watching %s with %s; state in %s", self.inbox, model, self.state,
                     extra={"event": "ready", "model_sha256": self.classifier.sha256,
                            "bundle_sha256": self.classifier.bundle_sha256, "bundle": str(self.classifier.bundle.path)})
            self.notifier.ready(status=f"watching {self.inbox}")
            return self.loop()
        finally:
            self.notifier.stopping()
            self.reader.stop.set()
            if self.reader.is_alive():
                self.reader.join(timeout=10)
            if observer is not None:
                observer.stop()
            self.beat("stopped")
            if self.journal is not None:
                self.journal.close()
            if self.reader.claims is not None and not self.reader.is_alive():
                self.reader.claims.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            log.info("stopped; %d ok, %d rejected in this run", self.processed["ok"], self.processed["rejected"],
                     extra={"event": "stopped"})

    def loop(self) -> int:
        now = time.monotonic()
        next_beat = next_scan = next_retry = next_prune = now
        next_ping = now
        ping = self.notifier.ping_interval
        while not self.stop_requested:
            now = time.monotonic()
            if ping and now >= next_ping:
                self.notifier.watchdog()
                next_ping = now + ping
            if self.blocked is not None:
                if self.once:
                    log.error("stopping: %s", self.blocked)
                    return EXIT_STORAGE
                if now >= next_retry:
                    next_retry = now + self.config.retry_seconds
                    if not self.try_resume():
                        self.beat("blocked")
                time.sleep(TICK_SECONDS)
                continue
            if now >= next_scan and not self.once:
                self.arrivals.scan()
                next_scan = now + self.config.rescan_seconds
            if now >= next_prune:
                try:
                    more = self.prune()
                except JournalError as error:
                    self.block(str(error))
                    continue
                next_prune = now + (0.0 if more else PRUNE_SECONDS)
            if now >= next_beat:
                self.beat("running")
                next_beat = now + self.config.heartbeat_seconds
                try:
                    self.check_free_space()
                except StorageError as error:
                    self.block(str(error))
                    continue
            self.step()
            if self.once and not len(self.arrivals) and not self.in_flight and not self.batch and self.reader.idle():
                break
            if not self.in_flight and not self.batch:
                time.sleep(TICK_SECONDS / 2)
        self.flush()
        return EXIT_STORAGE if self.blocked else EXIT_OK

    def check_free_space(self) -> None:
        free_mb = shutil.disk_usage(self.state).free / 1e6
        if free_mb < self.config.min_free_mb:
            hint = "archive STATE/done, or set keep_done_days" if self.config.keep_done_days <= 0 else "archive STATE/done"
            raise StorageError(
                f"state folder {self.state} has {free_mb:.0f} MB free, below min_free_mb={self.config.min_free_mb:.0f}; "
                f"free space ({hint}) to resume"
            )


# -- command line -----------------------------------------------------------------------------


def register(subparsers) -> None:
    parser = subparsers.add_parser("watch", help="triage every slice dropped into a folder (the appliance daemon)")
    add_arguments(parser)
    parser.set_defaults(handler=run)


def add_arguments(parser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="TOML config file (default: /etc/ctpi/ctpi.toml if it exists)")
    parser.add_argument("--inbox", type=Path, default=None, help="folder slices are dropped into (subfolders are studies)")
    parser.add_argument("--state", type=Path, default=None, help="folder for the journal and processed files")
    parser.add_argument("--model", type=Path, default=None, help="model bundle (default models/mobilenetv2)")
    parser.add_argument("--bundle-sha256", default=None, help="refuse a bundle whose identity is not this (the deploy pins it)")
    parser.add_argument("--format", dest="fmt", default=None, help="model format in the bundle (default: the bundle's default)")
    parser.add_argument("--threads", type=int, default=None, help="inference threads (default: cores, at most 4)")
    parser.add_argument("--settle-seconds", type=float, default=None, help="how long a file must be unchanged before it is read")
    parser.add_argument("--keep-done-days", type=float, default=None,
                        help="delete triaged images from STATE/done after this many days, keeping their results (default 0: keep)")
    parser.add_argument("--log-format", choices=[f.value for f in LogFormat], default=None, help="text (default) or json lines")
    parser.add_argument("--once", action="store_true", help="process what is in the inbox, then exit")


def config_from_args(args) -> WatchConfig:
    config = load_config(args.config).watch
    return override(
        config,
        inbox=args.inbox,
        state=args.state,
        model=args.model,
        bundle_sha256=args.bundle_sha256,
        format=args.fmt,
        threads=args.threads,
        settle_seconds=args.settle_seconds,
        keep_done_days=args.keep_done_days,
        log_format=LogFormat(args.log_format) if args.log_format else None,
    )


def run(args) -> int:
    config = config_from_args(args)
    configure_logging(config.log_format, getattr(args, "verbose", False))
    return Daemon(config, once=args.once).run()


def main(argv: list[str] | None = None) -> int:
    from device.cli import main as cli_main

    return cli_main(["watch", *(argv or sys.argv[1:])])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

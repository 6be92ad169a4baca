"""Storage: the state folder. Results are committed to the journal in small groups, then the
files move to ``STATE/done/`` or ``STATE/rejected/`` and the folders are fsynced before the
records are marked moved; that order is what makes triage exactly-once (see
:mod:`device.watch.journal`). A restart finishes interrupted moves. Retention deletes images
in ``done/`` older than ``keep_done_days`` (a bounded batch per loop turn), keeping their
records. A full disk or a read-only state folder stops intake (files stay in the inbox) until
it can take results again.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import shutil
import time
from pathlib import Path

from device.watch.durable import fsync_dir
from device.watch.journal import Journal, JournalError
from device.watch.pause import pause_point
from device.watch.reader import file_identity

log = logging.getLogger(__name__)

PRUNE_SECONDS = 3600.0  # retention pass interval
PRUNE_BATCH = 200  # images deleted per loop turn at most (about 10-50 ms on an SD card)


class StorageError(RuntimeError):
    """The state folder cannot take more results (read-only, full, I/O error)."""


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


class Storage:
    """The state-folder half of :class:`~device.watch.daemon.Daemon` (a base class: it works on
    the daemon's ``config``, ``inbox``, ``state``, ``journal``, ``reader``, ``arrivals``,
    ``notifier``, ``batch``, ``in_flight``, ``signatures``, ``processed``, ``blocked`` and
    ``heartbeat_data()``)."""

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

    def check_free_space(self) -> None:
        free_mb = shutil.disk_usage(self.state).free / 1e6
        if free_mb < self.config.min_free_mb:
            hint = "archive STATE/done, or set keep_done_days" if self.config.keep_done_days <= 0 else "archive STATE/done"
            raise StorageError(
                f"state folder {self.state} has {free_mb:.0f} MB free, below min_free_mb={self.config.min_free_mb:.0f}; "
                f"free space ({hint}) to resume"
            )

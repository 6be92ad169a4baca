"""How the DICOM node writes a received instance to disk, and what it fsyncs when.

The instance's bytes are written as they arrived: a Part 10 header (preamble, ``DICM``, file
meta) encoded here, then the peer's encoded dataset straight from pynetdicom's receive buffer,
without decoding and re-encoding it and without copying 512 KB per slice into new ``bytes``.

**When is an instance durable?** Once its temporary file (``.<name>.tmp`` in the study folder)
is fsynced and its ledger row committed (``synchronous=FULL``): a restart renames every
temporary file whose row exists before the port opens (:meth:`device.node.scp.Receiver.recover`),
so the sender may be told *success* at that point. The rename into the watched name follows at
once, but the fsync of the study folder that makes the *new name* survive a power cut is not
on the acknowledgement path: :class:`FolderSync` does it for all folders renamed into since the
last tick (one fsync per folder per tick instead of one per instance). A power cut before that
leaves the temporary file, which recovery renames. A file the watch daemon already triaged
cannot come back: the daemon fsyncs the folder it moves a file out of before it marks the
record moved, and a record not yet marked moved is matched by content, not triaged again.

The temporary file's own directory entry is made durable by the file's fsync on a journalling
file system (ext4, the Pi's; XFS, btrfs), as the study folder's entry in the inbox always was.
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

from device.watch.durable import fsync_dir


def temporary_name(name: str) -> str:
    return f".{name}.tmp"


def write_parts(path: Path, parts) -> int:
    """Write each buffer of ``parts`` (bytes or memoryview, not copied) to ``path`` and fsync
    it; the folder must exist. Returns the number of bytes written."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    written = 0
    try:
        for part in parts:
            view = memoryview(part).cast("B")
            while view:
                count = os.write(descriptor, view)
                view, written = view[count:], written + count
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return written


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (a temporary name: not yet renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_parts(path, (data,))


def write_durably(path: Path, data: bytes) -> None:
    """Temporary name, fsync, rename, fsync the folder: ``path`` is whole or absent."""
    partial = path.with_name(temporary_name(path.name))
    write_file(partial, data)
    os.replace(partial, path)
    fsync_dir(path.parent)


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group-0002 element, explicit VR little endian (PS3.5 7.1.2)."""
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad * (len(raw) % 2)


def part10_header(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the file meta group, byte for byte what pynetdicom's
    ``Event.encoded_dataset(include_meta=True)`` puts before the dataset (its implementation
    UID and version), at a fraction of its cost."""
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

    group = b"".join((
        _element(0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, b"UI", _padded(str(sop_class), b"\0")),
        _element(0x0003, b"UI", _padded(str(sop_instance), b"\0")),
        _element(0x0010, b"UI", _padded(str(transfer_syntax), b"\0")),
        _element(0x0012, b"UI", _padded(str(PYNETDICOM_IMPLEMENTATION_UID), b"\0")),
        _element(0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
    ))  # fmt: skip
    return b"\0" * 128 + b"DICM" + _element(0x0000, b"UL", struct.pack("<I", len(group))) + group


class FolderSync:
    """Folders that received a rename (or a new study folder) and still need their fsync.

    The store adds to it under the node's lock; :meth:`flush` (the node's tick, and its stop)
    takes the set and fsyncs each folder once, outside that lock, so receiving goes on."""

    def __init__(self, inbox: Path):
        self.inbox = inbox
        self._folders: set[Path] = set()
        self._known: set[Path] = set()  # study folders known to exist: no mkdir per instance
        self._guard = threading.Lock()

    def folder(self, path: Path) -> Path:
        """``path`` (a study folder), created if needed; a new one is queued with the inbox."""
        if path not in self._known:
            if not path.is_dir():
                path.mkdir(parents=True, exist_ok=True)
                self.renamed_into(path.parent)
            self._known.add(path)
        return path

    def renamed_into(self, folder: Path) -> None:
        with self._guard:
            self._folders.add(folder)

    def forget(self, path: Path) -> None:
        """The watch daemon may remove an emptied study folder: check it again next time."""
        self._known.discard(path)

    def flush(self) -> int:
        with self._guard:
            folders, self._folders = self._folders, set()
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):  # study folders, then the inbox
            try:
                fsync_dir(folder)
            except FileNotFoundError:  # emptied and removed by the watch daemon meanwhile
                self.forget(folder)
        return len(folders)

"""Receiving: the node's Storage SCP (pynetdicom). C-ECHO, and CT and Enhanced CT Image Storage
from allow-listed peers; each instance is written durably into the watch inbox under hashed
names (no identifier of the patient in a path) before the sender hears *success*. See
:mod:`device.node.daemon` for the contract and :mod:`device.node.store` for the fsyncs."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass

from device.config import ConfigError
from device.node.store import part10_header, temporary_name, write_durably, write_parts
from device.watch.durable import fsync_dir

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
ACCEPTED_SOP_CLASSES = (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE)
# C-STORE statuses (PS3.4 B.2.3)
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND, PROCESSING_FAILURE = 0x0000, 0xA700, 0xC000, 0x0110


def study_folder(study_uid: str) -> str:
    return "study-" + hashlib.sha256(study_uid.encode()).hexdigest()[:20]


def instance_hash(sop_uid: str) -> str:
    return hashlib.sha256(sop_uid.encode()).hexdigest()


@dataclass(frozen=True)
class Peer:
    """One allow-list entry: ``AET`` or ``AET@HOST``."""

    aet: str
    host: str | None = None

    @classmethod
    def parse(cls, text: str) -> Peer:
        aet, _, host = text.partition("@")
        if not aet.strip() or len(aet.strip()) > 16:
            raise ConfigError(f"allow entry {text!r}: expected AET or AET@HOST (AE title of 1-16 characters)")
        return cls(aet.strip(), host.strip() or None)

    def admits(self, aet: str, address: str | None) -> bool:
        return aet == self.aet and (self.host is None or self.host == address)


class Receiver:
    """The receiving half of :class:`~device.node.daemon.Node` (a base class: it works on the node's
    ``config``, ``inbox``, ``folder``, ``peers``, ``lock``, ``ledger``, ``folders`` and ``headers_kept``)."""

    def recover(self) -> int:
        """Finish or undo stores a crash interrupted: a temporary file whose ledger row was
        committed is renamed into place (its sender may have been told success), any other is
        deleted (its sender was not). Returns how many were renamed."""
        renamed = 0
        for study in sorted(p for p in self.inbox.glob("study-*") if p.is_dir()):
            for partial in study.glob(".*.tmp"):
                name = partial.name[1:-4]
                row = self.ledger._db.execute("SELECT 1 FROM instances WHERE study = ? AND name = ?", (study.name, name)).fetchone()
                if row is not None and not (study / name).exists():
                    os.replace(partial, study / name)
                    renamed += 1
                else:
                    partial.unlink(missing_ok=True)
            fsync_dir(study)
        for partial in self.folder.rglob(".*.tmp"):
            partial.unlink(missing_ok=True)
        return renamed

    def build_ae(self):
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
        from pynetdicom.sop_class import Verification

        # pynetdicom's own per-PDU and per-message log handlers cost CPU on every instance and
        # their lines name patients; the node logs what it needs itself
        _config.LOG_HANDLER_LEVEL = "none"
        ae = AE(ae_title=self.config.aet)
        ae.add_supported_context(Verification)
        for sop_class in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs for 512 KB slices
        ae.network_timeout = 60
        handlers = [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_ABORTED, self.on_aborted),
        ]
        return ae, handlers

    # -- association -------------------------------------------------------------------------

    def on_requested(self, event) -> None:
        calling = event.assoc.requestor.primitive.calling_ae_title.strip()
        address = event.assoc.requestor.address
        if any(peer.admits(calling, address) for peer in self.peers):
            self.ledger_count("associations")
            return
        reason = "calling AE title not in [dicom] allow" if not any(p.aet == calling for p in self.peers) else "source address not allowed for this AE title"
        log.warning("refused an association from %s at %s: %s", calling, address, reason, extra={"event": "refused"})
        with self.lock:
            self.ledger.refuse(calling, "not-allowed", f"{reason} ({address})")
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # rejected-permanent, service user, calling AE not recognised

    def on_aborted(self, event) -> None:
        log.info("an association was aborted by the peer", extra={"event": "aborted"})
        self.ledger_count("associations_aborted")

    def ledger_count(self, name: str) -> None:
        with self.lock:
            self.ledger.count(name)

    # -- C-STORE -----------------------------------------------------------------------------

    def refuse(self, calling: str, reason: str, message: str, status: int) -> int:
        log.warning("refused an instance from %s: %s", calling, message, extra={"event": "refused", "reason": reason})
        with self.lock:
            self.ledger.refuse(calling, reason, message)
        return status

    def on_store(self, event) -> int:
        received = event.request.DataSet
        with received.getbuffer() if received is not None else memoryview(b"") as raw:  # no copy of the bytes
            return self.store(event, raw)

    def store(self, event, raw: memoryview) -> int:
        """Check, write, record, rename: the status to answer (see :mod:`device.node.store`)."""
        calling = event.assoc.requestor.ae_title.strip()
        request = event.request
        sop_class = str(request.AffectedSOPClassUID)
        if sop_class not in ACCEPTED_SOP_CLASSES:  # negotiation already refuses these; belt and braces
            return self.refuse(calling, "sop-class", f"SOP class {sop_class} is not CT", PROCESSING_FAILURE)
        if len(raw) > self.config.max_instance_mb * 1e6:
            return self.refuse(calling, "too-large", f"{len(raw) / 1e6:.0f} MB is above max_instance_mb={self.config.max_instance_mb:g}", OUT_OF_RESOURCES)
        try:
            dataset = event.dataset
            study_uid = str(dataset.StudyInstanceUID)
            rows, columns = int(dataset.Rows), int(dataset.Columns)
            pixel_bytes = len(dataset.PixelData)
            transfer_syntax = event.context.transfer_syntax
            compressed = transfer_syntax.is_compressed if hasattr(transfer_syntax, "is_compressed") else False
            needed = rows * columns * int(dataset.get("SamplesPerPixel", 1)) * int(dataset.BitsAllocated) // 8
            if not study_uid or rows < 1 or columns < 1 or (not compressed and pixel_bytes < needed):
                raise ValueError("pixel data shorter than Rows x Columns")
        except Exception as error:  # a broken dataset raises many types; none may stop the node
            return self.refuse(calling, "broken", f"dataset cannot be used ({type(error).__name__})", CANNOT_UNDERSTAND)
        sop_uid = str(request.AffectedSOPInstanceUID)
        key = instance_hash(sop_uid)
        study, name = study_folder(study_uid), key[:32] + ".dcm"
        with self.lock:
            if self.ledger.instance(key) is not None:
                self.ledger.count("instances_duplicate")
                return SUCCESS  # already durable: a resend is acknowledged, not stored twice
            try:
                # the bytes as received, behind a Part 10 header; durable once fsynced *and*
                # in the ledger (recovery renames it), so the rename's folder fsync is batched
                header = part10_header(sop_class, sop_uid, transfer_syntax)
                folder = self.folders.folder(self.inbox / study)
                partial = folder / temporary_name(name)
                try:
                    size = write_parts(partial, (header, raw))
                except FileNotFoundError:  # the study folder was removed behind our back
                    self.folders.forget(folder)
                    size = write_parts(self.folders.folder(folder) / temporary_name(name), (header, raw))
                self.keep_header(study, header, raw)
                self.ledger.add_instance(key, study, name, calling, size)
                os.replace(partial, folder / name)
                self.folders.renamed_into(folder)
            except OSError as error:
                log.error("cannot store an instance: %s", error.strerror, extra={"event": "storage-error"})
                return OUT_OF_RESOURCES
        return SUCCESS

    def keep_header(self, study: str, header: bytes, raw) -> None:
        """The study's identity for its result: the first instance's header, no pixels."""
        if study in self.headers_kept:
            return
        path = self.folder / "headers" / f"{study}.dcm"
        if path.exists():
            self.headers_kept.add(study)
            return
        import pydicom

        header = pydicom.dcmread(io.BytesIO(header + bytes(raw)), stop_before_pixels=True)
        buffer = io.BytesIO()
        header.save_as(buffer)
        write_durably(path, buffer.getvalue())
        self.headers_kept.add(study)

"""``ctpi dicom``: the DICOM node. A PACS or scanner pushes studies; the verdict goes back.

- **Receive**: a Storage SCP (pynetdicom) with its own AE title answers C-ECHO and accepts CT
  and Enhanced CT Image Storage; other SOP classes are refused at negotiation. Each instance
  is written into the watch inbox as ``<study folder>/<instance>.dcm``, where the study folder
  is ``study-`` + a hash of the StudyInstanceUID and the file name a hash of the
  SOPInstanceUID, so no identifier of the patient appears in a path, the journal or a log.
  ``ctpi watch`` triages the files exactly once, as any dropped file.
- **Acknowledged means durable** (the order is the contract): the bytes, as received, go to
  a hidden temporary name (``.<name>.tmp``, which the watch daemon ignores) and are fsynced;
  the ledger row is committed (:mod:`device.node.ledger`, ``synchronous=FULL``); the file is
  renamed into place; only then does the sender hear *success*. A restart renames any
  temporary file whose row was committed and deletes the others, before the port opens, so
  the folder fsync that makes the new name itself durable is batched once per tick
  (:mod:`device.node.store` says why that is safe). A resend of an instance with a row is
  answered *success* and not written again, so it is never triaged twice.
- **Who may talk**: calling AE titles, optionally with a source address (``AET@HOST``), are
  allow-listed; anything else is rejected at association, logged with its reason.
- **Study complete**: no instance of a study for ``stable_seconds``. Once the watch journal
  holds a result for every instance of it, the verdict is final and the result is made.
- **Send back**: a Structured Report and a Secondary Capture (:mod:`device.node.report`) are
  written to ``STATE/dicom/outbox/`` durably, queued in the ledger, and sent with C-STORE to
  ``send_to``, retried every ``retry_seconds`` until the destination answers success; a
  result is marked sent only then, so a restart resends what was not confirmed (same UIDs).

The patient's identity is needed once more, for the result to be filed with the study: the
first instance's header (no pixel data) is kept in ``STATE/dicom/headers/``, a DICOM file
like the received images themselves.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from device.config import ConfigError, DicomConfig, LogFormat, load_config, override
from device.node.ledger import Ledger
from device.node.store import FolderSync, part10_header, temporary_name, write_durably, write_parts
from device.watch.durable import fsync_dir
from device.watch.sdnotify import Notifier

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
NODE_FOLDER = "dicom"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
ACCEPTED_SOP_CLASSES = (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE)
# C-STORE statuses (PS3.4 B.2.3)
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND, PROCESSING_FAILURE = 0x0000, 0xA700, 0xC000, 0x0110
TICK_SECONDS = 0.25


class NodeError(RuntimeError):
    """The node cannot start or send (bad address, port in use, unreadable state)."""


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


@dataclass(frozen=True)
class Destination:
    aet: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        try:
            aet, rest = text.split("@", 1)
            host, port = rest.rsplit(":", 1)
            return cls(aet.strip(), host.strip(), int(port))
        except ValueError:
            raise ConfigError(f"send_to {text!r}: expected AET@HOST:PORT, e.g. ORTHANC@10.0.0.5:4242") from None

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"


class Node:
    """The Storage SCP, the stable-study rule and the sender; ``run()`` returns an exit status."""

    def __init__(self, config: DicomConfig, inbox: Path, state: Path, model: Path | None = None, fmt: str | None = None,
                 notifier: Notifier | None = None):
        self.config = config
        self.inbox = Path(inbox).absolute()
        self.state = Path(state).absolute()
        self.folder = self.state / NODE_FOLDER
        self.model_path, self.fmt = model, fmt
        self.peers = [Peer.parse(entry) for entry in config.allow]
        self.destination = Destination.parse(config.send_to) if config.send_to else None
        if not self.inbox.is_dir():
            raise ConfigError(f"inbox {self.inbox} is not a folder; create it or set [watch] inbox / --inbox")
        self.notifier = notifier or Notifier()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.ledger: Ledger | None = None
        self.server = None
        self._journal = None
        self._model_info: dict | None = None
        self._spec = None
        self._classifier = None
        self.folders = FolderSync(self.inbox)
        self.headers_kept: set[str] = set()

    # -- start-up ----------------------------------------------------------------------------

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

    # -- study completion and results ------------------------------------------------------------

    def journal(self):
        from device.watch.journal import Journal, JournalError

        if self._journal is None:
            try:
                self._journal = Journal.open_readonly(self.state)
            except JournalError:
                return None
        return self._journal

    def model_info(self) -> dict:
        if self._model_info is None:
            info = {}
            if self.model_path is not None:
                try:
                    from device.core.bundle import load_bundle

                    bundle = load_bundle(self.model_path, verify=False)
                    fmt = self.fmt or bundle.default_format
                    info = {"name": bundle.name, "version": bundle.manifest.get("version"), "format": fmt, "sha256": bundle.sha256(fmt)}
                    self._spec = bundle.spec
                except Exception as error:  # the SR still goes out, naming the digest the journal holds
                    log.warning("model bundle not readable for the report: %s", error)
            self._model_info = info
        return self._model_info

    def spec(self):
        """The bundle's preprocessing, so the report's image is windowed as the model saw the slice
        (its ``dicom_window``); None (the default lung window) when no bundle is readable."""
        self.model_info()
        return self._spec

    def complete_studies(self) -> None:
        cutoff = time.time() - self.config.stable_seconds
        for row in self.ledger.studies_in("receiving"):
            if row["last_at"] <= cutoff and self.ledger.set_study(row["study"], "complete", only_if="receiving"):
                log.info("study %s complete: %d instances, none for %g s", row["study"], row["instances"],
                         self.config.stable_seconds, extra={"event": "study-complete", "study": row["study"]})
        for row in self.ledger.studies_in("complete"):
            journal = self.journal()
            verdict = journal.study(row["study"]) if journal is not None else None
            if verdict is None or verdict["slices"] + verdict["rejected"] < row["instances"]:
                continue  # the watch daemon has not triaged every instance yet
            try:
                files = self.make_results(row["study"], verdict)
            except Exception as error:  # one study's report must not stop the node
                log.exception("cannot make the result of study %s", row["study"])
                self.ledger.set_study(row["study"], "failed", only_if="complete", last_error=str(error)[:200])
                continue
            if self.ledger.queue_results(row["study"], files):
                log.info("study %s: result queued (%s, P=%s)", row["study"], verdict.get("label"), verdict.get("probability"),
                         extra={"event": "result-queued", "study": row["study"]})

    def top_slice_rgb(self, verdict: dict):
        """The verdict's slice as the model saw it, with the heatmap when enabled (RGB uint8)."""
        import numpy as np

        journal = self.journal()
        top = verdict.get("top_slice_id")
        row = journal._db.execute("SELECT stored_as FROM slices WHERE id = ?", (top,)).fetchone() if top is not None else None
        path = self.state / row["stored_as"] if row is not None and row["stored_as"] else None
        if path is None or not path.is_file():
            return np.zeros((256, 256, 3), dtype=np.uint8)
        from device.core.preprocess import decode_slice, prepare

        classifier = self.classifier()
        if classifier is None:
            decoded = decode_slice(path, self.spec())
            grey = np.clip(decoded.pixels, 0, 255).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=2)
        from device.core.heatmap import occlusion_map, overlay

        pixels = prepare(decode_slice(path, classifier.bundle.spec).pixels, classifier.bundle.spec)
        return overlay(pixels, occlusion_map(classifier, pixels).sensitivity)

    def classifier(self):
        if not self.config.heatmap or self.model_path is None:
            return None
        if self._classifier is None:
            from device.core.classifier import Classifier

            self._classifier = Classifier(str(self.model_path), self.fmt, 1)
        return self._classifier

    def make_results(self, study: str, verdict: dict) -> list[tuple[str, str]]:
        import pydicom

        from device.node.report import build_sc, build_sr, encode

        source = pydicom.dcmread(self.folder / "headers" / f"{study}.dcm")
        model = self.model_info() or {"sha256": verdict.get("model_sha256")}
        model.setdefault("sha256", verdict.get("model_sha256"))
        round_number = (self.ledger.study(study) or {}).get("round", 0) + 1
        files = []
        for kind, dataset in (("sr", build_sr(source, verdict, model)), ("sc", build_sc(source, self.top_slice_rgb(verdict), verdict, model))):
            relative = f"outbox/{study}/{round_number}-{kind}.dcm"
            write_durably(self.folder / relative, encode(dataset))
            files.append((kind, relative))
        return files

    # -- sending -----------------------------------------------------------------------------------

    def send_due(self) -> None:
        if self.destination is None:
            return
        due = self.ledger.due()
        if not due:
            return
        from pynetdicom import AE

        ae = AE(ae_title=self.config.aet)
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 30
        from device.node.report import COMPREHENSIVE_SR, EXPLICIT_VR_LITTLE_ENDIAN, SECONDARY_CAPTURE

        for sop_class in (COMPREHENSIVE_SR, SECONDARY_CAPTURE):
            ae.add_requested_context(sop_class, EXPLICIT_VR_LITTLE_ENDIAN)
        target = self.destination
        assoc = ae.associate(target.host, target.port, ae_title=target.aet)
        try:
            for item in due:
                if not assoc.is_established:
                    self.ledger.mark_failed(item["id"], f"no association with {target}", self.config.retry_seconds)
                    continue
                error = self.send_one(assoc, item)
                if error is None:
                    self.ledger.mark_sent(item["id"])
                    if not self.ledger.pending(item["study"]):
                        self.ledger.set_study(item["study"], "sent", only_if="reported")
                        log.info("study %s: result sent to %s", item["study"], target, extra={"event": "result-sent", "study": item["study"]})
                else:
                    log.warning("result of study %s not taken by %s: %s; retry in %g s", item["study"], target, error,
                                self.config.retry_seconds, extra={"event": "send-failed", "study": item["study"]})
                    self.ledger.mark_failed(item["id"], error, self.config.retry_seconds)
        finally:
            if assoc.is_established:
                assoc.release()

    def send_one(self, assoc, item: dict) -> str | None:
        import pydicom

        try:
            dataset = pydicom.dcmread(self.folder / item["path"])
        except (OSError, pydicom.errors.InvalidDicomError) as error:
            return f"outbox file unreadable: {error}"
        try:
            status = assoc.send_c_store(dataset)
        except (ValueError, RuntimeError) as error:
            return str(error)
        if status is None or "Status" not in status:
            return "no response (connection lost or timed out)"
        if status.Status not in (0x0000, 0xB000, 0xB007, 0xB006):  # success or warning
            return f"status 0x{status.Status:04X}"
        return None

    # -- main loop --------------------------------------------------------------------------------

    def sync_folders(self) -> None:
        """The batched folder fsync (names of instances already durable as temporary files)."""
        try:
            self.folders.flush()
        except OSError as error:  # recovery still renames their temporary files after a power cut
            log.error("cannot fsync the inbox folders: %s", error.strerror, extra={"event": "storage-error"})

    def request_stop(self, signum=None, frame=None) -> None:
        self.stop.set()

    def run(self) -> int:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.ledger = Ledger.open(self.folder)
            renamed = self.recover()
        except OSError as error:
            log.error("cannot start: %s", error)
            return EXIT_FAILED
        if renamed:
            log.info("recovery: %d acknowledged instances moved into the inbox", renamed)
        if not self.peers:
            log.warning("[dicom] allow is empty: every association will be refused")
        ae, handlers = self.build_ae()
        try:
            self.server = ae.start_server((self.config.host, self.config.port), block=False, evt_handlers=handlers)
        except OSError as error:
            log.error("cannot listen on %s:%d: %s", self.config.host, self.config.port, error)
            return EXIT_FAILED
        previous = {sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        log.info("DICOM node %s listening on %s:%d; inbox %s; results to %s", self.config.aet, self.config.host,
                 self.config.port, self.inbox, self.destination or "(nowhere: send_to unset)", extra={"event": "ready"})
        self.notifier.ready(status=f"DICOM node {self.config.aet} on port {self.config.port}")
        ping = self.notifier.ping_interval
        next_ping = 0.0
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                if ping and now >= next_ping:
                    self.notifier.watchdog()
                    next_ping = now + ping
                self.sync_folders()
                with self.lock:
                    self.complete_studies()
                try:
                    self.send_due()
                except Exception:  # a broken destination must not stop receiving
                    log.exception("sending results failed")
                self.stop.wait(TICK_SECONDS)
        finally:
            self.notifier.stopping()
            ae.shutdown()
            self.sync_folders()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            with self.lock:
                self.ledger.close()
            log.info("DICOM node stopped", extra={"event": "stopped"})
        return EXIT_OK


def status(state: Path) -> dict | None:
    """The node's counters for ``ctpi status`` (None if it never ran with this state)."""
    ledger = Ledger.open_readonly(Path(state) / NODE_FOLDER)
    if ledger is None:
        return None
    try:
        return ledger.summary()
    finally:
        ledger.close()


# -- command line ---------------------------------------------------------------------------------


def register(subparsers) -> None:
    parser = subparsers.add_parser("dicom", help="DICOM node: receive studies (C-STORE) and send the verdict back (SR)")
    parser.add_argument("--config", type=Path, default=None, help="TOML config file (default: /etc/ctpi/ctpi.toml if it exists)")
    parser.add_argument("--aet", default=None, help="our AE title (default CTPI)")
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port to listen on (default 11112)")
    parser.add_argument("--allow", action="append", default=None, metavar="AET[@HOST]", help="who may send (repeat)")
    parser.add_argument("--send-to", default=None, metavar="AET@HOST:PORT", help="where results go (the PACS)")
    parser.add_argument("--stable-seconds", type=float, default=None, help="a study is complete after this long without an instance")
    parser.add_argument("--inbox", type=Path, default=None, help="the watch daemon's inbox ([watch] inbox)")
    parser.add_argument("--state", type=Path, default=None, help="the watch daemon's state folder ([watch] state)")
    parser.add_argument("--model", type=Path, default=None, help="the bundle the watch daemon runs ([watch] model)")
    parser.add_argument("--bundle-sha256", default=None, help="refuse a bundle whose identity is not this (the deploy pins it)")
    parser.add_argument("--no-heatmap", action="store_true", help="Secondary Capture without the heatmap (no model in the node)")
    parser.add_argument("--log-format", choices=[f.value for f in LogFormat], default=None, help="text (default) or json lines")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from device.watch.daemon import configure_logging

    config = load_config(args.config)
    dicom = override(
        config.dicom, aet=args.aet, host=args.host, port=args.port, allow=tuple(args.allow) if args.allow else None,
        send_to=args.send_to, stable_seconds=args.stable_seconds, heatmap=False if args.no_heatmap else None,
    )
    watch = override(config.watch, inbox=args.inbox, state=args.state, model=args.model, bundle_sha256=args.bundle_sha256)
    configure_logging(LogFormat(args.log_format) if args.log_format else watch.log_format, getattr(args, "verbose", False))
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO lines name patients
    try:
        if watch.bundle_sha256:  # the bundle the deploy pinned, or nothing is sent under its name
            from device.core.bundle import BundleError, load_bundle

            try:
                load_bundle(watch.model, verify=False, expected_sha256=watch.bundle_sha256)
            except BundleError as error:
                raise ConfigError(str(error)) from None
        node = Node(dicom, watch.inbox, watch.state, watch.model, watch.format)
    except ConfigError as error:
        print(f"ctpi dicom: {error}", file=sys.stderr)
        return EXIT_USAGE
    return node.run()


def main(argv: list[str] | None = None) -> int:
    from device.cli import main as cli_main

    return cli_main(["dicom", *(argv or sys.argv[1:])])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def format_status(summary: dict | None) -> list[str]:
    """``ctpi status`` lines for the node (none if it never ran)."""
    if summary is None:
        return []
    counters, studies, outbox = summary["counters"], summary["studies"], summary["outbox"]
    refused = sum(value for name, value in counters.items() if name.startswith("refused_"))
    lines = [
        f"dicom       {counters.get('associations', 0)} associations, {counters.get('instances_received', 0)} instances received"
        f" ({counters.get('instances_duplicate', 0)} resent), {refused} refused",
        "dicom       studies " + (", ".join(f"{n} {state}" for state, n in sorted(studies.items())) or "none")
        + f"; results {outbox['sent']} sent, {outbox['pending']} waiting",
    ]
    if outbox.get("last_error"):
        lines.append(f"dicom       NOT SENT: {outbox['last_error']}")
    return lines

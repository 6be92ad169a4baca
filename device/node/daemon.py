"""``ctpi dicom``: the DICOM node. A PACS or scanner pushes studies; the verdict goes back.

This module is the node's loop and command line; its parts are receiving
(:mod:`device.node.scp`), results (:mod:`device.node.outbox`) and sending (:mod:`device.node.sender`).

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
  holds a result for every instance of it (and the heatmap of its top slice, which the watch
  daemon makes: a bounded wait, see :mod:`device.node.outbox`), the verdict is final and the
  result is made.
- **Send back**: a Structured Report and a Secondary Capture (:mod:`device.node.report`) are
  written to ``STATE/dicom/outbox/`` durably, queued in the ledger, and sent with C-STORE to
  ``send_to``, retried every ``retry_seconds`` until the destination answers success; a
  result is marked sent only then, so a restart resends what was not confirmed (same UIDs).

The patient's identity is needed once more, for the result to be filed with the study: the
first instance's header (no pixel data) is kept in ``STATE/dicom/headers/``, a DICOM file
like the received images themselves.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path

from device.config import ConfigError, DicomConfig, LogFormat, load_config, override
from device.core.memory import one_malloc_arena
from device.node.ledger import NODE_FOLDER, Ledger
from device.node.outbox import Outbox
from device.node.scp import Peer, Receiver
from device.node.sender import Destination, Sender
from device.node.store import FolderSync
from device.watch.sdnotify import Notifier

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
TICK_SECONDS = 0.25


class NodeError(RuntimeError):
    """The node cannot start or send (bad address, port in use, unreadable state)."""


class Node(Receiver, Outbox, Sender):
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
        self._heatmap_waits: dict[str, float] = {}
        self.folders = FolderSync(self.inbox)
        self.headers_kept: set[str] = set()

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
        from device.core.dicom import import_pydicom_lean

        import_pydicom_lean()  # before pynetdicom imports it: 5 MB less for a long-running service
        one_malloc_arena()  # before pynetdicom's threads: 4.5 MB less at the peak once studies follow each other
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
    parser.add_argument("--no-heatmap", action="store_true", help="Secondary Capture without the heatmap (the watch daemon's; no wait for it)")
    parser.add_argument("--log-format", choices=[f.value for f in LogFormat], default=None, help="text (default) or json lines")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from device.watch.logs import configure_logging

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

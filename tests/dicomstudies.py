"""A state folder holding studies that arrived over DICOM, made by the real code in-process.

The node's own Storage SCP (:meth:`device.node.scp.Receiver.build_ae`) receives each study from a
pynetdicom SCU over loopback, ``ctpi watch --once`` (:class:`device.watch.daemon.Daemon`) triages it,
the node completes the study, makes its SR and Secondary Capture and sends them to a
pynetdicom Storage SCP standing in for the PACS. Three studies end in the three states the
page must tell apart: **sent**, **failed** (the PACS was down: last error, attempts) and
**queued** (never tried). Used by the page tests and the browser test (``docs/dicom-study.png``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tests.dicomtools import free_port, write_series

CALLING_AET = "CT_SCANNER"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


class Pacs:
    """A Storage SCP for SR and Secondary Capture on a free loopback port, started on demand."""

    def __init__(self):
        from device.node.report import COMPREHENSIVE_SR, SECONDARY_CAPTURE

        self.port, self.received, self.server = free_port(), [], None
        self.sop_classes = (COMPREHENSIVE_SR, SECONDARY_CAPTURE)

    def start(self) -> None:
        from pynetdicom import AE, evt

        ae = AE(ae_title="PACS")
        for sop_class in self.sop_classes:
            ae.add_supported_context(sop_class)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, lambda event: self.received.append(event.request.AffectedSOPClassUID) or 0)])

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


def send_study(port: int, files: list[Path]) -> None:
    import pydicom
    from pynetdicom import AE

    ae = AE(ae_title=CALLING_AET)
    ae.add_requested_context(CT_IMAGE_STORAGE, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="CTPI")
    assert assoc.is_established, "the node refused the association"
    try:
        for path in files:
            assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
    finally:
        assoc.release()


def studies_over_dicom(watch, work: Path, slices: int = 2, size: int = 64) -> dict[str, str]:
    """Three studies through node -> watch -> node -> PACS into ``watch.state``; returns
    ``{"sent" | "failed" | "queued": study folder}``. ``watch`` is a :class:`WatchConfig`."""
    from device.config import DicomConfig
    from device.node.daemon import Node
    from device.node.ledger import Ledger
    from device.watch.daemon import Daemon

    pacs = Pacs()
    watch = dataclasses.replace(watch, settle_seconds=0.0)
    Path(watch.inbox).mkdir(parents=True, exist_ok=True)
    config = DicomConfig(port=free_port(), allow=(CALLING_AET,), send_to=f"PACS@127.0.0.1:{pacs.port}", stable_seconds=0.0,
                         retry_seconds=0.0, heatmap=False)
    node = Node(config, watch.inbox, watch.state, watch.model)
    node.folder.mkdir(parents=True, exist_ok=True)
    node.ledger = Ledger.open(node.folder)
    ae, handlers = node.build_ae()
    server = ae.start_server(("127.0.0.1", config.port), block=False, evt_handlers=handlers)
    before: set[str] = set()
    studies = {}
    try:
        for outcome, seed, label in (("sent", 1, "COVID"), ("failed", 2, "NonCOVID"), ("queued", 3, "COVID")):
            send_study(config.port, write_series(work / outcome, slices, size=size, seed=seed, label=label))
            node.folders.flush()
            assert Daemon(watch, once=True).run() == 0
            node.complete_studies()
            (study,) = set(node.ledger.origins()) - before
            before.add(study)
            studies[outcome] = study
            assert node.ledger.study(study)["state"] == "reported", node.ledger.study(study)
            if outcome == "sent":  # refused once (the PACS is down), then taken
                node.send_due()
                pacs.start()
                node.send_due()
                pacs.stop()
                assert node.ledger.study(study)["state"] == "sent" and len(pacs.received) == 2
            elif outcome == "failed":
                node.send_due()
        return studies
    finally:
        server.shutdown()
        pacs.stop()
        node.ledger.close()

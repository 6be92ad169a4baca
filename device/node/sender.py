"""Sending: queued results go to ``send_to`` with C-STORE, retried every ``retry_seconds`` until
the destination answers success; only then is a result marked sent (a restart resends what was
not confirmed, with the same UIDs)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from device.config import ConfigError

log = logging.getLogger(__name__)


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


class Sender:
    """The sending half of :class:`~device.node.daemon.Node` (a base class: it works on the node's
    ``config``, ``destination``, ``folder`` and ``ledger``)."""

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

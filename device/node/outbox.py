"""Results: a study is complete once no instance arrived for ``stable_seconds``; once the watch
journal holds a result for every instance (and, with ``heatmap``, the heatmap of its top slice,
for at most ``heatmap_wait_seconds``), its Structured Report and Secondary Capture
(:mod:`device.node.report`) are written durably to ``STATE/dicom/outbox/`` and queued in the
ledger for :mod:`device.node.sender`.

The heatmap is the watch daemon's (:mod:`device.watch.evidence`): it scored the slice with the
model it holds and stores the coarse occlusion map in the journal; the node only smooths and
draws it, so it never loads LiteRT (#19: a second interpreter was about 20 MB of the node's
80 MB budget)."""

from __future__ import annotations

import logging
import time

from device.core.memory import release_memory
from device.node.store import write_durably

log = logging.getLogger(__name__)


class Outbox:
    """The results half of :class:`~device.node.daemon.Node` (a base class: it works on the node's
    ``config``, ``state``, ``folder``, ``ledger``, ``model_path``, ``fmt``, the caches
    ``_journal``, ``_model_info`` and ``_spec`` that the node starts empty, and
    ``_heatmap_waits``, when each study started waiting for its heatmap)."""

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
            if not self.heatmap_ready(row["study"], verdict, journal):
                continue
            self._heatmap_waits.pop(row["study"], None)
            try:
                files = self.make_results(row["study"], verdict)
            except Exception as error:  # one study's report must not stop the node
                log.exception("cannot make the result of study %s", row["study"])
                self.ledger.set_study(row["study"], "failed", only_if="complete", last_error=str(error)[:200])
                continue
            if self.ledger.queue_results(row["study"], files):
                log.info("study %s: result queued (%s, P=%s)", row["study"], verdict.get("label"), verdict.get("probability"),
                         extra={"event": "result-queued", "study": row["study"]})

    def heatmap_ready(self, study: str, verdict: dict, journal) -> bool:
        """Whether a triaged study's result may be made: without ``heatmap``, at once; else once
        the journal holds its top slice's heatmap (or why it could not be made), at once when
        the watch daemon's heartbeat says it makes none, or ``heatmap_wait_seconds`` after the
        node first found the study complete and triaged (a restart waits once more). Past the
        wait the Secondary Capture goes out without the heatmap and the log says why."""
        top = verdict.get("top_slice_id")
        if not self.config.heatmap or top is None:
            return True
        stored = journal.heatmap(top)
        if stored is not None:
            if stored["coarse"] is None:
                log.warning("study %s: Secondary Capture without heatmap: the watch daemon could not make it (%s)", study,
                            stored["error"], extra={"event": "no-heatmap", "study": study})
            return True
        beat = journal.heartbeat()
        if beat is not None and beat.get("study_heatmaps") is False:
            reason = "the watch daemon makes no study heatmaps ([watch] study_heatmaps = false)"
        else:
            waited = time.monotonic() - self._heatmap_waits.setdefault(study, time.monotonic())
            if waited < self.config.heatmap_wait_seconds:
                return False
            reason = f"none from the watch daemon {waited:.0f} s after the study was triaged (heatmap_wait_seconds)"
        log.warning("study %s: Secondary Capture without heatmap: %s", study, reason, extra={"event": "no-heatmap", "study": study})
        return True

    def top_slice_rgb(self, verdict: dict):
        """The verdict's slice as the model saw it, with the heatmap when enabled and the watch
        daemon made it (RGB uint8); the plain slice otherwise.

        No model here (#19): the heatmap is the coarse map the watch daemon stored in the
        journal (:mod:`device.watch.evidence`), smoothed to the model's input size as
        :func:`~device.core.heatmap.occlusion_map` smooths it, so the picture is the one the
        page would show for that slice."""
        import numpy as np

        journal = self.journal()
        top = verdict.get("top_slice_id")
        row = journal._db.execute("SELECT stored_as FROM slices WHERE id = ?", (top,)).fetchone() if top is not None else None
        path = self.state / row["stored_as"] if row is not None and row["stored_as"] else None
        if path is None or not path.is_file():
            return np.zeros((256, 256, 3), dtype=np.uint8)
        from device.core.preprocess import decode_slice, prepare

        spec = self.spec()
        stored = journal.heatmap(top) if self.config.heatmap and spec is not None else None
        decoded = decode_slice(path, spec)
        if stored is None or stored["coarse"] is None:
            grey = np.clip(decoded.pixels, 0, 255).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=2)
        from device.core.heatmap import overlay, sensitivity_map

        pixels = prepare(decoded.pixels, spec)
        del decoded
        return overlay(pixels, sensitivity_map(stored["coarse"], pixels.shape[:2]))

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
        del dataset
        release_memory()
        return files

"""Results: a study is complete once no instance arrived for ``stable_seconds``; once the watch
journal holds a result for every instance, its Structured Report and Secondary Capture
(:mod:`device.node.report`) are written durably to ``STATE/dicom/outbox/`` and queued in the
ledger for :mod:`device.node.sender`."""

from __future__ import annotations

import logging
import time

from device.node.store import write_durably

log = logging.getLogger(__name__)


def release_memory() -> None:
    """Hand freed heap back to the kernel (glibc's ``malloc_trim``): CPython and LiteRT free
    into malloc's arenas, which otherwise keep the pages, so the RSS of a long-running node
    would stay at its high-water mark after every study. A no-op where libc has no such call."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols, libc's among them
    except (OSError, AttributeError):
        pass


M_ARENA_MAX = -8  # glibc's malloc.h


def one_malloc_arena() -> None:
    """Make every thread allocate from glibc's main arena (``mallopt(M_ARENA_MAX, 1)``, what
    ``MALLOC_ARENA_MAX=1`` does). pynetdicom runs each association in a new thread, and glibc
    gives threads arenas of their own, whose freed pages :func:`release_memory` cannot all hand
    back: the node's peak grew by about 4.5 MB over its first four studies (82 -> 87.5 MB,
    ``tools/bench_dicom.py --studies 4``) and by 1.7 MB with one arena, at the same receive
    rate (the node's threads mostly wait on sockets and disks). Call it before any thread
    starts. A no-op where libc has no ``mallopt``."""
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        pass


class Outbox:
    """The results half of :class:`~device.node.daemon.Node` (a base class: it works on the node's
    ``config``, ``state``, ``folder``, ``ledger``, ``model_path``, ``fmt`` and the caches
    ``_journal``, ``_model_info`` and ``_spec`` that the node starts empty; the heatmap's model
    is deliberately not cached, see :meth:`top_slice_rgb`)."""

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
        """The verdict's slice as the model saw it, with the heatmap when enabled (RGB uint8).

        Memory (#19: the node's budget is 80 MB): the slice is decoded before the model is
        loaded, so the 512x512 float copies of the decode are gone before the interpreter
        arrives; the interpreter lives for the occlusion map only and its memory is handed back
        before the overlay and the Secondary Capture are built, and between studies."""
        import numpy as np

        journal = self.journal()
        top = verdict.get("top_slice_id")
        row = journal._db.execute("SELECT stored_as FROM slices WHERE id = ?", (top,)).fetchone() if top is not None else None
        path = self.state / row["stored_as"] if row is not None and row["stored_as"] else None
        if path is None or not path.is_file():
            return np.zeros((256, 256, 3), dtype=np.uint8)
        from device.core.preprocess import decode_slice, prepare

        if not self.config.heatmap or self.model_path is None:
            decoded = decode_slice(path, self.spec())
            grey = np.clip(decoded.pixels, 0, 255).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=2)
        from device.core.bundle import load_bundle
        from device.core.classifier import Classifier
        from device.core.heatmap import occlusion_map, overlay

        bundle = load_bundle(self.model_path)
        pixels = prepare(decode_slice(path, bundle.spec).pixels, bundle.spec)
        release_memory()
        classifier = Classifier(bundle, self.fmt, 1, guard=False)  # the guard judged the slice in the watch daemon
        try:
            sensitivity = occlusion_map(classifier, pixels).sensitivity
        finally:
            del classifier
            release_memory()
        return overlay(pixels, sensitivity)

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

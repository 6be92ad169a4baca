"""Study heatmaps: the watch daemon makes the occlusion map of each study's top slice (#19).

Why here: the DICOM node burns the top slice's heatmap into the Secondary Capture it sends the
PACS. Computing it in the node meant a second LiteRT interpreter on the Pi (about 20 MB of the
node's 80 MB budget: XNNPACK's packed weights and LiteRT's code pages) beside the one this
daemon already holds, for a slice this daemon has just scored. So the daemon that triages makes
the evidence and the node only draws it: the coarse ``grid x grid`` map
(:func:`device.core.heatmap.occlusion_map`) goes into the journal's ``heatmaps`` table, keyed by
slice id, and the node smooths and overlays it (:func:`device.core.heatmap.sensitivity_map`).

When: only when the daemon is idle (nothing settling in the inbox, nothing being read, scored
or committed), one map per idle pass, so triage of arriving slices always comes first and a new
arrival waits at most one map (49 invokes, a few seconds on a Pi 4). A study whose top slice
changes later (a more positive slice arrived) gets a map of its new top slice.

A slice whose map cannot be made (its file pruned or unreadable, or scored by another model
than the one loaded now) gets a record with the reason and no map, so it is not tried again,
and the daemon goes on. ``[watch] study_heatmaps = false`` turns it off; the heartbeat says so,
and the node then sends its Secondary Capture without a heatmap instead of waiting for one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def make_due_heatmap(journal, classifier, state: Path, grid: int) -> bool:
    """Make (or record the failure of) one due study heatmap; False when none is due.
    :class:`~device.watch.journal.JournalError` from the journal's write is the caller's."""
    due = journal.heatmap_due()
    if due is None:
        return False
    from device.core.heatmap import occlusion_map
    from device.core.preprocess import decode_slice, prepare

    slice_id, start = due["id"], time.perf_counter()
    error = coarse = base = None
    if due["model_sha256"] != classifier.sha256:
        error = f"scored by another model ({(due['model_sha256'] or 'none')[:12]}), not {classifier.sha256[:12]}"
    elif due["stored_as"] is None:
        error = "no stored file (it had left the inbox before it was triaged)"
    elif due["pruned_at"] is not None:
        error = "its file was deleted by retention (keep_done_days)"
    elif not (state / due["stored_as"]).is_file():
        error = f"its file {due['stored_as']} is gone"
    else:
        spec = classifier.bundle.spec
        try:
            pixels = prepare(decode_slice(state / due["stored_as"], spec).pixels, spec)
            heatmap = occlusion_map(classifier, pixels, grid)
            coarse, base = heatmap.coarse, heatmap.base_probability
        except Exception as exc:  # a bad file must never stop triage
            error = f"{type(exc).__name__}: {exc}"[:300]
    seconds = time.perf_counter() - start
    journal.record_heatmap(slice_id, time.time(), grid=grid if coarse is not None else None, coarse=coarse,
                           base_probability=base, model_sha256=classifier.sha256 if coarse is not None else None,
                           error=error, seconds=seconds)
    if error is None:
        log.info("heatmap of top slice %d made (%dx%d, %.1f s)", slice_id, grid, grid, seconds,
                 extra={"event": "study-heatmap", "record": slice_id})
    else:
        log.warning("no heatmap of top slice %d: %s", slice_id, error, extra={"event": "study-heatmap-failed", "record": slice_id})
    return True


class StudyHeatmaps:
    """When the daemon makes one (``make_one``): heatmaps on, the daemon idle, and more slices
    recorded since the journal last had none due, so an idle daemon does not query it every tick."""

    def __init__(self, enabled: bool, grid: int):
        self.enabled, self.grid = enabled, grid
        self.checked_at: int | None = None  # slices processed when none was due

    def make_one(self, journal, classifier, state: Path, idle: bool, processed: int) -> bool:
        """True if a map was made or recorded as impossible."""
        if not self.enabled or not idle or self.checked_at == processed:
            return False
        if make_due_heatmap(journal, classifier, state, self.grid):
            return True
        self.checked_at = processed
        return False

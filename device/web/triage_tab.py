"""The Triage tab: scores uploads in the page's memory (with a heatmap) and writes to the inbox only on Send to inbox."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import streamlit as st

from device.config import Config
from device.core.band import UNCERTAIN, UNCERTAIN_DISPLAY
from device.core.classifier import Classifier, Prediction
from device.core.heatmap import Heatmap, colour_scale, occlusion_map, overlay
from device.core.preprocess import BadSliceError, decode_slice, prepare
from device.web.markup import heatmap_legend, md_escape, probability_bar

DISPLAY_WIDTH = 260  # pixels per image column: two of them and the figures fit a laptop screen


@dataclass
class SliceResult:
    """What the page shows for one uploaded file: a prediction, or the reason it failed."""

    name: str
    size_bytes: int
    prediction: Prediction | None = None
    heatmap: Heatmap | None = None
    pixels: np.ndarray | None = None  # the model input, shown beside the overlay
    source: dict = field(default_factory=dict)  # format, mode, width, height: nothing from DICOM headers
    error: str | None = None
    reason: str | None = None


@st.cache_resource
def interpreter_lock(sha256: str) -> threading.Lock:
    """Sessions run in threads and a TFLite interpreter is not thread-safe: one invoke (or one
    heatmap) at a time per model."""
    return threading.Lock()


def analyse(classifier: Classifier, name: str, data: bytes, grid: int, max_bytes: int) -> SliceResult:
    """Prediction and heatmap (``grid`` 0: none) for one uploaded file; a bad file becomes a
    result with its error, never an exception, so the other files and the page keep working."""
    result = SliceResult(name=name, size_bytes=len(data))
    if len(data) > max_bytes:
        result.error, result.reason = f"file is {len(data) / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.0f} MB", "too-large"
        return result
    try:
        start = time.perf_counter()
        decoded = decode_slice(data, classifier.bundle.spec)
        decoded_at = time.perf_counter()
        classifier.check(decoded)  # the input guard: not a chest CT slice -> BadSliceError "not-ct"
        pixels = prepare(decoded.pixels, classifier.bundle.spec)
        prepared_at = time.perf_counter()
    except BadSliceError as error:
        result.error, result.reason = str(error), error.reason
        return result
    result.source = {"format": decoded.format, "mode": decoded.mode, "width": decoded.width, "height": decoded.height}
    result.pixels = pixels
    with interpreter_lock(classifier.sha256):
        result.prediction = classifier.predict_pixels(
            pixels, {"decode": (decoded_at - start) * 1000.0, "preprocess": (prepared_at - decoded_at) * 1000.0}
        )
        if grid > 0:
            result.heatmap = occlusion_map(classifier, pixels, grid)
    return result


def safe_name(name: str) -> str:
    """An uploaded file's name, reduced to something safe to create in the inbox."""
    base = Path(name.replace("\\", "/")).name
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in base).lstrip(".")
    return cleaned or "upload"


def send_to_inbox(inbox: Path, name: str, data: bytes) -> Path:
    """Copy an upload into the watch daemon's inbox (``ui-uploads/``, a study of its own).
    Written under a dot-name the daemon ignores, then renamed, so it is never read half-written."""
    folder = Path(inbox) / "ui-uploads"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / safe_name(name)
    stem, suffix, counter = target.stem, target.suffix, 1
    while target.exists():
        target = folder / f"{stem}-{counter}{suffix}"
        counter += 1
    partial = folder / f".{target.name}.part"
    partial.write_bytes(data)
    partial.replace(target)
    return target


def show_result(result: SliceResult, classifier: Classifier, inbox: Path, data: bytes, key: str) -> None:
    with st.container(border=True):
        if result.error:
            what = "not scored" if result.reason == "not-ct" else "cannot be read"
            st.error(f"**{md_escape(result.name)}**: {what} — {md_escape(result.error)} (`{result.reason}`)")
            return
        prediction, heatmap = result.prediction, result.heatmap
        positive = classifier.bundle.positive_label
        flagged = prediction.label == positive
        if prediction.label == UNCERTAIN:
            badge = f":orange-background[**{UNCERTAIN_DISPLAY}**]"
        else:
            badge = f":red-background[**{prediction.label}**]" if flagged else f":green-background[**{prediction.label}**]"
        st.markdown(
            f"#### {md_escape(result.name)}\n{badge} · P({positive}) = **{prediction.positive_probability:.3f}** "
            f"(threshold {prediction.threshold:.2f}) · {prediction.latency_ms['total']:.0f} ms"
        )
        original, explained, figures = st.columns([1, 1, 1.2], gap="medium")
        original.image(result.pixels[..., 0], caption="model input", width=DISPLAY_WIDTH, clamp=True)
        if heatmap is not None:
            explained.image(overlay(result.pixels, heatmap.sensitivity), caption="occlusion heatmap", width=DISPLAY_WIDTH)
            explained.html(heatmap_legend(colour_scale(heatmap.sensitivity), positive))
            explanation = (
                f"heatmap: {heatmap.invokes} invokes in {heatmap.seconds:.1f} s; warm = hiding it lowers P({positive}), "
                "blue = raises it  \n"
            )
        else:
            explained.caption("Heatmaps are off (switch above the uploader).")
            explanation = ""
        with figures:
            st.html(probability_bar(prediction.positive_probability, prediction.threshold, positive, prediction.uncertain_band))
            latency = prediction.latency_ms
            st.caption(
                f"latency: decode {latency.get('decode', 0):.1f} · preprocess {latency.get('preprocess', 0):.1f} · "
                f"invoke {latency['invoke']:.1f} ms  \n"
                f"{explanation}"
                f"{result.source['format']} {result.source['width']}×{result.source['height']} "
                f"({result.size_bytes / 1024:.0f} KB) · model sha256 `{prediction.model_sha256[:12]}` · "
                f"bundle `{prediction.bundle_sha256[:12]}`"
            )
            if st.button("Send to inbox", key=f"inbox-{key}", help=f"copy this file into {inbox} for the watch daemon"):
                try:
                    target = send_to_inbox(inbox, result.name, data)
                    st.success(f"Copied to {target}; the watch daemon will record it.")
                except OSError as error:
                    st.error(f"Could not copy it into the inbox: {error}")


def triage_tab(classifier: Classifier, config: Config) -> None:
    settings = config.ui
    uploads = st.file_uploader(
        "CT slices: PNG, JPEG or DICOM (recognised by content, any file name)",
        accept_multiple_files=True,
        key="uploads",
    )
    heatmaps = st.toggle(
        "Occlusion heatmaps",
        value=True,
        key="heatmaps",
        help=f"{settings.heatmap_grid ** 2 + 1} extra invokes per slice; switch off to triage many slices quickly on a Pi",
    )
    if not uploads:
        st.info("Drop one or more slices here. They stay in this page's memory; nothing is written to the inbox unless you ask.")
        return
    cache = st.session_state.setdefault("results", {})
    grid = settings.heatmap_grid if heatmaps else 0
    wanted = set()
    for upload in uploads:
        key = f"{upload.file_id}:{classifier.sha256}:{grid}"
        wanted.add(key)
        data = upload.getvalue()
        if key not in cache:
            with st.spinner(f"Analysing {upload.name}…"):
                cache[key] = analyse(classifier, upload.name, data, grid, settings.max_upload_mb * 1024 * 1024)
        show_result(cache[key], classifier, config.watch.inbox, data, upload.file_id)
    for stale in set(cache) - wanted:  # removed uploads or another model: free their arrays
        del cache[stale]

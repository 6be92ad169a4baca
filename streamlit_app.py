"""The ctpi web page: triage uploaded slices with a heatmap, browse the watch daemon's history,
benchmark a model and see the appliance's status, behind a password.

A thin layer over ``device/``: predictions come from :class:`device.core.classifier.Classifier`
(one per bundle and format, loaded once per process), heatmaps from :mod:`device.core.heatmap`,
the password from :mod:`device.web.auth`, history and status from the daemon's journal. Started
by ``ctpi ui`` (which passes the settings) or ``make run``. Never imports TensorFlow.
"""

from __future__ import annotations

import html
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import streamlit as st

from device.config import Config, UiConfig
from device.core.band import REVIEW, UNCERTAIN, UNCERTAIN_DISPLAY, display_label
from device.core.bundle import BundleError, find_bundles, load_bundle
from device.core.classifier import Classifier, Prediction
from device.core.heatmap import OPACITY, Heatmap, colour_scale, legend, occlusion_map, overlay
from device.core.preprocess import BadSliceError, decode_slice, prepare
from device.core.siteprofile import SiteProfileError, load_site_profile
from device.tools.plots import reliability_svg, roc_svg
from device.watch.journal import Journal, JournalError
from device.web.auth import AuthError, LoginThrottle, read_password_hash
from device.web.history import (
    REJECTED,
    HistoryFilter,
    delivery,
    dicom_origins,
    disk_free,
    process_memory_mb,
    slice_page,
    table_rows,
    to_csv,
    utc,
)
from device.web.ui import settings_from_environment

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


# -- resources shared by every session of this process --------------------------------------


@st.cache_resource(show_spinner="Loading the model…", max_entries=2)
def get_classifier(bundle_path: str, fmt: str | None, threads: int | None) -> Classifier:
    """One interpreter per (bundle, format) per process; at most two kept (memory on a Pi)."""
    return Classifier(bundle_path, fmt, threads)


@st.cache_resource
def interpreter_lock(sha256: str) -> threading.Lock:
    """Sessions run in threads and a TFLite interpreter is not thread-safe: one invoke (or one
    heatmap) at a time per model."""
    return threading.Lock()


@st.cache_resource
def get_throttle(attempts: int, lockout_seconds: float) -> LoginThrottle:
    return LoginThrottle(attempts, lockout_seconds)


# -- pure helpers ------------------------------------------------------------------------------


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


def probability_bar(probability: float, threshold: float, positive_label: str, band: list[float] | None = None) -> str:
    """An HTML bar of P(positive) with a marker at the threshold and the "uncertain — review"
    band shaded."""
    over = probability >= threshold
    uncertain = band is not None and band[0] <= probability < band[1]
    colour = "#e0a100" if uncertain else "#d33" if over else "#2a8a4a"
    shade = (
        f'<div data-band="{band[0]:.3f},{band[1]:.3f}" title="uncertain — review" style="position:absolute;'
        f'left:{band[0] * 100:.1f}%;width:{(band[1] - band[0]) * 100:.1f}%;top:0;bottom:0;'
        'background:repeating-linear-gradient(45deg,rgba(224,161,0,.45) 0 4px,rgba(224,161,0,.15) 4px 8px)"></div>'
        if band else ""
    )
    return (
        '<div style="font-size:0.85rem;margin:0.2rem 0 0.6rem 0">'
        f'<div style="display:flex;justify-content:space-between"><span>P({html.escape(positive_label)}), calibrated</span>'
        f"<span><b>{probability:.3f}</b></span></div>"
        '<div style="position:relative;height:14px;background:#e6e8eb;border-radius:7px;overflow:hidden">'
        f'<div style="width:{probability * 100:.1f}%;height:100%;background:{colour}"></div>{shade}'
        f'<div style="position:absolute;left:{threshold * 100:.1f}%;top:0;bottom:0;width:2px;background:#222"></div>'
        "</div>"
        f'<div style="position:relative;height:1.1rem"><span style="position:absolute;left:{threshold * 100:.1f}%;'
        f'transform:translateX(-50%);color:#555">threshold {threshold:.2f}</span></div>'
        + (f'<div style="color:#8a6d00">uncertain — review band {band[0]:.2f}–{band[1]:.2f}</div>' if band else "")
        + "</div>"
    )


def heatmap_legend(scale: float, positive_label: str) -> str:
    """A colour bar for the overlay: the colours at their drawn opacity over mid grey, with
    the change of P each end stands for (this image's own scale)."""
    stops = ", ".join(
        f"rgba({r},{g},{b},{OPACITY * abs(value):.2f}) {(value + 1) * 50:.0f}%" for value, (r, g, b) in legend(21)
    )
    label = html.escape(positive_label)
    return (
        '<div data-legend="heatmap" style="font-size:0.75rem;width:260px;margin-top:-0.4rem">'
        f'<div style="height:12px;border-radius:3px;background:linear-gradient(to right, {stops}), #808080"></div>'
        '<div style="display:flex;justify-content:space-between;color:#444">'
        f"<span>−{scale:.2f}</span><span>0</span><span>+{scale:.2f}</span></div>"
        f'<div style="color:#444">change of P({label}) when the region is hidden: warm = evidence for {label}, '
        "blue = against</div></div>"
    )


def md_escape(text: str) -> str:
    """A file name as literal Markdown text (a name like ``[x](http://…)`` must not become a link)."""
    return "".join("\\" + c if c in "\\`*_{}[]()<>#+!|~" else c for c in text)


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


def flatten(values: dict, prefix: str = "") -> dict[str, object]:
    """Nested manifest metrics as ``a.b.c -> value`` for a two-column table."""
    flat: dict[str, object] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, float):
            flat[name] = f"{value:.4g}"
        elif isinstance(value, (int, str, bool)) or value is None:
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


TABLE_STYLE = (
    "<style>table.ctpi{border-collapse:collapse;width:100%;font-size:0.85rem}"
    "table.ctpi th{text-align:left;font-weight:600;border-bottom:2px solid #d5d8dc;padding:0.3rem 0.6rem}"
    "table.ctpi td{border-bottom:1px solid #eceef0;padding:0.25rem 0.6rem}"
    "table.ctpi td.n{text-align:right;font-variant-numeric:tabular-nums}"
    "table.ctpi tr.flag td{background:#fdecec}</style>"
)


def html_table(rows: list[dict], name: str, flag=None) -> str:
    """Rows as an escaped HTML table. Streamlit's dataframe would pull in pandas and pyarrow
    (about 80 MB more in the page process, a lot on a 1 GB Pi) for a few dozen rows."""
    if not rows:
        return ""
    columns = list(rows[0])

    def cell(value) -> str:
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        text = "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
        return f'<td class="n">{html.escape(text)}</td>' if numeric else f"<td>{html.escape(text)}</td>"

    header = "".join(f"<th>{html.escape(str(column))}</th>" for column in columns)
    body = "".join(
        f'<tr{" class=flag" if flag and flag(row) else ""}>{"".join(cell(row[c]) for c in columns)}</tr>' for row in rows
    )
    return f'{TABLE_STYLE}<table class="ctpi" data-table="{html.escape(name)}"><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>'


# -- page sections ---------------------------------------------------------------------------


def login(settings: UiConfig) -> bool:
    """The password gate; True once this browser session has logged in."""
    if st.session_state.get("authenticated"):
        return True
    st.title("ctpi · CT slice triage")
    try:
        encoded = read_password_hash(settings.password_file)
    except AuthError as error:
        st.error(f"The password file cannot be used: {error}")
        return False
    if encoded is None:
        st.warning(
            "**No password is set yet**, so this page stays closed.\n\n"
            f"On the appliance, run `ctpi passwd --password-file {settings.password_file}` "
            "and reload this page."
        )
        return False
    throttle = get_throttle(settings.login_attempts, settings.lockout_seconds)
    address = st.context.ip_address  # None for a localhost client
    client = address if isinstance(address, str) else "local"
    with st.form("login"):
        password = st.text_input("Password", type="password")
        submitted = st.form_submit_button("Log in", type="primary")
    if submitted:
        result = throttle.attempt(client, password, encoded)
        if result.ok:
            st.session_state.authenticated = True
            st.rerun()
        elif result.retry_after_s > 0:
            st.error(f"Too many wrong passwords. Try again in {result.retry_after_s:.0f} s.")
        else:
            st.error(f"Wrong password. {result.attempts_left} more tries before a {settings.lockout_seconds:.0f} s pause.")
    st.caption("Decision support for triage, not a diagnostic device.")
    return False


def choose_model(config: Config) -> Classifier | None:
    """Sidebar: the bundle selector (``[watch] model`` first) and the chosen model's card."""
    settings = config.ui
    bundles = find_bundles(settings.models_dir)
    preferred = Path(config.watch.model)
    resolved = [b.resolve() for b in bundles]
    if (preferred / "manifest.json").is_file() and preferred.resolve() not in resolved:
        bundles.insert(0, preferred)
        resolved.insert(0, preferred.resolve())
    if not bundles:
        st.sidebar.error(f"No model bundles in `{settings.models_dir}` and none at `{preferred}`.")
        return None
    default = resolved.index(preferred.resolve()) if preferred.resolve() in resolved else 0
    chosen = st.sidebar.selectbox("Model", bundles, index=default, format_func=lambda p: p.name, key="bundle")
    try:
        pinned = config.watch.bundle_sha256 if Path(chosen).resolve() == preferred.resolve() else None
        bundle = load_bundle(chosen, verify=False, expected_sha256=pinned or None)
        formats = list(bundle.formats)
        fmt = st.sidebar.selectbox("Format", formats, index=formats.index(bundle.default_format), key="format")
        classifier = get_classifier(str(chosen), fmt, settings.threads or config.watch.threads)
    except (BundleError, RuntimeError, ValueError) as error:
        st.sidebar.error(f"This model cannot be used: {error}")
        return None
    apply_site_profile(classifier, config.watch.state)
    manifest = classifier.bundle.manifest
    st.sidebar.caption(
        f"{manifest['name']} {manifest['version']} · {manifest['architecture']} · threshold {classifier.threshold:.3f} "
        f"for {classifier.bundle.positive_label} · sha256 `{classifier.sha256[:12]}`"
    )
    if classifier.site is not None:
        st.sidebar.caption(f"**{classifier.site.describe()}** (`ctpi site-check --accept`)")
    elif st.session_state.get("site_error"):
        st.sidebar.warning(st.session_state.site_error)
    figures = [row for row in model_figures(manifest.get("metrics") or {}) if row["model"] in (classifier.format, "model")]
    if figures:
        row = figures[0]
        st.sidebar.caption(
            f"val: accuracy {row['accuracy']:.3f} · sensitivity {row['sensitivity']:.3f} · "
            f"specificity {row['specificity']:.3f} · ROC AUC {row['auc']:.3f} (n = {row['n']})"
        )
    return classifier


def apply_site_profile(classifier: Classifier, state: Path) -> None:
    """Decide with the state folder's site profile when it was accepted for this model; a
    profile for another model (or an unreadable one) is refused and the reason kept for the
    sidebar. Read on every rerun, so an accepted profile applies at once."""
    st.session_state.site_error = None
    try:
        profile = load_site_profile(state)
        classifier.use_site_profile(profile)
    except SiteProfileError as error:
        classifier.use_site_profile(None)
        st.session_state.site_error = str(error)


FIGURES = ("accuracy", "sensitivity", "specificity", "auc")


def model_figures(metrics: dict, split: str = "val") -> list[dict]:
    """The model card's headline figures from a manifest's ``metrics``: the reference model's
    and each format's on ``split`` (as ``python -m convert`` records them)."""
    rows = []

    def add(name: str, figures) -> None:
        if isinstance(figures, dict) and all(isinstance(figures.get(key), (int, float)) for key in FIGURES):
            rows.append({"model": name, "n": figures.get("n"), **{key: round(float(figures[key]), 3) for key in FIGURES}})

    add("reference (Keras float)" if "formats" in metrics else "model", metrics.get(split))
    for fmt, figures in (metrics.get("formats") or {}).items():
        if isinstance(figures, dict):
            add(fmt, figures.get(split))
    return rows


def model_card_tab(classifier: Classifier) -> None:
    bundle = classifier.bundle
    manifest = bundle.manifest
    st.markdown(
        f"**{manifest['name']}** {manifest['version']} · {manifest['architecture']} · labels {', '.join(bundle.labels)} · "
        f"threshold **{bundle.threshold:.3f}** for {bundle.positive_label} · formats {', '.join(bundle.formats)}"
    )
    metrics = manifest.get("metrics") or {}
    figures = model_figures(metrics)
    if figures:
        st.caption("Figures on the validation split, from the bundle's manifest")
        st.html(html_table([{("ROC AUC" if key == "auc" else key): value for key, value in row.items()} for row in figures], "figures"))
    elif metrics:
        st.html(html_table([{"metric": key, "value": str(value)} for key, value in flatten(metrics).items()], "metrics"))
    else:
        st.info("This bundle's manifest records no metrics.")
    calibration_section(manifest, bundle.positive_label)
    site_section(classifier)
    card = bundle.path / "MODEL_CARD.md"
    if card.is_file():
        with st.expander("MODEL_CARD.md", expanded=True):
            st.markdown(card.read_text(encoding="utf-8"))
    else:
        st.caption("This bundle has no MODEL_CARD.md.")


def calibration_section(manifest: dict, positive_label: str) -> None:
    """ECE per val source before and after calibration, the reliability diagram, the band."""
    entry = manifest.get("calibration")
    if not entry:
        st.warning("This bundle's P is not calibrated: run `python -m convert.calibrate` on it.")
        return
    st.subheader("Calibration")
    band = manifest.get("uncertain_band")
    st.markdown(
        f"P({positive_label}) = sigmoid({entry['a']:.3f} · logit(p) + {entry['b']:.3f}) ({entry['method']}, fitted on "
        f"{entry['fitted_on']['n']} val slices); threshold {manifest['threshold']:.3f} on this scale"
        + (f"; **uncertain — review** band [{band[0]:.3f}, {band[1]:.3f})" if band else "")
    )
    rows = []
    for name, after in entry["ece_after"].items():
        figures = entry["band"]["figures"].get(name, {})
        rows.append({
            "val source": name, "slices": entry["reliability"][name]["after"]["n"],
            "ECE before": round(entry["ece_before"][name], 3), "ECE after": round(after, 3),
            "in band": figures.get("in_band"), "accuracy outside band": round(figures.get("accuracy_outside", float("nan")), 3),
        })  # fmt: skip
    st.html(html_table(rows, "calibration"))
    st.html(reliability_svg({name: r["after"]["bins"] for name, r in entry["reliability"].items()}, "Reliability after calibration (val)"))


def site_section(classifier: Classifier) -> None:
    """The accepted site profile's report: ROC curve and the figures with their intervals."""
    site = classifier.site
    if site is None:
        st.caption("No site profile: `ctpi site-check --model BUNDLE DATA --accept` checks the model on local slices.")
        return
    report = site.data["report"]
    st.subheader("Site check")
    st.markdown(f"**{site.describe()}** · data fingerprint `{site.data['data']['fingerprint'][:12]}` · rule {site.data['rule']}")
    rows = []
    for title, point in (("bundle", report["bundle"]), ("site (in use)", report["proposed"])):
        sensitivity, specificity = point["sensitivity"], point["specificity"]
        rows.append({
            "threshold": title, "value": round(point["threshold"], 3),
            "sensitivity": f"{sensitivity['value']:.3f} ({sensitivity['ci95'][0]:.3f}–{sensitivity['ci95'][1]:.3f})",
            "specificity": f"{specificity['value']:.3f} ({specificity['ci95'][0]:.3f}–{specificity['ci95'][1]:.3f})",
            "uncertain": point["band"]["in_band"], "accuracy outside band": round(point["band"]["accuracy_outside"], 3),
        })  # fmt: skip
    st.html(html_table(rows, "site"))
    auc = report["auc"]
    st.caption(
        f"ROC AUC {auc['value']:.3f} (95% CI {auc['ci95'][0]:.3f}–{auc['ci95'][1]:.3f}, DeLong) · ECE {report['calibration']['ece']:.3f} · "
        f"{report['data']['n']} slices scored, {report['refused']['n']} refused, {report['uncertain']} uncertain at the bundle's band · "
        "intervals: 95% Wilson"
    )
    point = report["proposed"]
    mark = (1 - point["specificity"]["value"], point["sensitivity"]["value"])
    st.html(roc_svg({"site slices": (report["roc"]["fpr"], report["roc"]["tpr"])}, "ROC on local slices", {"site threshold": mark}))
    site_map = report.get("site_calibration") or {}
    if site.calibration is not None and "reliability" in site_map:
        ece = site_map["ece"]
        st.caption(
            f"Site calibration in use instead of the bundle's: P = sigmoid({site_map['a']:.3f} · logit(p) + {site_map['b']:.3f}) "
            f"(Platt on the model's raw output of {site_map['fitted_on']['n']} local slices) · ECE bundle map {ece['bundle_map']:.3f}, "
            f"site map {ece['site_map_in_sample']:.3f} in-sample"
            + (f", {ece['site_map_cross_fitted']:.3f} cross-fitted ({site_map['cross_fit']['folds']} folds)" if ece["site_map_cross_fitted"] is not None else "")
        )
        curves = {name: bins for name, bins in site_map["reliability"].items() if name != "site map, in-sample"}
        st.html(reliability_svg(curves, "Reliability on local slices"))


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


def bench_tab(classifier: Classifier) -> None:
    from device.core.backends import default_threads
    from device.tools.bench import format_table, run_benchmark

    st.markdown(
        "Runs `ctpi bench` on the selected model in a separate process: interpreter load, invoke latency, "
        "end-to-end latency from PNG files, throughput and memory. It keeps the CPU busy while it runs."
    )
    left, middle, right = st.columns(3)
    threads = left.multiselect("Threads", [1, 2, 3, 4], default=[default_threads()], key="bench_threads")
    runs = middle.number_input("Runs", min_value=1, max_value=500, value=20, key="bench_runs")
    warmup = right.number_input("Warm-up", min_value=0, max_value=50, value=3, key="bench_warmup")
    if st.button("Run bench", type="primary", disabled=not threads):
        with st.spinner("Benchmarking…"):
            st.session_state.bench = run_benchmark(
                [str(classifier.bundle.path)], sorted(threads), int(runs), int(warmup), fmt=classifier.format
            )
    report = st.session_state.get("bench")
    if report:
        rows = [
            {
                "model": r["model"], "format": r["format"], "threads": r["threads"],
                "invoke mean ms": round(r["invoke_ms"]["mean"], 2), "p90 ms": round(r["invoke_ms"]["p90"], 2),
                "end-to-end ms": round(r["end_to_end_ms"]["mean"], 1), "slices/s": round(r["throughput_per_s"], 1),
                "peak MB": round(r["rss_peak_mb"]), "backend": r["backend"],
            }
            for r in report["results"] if "error" not in r
        ]  # fmt: skip
        for failed in (r for r in report["results"] if "error" in r):
            st.error(f"threads={failed['threads']}: {failed['error']}")
        if rows:
            st.html(html_table(rows, "bench"))
        st.code(format_table(report), language=None)


def open_journal(state: Path) -> Journal | None:
    try:
        return Journal.open_readonly(state)
    except JournalError as error:
        st.info(f"No history yet: {error}")
        return None


def history_tab(config: Config, classifier: Classifier) -> None:
    labels, flagged_label = classifier.labels, classifier.bundle.positive_label
    journal = open_journal(config.watch.state)
    if journal is None:
        return
    with journal:
        studies = journal.studies()
        origins = dicom_origins(config.watch.state)  # studies that arrived over DICOM (the node's ledger)
        since_column, label_column, study_column = st.columns(3)
        since = since_column.date_input("Recorded since (UTC)", value=None, key="history_since")
        label = label_column.selectbox(
            "Label", [None, *labels, UNCERTAIN, REJECTED], format_func=lambda v: "any" if v is None else display_label(v), key="history_label"
        )
        study = study_column.selectbox(
            "Study", [None, *(s["name"] for s in studies)], key="history_study",
            format_func=lambda v: "any" if v is None else f"{v} · DICOM from {origins[v]['calling_aet']}" if v in origins else v,
        )
        chosen = HistoryFilter(since=since, label=label, study=study)
        if st.session_state.get("history_filter") != chosen:  # new filter: back to the first page
            st.session_state.history_filter, st.session_state.history_page = chosen, 0
        if study is not None:
            verdict = journal.study(study)
            if verdict and verdict["label"]:
                st.markdown(
                    f"**Study {html.escape(study)}**: **{verdict['label']}**, P = {verdict['probability']:.3f} "
                    f"(rule `{verdict['rule']}`: the most suspicious slice decides; an uncertain slice and no positive one: "
                    f"{REVIEW}) · {verdict['slices']} slices, {verdict['positive_slices']} over the threshold, "
                    + (f"{verdict['uncertain_slices']} uncertain, " if verdict.get("uncertain_slices") else "")
                    + f"{verdict['rejected']} rejected · updated {verdict['updated_at'][:19]}"
                )
            if study in origins:
                dicom_line(origins[study])
        page = slice_page(journal, chosen, st.session_state.history_page, config.ui.page_size)
        if page.rows:
            st.html(html_table(table_rows(page.rows), "history", flag=lambda row: row["label"] == flagged_label))
        else:
            st.info("No slices match these filters.")
        previous, where, following, download = st.columns([1, 2, 1, 2])
        if previous.button("← Newer", disabled=page.number == 0, key="history_newer"):
            st.session_state.history_page -= 1
            st.rerun()
        where.caption(f"page {page.number + 1} · {config.ui.page_size} per page")
        if following.button("Older →", disabled=not page.has_next, key="history_older"):
            st.session_state.history_page += 1
            st.rerun()
        state = config.watch.state

        def csv_text() -> str:  # runs when clicked, on another thread: its own connection
            with Journal.open_readonly(state) as own:
                return to_csv(own, chosen)

        download.download_button("Download CSV", csv_text, file_name="ctpi-history.csv", mime="text/csv", key="history_csv")
        if studies:
            with st.expander(f"Studies ({len(studies)})"):
                rows = [
                    {"study": s["name"], "verdict": s["label"], "probability": None if s["probability"] is None else round(s["probability"], 3), "slices": s["slices"],
                     "over threshold": s["positive_slices"], "uncertain": s.get("uncertain_slices") or 0, "rejected": s["rejected"], "updated (UTC)": s["updated_at"][:19],
                     **({"from": f"DICOM {origins[s['name']]['calling_aet']}" if s["name"] in origins else "inbox",
                         "PACS result": delivery(origins[s["name"]])[0] if s["name"] in origins else ""} if origins else {})}
                    for s in studies
                ]  # fmt: skip
                st.html(html_table(rows, "studies", flag=lambda row: row["verdict"] == flagged_label))


def dicom_line(origin: dict) -> None:
    """Where a study that arrived over DICOM came from, and whether its result reached the PACS."""
    state, words = delivery(origin)
    text = (
        f"Arrived over DICOM from **{md_escape(origin['calling_aet'] or '?')}** ({origin['instances']} instances, the last at "
        f"{utc(origin['last_at'])}) · result to the PACS: **{state}**: {md_escape(words)}"
    )
    (st.warning if state in ("failed", "not made") else st.success if state == "sent" else st.info)(text)


def status_tab(config: Config, classifier: Classifier) -> None:
    beat, counts = None, None
    try:
        with Journal.open_readonly(config.watch.state) as journal:
            beat, counts = journal.heartbeat(), journal.counts()
    except JournalError as error:
        st.warning(f"Watch daemon: no journal yet ({error})")
    daemon, slices, disk, page = st.columns(4)
    if beat is not None:
        alive = beat["state"] == "running" and beat["age_seconds"] < 60
        daemon.metric("Watch daemon", beat["state"] if alive or beat["state"] != "running" else "silent", f"beat {beat['age_seconds']:.0f} s ago", delta_color="off", delta_arrow="off", border=True)
        if beat.get("message"):
            st.error(f"Watch daemon: {beat['message']}")
        model = beat.get("model") or {}
        st.caption(f"daemon model: {model.get('name')} {model.get('format')} · sha256 `{str(model.get('sha256'))[:12]}` · {model.get('backend')} × {model.get('threads')} threads")
        if model.get("site_profile"):
            st.caption(f"daemon: {model['site_profile']}")
        if model.get("site_profile_error"):
            st.warning(f"Watch daemon: {model['site_profile_error']}")
    else:
        daemon.metric("Watch daemon", "no heartbeat", border=True)
    if counts is not None:
        slices.metric("Slices recorded", counts["slices"], f"{counts['positive']} positive · {counts['rejected']} rejected", delta_color="off", delta_arrow="off", border=True)
    free = disk_free(config.watch.state)
    if free is not None:
        disk.metric("Disk free", f"{free['free_mb'] / 1000:.1f} GB", f"of {free['total_mb'] / 1000:.0f} GB", delta_color="off", delta_arrow="off", border=True)
    memory = process_memory_mb()
    page.metric("Page memory", f"{memory:.0f} MB" if memory else "n/a", "this UI process (RSS)", delta_color="off", delta_arrow="off", border=True)
    st.caption(
        f"page model: {classifier.bundle.describe(classifier.format)} on {classifier.backend.name} × {classifier.threads} threads · "
        f"state `{config.watch.state}` · inbox `{config.watch.inbox}`"
    )


def main() -> None:
    config = settings_from_environment()
    st.set_page_config(page_title="ctpi · CT triage", page_icon="🫁", layout="wide")
    if not login(config.ui):
        return
    st.sidebar.title("ctpi")
    classifier = choose_model(config)
    if st.sidebar.button("Log out"):
        st.session_state.clear()
        st.rerun()
    st.sidebar.caption("Decision support for triage, not a diagnostic device.")
    st.title("ctpi · CT slice triage")
    if classifier is None:
        st.error("No usable model: see the sidebar.")
        return
    triage, history, bench, card, status = st.tabs(["Triage", "History", "Bench", "Model card", "Status"])
    with triage:
        triage_tab(classifier, config)
    with history:
        history_tab(config, classifier)
    with bench:
        bench_tab(classifier)
    with card:
        model_card_tab(classifier)
    with status:
        status_tab(config, classifier)


main()

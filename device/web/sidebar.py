"""The sidebar's model selector, apart from the tabs because every tab works on the bundle, format and site profile chosen there."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from device.config import Config
from device.core.bundle import BundleError, find_bundles, load_bundle
from device.core.classifier import Classifier
from device.core.siteprofile import SiteProfileError, load_site_profile
from device.web.model_card import model_figures


@st.cache_resource(show_spinner="Loading the model…", max_entries=2)
def get_classifier(bundle_path: str, fmt: str | None, threads: int | None) -> Classifier:
    """One interpreter per (bundle, format) per process; at most two kept (memory on a Pi)."""
    return Classifier(bundle_path, fmt, threads)


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

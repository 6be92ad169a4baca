"""The Status tab: whether the appliance is healthy at a glance (daemon heartbeat, slices recorded, disk free, page memory)."""

from __future__ import annotations

import streamlit as st

from device.config import Config
from device.core.classifier import Classifier
from device.watch.journal import Journal, JournalError
from device.web.history import disk_free, process_memory_mb


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

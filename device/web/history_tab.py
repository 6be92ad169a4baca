"""The History tab: the watch daemon's record read back without driving it (journal and DICOM ledger opened read-only)."""

from __future__ import annotations

import html
from pathlib import Path

import streamlit as st

from device.config import Config
from device.core.band import REVIEW, UNCERTAIN, display_label
from device.core.classifier import Classifier
from device.watch.journal import Journal, JournalError
from device.web.history import REJECTED, HistoryFilter, delivery, dicom_origins, slice_page, table_rows, to_csv, utc
from device.web.markup import html_table, md_escape


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

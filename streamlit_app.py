"""The ctpi web page: triage uploaded slices with a heatmap, browse the watch daemon's history,
benchmark a model and see the appliance's status, behind a password.

The entry point only wires the page together; each section lives in ``device/web/``: the
password gate (:mod:`device.web.login`), the model selector (:mod:`device.web.sidebar`) and one
module per tab (``triage_tab``, ``history_tab``, ``bench_tab``, ``model_card``, ``status_tab``).
Predictions come from :class:`device.core.classifier.Classifier`. Started by ``ctpi ui`` (which
passes the settings) or ``make run``. Never imports TensorFlow.
"""

from __future__ import annotations

import streamlit as st

from device.web.bench_tab import bench_tab
from device.web.history_tab import history_tab
from device.web.login import login
from device.web.model_card import model_card_tab
from device.web.sidebar import choose_model
from device.web.status_tab import status_tab
from device.web.triage_tab import triage_tab
from device.web.ui import settings_from_environment


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

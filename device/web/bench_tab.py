"""The Bench tab: times the selected model on this machine from the browser (`ctpi bench` in a separate process)."""

from __future__ import annotations

import streamlit as st

from device.core.classifier import Classifier
from device.web.markup import html_table


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

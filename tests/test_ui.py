"""The web page, driven in-process by Streamlit's AppTest against a real tiny bundle."""

from __future__ import annotations

import dataclasses
from datetime import date, timedelta
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from device.config import Config, UiConfig, WatchConfig  # noqa: E402
from device.core.classifier import Classifier  # noqa: E402
from device.web.auth import write_password  # noqa: E402
from device.web.ui import SETTINGS_ENVIRONMENT, settings_to_environment  # noqa: E402
from tests.synthetic import NEGATIVE, POSITIVE, png_bytes, slice_array  # noqa: E402

APP = str(Path(__file__).resolve().parent.parent / "streamlit_app.py")
PASSWORD = "correct horse battery"
TIMEOUT = 120


@pytest.fixture(autouse=True)
def fresh_process_caches():
    """Each test starts like a fresh UI process: no loaded models, no login throttle state."""
    import streamlit as st

    st.cache_resource.clear()
    yield
    st.cache_resource.clear()


@pytest.fixture
def settings(tmp_path, tiny_bundle) -> Config:
    password_file = tmp_path / "config" / "ui-password"
    write_password(password_file, PASSWORD)
    ui = UiConfig(
        models_dir=tiny_bundle.parent,
        password_file=password_file,
        heatmap_grid=4,
        login_attempts=3,
        lockout_seconds=600.0,
    )
    watch = WatchConfig(inbox=tmp_path / "inbox", state=tmp_path / "state", model=tiny_bundle, settle_seconds=0.0)
    return Config(watch=watch, ui=ui)


def open_page(settings: Config, monkeypatch) -> AppTest:
    monkeypatch.setenv(SETTINGS_ENVIRONMENT, settings_to_environment(settings))
    page = AppTest.from_file(APP, default_timeout=TIMEOUT)
    page.run()
    assert not page.exception, page.exception
    return page


def log_in(page: AppTest, password: str = PASSWORD) -> AppTest:
    page.text_input[0].input(password)
    page.button[0].click()
    page.run()
    assert not page.exception, page.exception
    return page


def page_text(page: AppTest) -> str:
    parts = [element.value for kind in ("markdown", "caption", "error", "warning", "success", "title", "info") for element in getattr(page, kind)]
    return "\n".join(str(part) for part in parts)


def logged_in_page(settings, monkeypatch) -> AppTest:
    page = log_in(open_page(settings, monkeypatch))
    assert len(page.file_uploader) == 1, page_text(page)
    return page


def synthetic_png(label: str, seed: int) -> bytes:
    return png_bytes(slice_array(label, np.random.default_rng(seed)))


def test_page_stays_closed_until_a_password_is_set(settings, monkeypatch, tmp_path):
    ui = dataclasses.replace(settings.ui, password_file=tmp_path / "nowhere" / "ui-password")
    page = open_page(dataclasses.replace(settings, ui=ui), monkeypatch)
    assert "No password is set yet" in page_text(page)
    assert "ctpi passwd" in page_text(page)
    assert len(page.text_input) == 0 and len(page.file_uploader) == 0


def test_wrong_password_is_refused_and_right_one_opens_the_page(settings, monkeypatch):
    page = open_page(settings, monkeypatch)
    log_in(page, "not the password")
    assert "Wrong password" in page_text(page)
    assert len(page.file_uploader) == 0
    log_in(page, PASSWORD)
    assert len(page.file_uploader) == 1
    assert "Wrong password" not in page_text(page)


def test_repeated_wrong_passwords_lock_the_client_out(settings, monkeypatch):
    page = open_page(settings, monkeypatch)
    for _ in range(settings.ui.login_attempts):
        log_in(page, "guess-guess")
    assert "Too many wrong passwords" in page_text(page)
    log_in(page, PASSWORD)  # even the right password waits out the pause
    assert "Too many wrong passwords" in page_text(page)
    assert len(page.file_uploader) == 0


def test_upload_shows_label_probability_and_heatmap_per_slice(settings, monkeypatch, tiny_bundle):
    page = logged_in_page(settings, monkeypatch)
    files = {"covid.png": synthetic_png(POSITIVE, 11), "clear.png": synthetic_png(NEGATIVE, 12)}
    page.file_uploader[0].set_value([(name, data, "image/png") for name, data in files.items()])
    page.run()
    assert not page.exception, page.exception
    reference = Classifier(tiny_bundle)
    text = page_text(page)
    for (name, data), label in zip(files.items(), (POSITIVE, NEGATIVE), strict=True):
        expected = reference.predict(data)
        assert expected.label == label  # both outcomes are on the page
        assert f"#### {name}\n" in text
        headline = next(m.value for m in page.markdown if m.value.startswith(f"#### {name}"))
        assert f"**{expected.label}**" in headline
        assert f"P({POSITIVE}) = **{expected.positive_probability:.3f}**" in headline
    captions = [caption for image in page.get("image") for caption in image.captions]
    assert captions == ["model input", "occlusion heatmap"] * len(files)
    assert "heatmap: 17 invokes" in text  # grid 4: 16 occluded copies + the intact slice
    assert sum("threshold 0.50" in h.proto.body for h in page.get("html")) == len(files)


def test_bad_file_shows_its_error_and_the_page_keeps_working(settings, monkeypatch):
    page = logged_in_page(settings, monkeypatch)
    page.file_uploader[0].set_value(
        [("notes.png", b"this is a text file, not a slice\n", "image/png"), ("good.png", synthetic_png(POSITIVE, 3), "image/png")]
    )
    page.run()
    assert not page.exception, page.exception
    errors = [e.value for e in page.error]
    assert any("notes.png" in e and "not-an-image" in e for e in errors), errors
    assert any(m.value.startswith("#### good.png") for m in page.markdown)
    page.file_uploader[0].set_value(("next.png", synthetic_png(NEGATIVE, 4), "image/png"))
    page.run()
    assert not page.exception, page.exception
    assert not page.error
    assert any(m.value.startswith("#### next.png") and f"**{NEGATIVE}**" in m.value for m in page.markdown)


def test_heatmaps_can_be_switched_off_for_large_batches(settings, monkeypatch):
    page = logged_in_page(settings, monkeypatch)
    page.toggle(key="heatmaps").set_value(False)
    page.file_uploader[0].set_value([(f"s{i}.png", synthetic_png(POSITIVE, 50 + i), "image/png") for i in range(3)])
    page.run()
    assert not page.exception, page.exception
    assert [c for image in page.get("image") for c in image.captions] == ["model input"] * 3
    assert "heatmap:" not in page_text(page) and page_text(page).count("Heatmaps are off") == 3


def test_file_names_are_shown_as_text_not_markdown(settings, monkeypatch):
    page = logged_in_page(settings, monkeypatch)
    page.file_uploader[0].set_value(("[open me](http://example.invalid).png", synthetic_png(NEGATIVE, 8), "image/png"))
    page.run()
    headline = next(m.value for m in page.markdown if m.value.startswith("#### "))
    assert headline.startswith("#### \\[open me\\]\\(http://example.invalid\\).png\n")


def test_dicom_upload_shows_no_patient_fields(settings, monkeypatch):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    dataset = pydicom.dcmread(path)
    patient_values = [str(dataset.get(k)) for k in ("PatientName", "PatientID", "PatientBirthDate") if dataset.get(k)]
    assert patient_values
    page = logged_in_page(settings, monkeypatch)
    page.file_uploader[0].set_value(("slice.dcm", Path(path).read_bytes(), "application/dicom"))
    page.run()
    assert not page.exception, page.exception
    text = page_text(page) + "".join(h.proto.body for h in page.get("html"))
    assert "#### slice.dcm" in text and "DICOM 128×128" in text
    for value in patient_values:
        assert value not in text


def test_uploads_reach_the_inbox_only_when_asked(settings, monkeypatch):
    page = logged_in_page(settings, monkeypatch)
    data = synthetic_png(POSITIVE, 5)
    page.file_uploader[0].set_value(("../escape me.png", data, "image/png"))
    page.run()
    inbox = settings.watch.inbox
    assert not inbox.exists()
    page.button(key=next(b.key for b in page.button if b.key and b.key.startswith("inbox-"))).click()
    page.run()
    assert not page.exception, page.exception
    written = [p for p in inbox.rglob("*") if p.is_file()]
    assert [p.name for p in written] == ["escape_me.png"]
    assert written[0].read_bytes() == data
    assert any("Copied to" in s.value for s in page.success)


@pytest.mark.slow
def test_bench_panel_runs_ctpi_bench_on_the_chosen_model(settings, monkeypatch):
    page = logged_in_page(settings, monkeypatch)
    page.multiselect(key="bench_threads").set_value([1])
    page.number_input(key="bench_runs").set_value(3)
    page.number_input(key="bench_warmup").set_value(0)
    next(b for b in page.button if b.label == "Run bench").click()
    page.run(timeout=TIMEOUT)
    assert not page.exception, page.exception
    rows = table(page, "bench")
    assert [row["model"] for row in rows] == ["tiny-texture"] and [row["threads"] for row in rows] == ["1"]
    assert float(rows[0]["invoke mean ms"]) > 0
    assert "tiny-texture" in page.code[-1].value and "slices/s" in page.code[-1].value


def test_model_selector_shows_each_bundles_model_card(settings, monkeypatch, tiny_bundle, tmp_path):
    import json
    import shutil

    from device.core.bundle import write_manifest

    models = tmp_path / "models"
    shutil.copytree(tiny_bundle, models / "carded")
    shutil.copytree(tiny_bundle, models / "plain")
    manifest = json.loads((models / "carded" / "manifest.json").read_text())
    val = {"n": 118, "accuracy": 0.763, "sensitivity": 0.867, "specificity": 0.655, "auc": 0.783}
    manifest["metrics"] = {"val": val, "formats": {"int8": {"val": {**val, "accuracy": 0.754}}, "float32": {"val": val}}}
    manifest["name"] = "carded-model"
    (models / "carded" / "MODEL_CARD.md").write_text("# Model card\n\nIntended use: triage support only.\n")
    write_manifest(models / "carded", manifest)
    watch = dataclasses.replace(settings.watch, model=models / "carded")
    page = logged_in_page(dataclasses.replace(settings, watch=watch, ui=dataclasses.replace(settings.ui, models_dir=models)), monkeypatch)
    assert page.selectbox(key="bundle").options == ["carded", "plain"]
    figures = table(page, "figures")
    assert [row["model"] for row in figures] == ["reference (Keras float)", "int8", "float32"]
    assert figures[1]["accuracy"] == "0.754" and figures[1]["ROC AUC"] == "0.783"
    assert any("Intended use: triage support only." in m.value for m in page.markdown)
    assert any("val: accuracy 0.754" in c.value for c in page.sidebar.caption)  # the selected format's figures

    page.selectbox(key="bundle").set_value(models / "plain").run()
    assert not page.exception, page.exception
    assert table(page, "figures") == []
    assert any("records no metrics" in info.value for info in page.info)
    assert any("This bundle has no MODEL_CARD.md" in c.value for c in page.caption)


# -- history and status, against a journal written by the real watch daemon ------------------


@pytest.fixture
def journal_settings(settings) -> Config:
    """Seven drops processed by ``ctpi watch --once``: study-a (3 positive, 1 broken file),
    study-b (2 negative) and one negative slice outside any study."""
    from device.watch.daemon import Daemon

    inbox = settings.watch.inbox
    for folder, label, count, seed in (("study-a", POSITIVE, 3, 20), ("study-b", NEGATIVE, 2, 30), ("", NEGATIVE, 1, 40)):
        (inbox / folder).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            (inbox / folder / f"{label.lower()}-{index}.png").write_bytes(synthetic_png(label, seed + index))
    (inbox / "study-a" / "broken.png").write_bytes(b"not an image at all")
    assert Daemon(settings.watch, once=True).run() == 0
    return settings


class TableReader(HTMLParser):
    """Rows of the page's HTML tables (``<table data-table=NAME>``) as dicts of cell text."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._name, self._row, self._cell = None, None, None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._name = dict(attrs).get("data-table")
            self.tables[self._name] = []
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._name is not None:
            self.tables[self._name].append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def table(page: AppTest, name: str) -> list[dict]:
    reader = TableReader()
    for element in page.get("html"):
        reader.feed(element.proto.body)
    header, *rows = reader.tables.get(name) or [[]]
    return [dict(zip(header, row, strict=True)) for row in rows]


def history_rows(page: AppTest) -> list[dict]:
    return table(page, "history")


def test_history_table_shows_the_daemons_results_and_filters_them(journal_settings, monkeypatch):
    page = logged_in_page(journal_settings, monkeypatch)
    rows = history_rows(page)
    assert len(rows) == 7
    assert {row["study"] for row in rows} == {"study-a", "study-b", ""}

    page.selectbox(key="history_label").set_value(POSITIVE).run()
    rows = history_rows(page)
    assert len(rows) == 3 and {row["label"] for row in rows} == {POSITIVE}

    page.selectbox(key="history_label").set_value("rejected").run()
    assert [row["label"] for row in history_rows(page)] == ["rejected: not-an-image"]

    page.selectbox(key="history_label").set_value(None).run()
    page.selectbox(key="history_study").set_value("study-b").run()
    rows = history_rows(page)
    assert len(rows) == 2 and {row["study"] for row in rows} == {"study-b"}
    assert any(m.value.startswith(f"**Study study-b**: **{NEGATIVE}**") and "2 slices" in m.value for m in page.markdown)

    page.selectbox(key="history_study").set_value("study-a").run()
    verdict = next(m.value for m in page.markdown if m.value.startswith("**Study study-a**"))
    assert f"**{POSITIVE}**" in verdict and "3 slices, 3 over the threshold, 1 rejected" in verdict

    tomorrow = date.today() + timedelta(days=2)
    page.date_input(key="history_since").set_value(tomorrow).run()
    assert history_rows(page) == []
    assert any("No slices match" in info.value for info in page.info)
    assert not page.exception, page.exception


def test_history_is_read_one_page_at_a_time(journal_settings, monkeypatch):
    settings = dataclasses.replace(journal_settings, ui=dataclasses.replace(journal_settings.ui, page_size=3))
    page = logged_in_page(settings, monkeypatch)
    seen = []
    for expected in (3, 3, 1):
        rows = history_rows(page)
        assert len(rows) == expected
        seen += [row["id"] for row in rows]
        older = page.button(key="history_older")
        if expected == 3:
            older.click().run()
        else:
            assert older.disabled
    seen = [int(record_id) for record_id in seen]
    assert seen == sorted(seen, reverse=True) and len(set(seen)) == 7
    page.button(key="history_newer").click().run()
    assert len(history_rows(page)) == 3


def test_history_csv_holds_every_slice_matching_the_filter(journal_settings):
    import csv
    import io

    from device.watch.journal import Journal
    from device.web.history import HistoryFilter, to_csv

    with Journal.open_readonly(journal_settings.watch.state) as journal:
        everything = list(csv.DictReader(io.StringIO(to_csv(journal, HistoryFilter()))))
        study_a = list(csv.DictReader(io.StringIO(to_csv(journal, HistoryFilter(study="study-a", label=POSITIVE)))))
    assert len(everything) == 7
    assert len(study_a) == 3 and {row["label"] for row in study_a} == {POSITIVE} and {row["study"] for row in study_a} == {"study-a"}
    assert all(float(row["positive_probability"]) >= float(row["threshold"]) for row in study_a)


def test_status_panel_shows_heartbeat_counts_and_disk(journal_settings, monkeypatch):
    page = logged_in_page(journal_settings, monkeypatch)
    metrics = {metric.label: metric for metric in page.metric}
    assert metrics["Watch daemon"].value == "stopped"  # --once beats 'stopped' when it ends
    assert metrics["Slices recorded"].value == "7"
    assert "3 positive · 1 rejected" in metrics["Slices recorded"].proto.delta
    assert metrics["Disk free"].value.endswith("GB")
    assert metrics["Page memory"].value.endswith("MB")

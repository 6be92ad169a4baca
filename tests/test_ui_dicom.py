"""The page's history for studies that arrived over DICOM: the calling AE title, and whether the
result reached the PACS (sent / failed with the last error and attempts / queued), read from
the DICOM node's ledger that the real node code wrote (tests/dicomstudies.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("streamlit")
pytest.importorskip("pynetdicom")

from tests.dicomstudies import CALLING_AET, studies_over_dicom  # noqa: E402
from tests.dicomtools import PATIENT_ID, PATIENT_NAME  # noqa: E402
from tests.synthetic import NEGATIVE, png_bytes, slice_array  # noqa: E402
from tests.test_ui import fresh_process_caches as fresh_process_caches  # noqa: E402,F401  (fixture)
from tests.test_ui import logged_in_page, page_text, table  # noqa: E402
from tests.test_ui import settings as settings  # noqa: E402,F401  (fixture)

SHOWN_AET = CALLING_AET.replace("_", "\\_")  # as Markdown text (the page escapes it)


@pytest.fixture
def dicom_state(settings, tmp_path):
    """Three studies over DICOM (sent, failed, queued) and one folder dropped into the inbox."""
    import numpy as np

    from device.watch.daemon import Daemon

    studies = studies_over_dicom(settings.watch, tmp_path / "series")
    dropped = settings.watch.inbox / "dropped-study"
    dropped.mkdir(parents=True)
    (dropped / "slice.png").write_bytes(png_bytes(slice_array(NEGATIVE, np.random.default_rng(5))))
    assert Daemon(settings.watch, once=True).run() == 0
    return settings, studies


def shown(page, kind: str) -> str:
    return "\n".join(str(element.value) for element in getattr(page, kind))


def test_history_shows_where_a_dicom_study_came_from_and_where_its_result_is(dicom_state, monkeypatch):
    settings, studies = dicom_state
    page = logged_in_page(settings, monkeypatch)
    choices = page.selectbox(key="history_study")
    assert f"{studies['sent']} · DICOM from {CALLING_AET}" in choices.options
    assert "dropped-study" in choices.options

    choices.set_value(studies["sent"]).run()
    sent = shown(page, "success")
    assert f"Arrived over DICOM from **{SHOWN_AET}** (2 instances" in sent
    assert "result to the PACS: **sent**: sent to the PACS at 20" in sent and "UTC" in sent

    page.selectbox(key="history_study").set_value(studies["failed"]).run()
    failed = shown(page, "warning")
    assert f"Arrived over DICOM from **{SHOWN_AET}**" in failed
    assert "result to the PACS: **failed**: not sent: no association with PACS@127.0.0.1:" in failed
    assert "1 attempt, next try" in failed  # attempts counted
    assert shown(page, "success") == ""

    page.selectbox(key="history_study").set_value(studies["queued"]).run()
    assert "result to the PACS: **queued**: queued since" in shown(page, "info")

    page.selectbox(key="history_study").set_value("dropped-study").run()  # not over DICOM: no origin line
    assert "Arrived over DICOM" not in page_text(page)

    rows = {row["study"]: row for row in table(page, "studies")}
    assert {name: (rows[name]["from"], rows[name]["PACS result"]) for name in studies.values()} == {
        studies["sent"]: (f"DICOM {CALLING_AET}", "sent"),
        studies["failed"]: (f"DICOM {CALLING_AET}", "failed"),
        studies["queued"]: (f"DICOM {CALLING_AET}", "queued"),
    }
    assert (rows["dropped-study"]["from"], rows["dropped-study"]["PACS result"]) == ("inbox", "")
    everything = page_text(page) + "".join(str(element.proto.body) for element in page.get("html"))
    assert PATIENT_NAME not in everything and PATIENT_ID not in everything and "SECRET" not in everything
    assert not page.exception, page.exception


def test_history_without_a_dicom_node_has_no_dicom_columns(settings, monkeypatch):
    """A state folder the node never used: the page reads no ledger and adds nothing."""
    import numpy as np

    from device.watch.daemon import Daemon

    (settings.watch.inbox / "plain").mkdir(parents=True)
    (settings.watch.inbox / "plain" / "a.png").write_bytes(png_bytes(slice_array(NEGATIVE, np.random.default_rng(6))))
    assert Daemon(settings.watch, once=True).run() == 0
    page = logged_in_page(settings, monkeypatch)
    (row,) = table(page, "studies")
    assert "from" not in row and "PACS result" not in row
    assert not (settings.watch.state / "dicom").exists()  # the page created nothing

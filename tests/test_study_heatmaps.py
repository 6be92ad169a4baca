"""#19: the watch daemon makes the heatmap of each study's top slice when idle and keeps it in the
journal; the DICOM node draws it and never loads LiteRT. Real daemon, real journal, the tiny
real bundle, the node's own SCP and result path (in a child process where imports matter)."""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from device.config import WatchConfig
from device.watch.journal import Journal
from tests.synthetic import NEGATIVE, POSITIVE
from tests.watchtools import REPO, drop, slice_png

GRID = 4  # the tiny bundle's input is 32x32


def watch_config(tmp_path: Path, model: Path, **changes) -> WatchConfig:
    (tmp_path / "inbox").mkdir(exist_ok=True)
    return WatchConfig(inbox=tmp_path / "inbox", state=tmp_path / "state", model=model, threads=1, settle_seconds=0.0, **changes)


def triage_once(config: WatchConfig, grid: int = GRID) -> None:
    from device.watch.daemon import Daemon

    assert Daemon(config, once=True, heatmap_grid=grid).run() == 0


def direct_map(model: Path, stored: Path, grid: int = GRID):
    """The map :func:`occlusion_map` gives for a stored slice, computed here with the same model."""
    from device.core.classifier import Classifier
    from device.core.heatmap import occlusion_map
    from device.core.preprocess import decode_slice, prepare

    classifier = Classifier(model, None, 1)
    spec = classifier.bundle.spec
    pixels = prepare(decode_slice(stored, spec).pixels, spec)
    return pixels, occlusion_map(classifier, pixels, grid), classifier.sha256


def top_slice(state: Path, study: str) -> tuple[int, Path]:
    with Journal.open_readonly(state) as journal:
        top = journal.study(study)["top_slice_id"]
        (stored_as,) = journal._db.execute("SELECT stored_as FROM slices WHERE id = ?", (top,)).fetchone()
    return top, state / stored_as


def stored_map(state: Path, slice_id: int) -> dict | None:
    with Journal.open_readonly(state) as journal:
        return journal.heatmap(slice_id)


# -- the watch daemon ---------------------------------------------------------------------------------


def test_the_idle_daemon_stores_the_top_slice_map_and_a_new_top_slice_gets_its_own(tmp_path, tiny_bundle):
    config = watch_config(tmp_path, tiny_bundle)
    for index in range(3):
        drop(config.inbox, f"study-a/n{index}.png", slice_png(NEGATIVE, 10 + index))
    triage_once(config)
    first, stored = top_slice(config.state, "study-a")
    made = stored_map(config.state, first)
    _, expected, sha256 = direct_map(tiny_bundle, stored)
    assert made["error"] is None and made["grid"] == GRID and made["model_sha256"] == sha256
    assert made["coarse"].dtype == np.float32 and np.array_equal(made["coarse"], expected.coarse)
    assert made["base_probability"] == expected.base_probability
    assert np.abs(expected.coarse).max() > 0  # a map with something in it, not zeros that match anything

    drop(config.inbox, "study-a/p0.png", slice_png(POSITIVE, 30))  # more positive: the study's top slice changes
    triage_once(config)
    second, stored = top_slice(config.state, "study-a")
    assert second != first
    _, expected, _ = direct_map(tiny_bundle, stored)
    assert np.array_equal(stored_map(config.state, second)["coarse"], expected.coarse)
    assert np.array_equal(stored_map(config.state, first)["coarse"], made["coarse"])  # the old one is kept


def test_a_map_that_cannot_be_made_is_recorded_once_and_off_means_none(tmp_path, tiny_bundle, caplog):
    config = watch_config(tmp_path, tiny_bundle, study_heatmaps=False)
    drop(config.inbox, "gone/a.png", slice_png(POSITIVE, 1))
    drop(config.inbox, "kept/a.png", slice_png(POSITIVE, 2))
    triage_once(config)
    gone, gone_file = top_slice(config.state, "gone")
    kept, _ = top_slice(config.state, "kept")
    assert stored_map(config.state, gone) is None and stored_map(config.state, kept) is None  # off: none made
    with Journal.open_readonly(config.state) as journal:
        assert journal.heartbeat()["study_heatmaps"] is False  # what the node reads

    gone_file.unlink()  # deleted by hand (or retention) before the daemon had time for its map
    with caplog.at_level(logging.WARNING, logger="device.watch.evidence"):
        triage_once(dataclasses.replace(config, study_heatmaps=True))
    failed = stored_map(config.state, gone)
    assert failed["coarse"] is None and "is gone" in failed["error"]
    assert stored_map(config.state, kept)["coarse"].shape == (GRID, GRID)  # and it went on
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="device.watch.evidence"):
        triage_once(dataclasses.replace(config, study_heatmaps=True))
    assert not [r for r in caplog.records if r.name == "device.watch.evidence"]  # not tried again
    with Journal.open_readonly(config.state) as journal:
        assert journal._db.execute("SELECT count(*) FROM heatmaps").fetchone()[0] == 2


def test_only_studies_updated_within_the_horizon_get_a_map(tmp_path, tiny_bundle):
    """A journal with old studies (as after an upgrade) does not keep the Pi drawing their maps:
    a study last updated two days ago gets none (the horizon is a day)."""
    config = watch_config(tmp_path, tiny_bundle, study_heatmaps=False)
    drop(config.inbox, "old/a.png", slice_png(POSITIVE, 4))
    drop(config.inbox, "new/a.png", slice_png(POSITIVE, 5))
    triage_once(config)
    from device.watch.journal_schema import JOURNAL_NAME

    with sqlite3.connect(config.state / JOURNAL_NAME) as db:
        db.execute("UPDATE studies SET updated_at = updated_at - 2 * 86400 WHERE name = 'old'")
    triage_once(dataclasses.replace(config, study_heatmaps=True))
    assert stored_map(config.state, top_slice(config.state, "new")[0])["coarse"].shape == (GRID, GRID)
    assert stored_map(config.state, top_slice(config.state, "old")[0]) is None


def test_ctpi_watch_takes_the_grid_from_the_config(tmp_path, tiny_bundle):
    config = watch_config(tmp_path, tiny_bundle)
    drop(config.inbox, "study/a.png", slice_png(POSITIVE, 3))
    (tmp_path / "ctpi.toml").write_text("[ui]\nheatmap_grid = 3\n")
    done = subprocess.run([sys.executable, "-m", "device.cli", "watch", "--once", "--inbox", str(config.inbox), "--state",
                           str(config.state), "--model", str(tiny_bundle), "--threads", "1", "--settle-seconds", "0",
                           "--config", str(tmp_path / "ctpi.toml")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    top, stored = top_slice(config.state, "study")
    assert np.array_equal(stored_map(config.state, top)["coarse"], direct_map(tiny_bundle, stored, 3)[1].coarse)


def test_a_schema_4_journal_gains_the_heatmaps_table(tmp_path):
    from device.watch.journal_schema import SCHEMA_VERSION

    with Journal.open(tmp_path):
        pass
    db = sqlite3.connect(tmp_path / "journal.sqlite")
    db.executescript("DROP TABLE heatmaps; PRAGMA user_version=4;")
    db.close()
    with Journal.open_readonly(tmp_path) as reader:  # the node before the daemon upgraded it
        assert reader.heatmap(1) is None
    with Journal.open(tmp_path) as journal:
        assert journal._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        journal.record_heatmap(7, 1.0, grid=2, coarse=np.arange(4, dtype=np.float32).reshape(2, 2), base_probability=0.5)
        assert journal.heatmap(7)["coarse"].tolist() == [[0.0, 1.0], [2.0, 3.0]]


# -- the DICOM node ----------------------------------------------------------------------------------------


def received_study(tmp_path: Path, watch: WatchConfig, label: str = POSITIVE, count: int = 3) -> str:
    """One study received by the node's own Storage SCP (in this process) into ``watch.inbox``;
    returns its study folder. The ledger stays in ``watch.state``, as after a node's run."""
    pytest.importorskip("pynetdicom")
    from device.config import DicomConfig
    from device.node.daemon import Node
    from device.node.ledger import Ledger
    from tests.dicomstudies import CALLING_AET, send_study
    from tests.dicomtools import free_port, write_series

    config = DicomConfig(port=free_port(), allow=(CALLING_AET,))
    node = Node(config, watch.inbox, watch.state, watch.model)
    node.folder.mkdir(parents=True, exist_ok=True)
    node.ledger = Ledger.open(node.folder)
    ae, handlers = node.build_ae()
    server = ae.start_server(("127.0.0.1", config.port), block=False, evt_handlers=handlers)
    try:
        send_study(config.port, write_series(tmp_path / "series", count, size=64, label=label))
        node.folders.flush()
        (study,) = node.ledger.origins()
    finally:
        server.shutdown()
        node.ledger.close()
    return study


def result_node(watch: WatchConfig, **dicom):
    from device.config import DicomConfig
    from device.node.daemon import Node
    from device.node.ledger import Ledger

    node = Node(DicomConfig(stable_seconds=0.0, **dicom), watch.inbox, watch.state, watch.model)
    node.ledger = Ledger.open(node.folder)
    return node


def secondary_capture(state: Path, study: str) -> np.ndarray:
    import pydicom

    (path,) = (state / "dicom" / "outbox" / study).glob("*-sc.dcm")
    return pydicom.dcmread(path).pixel_array


# The node's result path in a process of its own, as `ctpi dicom` runs it: what did it import?
NODE_RESULTS = """
import json, sys
from pathlib import Path
from device.config import DicomConfig
from device.node.daemon import Node
from device.node.ledger import Ledger
inbox, state, model = map(Path, sys.argv[1:4])
node = Node(DicomConfig(stable_seconds=0.0, heatmap_wait_seconds=3600.0), inbox, state, model)
node.ledger = Ledger.open(node.folder)
node.complete_studies()
print(json.dumps({"states": [row["state"] for row in node.ledger.studies_in("reported")], "modules": sorted(sys.modules)}))
"""


def test_the_node_draws_the_daemons_map_into_the_secondary_capture_without_litert(tmp_path, tiny_bundle):
    from device.core.heatmap import overlay
    from device.node.report import burn_in

    watch = watch_config(tmp_path, tiny_bundle)
    study = received_study(tmp_path, watch, NEGATIVE, count=1)  # a slice whose map the tiny model draws in colour
    triage_once(watch)
    top, stored = top_slice(watch.state, study)
    assert stored_map(watch.state, top)["coarse"] is not None
    done = subprocess.run([sys.executable, "-c", NODE_RESULTS, str(watch.inbox), str(watch.state), str(tiny_bundle)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout)
    assert answer["states"] == ["reported"]
    assert "device.node.outbox" in answer["modules"] and "device.core.heatmap" in answer["modules"]  # the path ran
    loaded = [name for name in answer["modules"] if name.split(".")[0] in ("ai_edge_litert", "tflite_runtime", "tensorflow")
              or name in ("device.core.classifier", "device.core.backends")]
    assert loaded == []

    pixels, expected, _ = direct_map(tiny_bundle, stored)
    drawn = burn_in(overlay(pixels, expected.sensitivity), [])
    image = drawn[: drawn.shape[0] - 8]  # burn_in's band below the image, for no lines
    sc = secondary_capture(watch.state, study)
    assert np.array_equal(sc[: image.shape[0]], image)
    assert (image[..., 0] != image[..., 2]).any()  # coloured: the map is drawn, not only the grey slice


def test_a_watch_daemon_without_heatmaps_gets_the_result_sent_without_one(tmp_path, tiny_bundle, caplog):
    watch = watch_config(tmp_path, tiny_bundle, study_heatmaps=False)
    study = received_study(tmp_path, watch)
    triage_once(watch)
    node = result_node(watch, heatmap_wait_seconds=3600.0)
    with caplog.at_level(logging.WARNING, logger="device.node.outbox"):
        node.complete_studies()  # no wait: the heartbeat says none will come
    assert node.ledger.study(study)["state"] == "reported"
    assert any("without heatmap: the watch daemon makes no study heatmaps" in r.getMessage() for r in caplog.records)
    sc = secondary_capture(watch.state, study)
    assert (sc[..., 0] == sc[..., 2]).all() and (sc[..., 1] == sc[..., 2]).all()  # grey
    node.ledger.close()


def test_the_wait_for_a_heatmap_is_bounded(tmp_path, tiny_bundle, caplog):
    """A watch daemon that says nothing of heatmaps (gone since it triaged, or older than them):
    the study waits ``heatmap_wait_seconds``, then goes out without, the log saying why."""
    watch = watch_config(tmp_path, tiny_bundle, study_heatmaps=False)
    study = received_study(tmp_path, watch)
    triage_once(watch)
    with sqlite3.connect(watch.state / "journal.sqlite") as db:
        db.execute("DELETE FROM heartbeat")
    node = result_node(watch, heatmap_wait_seconds=3600.0)
    node.complete_studies()
    assert node.ledger.study(study)["state"] == "complete"  # waiting for the heatmap
    node.config = dataclasses.replace(node.config, heatmap_wait_seconds=0.0)
    with caplog.at_level(logging.WARNING, logger="device.node.outbox"):
        node.complete_studies()
    assert node.ledger.study(study)["state"] == "reported"
    assert any("without heatmap: none from the watch daemon" in r.getMessage() for r in caplog.records)
    node.ledger.close()

"""Bundle integrity end to end: a hand-edited manifest is refused by `ctpi predict`, the daemon
and the page, and the identity recorded with every result covers manifest and files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from device.core.bundle import load_bundle, write_manifest
from tests.synthetic import POSITIVE
from tests.watchtools import drop, rows, slice_png

REPO = Path(__file__).resolve().parents[1]


def ctpi(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "device.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def edit_threshold(bundle: Path, threshold: float) -> None:
    """What the issue's operator did: open manifest.json in an editor and change the threshold."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["threshold"] = threshold
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


@pytest.fixture
def copies(tiny_bundle, tmp_path):
    edited, resealed = tmp_path / "edited", tmp_path / "resealed"
    shutil.copytree(tiny_bundle, edited)
    shutil.copytree(tiny_bundle, resealed)
    edit_threshold(edited, 0.99)
    manifest = json.loads((resealed / "manifest.json").read_text())
    write_manifest(resealed, manifest | {"threshold": 0.99})  # made by the bundle tools: a new identity
    return {"original": tiny_bundle, "edited": edited, "resealed": resealed}


def test_predict_refuses_an_edited_manifest_and_reports_the_bundle_identity(copies, tmp_path):
    image = tmp_path / "slice.png"
    image.write_bytes(slice_png(POSITIVE, 3))
    refused = ctpi("predict", "--json", "--model", str(copies["edited"]), str(image))
    assert refused.returncode == 2 and "manifest.json was edited" in refused.stderr, refused.stderr
    identities = {}
    for name in ("original", "resealed"):
        done = ctpi("predict", "--json", "--model", str(copies[name]), str(image))
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert answer["model"]["bundle_sha256"] == load_bundle(copies[name]).digest
        (prediction,) = answer["results"]
        identities[name] = (prediction["model_sha256"], prediction["bundle_sha256"])
        assert prediction["bundle_sha256"] == load_bundle(copies[name]).digest
    # the same model file, a different threshold: the model sha256 cannot tell them apart, the bundle's can
    assert identities["original"][0] == identities["resealed"][0]
    assert identities["original"][1] != identities["resealed"][1]


def test_daemon_refuses_an_edited_manifest_and_records_the_identity(copies, tmp_path):
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    drop(inbox, "s1/a.png", slice_png(POSITIVE, 1))
    common = ("watch", "--inbox", str(inbox), "--state", str(state), "--once", "--settle-seconds", "0")
    refused = ctpi(*common, "--model", str(copies["edited"]))
    assert refused.returncode == 2 and "manifest.json was edited" in refused.stderr, refused.stderr
    assert rows(state) == [] and (inbox / "s1" / "a.png").exists()  # nothing was decided with it

    done = ctpi(*common, "--model", str(copies["original"]))
    assert done.returncode == 0, done.stderr
    (record,) = rows(state)
    assert record["bundle_sha256"] == load_bundle(copies["original"]).digest
    results = ctpi("results", "--state", str(state), "--json")
    assert load_bundle(copies["original"]).digest in results.stdout


def test_daemon_refuses_a_bundle_other_than_the_one_pinned_by_the_deploy(copies, tmp_path):
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    pinned = load_bundle(copies["original"]).digest
    common = ("watch", "--inbox", str(inbox), "--state", str(state), "--once", "--bundle-sha256", pinned)
    refused = ctpi(*common, "--model", str(copies["resealed"]))
    assert refused.returncode == 2 and "deployed with" in refused.stderr, refused.stderr
    assert ctpi(*common, "--model", str(copies["original"])).returncode == 0


def test_page_refuses_an_edited_manifest(copies, tmp_path, monkeypatch):
    pytest.importorskip("streamlit")
    from device.config import Config, UiConfig, WatchConfig
    from device.web.auth import write_password
    from tests.test_ui import log_in, open_page

    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(copies["edited"], models / "edited")
    password_file = tmp_path / "ui-password"
    write_password(password_file, "correct horse battery")
    settings = Config(
        watch=WatchConfig(inbox=tmp_path / "inbox", state=tmp_path / "state", model=models / "edited"),
        ui=UiConfig(models_dir=models, password_file=password_file),
    )
    page = log_in(open_page(settings, monkeypatch))
    errors = " ".join(e.value for e in page.sidebar.error)
    assert "cannot be used" in errors and "manifest.json was edited" in errors, errors

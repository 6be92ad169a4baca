"""The real page in a real browser: ``ctpi ui`` served on localhost, driven by headless Chromium.

Debian's ``chromium`` (installed by ``tests/system-deps.sh``) is driven by playwright through
``executable_path``; no browser is downloaded. The screenshot of the page after an upload is
kept in ``test-artifacts/`` (git-ignored) for people to look at.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

from tests.synthetic import POSITIVE, png_bytes, slice_array

pytestmark = [pytest.mark.system, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
PASSWORD = "browser test password"
MAX_UPLOAD_MB = 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise AssertionError(f"no VmRSS for pid {pid}")


def ctpi(*args: str) -> list[str]:
    return [sys.executable, "-m", "device.cli", *args]


class ServerDidNotStart(RuntimeError):
    pass


@contextlib.contextmanager
def serve_ui(bundle: Path, workdir: Path, max_upload_mb: int = MAX_UPLOAD_MB):
    """``ctpi ui`` for ``bundle`` on a free localhost port, with a password set by
    ``ctpi passwd``; yields ``(url, server process)`` and stops the server afterwards."""
    password_file = workdir / "config" / "ui-password"
    environment = dict(os.environ, HOME=str(workdir / "home"))
    subprocess.run(ctpi("passwd", "--password-file", str(password_file), "--stdin"), input=PASSWORD + "\n", text=True, check=True, env=environment, capture_output=True)
    port = free_port()
    log = open(workdir / "ui.log", "w+")
    command = ctpi(
        "ui", "--host", "127.0.0.1", "--port", str(port), "--models", str(bundle.parent), "--model", str(bundle),
        "--state", str(workdir / "state"), "--inbox", str(workdir / "inbox"), "--password-file", str(password_file),
        "--max-upload-mb", str(max_upload_mb),
    )  # fmt: skip
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=workdir)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise ServerDidNotStart(f"ctpi ui did not come up (exit {server.poll()}):\n{log.read()}")
            time.sleep(0.3)
        yield url, server
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)


def log_in(page, url: str, password: str = PASSWORD):
    """Open the page and log in; returns the file input once the page is open."""
    from playwright.sync_api import expect

    page.goto(url)
    page.get_by_label("Password", exact=True).fill(password)
    page.get_by_role("button", name="Log in").click()
    uploader = page.locator("input[type=file]")
    expect(uploader).to_be_attached(timeout=60_000)
    return uploader


@pytest.fixture
def served_page(tmp_path, tiny_bundle):
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium not installed (tests/system-deps.sh installs it as root)")
    pytest.importorskip("playwright.sync_api", reason="playwright missing: pip install -e '.[dev]'")
    try:
        with serve_ui(tiny_bundle, tmp_path) as served:
            yield served
    except ServerDidNotStart as error:
        pytest.fail(str(error))


def test_browser_logs_in_uploads_a_slice_and_sees_its_prediction(served_page, tmp_path, tiny_bundle):
    from playwright.sync_api import expect, sync_playwright

    from device.core.classifier import Classifier

    url, server = served_page
    slice_file = tmp_path / "covid-slice.png"
    slice_file.write_bytes(png_bytes(slice_array(POSITIVE, np.random.default_rng(7), 192, 256)))
    expected = Classifier(tiny_bundle).predict(slice_file)
    too_big = tmp_path / "too-big.png"
    too_big.write_bytes(b"\0" * (MAX_UPLOAD_MB * 1024 * 1024 + 1))
    ARTIFACTS.mkdir(exist_ok=True)
    outside = []
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("request", lambda request: urlparse(request.url).hostname not in ("127.0.0.1", None) and outside.append(request.url))
            page.goto(url)
            password = page.get_by_label("Password", exact=True)
            password.fill("wrong password")
            page.get_by_role("button", name="Log in").click()
            expect(page.get_by_text("Wrong password")).to_be_visible(timeout=90_000)
            password.fill(PASSWORD)
            page.get_by_role("button", name="Log in").click()
            uploader = page.locator("input[type=file]")
            expect(uploader).to_be_attached(timeout=90_000)
            uploader.set_input_files(str(slice_file))
            headline = page.get_by_text(f"P({POSITIVE}) = {expected.positive_probability:.3f}")
            expect(headline).to_be_visible(timeout=120_000)
            expect(page.get_by_text(expected.label, exact=True).first).to_be_visible()
            expect(page.get_by_text("occlusion heatmap", exact=True)).to_be_visible()
            page.wait_for_timeout(500)  # let the images finish painting
            page.screenshot(path=str(ARTIFACTS / "ui-after-upload.png"), full_page=True)
            memory = rss_mb(server.pid)
            (ARTIFACTS / "ui-memory.txt").write_text(f"streamlit page process RSS after one prediction: {memory:.0f} MB (tiny test bundle)\n")
            print(f"\nUI process RSS after one prediction: {memory:.0f} MB")

            uploader.set_input_files(str(too_big))  # the browser refuses it before sending
            expect(page.get_by_text(f"{MAX_UPLOAD_MB}.0MB or smaller", exact=False).first).to_be_visible(timeout=90_000)
        finally:
            browser.close()
    assert outside == [], f"the page contacted hosts other than the appliance: {outside}"
    assert server.poll() is None, "the UI server died"


def show_dicom_study(page, url: str, studies: dict[str, str], screenshot: Path) -> None:
    """Log in, open History, pick the study whose result was sent, open the studies table and
    take a screenshot (the page scrolls inside itself: the viewport must be tall enough)."""
    from playwright.sync_api import expect

    from tests.dicomstudies import CALLING_AET

    log_in(page, url)
    page.get_by_role("tab", name="History").click()
    page.get_by_role("combobox", name="Study").click()
    page.get_by_role("option", name=f"{studies['sent']} · DICOM from {CALLING_AET}").click()
    expect(page.get_by_text(f"Arrived over DICOM from {CALLING_AET}")).to_be_visible(timeout=60_000)
    expect(page.get_by_text("sent to the PACS at")).to_be_visible()
    page.get_by_text(f"Studies ({len(studies)})").click()  # the expander: every study's origin and result
    expect(page.locator("table[data-table=studies]")).to_be_visible()
    page.wait_for_timeout(500)
    page.screenshot(path=str(screenshot), full_page=True)


def test_browser_shows_a_study_that_arrived_over_dicom(served_page, tmp_path, tiny_bundle):
    """History tab, one study received by the DICOM node: its calling AE and that its result
    reached the PACS (``python -m tests.test_browser --dicom-study`` makes docs/dicom-study.png)."""
    pytest.importorskip("pynetdicom")
    from playwright.sync_api import sync_playwright

    from device.config import WatchConfig
    from tests.dicomstudies import studies_over_dicom

    url, server = served_page
    studies = studies_over_dicom(WatchConfig(inbox=tmp_path / "inbox", state=tmp_path / "state", model=tiny_bundle), tmp_path / "series")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            show_dicom_study(browser.new_page(viewport={"width": 1400, "height": 1300}), url, studies, ARTIFACTS / "dicom-study.png")
        finally:
            browser.close()
    assert server.poll() is None, "the UI server died"


def test_served_page_refuses_uploads_without_xsrf_token(served_page):
    url, _ = served_page
    request = urllib.request.Request(f"{url}/_stcore/upload_file/some-session/some-file", data=b"x" * 10, method="PUT")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403


def main(argv: list[str] | None = None) -> int:
    """Page memory, the figure the issue asks for: ``python -m tests.test_browser --model
    models/mobilenetv2 --slice FILE`` serves the page, logs in with Chromium, uploads FILE and
    prints the server process's RSS at each step. With ``--dicom-study PNG`` instead of
    ``--slice``: three synthetic phantom studies go through the DICOM node code, the watch
    daemon and a stand-in PACS (tests/dicomstudies.py), and PNG is the History tab showing one."""
    from playwright.sync_api import expect, sync_playwright

    parser = argparse.ArgumentParser(prog="python -m tests.test_browser", description=main.__doc__)
    parser.add_argument("--model", type=Path, required=True, help="bundle folder")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--slice", type=Path, help="a slice file to upload")
    what.add_argument("--dicom-study", type=Path, metavar="PNG", help="screenshot of a study that arrived over DICOM")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ctpi-ui-memory-") as workdir, serve_ui(args.model.resolve(), Path(workdir), 32) as (url, server):
        if args.dicom_study:
            from device.config import WatchConfig
            from tests.dicomstudies import studies_over_dicom

            watch = WatchConfig(inbox=Path(workdir) / "inbox", state=Path(workdir) / "state", model=args.model.resolve())
            studies = studies_over_dicom(watch, Path(workdir) / "series", slices=4, size=512)  # full-size phantom slices
            with sync_playwright() as playwright:
                browser = launch_chromium(playwright)
                show_dicom_study(browser.new_page(viewport={"width": 1400, "height": 1500}), url, studies, args.dicom_study)
                browser.close()
            print(f"wrote {args.dicom_study}")
            return 0
        print(f"idle page process:                   {rss_mb(server.pid):6.0f} MB RSS")
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            uploader = log_in(page, url)
            print(f"logged in, model loaded:             {rss_mb(server.pid):6.0f} MB RSS")
            uploader.set_input_files(str(args.slice))
            expect(page.get_by_text("occlusion heatmap", exact=True)).to_be_visible(timeout=300_000)
            print(f"after one prediction with heatmap:   {rss_mb(server.pid):6.0f} MB RSS")
            print(page.get_by_text("P(COVID) =").first.inner_text())
            print(page.get_by_text("heatmap:").first.inner_text().replace("\n", " / "))
            browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A really full disk (ENOSPC from a small tmpfs, not a free-space threshold) loses nothing and
records nothing twice. Needs a private mount namespace (``unshare -rm``), as on the CI machine."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.watchtools import REPO


def _namespaces_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _namespaces_available(), reason="needs unshare -rm and tmpfs mounts (a private mount namespace)")


def test_a_disk_filling_mid_copy_stops_intake_and_a_retry_records_each_file_once(tiny_bundle, tmp_path):
    scenario = subprocess.run(["unshare", "-rm", sys.executable, "-m", "tests.full_disk", str(tiny_bundle), str(tmp_path)],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
    assert scenario.returncode == 0, scenario.stderr
    result = json.loads(scenario.stdout)
    dropped, full, again = result["dropped"], result["full"], result["again"]

    # While full: the daemon stops with a storage error and nothing is lost: every file is in
    # the inbox or in done/ (none both, none neither), no record twice.
    assert full["returncode"] == 1, full["log"]
    assert "No space left on device" in full["log"] or "disk is full" in full["log"], full["log"]
    recorded = [r["path"] for r in full["records"]]
    assert len(recorded) == len(set(recorded))
    assert len([r for r in full["records"] if r["moved_at"]]) < len(dropped)  # the disk filled mid-way
    stored = {name.split("-", 1)[1] for name in full["done"]}
    assert stored.isdisjoint(full["inbox"]) and stored | set(full["inbox"]) == set(dropped)

    # Space back: every file has exactly one record with its content, stored intact.
    assert again["returncode"] == 0, again["log"]
    paths = [r["path"] for r in again["records"]]
    assert sorted(paths) == sorted(dropped) and len(paths) == len(set(paths))
    assert again["inbox"] == [] and again["leftovers"] == []
    assert all(record["moved_at"] for record in again["records"])
    assert again["stored_sha256"] == dropped

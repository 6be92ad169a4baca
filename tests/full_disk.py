"""A real full disk under the watch daemon: ``python -m tests.full_disk BUNDLE WORKDIR``.

Run inside its own mount namespace (``unshare -rm``, see ``test_watch_full_disk.py``): it
mounts a small tmpfs as the state folder, so copies and journal writes fail with ENOSPC for
real, then lets the daemon run, grows the file system, runs it again and prints what
happened as JSON. The inbox is on another file system, so moves are copies, the case where a
full disk strikes mid-file.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests.watchtools import REPO, inbox_files, rows, sha256

SLICES = 12


def noise_png(seed: int) -> bytes:
    """An incompressible ~90 KB slice: twelve of them cannot fit the small state folder."""
    array = np.random.default_rng(seed).integers(0, 256, (300, 300), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def watch_once(inbox: Path, state: Path, bundle: Path, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "device.cli", "watch", "--config", str(config), "--inbox", str(inbox), "--state", str(state),
         "--model", str(bundle), "--once", "--settle-seconds", "0.1", "--threads", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )


def records(state: Path) -> list[dict]:
    return [{k: r[k] for k in ("path", "sha256", "moved_at", "stored_as")} for r in rows(state)]


def main(bundle: Path, work: Path) -> dict:
    inbox, state = work / "inbox", work / "state"
    inbox.mkdir(parents=True)
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=640k", "tmpfs", str(state)], check=True)
    config = work / "ctpi.toml"
    config.write_text("[watch]\nmin_free_mb = 0.0\n")  # let the disk really fill up
    dropped = {}
    for index in range(SLICES):
        data = noise_png(index)
        (inbox / f"s{index:02d}.png").write_bytes(data)
        dropped[f"s{index:02d}.png"] = sha256(data)

    full = watch_once(inbox, state, bundle, config)
    after_full = {
        "returncode": full.returncode,
        "log": full.stderr[-3000:],
        "records": records(state),
        "inbox": sorted(p.name for p in inbox_files(inbox)),
        "done": sorted(p.name for p in (state / "done").rglob("*") if p.is_file()),
    }
    subprocess.run(["mount", "-o", "remount,size=16m", str(state)], check=True)
    again = watch_once(inbox, state, bundle, config)
    final = records(state)
    return {
        "dropped": dropped,
        "full": after_full,
        "again": {
            "returncode": again.returncode,
            "log": again.stderr[-3000:],
            "records": final,
            "inbox": sorted(p.name for p in inbox_files(inbox)),
            "stored_sha256": {r["path"]: sha256((state / r["stored_as"]).read_bytes()) for r in final if r["stored_as"]},
            "leftovers": sorted(p.name for p in state.rglob(".*partial")),
        },
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]))))

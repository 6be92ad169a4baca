"""``ctpi bench``: the figures benchmark_model reports and more, for several bundles at once."""

import json
import shutil

from device.cli import main

INVOKE_KEYS = {"count", "mean", "std", "min", "max", "p50", "p90", "p99"}


def test_bench_compares_bundles_and_thread_counts_in_one_run(tiny_bundle, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(tiny_bundle, other)
    code = main(["bench", "--model", str(tiny_bundle), "--model", str(other), "--threads", "1,2", "--runs", "5", "--warmup", "2", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    results = report["results"]
    assert [(r["bundle"], r["threads"]) for r in results] == [
        (str(tiny_bundle), 1), (str(tiny_bundle), 2), (str(other), 1), (str(other), 2)
    ]
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    for r in results:
        invoke = r["invoke_ms"]
        assert set(invoke) == INVOKE_KEYS and invoke["count"] == 5
        assert invoke["min"] <= invoke["p50"] <= invoke["p90"] <= invoke["p99"] <= invoke["max"]
        assert invoke["min"] <= invoke["mean"] <= invoke["max"]
        assert r["end_to_end_ms"]["mean"] >= invoke["mean"]  # a file read + decode is never free
        assert r["throughput_per_s"] == 1000.0 / r["end_to_end_ms"]["mean"]
        assert r["init_ms"] > 0 and r["first_ms"] > 0 and r["warmup_ms"] > 0
        assert 0 < r["rss_init_mb"] <= r["rss_peak_mb"]
        assert r["sha256"] == manifest["files"]["model_int8.tflite"]
        assert r["size_bytes"] == (tiny_bundle / "model_int8.tflite").stat().st_size
        assert r["backend"] == "ai-edge-litert" and r["backend_version"] != "unknown"
    assert report["machine"]["cores"] >= 1 and "throttling" in report["machine"]
    assert report["settings"]["isolated_processes"] is True


def test_bench_table_reads_like_benchmark_model(tiny_bundle, synthetic_data, capsys):
    code = main(["bench", "--model", str(tiny_bundle), "--threads", "1", "--runs", "3", "--images", str(synthetic_data)])
    out = capsys.readouterr().out
    assert code == 0
    header = out.splitlines()[0].split()
    for column in ("init", "first", "mean", "std", "p50", "p90", "p99", "min", "max", "e2e", "slices/s"):
        assert column in header
    assert "tiny-texture" in out and "throttling:" in out and "ai-edge-litert" in out


def test_bench_refuses_bad_thread_lists_and_bundles(tiny_bundle, tmp_path, capsys):
    assert main(["bench", "--model", str(tiny_bundle), "--threads", "0"]) == 2
    assert "thread counts must be >= 1" in capsys.readouterr().err
    assert main(["bench", "--model", str(tmp_path)]) == 2
    assert "not a ctpi model bundle" in capsys.readouterr().err


def test_a_bundle_converted_without_its_bench_is_measured_again_in_place(tiny_bundle, synthetic_data, tmp_path, capsys):
    from convert.benchmark import main as rebench
    from device.core.bundle import load_bundle

    bundle = tmp_path / "tiny"
    shutil.copytree(tiny_bundle, bundle)
    (bundle / "MODEL_CARD.md").write_text("# Model card\n\n## Speed\n\nNot measured: skipped (--no-bench).\n\n## Files\n\nkept\n")
    models_before = {name: digest for name, digest in load_bundle(bundle).manifest["files"].items() if name != "MODEL_CARD.md"}
    code = rebench(["--bundle", str(bundle), "--threads", "1", "--runs", "3", "--images", str(synthetic_data)])
    printed = capsys.readouterr().out
    assert code == 0
    manifest = load_bundle(bundle).manifest  # resealed: it verifies
    results = manifest["conversion"]["bench"]["results"]
    assert sorted(r["format"] for r in results) == sorted(manifest["formats"])
    assert all(r["threads"] == 1 and r["invoke_ms"]["count"] == 3 for r in results)
    assert {name: digest for name, digest in manifest["files"].items() if name != "MODEL_CARD.md"} == models_before
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "Not measured" not in card and "| int8 | 1 | ai-edge-litert" in card
    assert card.index("## Speed") < card.index("## Files") and card.endswith("## Files\n\nkept\n")
    assert "int8     threads 1: invoke" in printed


def test_a_bench_that_cannot_run_leaves_the_bundle_as_it_was(tiny_bundle, tmp_path, capsys):
    from convert.benchmark import main as rebench

    bundle = tmp_path / "tiny"
    shutil.copytree(tiny_bundle, bundle)
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    code = rebench(["--bundle", str(bundle), "--threads", "0", "--runs", "3"])
    assert code == 1 and "the bundle is unchanged" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before
    (bundle / "model_int8.tflite").write_bytes(b"not the model")
    assert rebench(["--bundle", str(bundle)]) == 2 and "sha256" in capsys.readouterr().err.lower()

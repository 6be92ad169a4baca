"""``ctpi bench``: on-device latency, memory and throughput, side by side.

Reports at least what TFLite's ``benchmark_model`` does (init time, first inference, warm-up
average, invoke latency mean/std/min/max and percentiles, memory at init and peak) plus what
an appliance owner needs: backend and version, model sha256 and size, the board's throttling
state, end-to-end latency from PNG files on disk (read + decode + preprocess + invoke),
throughput, a thread sweep, and several bundles in one table measured in one run.

Each (model, threads) configuration runs in a fresh spawned process, so memory figures belong
to that model alone and one configuration's caches do not flatter the next.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from device import __version__
from device.core.bundle import load_bundle
from device.core.dataset import is_candidate
from device.core.preprocess import crop_box, decode_slice, prepare

DEFAULT_RUNS = 50
DEFAULT_WARMUP = 5
SYNTHETIC_SLICES = 8
SYNTHETIC_SIZE = 512

THROTTLE_BITS = {
    0: "under-voltage now",
    1: "ARM frequency capped now",
    2: "throttled now",
    3: "soft temperature limit now",
    16: "under-voltage has occurred",
    17: "frequency capping has occurred",
    18: "throttling has occurred",
    19: "soft temperature limit has occurred",
}


def _memory_mb() -> tuple[float, float]:
    """Current and peak resident set size of this process, in MB (Linux /proc; elsewhere the
    peak from getrusage for both)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024.0, int(fields["VmHWM"].split()[0]) / 1024.0
    except (OSError, KeyError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mb = peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0
        return peak_mb, peak_mb


def summarize(samples_ms: list[float]) -> dict:
    values = np.asarray(samples_ms, dtype=np.float64)
    return {
        "count": int(values.size),
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
        "min": float(values.min()),
        "max": float(values.max()),
        "p50": float(np.percentile(values, 50)),
        "p90": float(np.percentile(values, 90)),
        "p99": float(np.percentile(values, 99)),
    }


def throttling() -> dict:
    """The Raspberry Pi's ``vcgencmd get_throttled`` decoded, or why it is unavailable."""
    command = shutil.which("vcgencmd")
    if command is None:
        return {"available": False, "note": "vcgencmd not found (not a Raspberry Pi, or firmware tools missing)"}
    try:
        output = subprocess.run([command, "get_throttled"], capture_output=True, text=True, timeout=5).stdout.strip()
        value = int(output.split("=", 1)[1], 16)
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return {"available": False, "note": "vcgencmd get_throttled gave no readable answer"}
    flags = [text for bit, text in THROTTLE_BITS.items() if value & (1 << bit)]
    return {"available": True, "raw": hex(value), "flags": flags, "ok": value == 0}


def machine_info() -> dict:
    info = {
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "ctpi": __version__,
        "throttling": throttling(),
    }
    try:
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip().lower(), value.strip())
        # x86 names the CPU in "model name"; a Raspberry Pi names the board in "model"
        cpu = fields.get("model name") or fields.get("hardware")
        board = fields.get("model") if not fields.get("model", "").isdigit() else None
        info["cpu"] = ", ".join(part for part in (board, cpu) if part) or platform.processor()
    except OSError:
        pass
    try:
        info["cpu_temperature_c"] = int(Path("/sys/class/thermal/thermal_zone0/temp").read_text()) / 1000.0
    except (OSError, ValueError):
        pass
    return info


def write_synthetic_slices(folder: Path, count: int = SYNTHETIC_SLICES, size: int = SYNTHETIC_SIZE) -> list[Path]:
    """CT-sized slices for end-to-end timing when no images are given: the chest phantom
    (:mod:`device.core.phantom`, half with ground glass), which the input guard accepts, so the
    guard's share is that of a real slice that goes all the way through it (plain ellipses and
    noise were refused early, which timed the guard's short path)."""
    from device.core.phantom import chest_png

    paths = []
    for index in range(count):
        path = folder / f"synthetic_{index:02d}.png"
        path.write_bytes(chest_png(size, size, seed=index, ground_glass=index % 2 == 1))
        paths.append(path)
    return paths


def list_images(folder: Path) -> list[Path]:
    images = sorted(p for p in Path(folder).rglob("*") if is_candidate(p))
    if not images:
        raise ValueError(f"--images {folder} holds no files")
    return images


def measure(model: str, fmt: str | None, threads: int, runs: int, warmup: int, images: list[str], backend: str | None, guard: bool = True) -> dict:
    """One configuration, in the current process: what ``benchmark_model`` measures plus the
    end-to-end path. Meant to run in a fresh process (see :func:`run_benchmark`)."""
    from device.core.classifier import Classifier

    baseline_mb, _ = _memory_mb()
    started = time.perf_counter()
    classifier = Classifier(model, fmt, threads, backend, guard=guard)
    init_ms = (time.perf_counter() - started) * 1000.0
    init_mb, _ = _memory_mb()
    spec = classifier.bundle.spec
    pixels = np.random.default_rng(0).integers(0, 256, (spec.height, spec.width, spec.channels), dtype=np.uint8)
    tensor_start = time.perf_counter()
    classifier.probabilities(pixels)
    first_ms = (time.perf_counter() - tensor_start) * 1000.0
    warmup_samples = []
    for _ in range(warmup):
        start = time.perf_counter()
        classifier.probabilities(pixels)
        warmup_samples.append((time.perf_counter() - start) * 1000.0)
    invoke_samples = []
    for _ in range(runs):
        start = time.perf_counter()
        classifier.probabilities(pixels)
        invoke_samples.append((time.perf_counter() - start) * 1000.0)
    def end_to_end_ms(path, guarded: bool):
        """Classifier.predict's steps from the file on disk, with the guard's verdict kept rather
        than raised (a slice it refuses is still scored, so every sample costs the whole path):
        the slice's time, the guard's own time and its verdict (None without the guard)."""
        start = time.perf_counter()
        decoded = decode_slice(path, spec)
        crop_box(decoded.pixels, spec)  # preprocessing's, reused by the guard (as in predict)
        guard_start = time.perf_counter()
        verdict = classifier.guard.check(decoded) if guarded else None
        guard_ms = (time.perf_counter() - guard_start) * 1000.0
        classifier.predict_pixels(prepare(decoded.pixels, spec))
        return (time.perf_counter() - start) * 1000.0, guard_ms, verdict

    end_to_end, unguarded, guard_samples, refused = [], [], [], 0
    has_guard = classifier.guard is not None
    for index in range(runs):
        path = images[index % len(images)]
        total_ms, guard_ms, verdict = end_to_end_ms(path, has_guard)
        end_to_end.append(total_ms)
        guard_samples.append(guard_ms)
        refused += int(verdict is not None and not verdict.accepted)
        if has_guard:
            # the same slice without the guard, interleaved: what the guard adds to a slice is the
            # difference, which is more than its own time (its numpy work also evicts the model
            # from the CPU's caches); separate runs with and without it differ by more than that
            unguarded.append(end_to_end_ms(path, False)[0])
    _, peak_mb = _memory_mb()
    model_path = classifier.bundle.model_path(classifier.format)
    e2e = summarize(end_to_end)
    return {
        "model": classifier.bundle.name,
        "bundle": str(model),
        "format": classifier.format,
        "threads": threads,
        "backend": classifier.backend.name,
        "backend_version": classifier.backend.version(),
        "sha256": classifier.sha256,
        "size_bytes": model_path.stat().st_size,
        "input": {"shape": list(classifier.backend.input.shape), "dtype": classifier.backend.input.dtype.name},
        "init_ms": init_ms,
        "first_ms": first_ms,
        "warmup_ms": statistics.fmean(warmup_samples) if warmup_samples else None,
        "invoke_ms": summarize(invoke_samples),
        "end_to_end_ms": e2e,
        "guard": "on" if classifier.guard is not None else ("off" if not guard else "none in bundle"),
        "guard_ms": summarize(guard_samples),
        "guard_refused": refused,  # of the end-to-end samples (scored anyway)
        # the same slices without the guard, interleaved with the guarded ones (guard on only)
        **({"end_to_end_unguarded_ms": summarize(unguarded)} if unguarded else {}),
        "throughput_per_s": 1000.0 / e2e["mean"],
        "invoke_throughput_per_s": 1000.0 / statistics.fmean(invoke_samples),
        "rss_baseline_mb": baseline_mb,
        "rss_init_mb": init_mb,
        "rss_peak_mb": peak_mb,
        "images": len(images),
    }


def _child(connection, kwargs) -> None:
    try:
        connection.send(("ok", measure(**kwargs)))
    except Exception as error:  # reported to the parent, which owns the output
        connection.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        connection.close()


def run_benchmark(
    models: list[str],
    threads: list[int],
    runs: int = DEFAULT_RUNS,
    warmup: int = DEFAULT_WARMUP,
    images: Path | None = None,
    fmt: str | None = None,
    backend: str | None = None,
    isolate: bool = True,
    on_progress=None,
    guard: bool = True,
) -> dict:
    """Every model x thread count, in order; ``isolate`` runs each in a fresh process.

    Returns ``{"machine": ..., "settings": ..., "results": [...]}`` (the ``--json`` output).
    A configuration that fails is reported with ``error`` and the others still run.
    """
    if runs < 1 or warmup < 0 or not threads or min(threads) < 1:
        raise ValueError("--runs must be >= 1, --warmup >= 0 and every thread count >= 1")
    for model in models:
        load_bundle(model)  # refuse a bad bundle before spending minutes on the others
    with tempfile.TemporaryDirectory(prefix="ctpi-bench-") as scratch:
        image_paths = list_images(images) if images else write_synthetic_slices(Path(scratch))
        results = []
        configurations = [(model, count) for model in models for count in threads]
        context = multiprocessing.get_context("spawn")
        for index, (model, count) in enumerate(configurations, 1):
            if on_progress:
                on_progress(index, len(configurations), f"{model} threads={count}")
            kwargs = dict(model=model, fmt=fmt, threads=count, runs=runs, warmup=warmup, images=[str(p) for p in image_paths], backend=backend, guard=guard)
            if isolate:
                receiver, sender = context.Pipe(duplex=False)
                process = context.Process(target=_child, args=(sender, kwargs))
                process.start()
                sender.close()
                try:
                    status, value = receiver.recv()
                except EOFError:
                    status, value = "error", f"benchmark process died (exit code {process.exitcode})"
                process.join()
            else:
                try:
                    status, value = "ok", measure(**kwargs)
                except Exception as error:
                    status, value = "error", f"{type(error).__name__}: {error}"
            results.append(value if status == "ok" else {"bundle": model, "threads": count, "error": value})
    return {
        "machine": machine_info(),
        "settings": {"runs": runs, "warmup": warmup, "images": str(images) if images else f"{len(image_paths)} synthetic {SYNTHETIC_SIZE}x{SYNTHETIC_SIZE} PNGs", "isolated_processes": isolate},
        "results": results,
    }


def format_table(report: dict) -> str:
    """The human table: one row per model x threads, latencies in ms, memory in MB."""
    header = ["model", "fmt", "thr", "init", "first", "warm", "mean", "std", "p50", "p90", "p99", "min", "max", "e2e", "slices/s", "MB init", "MB peak", "size MB"]
    rows, errors = [], []
    for r in report["results"]:
        if "error" in r:
            errors.append(f"{r['bundle']} threads={r['threads']}: ERROR {r['error']}")
            continue
        i = r["invoke_ms"]
        rows.append(
            [r["model"], r["format"], str(r["threads"]), f"{r['init_ms']:.0f}", f"{r['first_ms']:.1f}", f"{r['warmup_ms'] or 0:.1f}"]
            + [f"{i[k]:.2f}" for k in ("mean", "std", "p50", "p90", "p99", "min", "max")]
            + [f"{r['end_to_end_ms']['mean']:.1f}", f"{r['throughput_per_s']:.1f}", f"{r['rss_init_mb']:.0f}", f"{r['rss_peak_mb']:.0f}", f"{r['size_bytes'] / 1e6:.1f}"]
        )
    widths = [max([len(header[c])] + [len(row[c]) for row in rows]) for c in range(len(header))]

    def line(cells):
        return "  ".join(cell.ljust(w) if c < 2 else cell.rjust(w) for c, (cell, w) in enumerate(zip(cells, widths, strict=False)))

    lines = [line(header)] + [line(row) for row in rows] + errors
    machine = report["machine"]
    throttle = machine["throttling"]
    footer = [
        "",
        "latencies in ms: init = interpreter load, first = first invoke, warm = warm-up mean, mean..max = invoke,",
        "e2e = read + decode + input guard + preprocess + invoke of a PNG on disk; slices/s = 1000 / e2e mean (one stream)",
        f"machine: {machine.get('cpu', machine['machine'])}, {machine['cores']} cores, {machine['system']}",
        f"settings: {report['settings']['runs']} runs, {report['settings']['warmup']} warm-up, images: {report['settings']['images']}",
        "throttling: " + (("none" if throttle["ok"] else ", ".join(throttle["flags"])) + f" ({throttle['raw']})" if throttle["available"] else throttle["note"]),
    ]
    for r in report["results"]:
        if "error" not in r:
            footer.append(f"{r['model']} {r['format']}: {r['backend']} {r['backend_version']}, sha256 {r['sha256'][:16]}…")
    for r in report["results"]:
        if "error" not in r and "guard_ms" in r:
            share = r["guard_ms"]["mean"] / r["end_to_end_ms"]["mean"]
            footer.append(
                f"input guard ({r['guard']}) {r['model']} threads={r['threads']}: {r['guard_ms']['mean']:.2f} ms mean, "
                f"p90 {r['guard_ms']['p90']:.2f} ms per slice = {share:.1%} of e2e"
                + (f" ({r['guard_refused']} of {r['end_to_end_ms']['count']} samples refused as not CT, scored anyway)" if r.get("guard_refused") else "")
            )
            if "end_to_end_unguarded_ms" in r:
                without = r["end_to_end_unguarded_ms"]["mean"]
                added = r["end_to_end_ms"]["mean"] - without
                footer.append(
                    f"  e2e with the guard {r['end_to_end_ms']['mean']:.2f} ms, without it {without:.2f} ms (interleaved): "
                    f"it adds {added:.2f} ms = {added / without:.1%} to a slice"
                )
    return "\n".join(lines + list(dict.fromkeys(footer)))


def parse_threads(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--threads {text!r}: expected N or N,N,... (e.g. 1,2,4)") from None
    if not values or min(values) < 1:
        raise ValueError(f"--threads {text!r}: thread counts must be >= 1")
    return values


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="latency, memory and throughput of one or more bundles")
    parser.add_argument("--model", action="append", required=True, metavar="BUNDLE", help="bundle folder (repeat to compare side by side)")
    parser.add_argument("--format", dest="fmt", default=None, help="model format in each bundle (default: the bundle's default)")
    parser.add_argument("--backend", default=None, help="force a backend (ai-edge-litert, tflite-runtime, onnxruntime)")
    parser.add_argument("--threads", default=None, help="thread counts to sweep, e.g. 1,2,4 (default: cores up to 4)")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help=f"timed invokes and end-to-end slices (default {DEFAULT_RUNS})")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help=f"untimed warm-up invokes (default {DEFAULT_WARMUP})")
    parser.add_argument("--images", type=Path, default=None, help="folder of slices for the end-to-end figure (default: synthetic 512x512 PNGs)")
    parser.add_argument("--no-guard", action="store_true", help="leave the input guard out of the end-to-end figure")
    parser.add_argument("--json", action="store_true", help="machine-readable JSON output")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from device.cli import EXIT_FAILED_INPUTS, EXIT_OK, print_json
    from device.core.backends import default_threads

    threads = parse_threads(args.threads) if args.threads else [default_threads()]

    def show(index, total, what):
        if not args.json:
            print(f"[{index}/{total}] {what}", file=sys.stderr, flush=True)

    report = run_benchmark(args.model, threads, args.runs, args.warmup, args.images, args.fmt, args.backend, on_progress=show, guard=not args.no_guard)
    if args.json:
        print_json(report)
    else:
        print(format_table(report))
    return EXIT_FAILED_INPUTS if any("error" in r for r in report["results"]) else EXIT_OK


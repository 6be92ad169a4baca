"""``python -m convert``: a training run to a verified model bundle, through the accuracy gate.

Steps: read ``RUN/run.json`` and ``RUN/model.keras``; draw the int8 calibration slices from
``DATA/train`` (equally from every source when ``--data`` is repeated); convert to every
requested format; assemble a candidate bundle; score every format against the Keras float
model on ``DATA/val`` (pooled and per source) and on the unused training slices; refuse
the conversion (exit 1) when a format fails the gate; benchmark the candidate with
``ctpi bench``; write the final bundle with its figures and ``MODEL_CARD.md``.

Exit codes: 0 bundle written, 1 gate failed (nothing written), 2 bad run, data or flags.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shlex
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from convert.assemble import FILE_OF_FORMAT, assemble_bundle
from convert.benchmark import bench_formats
from convert.bias_correction import correct_biases
from convert.calibration import draw_by_source, load_slices
from convert.diagnose import explain, threshold_resolution, weights_only_agreement
from convert.export import DEFAULT_FORMATS, export_formats, parse_formats
from convert.gate import (
    ADVICE,
    GATE_RULES,
    GATED_SPLIT,
    check,
    format_figures,
    keras_probabilities,
    reference_figures,
    rules_manifest,
)
from convert.model_card import render_model_card
from convert.onnx_export import ONNX_OPSET
from convert.run import RunError, load_run
from convert.selective import HEAD, float_fallback, parse_option
from device.core.backends import BackendError
from device.core.bundle import FORMATS, BundleError, load_bundle
from device.core.classifier import Classifier
from device.core.dataset import combined_fingerprint, fingerprint, list_examples

EXIT_OK, EXIT_GATE_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_CALIBRATION_SAMPLES = 200
CARD = "MODEL_CARD.md"

log = logging.getLogger("convert")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="training run folder (model.keras + run.json)")
    parser.add_argument("--data", type=Path, action="append", required=True,
                        help="ImageFolder root with train/ and val/, one per source, in the run's order (repeat)")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write (replaced if it exists)")
    parser.add_argument("--formats", default=",".join(DEFAULT_FORMATS), help=f"comma-separated, from {', '.join(FORMATS)} (default: all)")
    parser.add_argument("--default-format", default=None, help="the format ctpi runs by default (default: int8 when present)")
    parser.add_argument("--calibration-samples", type=int, default=None,
                        help=f"training slices for int8 calibration (default: the count an experts head's int8 view was calibrated with, else {DEFAULT_CALIBRATION_SAMPLES})")
    parser.add_argument("--seed", type=int, default=None, help="calibration draw seed (default: the run's seed)")
    parser.add_argument("--per-tensor", action="store_true", help="per-tensor int8 weights instead of per-channel")
    parser.add_argument("--no-bias-correction", action="store_true", help="convert int8 without bias correction (for comparison)")
    parser.add_argument("--float-fallback", default="auto",
                        help="int8 ops kept in float: 'auto' (the fewest, from 0, 1, 2, 4, ..., that meet the int8 rule on "
                             "held-out train slices; the default), 'off' (full-integer only), a number N (the N worst) or "
                             "'head' (an experts run's head after the backbone's pooling)")
    parser.add_argument("--onnx-opset", type=int, default=ONNX_OPSET, help=f"ONNX opset (default {ONNX_OPSET})")
    parser.add_argument("--name", default=None, help="bundle name (default: the run folder's name)")
    parser.add_argument("--version", default=None, help="bundle version (default: today's date + the default model's sha256 prefix)")
    parser.add_argument("--bench-threads", default="1,2", help="thread counts for the model card's ctpi bench (default 1,2)")
    parser.add_argument("--bench-runs", type=int, default=50, help="timed runs per bench configuration (default 50)")
    parser.add_argument("--no-bench", action="store_true", help="skip ctpi bench (the model card says so)")
    parser.add_argument("--note", default=None, help="a paragraph for MODEL_CARD.md, e.g. why a format is left out")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def step(message: str) -> None:
    print(f"[convert {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _counts(examples, labels) -> dict[str, int]:
    return {label: sum(1 for e in examples if e.label == label) for label in labels}


def _figure_table(keras: dict, formats: dict, split: str) -> str:
    header = f"{split:<14} {'accuracy':>8} {'AUC':>7} {'agree':>7} {'max|Δp|':>8} {'mean|Δp|':>9}"
    rows = [header]

    def cell(value, width, digits=3):
        return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.{digits}f}"

    ref = keras[split]
    rows.append(f"{'keras float':<14} {cell(ref['accuracy'], 8)} {cell(ref['auc'], 7)} {'—':>7} {'—':>8} {'—':>9}")
    for fmt, figures in formats.items():
        got = figures[split]
        rows.append(
            f"{fmt:<14} {cell(got['accuracy'], 8)} {cell(got['auc'], 7)} {cell(got['agreement'], 7)} "
            f"{cell(got['max_abs_delta'], 8, 4)} {cell(got['mean_abs_delta'], 9, 4)}"
        )
    return "\n".join(rows)


def _run_gate(candidate: Path, formats, referee: Classifier, splits: dict, reference: dict, sources: dict):
    """Keras figures per split, every format's figures per split (and per source under
    ``sources``), and the gate's reasons to refuse."""
    keras_figures, keras_labels = {}, {}
    for split, slices in splits.items():
        keras_figures[split], keras_labels[split] = reference_figures(referee, slices, reference[split], sources[split])
    format_results, failures = {}, []
    for fmt in formats:
        classifier = Classifier(candidate, fmt)
        format_results[fmt] = {
            split: format_figures(classifier, slices, reference[split], keras_labels[split], f"gate {fmt} on {split}",
                                  sources[split])
            for split, slices in splits.items()
        }
        failures += check(format_results[fmt], keras_figures, fmt)
    return keras_figures, format_results, failures


def _check_reference(keras_figures: dict, recorded_auc: float | None) -> None:
    """The Keras model must score val as training recorded it; otherwise DATA is not the same."""
    measured = keras_figures[GATED_SPLIT]["auc"]
    if recorded_auc is not None and measured is not None and abs(recorded_auc - measured) > 1e-3:
        log.warning(
            "the Keras model scores val AUC %.4f here but the training run recorded %.4f: "
            "DATA/val or the preprocessing differs from what training used",
            measured, recorded_auc,
        )


def _report_failure(failures: list[str], format_results: dict, model, referee, splits: dict, reference: dict) -> None:
    print("\nconvert: the accuracy gate FAILED; no bundle was written.", file=sys.stderr)
    for reason in failures:
        print(f"  - {reason}", file=sys.stderr)
    for fmt in dict.fromkeys(reason.split(":")[0] for reason in failures):
        print(f"  what to try ({fmt}): {ADVICE[fmt]}", file=sys.stderr)
    if any(reason.startswith("int8:") for reason in failures):
        step("probing int8 weights alone (dynamic-range model) to tell weights from activations")
        probe = weights_only_agreement(model, referee, splits[GATED_SPLIT], reference[GATED_SPLIT])
        agreement = format_results["int8"][GATED_SPLIT]["agreement"] or 0.0
        output = referee.bundle.format_info("int8")["output"]
        resolution = threshold_resolution(referee.threshold, (output.get("quantization") or {}).get("scale"))
        print(f"  diagnosis: {explain(probe, agreement, GATE_RULES['int8'].min_agreement, resolution)}", file=sys.stderr)


def check_float_fallback(option: str, run) -> None:
    """Refuse a ``--float-fallback`` value that cannot apply before minutes of conversion are spent."""
    if parse_option(option) == HEAD and run.head is None:
        raise ValueError(f"--float-fallback {HEAD} keeps an experts head in float, but {run.path} was trained "
                         "without one (--head experts); use auto, off or a number of ops")


def convert(args, argv: list[str]) -> int:
    formats = parse_formats(args.formats)
    default_format = args.default_format or ("int8" if "int8" in formats else formats[0])
    if default_format not in formats:
        raise ValueError(f"--default-format {default_format} is not among --formats {formats}")
    step(f"reading training run {args.run}")
    run = load_run(args.run)
    check_float_fallback(args.float_fallback, run)
    viewed = (run.head or {}).get("int8_view_samples")  # recorded only for a view on the conversion's draw
    if args.calibration_samples is None:
        args.calibration_samples = int(viewed or DEFAULT_CALIBRATION_SAMPLES)
    elif viewed and args.calibration_samples != viewed:
        log.warning("the run's experts head was chosen on int8 features calibrated on %d train slices; converting with %d "
                    "sets other activation ranges, under which its decisions may flip (docs/conversion.md)", viewed,
                    args.calibration_samples)
    if args.calibration_samples < 1:
        raise ValueError("--calibration-samples must be at least 1")
    labels, spec = run.labels, run.spec
    roots = [Path(root) for root in args.data]
    names = [root.resolve().name for root in roots]
    seed = args.seed if args.seed is not None else int(run.info.get("seed") or 0)
    train_examples, val_examples, calibration_examples, holdout_examples = [], [], [], []
    source_of: dict[Path, str] = {}
    fingerprints = []
    per_source = [(name, root, list_examples(root / "train", labels), list_examples(root / "val", labels))
                  for name, root in zip(names, roots, strict=True)]
    draws = draw_by_source([source_train for _, _, source_train, _ in per_source], args.calibration_samples, seed)
    for (name, root, source_train, source_val), (chosen, rest) in zip(per_source, draws, strict=True):
        fingerprints.append((name, fingerprint(source_train, root / "train")))
        train_examples += source_train
        val_examples += source_val
        calibration_examples += chosen
        holdout_examples += rest
        source_of.update({example.path: name for example in source_train + source_val})
    train_fingerprint = combined_fingerprint(fingerprints)
    recorded = run.info["training_data"].get("fingerprint")
    if recorded != train_fingerprint:
        log.warning(
            "%s has fingerprint %s… but the run was trained on %s…: calibrating on other data than training",
            " + ".join(map(str, roots)), train_fingerprint[:12], str(recorded)[:12],
        )
    step(
        f"{len(train_examples)} train slices of {len(roots)} source(s): {len(calibration_examples)} for calibration "
        f"(seed {seed}), {len(holdout_examples)} held out; {len(val_examples)} val slices"
    )
    calibration = load_slices(calibration_examples, spec, "calibration slices")
    splits = {
        GATED_SPLIT: load_slices(val_examples, spec, "val slices"),
        "train_holdout": load_slices(holdout_examples, spec, "held-out train slices"),
    }
    split_sources = {split: [source_of[e.path] for e in slices.examples] for split, slices in splits.items()}

    step(f"loading {run.model_path}")
    model = run.load_model()
    int8_model = None
    if "int8" in formats and not args.no_bias_correction:
        step("bias correction of a copy for int8 (the mean shift of 8-bit weight rounding, measured on calibration)")
        int8_model = run.load_model()
        correct_biases(int8_model, calibration.pixels, per_channel=not args.per_tensor)
    models, format_extras = export_formats(
        model,
        formats,
        list(calibration.pixels),
        per_channel=not args.per_tensor,
        opset=args.onnx_opset,
        int8_model=int8_model,
        on_step=step,
    )
    for fmt, content in models.items():
        step(f"  {fmt}: {len(content) / 1e6:.2f} MB")
    if "int8" in format_extras:
        format_extras["int8"]["calibration_seed"] = seed

    step("scoring the Keras float model (the reference)")
    reference = {split: keras_probabilities(model, slices) for split, slices in splits.items()}
    if "int8" in models and args.float_fallback != "off":
        selection = float_fallback(args.float_fallback, int8_model or model, calibration, splits["train_holdout"],
                                    reference["train_holdout"], run, models["int8"], seed,
                                    original=model if int8_model is not None else None, on_step=step)
        models["int8"] = selection.content
        format_extras["int8"]["float_fallback"] = selection.manifest()
        if selection.float_tensors:
            format_extras["int8"]["quantization"] = (
                f"int8 (weights, activations, input and output) with {len(selection.float_tensors)} of "
                f"{selection.quantized_ops} ops kept in float"
            )

    identity = dict(
        name=args.name or run.path.resolve().name,
        version=args.version or default_version(models[default_format]),
        architecture=run.info["architecture"],
        labels=labels,
        positive_label=run.positive_label,
        threshold=run.threshold,
        spec=spec,
        training_data=run.info["training_data"],
        default_format=default_format,
        format_extras=format_extras,
    )
    with tempfile.TemporaryDirectory(prefix="ctpi-convert-") as scratch:
        candidate = Path(scratch) / identity["name"]
        step(f"assembling the candidate bundle in {candidate}")
        assemble_bundle(candidate, models, metrics={}, **identity)

        referee = Classifier(candidate, default_format)  # any format: only its decision rule is used
        keras_figures, format_results, failures = _run_gate(candidate, formats, referee, splits, reference, split_sources)
        _check_reference(keras_figures, run.info["metrics"].get("val", {}).get("auc"))
        for split in splits:
            print(_figure_table(keras_figures, format_results, split), file=sys.stderr)
        if failures:
            _report_failure(failures, format_results, int8_model or model, referee, splits, reference)
            return EXIT_GATE_FAILED
        step(f"accuracy gate passed for {', '.join(formats)}")

        if args.no_bench:
            bench = {"error": "skipped (--no-bench)"}
        else:
            step(f"ctpi bench on the candidate, threads {args.bench_threads}")
            bench = bench_formats(candidate, formats, args.bench_threads, args.bench_runs, roots[0] / "val")
            if "error" in bench:
                log.warning("benchmark: %s", bench["error"])

        metrics = {
            "reference": "Keras float32 model; per-format figures under formats",
            **keras_figures,
            "formats": format_results,
            "gate": {**rules_manifest(formats), "passed": True},
            "training_run": run.info.get("metrics", {}),
        }
        calibration_info = {
            "samples": len(calibration.examples),
            "seed": seed,
            "weights": "per-tensor" if args.per_tensor else "per-channel",
            "bias_correction": int8_model is not None,
            "holdout": len(splits["train_holdout"].examples),
            "train_fingerprint_matches_run": recorded == train_fingerprint,
            "sources": {name: sum(1 for e in calibration.examples if source_of[e.path] == name) for name in names},
        }
        command = "python -m convert " + shlex.join(argv)
        card = render_model_card(
            manifest={
                **identity,
                "preprocessing": spec.to_manifest(),
                "formats": {fmt: {"file": FILE_OF_FORMAT[fmt], **format_extras[fmt]} for fmt in formats},
            },
            provenance=run.provenance,
            data={
                "train (calibration)": _counts(calibration.examples, labels),
                "train (held out from calibration)": _counts(splits["train_holdout"].examples, labels),
                "val": _counts(splits[GATED_SPLIT].examples, labels),
                **({f"val, {name}": _counts([e for e in splits[GATED_SPLIT].examples if source_of[e.path] == name], labels)
                    for name in names} if len(names) > 1 else {}),
            },
            calibration=calibration_info,
            metrics={"keras": keras_figures, "formats": format_results},
            gate_rules=rules_manifest(formats),
            bench=bench,
            sizes={fmt: len(content) for fmt, content in models.items()},
            command=command,
            note=args.note,
        )
    step(f"writing {args.out}")
    bundle = assemble_bundle(
        args.out,
        models,
        metrics=metrics,
        extra={
            "training": run.provenance,
            "conversion": {"calibration": calibration_info, "command": command, "note": args.note, "bench": bench},
        },
        extra_files={CARD: card.encode("utf-8")},
        **identity,
    )
    step("fitting the input guard on the training slices (python -m convert.guard)")
    from convert.guard import fit_for_conversion  # the input guard, fitted on the same training slices

    bundle = fit_for_conversion(args.out, roots)
    step("calibrating P on val and choosing the uncertain band (python -m convert.calibrate)")
    from convert.calibrate import calibrate_bundle  # the same step that finalises a shipped bundle

    sources = roots
    calibrate_bundle(args.out, sources, command="python -m convert.calibrate " + shlex.join(
        ["--bundle", str(args.out), *(f"--data={source}" for source in sources)]))
    step("scoring val slices framed as a scanner exports them (python -m convert.framing)")
    from convert.framing import record  # the model on PACS-style frames: a figure of the card, not a gate

    record(args.out, sources, command="python -m convert.framing " + shlex.join(
        ["--bundle", str(args.out), *(f"--data={source}" for source in sources), "--write"]))
    bundle = load_bundle(args.out)
    step(f"done: {bundle.describe()}; {len(bundle.manifest['files'])} files with sha256 in manifest.json")
    return EXIT_OK


def default_version(default_model: bytes) -> str:
    """Today's date plus the first 8 hex digits of the default model file's sha256: two
    conversions on one day get different versions unless they made the same model."""
    return f"{date.today().strftime('%Y.%m.%d')}+{hashlib.sha256(default_model).hexdigest()[:8]}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("tensorflow", "absl", "tf2onnx", "h5py"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return convert(args, argv)
    except (RunError, BundleError, BackendError, FileNotFoundError, ValueError) as error:
        print(f"convert: {error}", file=sys.stderr)
        return EXIT_USAGE

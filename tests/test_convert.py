"""Conversion: every format from one Keras model, int8 integer end to end, formats agreeing
with Keras, complete checksummed manifests, and an accuracy gate that refuses a broken
calibration. Everything runs on synthetic slices and the tiny hand-weighted model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from device.core.bundle import REQUIRED_KEYS, file_sha256, load_bundle
from device.core.classifier import Classifier
from device.core.dataset import Example, fingerprint, list_examples
from tests.synthetic import LABELS, POSITIVE, png_bytes, write_image_folder

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")

ALL_FORMATS = ("int8", "float16", "float32", "onnx")
# |P(positive) - Keras P(positive)| allowed per format on the fixture slices.
FLOAT32_TOLERANCE = 1e-5  # same float graph, only kernel summation order differs
ONNX_TOLERANCE = 1e-5
FLOAT16_TOLERANCE = 5e-3  # half-precision weights
INT8_TOLERANCE = 0.06  # 8-bit activations; the output alone is quantized in steps of 1/256
TOLERANCE = {"float32": FLOAT32_TOLERANCE, "onnx": ONNX_TOLERANCE, "float16": FLOAT16_TOLERANCE, "int8": INT8_TOLERANCE}
WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def _pixels(bundle_path: Path, data: Path) -> tuple[np.ndarray, list[Example]]:
    from device.core.preprocess import load_slice

    bundle = load_bundle(bundle_path)
    examples = list_examples(data, LABELS)
    return np.stack([load_slice(e.path, bundle.spec) for e in examples]), examples


def test_tiny_bundle_holds_every_format_with_a_complete_checksummed_manifest(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    manifest = bundle.manifest
    assert set(manifest["formats"]) == set(ALL_FORMATS)
    assert manifest["default_format"] == "int8"
    assert [key for key in REQUIRED_KEYS if key not in manifest] == []
    on_disk = {p.name for p in tiny_bundle.iterdir() if p.name != "manifest.json"}
    assert set(manifest["files"]) == on_disk
    for name, digest in manifest["files"].items():
        assert file_sha256(tiny_bundle / name) == digest
    assert manifest["formats"]["onnx"]["opset"] == 17
    int8 = manifest["formats"]["int8"]
    assert int8["input"]["dtype"] == "int8" and int8["output"]["dtype"] == "int8"
    assert int8["input"]["quantization"]["scale"] > 0 and int8["calibration_samples"] > 0
    for fmt in ("float16", "float32", "onnx"):
        assert manifest["formats"][fmt]["input"]["dtype"] == "float32"


def test_int8_is_integer_end_to_end(tiny_bundle):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(
        model_path=str(load_bundle(tiny_bundle).model_path("int8")),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    interpreter.allocate_tensors()
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    assert interpreter.get_output_details()[0]["dtype"] == np.int8
    dtypes = {detail["index"]: detail["dtype"] for detail in interpreter.get_tensor_details()}
    floats = [d["name"] for d in interpreter.get_tensor_details() if d["dtype"] in (np.float32, np.float16)]
    assert floats == [], f"float tensors left in the int8 model: {floats}"
    ops = interpreter._get_ops_details()
    assert not [op["op_name"] for op in ops if op["op_name"] in ("QUANTIZE", "DEQUANTIZE")]
    weighted = [op for op in ops if op["op_name"] in WEIGHTED_OPS]
    assert weighted, "the tiny model has a convolution and a dense layer"
    for op in weighted:
        activations, weights, bias = op["inputs"][:3]
        assert dtypes[activations] == np.int8 and dtypes[weights] == np.int8, op
        assert dtypes[bias] == np.int32, op  # int8 kernels accumulate in int32
        assert all(dtypes[output] == np.int8 for output in op["outputs"]), op


def test_float16_stores_half_precision_weights(tiny_bundle):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(load_bundle(tiny_bundle).model_path("float16")))
    dtypes = [detail["dtype"] for detail in interpreter.get_tensor_details()]
    assert np.float16 in dtypes
    assert interpreter.get_input_details()[0]["dtype"] == np.float32


def test_every_format_agrees_with_keras_on_fixture_slices(tiny_bundle, tiny_keras_model, synthetic_data):
    pixels, examples = _pixels(tiny_bundle, synthetic_data)
    keras_positive = tiny_keras_model.predict(pixels.astype(np.float32), verbose=0)[:, LABELS.index(POSITIVE)]
    truth = np.array([e.label == POSITIVE for e in examples])
    assert ((keras_positive >= 0.5) == truth).all(), "the tiny model separates the synthetic classes"
    for fmt in ALL_FORMATS:
        classifier = Classifier(tiny_bundle, fmt, threads=1)
        predictions = [classifier.predict_pixels(p) for p in pixels]
        positive = np.array([p.positive_probability for p in predictions])
        worst = float(np.abs(positive - keras_positive).max())
        assert worst <= TOLERANCE[fmt], f"{fmt}: max |Δp| {worst:.2e} > {TOLERANCE[fmt]:.0e}"
        assert [p.label == POSITIVE for p in predictions] == list(truth), fmt


def test_calibration_draw_is_seeded_stratified_and_disjoint_from_holdout():
    from convert.calibration import stratified_split

    examples = [Example(Path(f"c{i}.png"), "COVID") for i in range(30)] + [
        Example(Path(f"n{i}.png"), "NonCOVID") for i in range(70)
    ]
    calibration, holdout = stratified_split(examples, 20, seed=7)
    assert len(calibration) == 20 and len(holdout) == 80
    assert sum(e.label == "COVID" for e in calibration) == 6  # 30 % of 20
    assert {e.path for e in calibration}.isdisjoint({e.path for e in holdout})
    again, _ = stratified_split(examples, 20, seed=7)
    other, _ = stratified_split(examples, 20, seed=8)
    assert [e.path for e in again] == [e.path for e in calibration]
    assert [e.path for e in other] != [e.path for e in calibration]


# -- the command line, end to end ------------------------------------------------------------


def write_run(folder: Path, model, data: Path) -> Path:
    """A finished training run as train/ leaves it: model.keras + run.json."""
    import keras
    import tensorflow as tf

    from tests.tiny_model import SPEC

    folder.mkdir(parents=True)
    model.save(folder / "model.keras")
    train = list_examples(data / "train", LABELS)
    run = {
        "architecture": "laplacian-energy",
        "labels": LABELS,
        "positive_label": POSITIVE,
        "threshold": 0.5,
        "threshold_rule": "youden",
        "preprocessing": SPEC.to_manifest(),
        "img_size": SPEC.height,
        "initial_weights": {"kind": "hand-set", "file": None, "sha256": None, "description": "tests/tiny_model.py"},
        "training_data": {
            "name": "synthetic",
            "fingerprint": fingerprint(train, data / "train"),
            "counts": {label: sum(e.label == label for e in train) for label in LABELS},
        },
        "metrics": {"val": {"accuracy": 1.0}},
        "seed": 3,
        "wall_seconds": 0.0,
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "recipe": {"epochs": 0},
    }
    (folder / "run.json").write_text(json.dumps(run))
    return folder


@pytest.fixture(scope="module")
def split_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("covid-like")
    write_image_folder(root / "train", per_class=10, seed=2)
    write_image_folder(root / "val", per_class=8, seed=3)
    return root


@pytest.mark.slow
def test_convert_cli_writes_a_gated_bundle_with_figures_and_model_card(tmp_path, tiny_keras_model, split_data, capsys):
    from convert.cli import main

    run = write_run(tmp_path / "run", tiny_keras_model, split_data)
    out = tmp_path / "models" / "tiny"
    argv = ["--run", str(run), "--data", str(split_data), "--out", str(out), "--calibration-samples", "8"]
    code = main(argv + ["--name", "tiny", "--version", "9.9", "--bench-threads", "1", "--bench-runs", "3", "--note", "Made by the test suite."])
    assert code == 0, capsys.readouterr().err
    bundle = load_bundle(out)
    manifest = bundle.manifest
    assert (manifest["name"], manifest["version"], manifest["default_format"]) == ("tiny", "9.9", "int8")
    assert set(manifest["formats"]) == set(ALL_FORMATS)
    assert manifest["formats"]["int8"]["calibration_samples"] == 8
    assert manifest["formats"]["int8"]["bias_correction"] is True
    metrics = manifest["metrics"]
    assert metrics["val"]["n"] == 16 and metrics["train_holdout"]["n"] == 12
    for fmt in ALL_FORMATS:
        val = metrics["formats"][fmt]["val"]
        assert val["agreement"] == 1.0 and val["accuracy"] == 1.0 and val["auc"] == 1.0
        assert val["max_abs_delta"] <= TOLERANCE[fmt]
    assert metrics["gate"]["passed"] and metrics["gate"]["int8"] == {"min_agreement": 0.98, "max_auc_change": 0.01}
    card = (out / "MODEL_CARD.md").read_text()
    assert manifest["files"]["MODEL_CARD.md"] == file_sha256(out / "MODEL_CARD.md")
    assert "not a diagnostic device" in card and "hand-set" in card and "with bias correction" in card
    assert "**Note.** Made by the test suite." in card and manifest["conversion"]["note"] == "Made by the test suite."
    assert "| int8 | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 |" in card
    bench = manifest["conversion"]["bench"]
    assert "error" not in bench, bench
    assert {(r["format"], r["threads"]) for r in bench["results"]} == {(fmt, 1) for fmt in ALL_FORMATS}
    int8_latency = next(r for r in bench["results"] if r["format"] == "int8")["invoke_ms"]["mean"]
    assert "| int8 | 1 | ai-edge-litert" in card and f"{int8_latency:.2f}" in card
    assert not list(out.parent.glob("*.partial"))
    assert "ctpi-convert-" not in (out / "manifest.json").read_text()  # no scratch paths recorded
    # the default model on val slices framed as a scanner exports them (convert.framing)
    framing = metrics["framing"]
    assert framing["format"] == "int8" and list(framing["sources"]) == [split_data.name]
    framed = framing["sources"][split_data.name]
    assert list(framed) == ["as exported", "framed in air", "framed, table under it", "re-framed at random"]
    assert all(figures["n"] == 16 for figures in framed.values())
    # as exported, it is the gate's own val figure: the calibration map does not change the ranking
    assert framed["as exported"]["auc"] == pytest.approx(metrics["formats"]["int8"]["val"]["auc"], abs=1e-4)
    assert card.count("## Slices framed as a scanner exports them") == 1


@pytest.mark.slow
def test_gate_refuses_int8_calibrated_on_black_slices(tmp_path, tiny_keras_model, split_data, capsys):
    """All-black calibration slices give the int8 input a near-zero range, so every real
    slice saturates: the gate must stop the conversion and say what to try."""
    from convert.cli import main

    data = tmp_path / "data"
    data.mkdir()
    (data / "val").symlink_to(split_data / "val")
    black = png_bytes(np.zeros((96, 128), np.uint8))
    for label in LABELS:
        (data / "train" / label).mkdir(parents=True)
        for index in range(6):
            (data / "train" / label / f"black_{index}.png").write_bytes(black)
    run = write_run(tmp_path / "run", tiny_keras_model, data)
    out = tmp_path / "out"
    code = main(["--run", str(run), "--data", str(data), "--out", str(out), "--formats", "int8,float32", "--no-bench"])
    err = capsys.readouterr().err
    assert code == 1
    assert not out.exists()
    assert "accuracy gate FAILED" in err and "int8: agrees with Keras on" in err
    assert "--calibration-samples" in err and "float16" in err
    assert "float32:" not in err.split("FAILED")[1]  # the float model is not blamed
    # the weights-only probe keeps the tiny model's labels, so the diagnosis blames the activations
    assert "int8 weights with float activations agree with Keras on 100.0%" in err
    assert "activation ranges are the problem" in err


@pytest.mark.slow
def test_an_experts_run_is_calibrated_on_as_many_slices_as_its_int8_view(tmp_path, tiny_keras_model, split_data, caplog):
    """The head was chosen on int8 features calibrated on the draw of N slices; another N sets
    other activation ranges, so convert takes the run's N unless told otherwise, and warns then."""
    from convert.cli import main

    run = write_run(tmp_path / "run", tiny_keras_model, split_data)
    experts = {"layers": ["features"], "choices": {"covid-like": {"C": 0.1, "views": 1, "val_auc": 1.0}}, "gate": {},
               "int8_view": True, "int8_view_samples": 6, "choice": "parts", "snapped_backbone": False}
    (run / "metrics.json").write_text(json.dumps({"experts": experts}))
    common = ["--run", str(run), "--data", str(split_data), "--formats", "int8", "--no-bench"]
    assert main(common + ["--out", str(tmp_path / "as-viewed")]) == 0
    assert load_bundle(tmp_path / "as-viewed").manifest["formats"]["int8"]["calibration_samples"] == 6
    assert "calibrated on 6 train slices" not in caplog.text
    assert main(common + ["--out", str(tmp_path / "other"), "--calibration-samples", "8"]) == 0
    assert load_bundle(tmp_path / "other").manifest["formats"]["int8"]["calibration_samples"] == 8
    assert "int8 features calibrated on 6 train slices; converting with 8" in caplog.text


def test_convert_refuses_a_run_folder_without_run_json(tmp_path, split_data, capsys):
    from convert.cli import main

    (tmp_path / "run").mkdir()
    code = main(["--run", str(tmp_path / "run"), "--data", str(split_data), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "no run.json" in capsys.readouterr().err


@pytest.mark.parametrize(("option", "message"), [
    ("head", "trained without one (--head experts)"),
    ("most", "takes auto, off, head or a number of ops, not 'most'"),
    ("0", "needs N >= 1"),
])
def test_convert_refuses_a_float_fallback_that_cannot_apply_before_converting(tmp_path, tiny_keras_model, split_data,
                                                                              capsys, option, message):
    """``--float-fallback head`` on a run without an experts head, or a value that is no option, is refused
    at once: no slice is loaded and no bundle written."""
    from convert.cli import main

    run = write_run(tmp_path / "run", tiny_keras_model, split_data)
    out = tmp_path / "out"
    code = main(["--run", str(run), "--data", str(split_data), "--out", str(out), "--float-fallback", option])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert "for calibration" not in err and not out.exists()  # refused before the calibration draw


def test_convert_refuses_an_unknown_format_before_converting(tmp_path, split_data, capsys):
    from convert.cli import main

    code = main(["--run", str(tmp_path), "--data", str(split_data), "--out", str(tmp_path / "out"), "--formats", "int8,int4"])
    assert code == 2
    assert "unknown formats ['int4']" in capsys.readouterr().err


def test_onnx_export_is_byte_reproducible(tiny_keras_model):
    """tf2onnx numbers its constants from a process-wide counter; the export canonicalizes
    them so the same model always gives the same file (and sha256)."""
    from convert.onnx_export import to_onnx

    assert to_onnx(tiny_keras_model) == to_onnx(tiny_keras_model)


def _rounded_copy(model):
    """``model``'s function with every kernel rounded as TFLite rounds int8 weights."""
    import keras

    from convert.bias_correction import round_like_tflite

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    stack = [copy]
    while stack:
        for layer in stack.pop().layers:
            if isinstance(layer, keras.Model):
                stack.append(layer)
            elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
                weights = layer.get_weights()
                weights[0] = round_like_tflite(weights[0], -1)
                layer.set_weights(weights)
    return copy


def test_bias_correction_cancels_the_mean_shift_of_int8_weight_rounding():
    """A nested block with a biased convolution and a bias-free one followed by BatchNorm,
    kernels with outliers so that 8-bit rounding visibly shifts the mean output: after
    correction the rounded model's mean output on the calibration data is the float one's."""
    import keras

    from convert.bias_correction import correct_biases

    rng = np.random.default_rng(0)
    inner_input = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(6, 3, use_bias=True, name="biased")(inner_input)
    x = keras.layers.Conv2D(5, 3, use_bias=False, name="bias_free")(x)
    inner = keras.Model(inner_input, keras.layers.BatchNormalization(name="bn")(x), name="block")
    outer_input = keras.Input((12, 12, 3))
    features = keras.layers.GlobalAveragePooling2D()(inner(keras.layers.Rescaling(1 / 255.0)(outer_input)))
    model = keras.Model(outer_input, features)
    for name in ("biased", "bias_free"):
        layer = inner.get_layer(name)
        kernel = rng.normal(0, 0.05, layer.get_weights()[0].shape).astype(np.float32)
        kernel[0, 0, 0, :] = 3.0  # one outlier per output channel coarsens the int8 grid
        layer.set_weights([kernel, *layer.get_weights()[1:]])
    samples = rng.integers(60, 255, (16, 12, 12, 3)).astype(np.uint8)

    reference = model.predict(samples.astype(np.float32), verbose=0).mean(axis=0)
    shift_before = np.abs(_rounded_copy(model).predict(samples.astype(np.float32), verbose=0).mean(axis=0) - reference)
    corrected = keras.models.clone_model(model)
    corrected.set_weights(model.get_weights())
    assert correct_biases(corrected, list(samples)) == {"bias": 1, "batchnorm": 1, "left": 0}
    shift_after = np.abs(_rounded_copy(corrected).predict(samples.astype(np.float32), verbose=0).mean(axis=0) - reference)
    assert shift_before.max() > 1e-3
    assert shift_after.max() < shift_before.max() / 50


def test_diagnosis_blames_a_threshold_on_the_coarse_end_of_the_int8_output_grid():
    from convert.diagnose import threshold_resolution

    step = 1 / 256
    assert "1.0 output steps" in threshold_resolution(step, step)
    assert threshold_resolution(1 - 2 * step, step) is not None
    assert threshold_resolution(0.5, step) is None
    assert threshold_resolution(0.01, None) is None  # float output: no grid


@pytest.mark.slow
def test_an_ensemble_run_converts_to_one_model_file_that_averages_its_members(tmp_path, split_data, capsys):
    """``python -m train.ensemble`` output is an ordinary run: every format is one model file
    computing the members' mean, the gate passes, and the card lists the members."""
    from convert.cli import main
    from tests.tiny_model import build_model, labelled_pixels
    from train.ensemble import build_ensemble

    pixels, positive = labelled_pixels(split_data / "train")
    sharp = build_model(pixels, positive)
    # a second, different member: the same feature with a softer head (half the logit gain)
    soft = build_model(pixels, positive)
    kernel, bias = soft.get_layer("head").get_weights()
    soft.get_layer("head").set_weights([kernel / 2, bias / 2])
    from tests.tiny_model import SPEC

    ensemble = build_ensemble([sharp, soft], (SPEC.height, SPEC.width, SPEC.channels), "tiny_ensemble")
    run = write_run(tmp_path / "run", ensemble, split_data)
    info = json.loads((run / "run.json").read_text())
    info["ensemble"] = {
        "members": [{"run": name, "seed": seed, "val_auc": 1.0} for name, seed in (("sharp", 1), ("soft", 2))],
        "commands": ["made by the test (sharp)", "made by the test (soft)"],
        "rule": "mean of softmax",
    }
    (run / "run.json").write_text(json.dumps(info))
    out = tmp_path / "models" / "tiny-ensemble"
    argv = ["--run", str(run), "--data", str(split_data), "--out", str(out), "--calibration-samples", "8",
            "--formats", "int8,float32", "--no-bench"]
    assert main(argv) == 0, capsys.readouterr().err
    bundle = load_bundle(out)
    assert set(bundle.manifest["formats"]) == {"int8", "float32"}
    assert len(list(out.glob("*.tflite"))) == 2  # one file per format, the members inside it
    val_pixels, _ = labelled_pixels(split_data / "val")
    batch = np.stack(val_pixels).astype(np.float32)
    expected = (sharp.predict(batch, verbose=0) + soft.predict(batch, verbose=0))[:, LABELS.index(POSITIVE)] / 2
    classifier = Classifier(bundle, fmt="float32", threads=1)
    # the model file's own output (the bundle's calibration map comes after it)
    got = np.array([classifier.raw_probabilities(p)[LABELS.index(POSITIVE)] for p in val_pixels])
    assert np.allclose(got, expected, atol=FLOAT32_TOLERANCE)
    card = (out / "MODEL_CARD.md").read_text()
    assert "ensemble of 2 runs" in card and "made by the test (soft)" in card
    assert bundle.manifest["training"]["ensemble"]["rule"] == "mean of softmax"
    # no --version: the date plus the default model's sha256 prefix, so same-day conversions differ
    from datetime import date

    int8_file = bundle.manifest["formats"]["int8"]["file"]
    expected_version = f"{date.today():%Y.%m.%d}+{bundle.manifest['files'][int8_file][:8]}"
    assert bundle.manifest["version"] == expected_version


@pytest.mark.slow
def test_a_two_source_conversion_calibrates_on_both_and_scores_every_format_per_source(tmp_path, tiny_keras_model, split_data, capsys):
    """int8 calibration draws equally from every source, and the manifest and the card carry
    every format's val figures per source (they add up to the pooled figures)."""
    from convert.cli import main

    second = tmp_path / "hospital-b"
    write_image_folder(second / "train", per_class=6, seed=8)
    write_image_folder(second / "val", per_class=4, seed=9)
    run = write_run(tmp_path / "run", tiny_keras_model, split_data)
    out = tmp_path / "models" / "two"
    argv = ["--run", str(run), "--data", str(split_data), "--data", str(second), "--out", str(out),
            "--calibration-samples", "10", "--formats", "int8,float32", "--no-bench"]
    assert main(argv) == 0, capsys.readouterr().err
    manifest = load_bundle(out).manifest
    assert manifest["conversion"]["calibration"]["sources"] == {split_data.name: 5, "hospital-b": 5}
    for figures in (manifest["metrics"]["val"], *[f["val"] for f in manifest["metrics"]["formats"].values()]):
        sources = figures["sources"]
        assert list(sources) == [split_data.name, "hospital-b"]
        assert sources[split_data.name]["n"] == 16 and sources["hospital-b"]["n"] == 8 and figures["n"] == 24
        for key in ("tp", "fn", "fp", "tn"):
            assert figures["confusion"][key] == sum(s["confusion"][key] for s in sources.values())
    int8 = manifest["metrics"]["formats"]["int8"]["val"]["sources"]["hospital-b"]
    assert 0.0 <= int8["agreement"] <= 1.0
    card = (out / "MODEL_CARD.md").read_text()
    assert "### val per source (one threshold for all)" in card and "**hospital-b**" in card


def _model_with_one_coarse_convolution():
    """Two convolutions; the second has one large weight per output channel, which makes its
    int8 weight grid coarse, so its int8 output is worse than rounding."""
    import keras

    rng = np.random.default_rng(0)
    pixels = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="fine")(keras.layers.Rescaling(1 / 255.0)(pixels))
    x = keras.layers.Conv2D(8, 3, padding="same", name="coarse")(x)
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(pixels, outputs)
    kernel, bias = model.get_layer("coarse").get_weights()
    kernel[0, 0, 0, :] = 30.0
    model.get_layer("coarse").set_weights([kernel, bias])
    return model, list(rng.integers(0, 255, (32, 12, 12, 3)).astype(np.uint8))


def _op_input_dtypes(content: bytes) -> list[tuple[str, list]]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content)
    interpreter.allocate_tensors()
    dtypes = {t["index"]: t["dtype"] for t in interpreter.get_tensor_details()}
    return [(op["op_name"], [dtypes[i] for i in op["inputs"] if i >= 0]) for op in interpreter._get_ops_details()]


def test_selective_int8_ranks_the_coarse_convolution_above_the_fine_one_and_keeps_only_it_in_float():
    from convert.selective import convert_with_float, rank_layers

    model, samples = _model_with_one_coarse_convolution()
    ranking = rank_layers(model, samples)
    convolutions = [layer for layer in ranking if layer.op == "CONV_2D"]
    assert [("coarse" in layer.tensor) for layer in convolutions] == [True, False]
    assert convolutions[0].rmse_per_step > 2 * convolutions[1].rmse_per_step
    coarse = convolutions[0].tensor

    ops = _op_input_dtypes(convert_with_float(model, samples, [coarse]))
    convs = [inputs for name, inputs in ops if name == "CONV_2D"]
    assert convs[0][0] == np.int8 and convs[1][0] == np.float32  # fine stays int8, coarse runs in float
    assert [name for name, _ in ops].count("DEQUANTIZE") == 1 and [name for name, _ in ops].count("QUANTIZE") == 1
    assert ops[0][1][0] == np.int8  # the model still takes int8 pixels


@pytest.mark.slow
def test_convert_keeps_the_requested_worst_ops_in_float_and_records_them(tmp_path, tiny_keras_model, split_data, capsys):
    """``--float-fallback 1``: the bundle's int8 file has one float op, the manifest and the card say
    which, and the Pi's code path runs it like any int8 model."""
    from convert.cli import main

    run = write_run(tmp_path / "run", tiny_keras_model, split_data)
    out = tmp_path / "tiny"
    argv = ["--run", str(run), "--data", str(split_data), "--out", str(out), "--calibration-samples", "8",
            "--formats", "int8,float32", "--no-bench", "--float-fallback", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    bundle = load_bundle(out)
    int8 = bundle.manifest["formats"]["int8"]
    assert int8["float_fallback"]["float_ops"] == 1 and len(int8["float_fallback"]["float_tensors"]) == 1
    assert "1 of" in int8["quantization"] and "kept in float" in int8["quantization"]
    ops = _op_input_dtypes(bundle.model_path("int8").read_bytes())
    assert sum(1 for _, inputs in ops if inputs and inputs[0] == np.float32 and _ != "QUANTIZE") == 1
    pixels, examples = _pixels(out, split_data / "val")
    classifier = Classifier(out, "int8")
    labels = [classifier.predict_pixels(p).label for p in pixels]
    assert labels == [e.label for e in examples]


def test_layers_kept_in_float_lose_the_int8_bias_correction_and_the_others_keep_it():
    """Bias correction offsets int8 weight rounding; an op kept in float has no rounding, so its
    layers must get their original weights back, and only those."""
    import keras

    from convert.selective import rank_layers, with_float_layers_restored

    original, samples = _model_with_one_coarse_convolution()
    corrected = keras.models.clone_model(original)
    corrected.set_weights(original.get_weights())
    for name in ("fine", "coarse"):
        kernel, bias = corrected.get_layer(name).get_weights()
        corrected.get_layer(name).set_weights([kernel, bias + 0.5])  # stands for a correction
    coarse = next(layer.tensor for layer in rank_layers(original, samples) if "coarse" in layer.tensor)

    restored = with_float_layers_restored(corrected, original, [coarse])
    assert np.array_equal(restored.get_layer("coarse").get_weights()[1], original.get_layer("coarse").get_weights()[1])
    assert np.allclose(restored.get_layer("fine").get_weights()[1], original.get_layer("fine").get_weights()[1] + 0.5)
    again = with_float_layers_restored(corrected, original, [])  # the next trial starts from the correction again
    assert np.allclose(again.get_layer("coarse").get_weights()[1], original.get_layer("coarse").get_weights()[1] + 0.5)


def test_framing_shows_a_whole_image_model_at_chance_on_framed_slices_and_the_body_crop_keeping_its_ranking(
        tiny_bundle, synthetic_data, tmp_path, capsys):
    """``python -m convert.framing``: the same tiny model behind preprocessing that letterboxes the
    whole image and behind one that crops to the body first, on the fixture slices as they are
    and framed in air as a scanner exports them."""
    import shutil

    from convert.framing import FRAMINGS, SECTION_START
    from convert.framing import main as framing_main
    from device.core.bundle import write_manifest

    figures = {}
    for crop in ("none", "body"):
        copy = tmp_path / crop
        shutil.copytree(tiny_bundle, copy)
        manifest = dict(load_bundle(copy).manifest)
        manifest["preprocessing"] = {**manifest["preprocessing"], "crop": crop}
        (copy / "MODEL_CARD.md").write_text("# tiny\n")
        write_manifest(copy, manifest)
        assert framing_main(["--bundle", str(copy), "--data", str(synthetic_data), "--json", "-q", "--write"]) == 0
        printed = json.loads(capsys.readouterr().out)
        recorded = load_bundle(copy).manifest["metrics"]["framing"]  # re-sealed: it loads
        assert recorded["sources"] == printed and list(printed[synthetic_data.name]) == list(FRAMINGS)
        assert (copy / "MODEL_CARD.md").read_text().count(SECTION_START) == 1
        figures[crop] = printed[synthetic_data.name]
    assert figures["none"]["as exported"]["auc"] == 1.0 and figures["none"]["framed in air"]["auc"] <= 0.6
    assert figures["body"]["framed in air"]["auc"] >= 0.95 and figures["body"]["framed, table under it"]["auc"] >= 0.95
    assert all(f["n"] == 24 for f in figures["body"].values())

"""The experts head: a source gate and one linear expert per source on frozen features
(``python -m train --head experts``). Synthetic features and tiny real Keras models only."""

from __future__ import annotations

import json

import numpy as np
import pytest

from device.core.metrics import roc_auc

pytest.importorskip("sklearn")


def _opposite_cues(n: int, seed: int):
    """Two sources told apart by feature 2; the label raises feature 0 in source a and lowers
    it in source b, so one linear boundary for both cannot rank either source."""
    rng = np.random.default_rng(seed)
    source = np.repeat(np.array(["a", "b"]), n)
    y = np.tile(np.repeat([0, 1], n // 2), 2)
    x = rng.normal(0, 1, (2 * n, 6))
    sign = np.where(source == "a", 1.0, -1.0)
    x[:, 0] += 2.0 * sign * (2 * y - 1)
    x[:, 2] += 4.0 * sign
    return x, y, source


def test_per_source_experts_rank_two_sources_whose_cues_run_opposite():
    from sklearn.linear_model import LogisticRegression

    from train.mixture import fit_mixture, predict_mixture

    x, y, source = _opposite_cues(200, 1)
    xv, yv, sv = _opposite_cues(100, 2)
    fitted = fit_mixture([x, x + np.random.default_rng(3).normal(0, 0.1, x.shape)], y, source, xv, yv, sv, ["a", "b"])
    mixed = predict_mixture(fitted, xv)
    pooled = LogisticRegression(max_iter=1000).fit(x, y).predict_proba(xv)[:, 1]
    for name in ("a", "b"):
        own = sv == name
        assert roc_auc(yv[own], mixed[own]) > 0.95
    assert min(roc_auc(yv[sv == name], pooled[sv == name]) for name in ("a", "b")) < 0.75
    assert fitted["gate_val_accuracy"] > 0.95
    assert set(fitted["choices"]) == {"a", "b"} and {c["views"] for c in fitted["choices"].values()} <= {1, 2}
    # each expert on each source: its own as chosen, the other's backwards (the cues run opposite),
    # which is what a slice the gate misroutes gets
    cross = fitted["expert_auc_by_source"]
    for name in ("a", "b"):
        assert cross[name][name] == pytest.approx(fitted["choices"][name]["val_auc"], abs=1e-4)
    assert cross["a"]["b"] < 0.5 and cross["b"]["a"] < 0.5


def test_each_expert_is_chosen_on_its_own_source_only():
    """Scrambling source b's val labels leaves source a's choice alone."""
    from train.mixture import fit_mixture

    x, y, source = _opposite_cues(120, 4)
    xv, yv, sv = _opposite_cues(60, 5)
    scrambled = yv.copy()
    scrambled[sv == "b"] = np.random.default_rng(6).permutation(scrambled[sv == "b"])
    first = fit_mixture([x], y, source, xv, yv, sv, ["a", "b"])
    second = fit_mixture([x], y, source, xv, scrambled, sv, ["a", "b"])
    assert first["choices"]["a"] == second["choices"]["a"]
    np.testing.assert_array_equal(first["experts"][0][:, 0], second["experts"][0][:, 0])


def test_fixed_choices_refit_a_head_with_another_runs_c_and_views_whatever_val_says():
    """--experts-fixed: the given parts keep the given C and views (the same fit as choosing
    them would give), a part left out is still chosen, and a part or view count the run does
    not have is refused."""
    from train.mixture import fit_mixture, parse_fixed

    x, y, source = _opposite_cues(120, 4)
    xv, yv, sv = _opposite_cues(60, 5)
    views = [x, x + np.random.default_rng(3).normal(0, 0.1, x.shape)]
    chosen = fit_mixture(views, y, source, xv, yv, sv, ["a", "b"])
    assert parse_fixed("a=0.003x2, gate=1x1") == {"a": (0.003, 2), "gate": (1.0, 1)}
    other_c = 0.001 if chosen["choices"]["a"]["C"] != 0.001 else 1.0
    fixed = fit_mixture(views, y, source, xv, yv, sv, ["a", "b"], fixed={"a": (other_c, 2), "gate": (0.1, 1)})
    assert (fixed["choices"]["a"]["C"], fixed["choices"]["a"]["views"]) == (other_c, 2)
    assert (fixed["gate_choice"]["C"], fixed["gate_choice"]["views"]) == (0.1, 1)
    assert fixed["choices"]["b"] == chosen["choices"]["b"]  # not given: chosen as before
    again = fit_mixture(views, y, source, xv, yv, sv, ["a", "b"], fixed={name: (c["C"], c["views"]) for name, c in chosen["choices"].items()}
                        | {"gate": (chosen["gate_choice"]["C"], chosen["gate_choice"]["views"])})
    np.testing.assert_allclose(again["experts"][0], chosen["experts"][0])
    np.testing.assert_allclose(again["gate"][0], chosen["gate"][0])
    with pytest.raises(ValueError, match="not a source of this run"):
        fit_mixture(views, y, source, xv, yv, sv, ["a", "b"], fixed={"c": (0.1, 1)})
    with pytest.raises(ValueError, match="3 views, but this run has 2"):
        fit_mixture(views, y, source, xv, yv, sv, ["a", "b"], fixed={"a": (0.1, 3)})
    for text in ("a=0.1", "a=x2", "a=-1x1"):
        with pytest.raises(ValueError, match="--experts-fixed"):
            parse_fixed(text)


def test_with_int8_features_choices_must_keep_their_decisions_under_them():
    """Where the int8 model's features are noisy in a cue the experts could lean on, the fit
    picks a mixture that keeps more val decisions under them than the fit that ignores them."""
    from device.core.metrics import choose_threshold_by_source
    from train.mixture import INT8_AGREEMENT, fit_mixture, predict_mixture

    x, y, source = _opposite_cues(200, 11)
    x[:, 4] += 0.8 * (2 * y - 1)  # a weak cue in a feature 8-bit rounding scrambles
    xv, yv, sv = _opposite_cues(100, 12)
    xv[:, 4] += 0.8 * (2 * yv - 1)
    noisy = xv.copy()
    noisy[:, 4] += np.random.default_rng(13).normal(0, 3.0, len(xv))

    def agreement(fitted):
        reference, int8 = predict_mixture(fitted, xv), predict_mixture(fitted, noisy)
        threshold = choose_threshold_by_source(yv, reference, sv, "youden")
        return float(np.mean((reference >= threshold) == (int8 >= threshold)))

    plain = fit_mixture([x], y, source, xv, yv, sv, ["a", "b"])
    same = fit_mixture([x], y, source, xv, yv, sv, ["a", "b"], val_int8=xv)  # int8 exact: nothing to avoid
    assert {k: c["C"] for k, c in same["choices"].items()} == {k: c["C"] for k, c in plain["choices"].items()}
    assert same["gate_choice"]["int8_agreement"] == 1.0
    careful = fit_mixture([x], y, source, xv, yv, sv, ["a", "b"], val_int8=noisy)
    assert careful["gate_choice"]["int8_agreement"] == pytest.approx(agreement(careful), abs=1e-4)
    assert agreement(careful) > agreement(plain)
    assert agreement(careful) >= INT8_AGREEMENT or all(c["int8_agreement"] < INT8_AGREEMENT for c in careful["choices"].values())
    # chosen together, the mixture itself must keep its decisions, and the part-by-part choice is one candidate
    together = fit_mixture([x], y, source, xv, yv, sv, ["a", "b"], val_int8=noisy, joint=True)
    assert together["gate_choice"]["int8_agreement"] == pytest.approx(agreement(together), abs=1e-4)
    assert agreement(together) >= INT8_AGREEMENT or agreement(together) >= agreement(careful)
    if agreement(careful) >= INT8_AGREEMENT:
        assert together["gate_choice"]["worst_source_auc"] >= careful["gate_choice"]["worst_source_auc"]


def test_chosen_together_the_mixture_is_the_best_worst_source_combination():
    """--experts-choice joint: experts and gate are chosen on the mixture's worst-source val AUC,
    which is at least what choosing part by part reaches (its choice is one combination)."""
    from train.mixture import fit_mixture, predict_mixture

    x, y, source = _opposite_cues(160, 21)
    xv, yv, sv = _opposite_cues(80, 22)
    parts = fit_mixture([x], y, source, xv, yv, sv, ["a", "b"], c_grid=(0.001, 0.1, 10.0), gate_grid=(0.001, 1.0))
    joint = fit_mixture([x], y, source, xv, yv, sv, ["a", "b"], c_grid=(0.001, 0.1, 10.0), gate_grid=(0.001, 1.0), joint=True)

    def worst(fitted):
        return min(roc_auc(yv[sv == name], predict_mixture(fitted, xv)[sv == name]) for name in ("a", "b"))

    assert joint["gate_choice"]["worst_source_auc"] == pytest.approx(worst(joint), abs=1e-4)
    assert worst(joint) >= worst(parts) - 1e-9
    assert "int8_agreement" not in joint["gate_choice"]  # no int8 view, no int8 rule


def _random_backbone_features(seed: int, pixel_seed: int, n: int):
    """A random 32-pixel MobileNetV2 (``keras.utils.set_random_seed(seed)``: set it again to
    build the same one) and its pooled features of ``n`` random slices."""
    keras = pytest.importorskip("keras")
    from train.experts import DEFAULT_LAYERS, build_extractor
    from train.model import resolve_weights

    weights, path = resolve_weights("none")
    layers = DEFAULT_LAYERS["mobilenetv2"]
    keras.utils.set_random_seed(seed)
    extractor = build_extractor("mobilenetv2", 32, weights, path, layers)
    pixels = np.random.default_rng(pixel_seed).integers(0, 256, (n, 32, 32, 1)).astype(np.float32)
    return weights, path, layers, pixels, np.asarray(extractor(pixels), dtype=np.float64)


@pytest.mark.parametrize("positive_index", [0, 1])
def test_the_keras_model_computes_the_fitted_mixture_in_built_in_layers(positive_index, tmp_path):
    keras = pytest.importorskip("keras")
    from train.experts import build_experts_model
    from train.mixture import fit_mixture, predict_mixture

    weights, path, layers, pixels, features = _random_backbone_features(0, 7, 24)
    y = np.tile([0, 1], 12)
    source = np.repeat(np.array(["a", "b"]), 12)
    fitted = fit_mixture([features], y, source, features, y, source, ["a", "b"])
    keras.utils.set_random_seed(0)  # the same random backbone as the extractor's
    model = build_experts_model("mobilenetv2", 32, ["COVID", "NonCOVID"], positive_index, weights, path, layers, fitted)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")  # no custom objects
    out = np.asarray(loaded(pixels))
    np.testing.assert_allclose(out[:, positive_index], predict_mixture(fitted, features), atol=2e-5)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-6)


@pytest.mark.slow
def test_float_fallback_head_keeps_the_backbone_and_pooling_int8_and_only_the_head_in_float(tmp_path):
    """``--float-fallback head``: every convolution and the pooling stay int8, every op of the
    head after the pooling (standardise, join, gate, experts, mixture) runs in float, the model
    still takes and gives int8, and it is closer to Keras than full-integer int8."""
    keras = pytest.importorskip("keras")
    from ai_edge_litert.interpreter import Interpreter

    from convert.diagnose import tflite_probabilities
    from convert.selective import head_float_fallback, head_layers
    from convert.tflite import to_tflite
    from train.experts import build_experts_model
    from train.mixture import fit_mixture

    weights, path, layers, pixels, features = _random_backbone_features(0, 7, 24)
    y = np.tile([0, 1], 12)
    source = np.repeat(np.array(["a", "b"]), 12)
    fitted = fit_mixture([features], y, source, features, y, source, ["a", "b"])
    keras.utils.set_random_seed(0)
    model = build_experts_model("mobilenetv2", 32, ["COVID", "NonCOVID"], 0, weights, path, layers, fitted)
    assert {"standardise0", "features", "gate", "source_experts", "mixture"} <= head_layers(model)
    assert not {name for name in head_layers(model) if name.startswith("pool")}
    slices = list(pixels.astype(np.uint8))
    selection = head_float_fallback(model, slices)
    assert selection.float_tensors and "head" in selection.manifest()["chosen_on"]

    interpreter = Interpreter(model_content=selection.content)
    interpreter.allocate_tensors()
    dtypes = {t["index"]: t["dtype"] for t in interpreter.get_tensor_details()}
    ops = [(op["op_name"], [dtypes[i] for i in op["inputs"] if i >= 0]) for op in interpreter._get_ops_details()]
    assert ops[0][1][0] == np.int8 and interpreter.get_output_details()[0]["dtype"] == np.int8
    assert all(inputs[0] == np.int8 for name, inputs in ops if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "MEAN"))
    float_ops = {name for name, inputs in ops if inputs and inputs[0] == np.float32 and name != "QUANTIZE"}
    assert {"FULLY_CONNECTED", "SOFTMAX", "LOGISTIC"} <= float_ops  # gate, experts
    reference = np.asarray(model(pixels))[:, 0]
    head_error = np.abs(tflite_probabilities(selection.content, pixels)[:, 0] - reference).mean()
    full_error = np.abs(tflite_probabilities(to_tflite(model, "int8", slices), pixels)[:, 0] - reference).mean()
    assert head_error <= full_error

    plain = keras.Sequential([keras.Input((32, 32, 1)), keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")])
    with pytest.raises(ValueError, match="experts"):
        head_layers(plain)


@pytest.mark.slow
def test_an_experts_run_on_two_sources_reports_its_head_and_converts_to_int8(tmp_path):
    pytest.importorskip("tensorflow")
    from convert.tflite import to_tflite
    from device.core.backends import dequantize, open_backend, quantize
    from tests.synthetic import write_image_folder
    from train.cli import main

    folders = []
    for index, name in enumerate(("hospital-a", "hospital-b")):
        write_image_folder(tmp_path / name / "train", per_class=8, seed=40 + index)
        write_image_folder(tmp_path / name / "val", per_class=5, seed=50 + index, size=(96 + 32 * index, 128))
        folders.append(tmp_path / name)
    out = tmp_path / "run"
    args = ["--arch", "mobilenetv2", "--weights", "none", "--out", str(out), "--img-size", "32", "--cache", "", "-q",
            "--no-determinism", "--head", "experts", "--trunk-views", "2", "--int8-view"]
    for folder in folders:
        args += ["--data", str(folder)]
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert run["recipe"]["head"] == "experts" and metrics["epochs_trained"] == 0
    assert set(metrics["experts"]["choices"]) == {"hospital-a", "hospital-b"}
    assert metrics["experts"]["int8_view"] is True and "int8_view_samples" not in metrics["experts"]  # the random draw
    # views are the slice alone or all three: two float views and the int8 one
    assert {choice["views"] for choice in metrics["experts"]["choices"].values()} <= {1, 3}
    report = (out / "report.md").read_text()
    assert "experts head fitted in one step" in report and "training_curves.png" not in report
    assert (out / "gradcam.png").is_file()
    from convert.model_card import _experts_lines
    from convert.run import load_run

    provenance = load_run(out).provenance  # what the manifest and the model card get
    assert provenance["experts"]["choices"] == metrics["experts"]["choices"]
    card = "\n".join(_experts_lines(provenance["experts"]))
    assert "expert `hospital-a`" in card and "expert `hospital-b`" in card and "gate: C" in card
    cross = metrics["experts"]["expert_auc_by_source"]
    assert set(cross) == {"hospital-a", "hospital-b"} and all(set(row) == set(cross) for row in cross.values())
    assert f"expert `hospital-a` on the other sources' val: `hospital-b` AUC {cross['hospital-a']['hospital-b']:.3f}" in card
    assert "each expert on each source's val: hospital-a expert hospital-a" in report

    import keras

    model = keras.models.load_model(out / "model.keras")
    from device.core.dataset import list_examples
    from device.core.preprocess import PreprocessSpec, load_slice

    # slices like the ones it was fitted on (each source's val, as the device prepares them)
    spec = PreprocessSpec.from_manifest(run["preprocessing"])
    slices = np.stack([load_slice(e.path, spec) for folder in folders for e in list_examples(folder / "val")[::2]])
    (tmp_path / "model.tflite").write_bytes(to_tflite(model, "int8", list(slices)))
    backend = open_backend(tmp_path / "model.tflite", "tflite", 1)
    assert backend.input.dtype == np.int8  # full-integer: the gate, experts and mixture too
    int8 = np.stack([dequantize(backend.invoke(quantize(s[None].astype(np.float32), backend.input)), backend.output)[0]
                     for s in slices])
    # the same model in 8 bits (a random 32-pixel backbone calibrated on 10 slices: loose)
    assert np.abs(int8 - np.asarray(model(slices.astype(np.float32)))).mean() < 0.1
    np.testing.assert_allclose(int8.sum(axis=1), 1.0, atol=0.02)

    # with --int8-view-samples N the view calibrates on the conversion's draw, and says so for convert
    drawn = tmp_path / "drawn"
    assert main([*args[:args.index("--out") + 1], str(drawn), *args[args.index("--out") + 2:], "--int8-view-samples", "6"]) == 0
    assert json.loads((drawn / "metrics.json").read_text())["experts"]["int8_view_samples"] == 6
    assert load_run(drawn).head["int8_view_samples"] == 6


def test_fine_tuning_knobs_are_refused_with_the_experts_head(tmp_path, capsys):
    from tests.synthetic import write_image_folder
    from train.cli import main

    write_image_folder(tmp_path / "a" / "train", per_class=3, seed=1)
    write_image_folder(tmp_path / "a" / "val", per_class=3, seed=2)
    args = ["--arch", "mobilenetv2", "--weights", "none", "--data", str(tmp_path / "a"), "--out", str(tmp_path / "run"),
            "--img-size", "32", "--cache", "", "-q", "--head", "experts", "--ema", "0.99"]
    assert main(args) == 2
    assert "--ema would do nothing" in capsys.readouterr().err
    assert not (tmp_path / "run" / "model.keras").exists()
    assert main([arg for arg in args if arg not in ("--ema", "0.99")] + ["--int8-view-samples", "100"]) == 2
    assert "without --int8-view it would do nothing" in capsys.readouterr().err
    dense = [arg for arg in args if arg not in ("experts", "--ema", "0.99")]
    dense[dense.index("--head")] = "--int8-view"
    assert main(dense) == 2
    assert "--int8-view is a view for the experts head's fit" in capsys.readouterr().err
    dense[dense.index("--int8-view")] = "--experts-choice=joint"
    assert main(dense) == 2
    assert "--experts-choice is how the experts head's parts are chosen" in capsys.readouterr().err
    dense[dense.index("--experts-choice=joint")] = "--experts-fixed=a=0.1x1"
    assert main(dense) == 2
    assert "--experts-fixed gives the experts head's choices" in capsys.readouterr().err
    assert main([arg for arg in args if arg not in ("--ema", "0.99")] + ["--experts-fixed", "z=0.1x1"]) == 2
    assert "--experts-fixed names z" in capsys.readouterr().err


def test_the_int8_view_is_the_features_a_full_int8_model_computes(tmp_path):
    keras = pytest.importorskip("keras")
    from train.experts import int8_features

    weights, path, layers, pixels, features = _random_backbone_features(3, 9, 16)
    pixels = pixels.astype(np.uint8)
    keras.utils.set_random_seed(3)  # the same random backbone
    int8, again = int8_features("mobilenetv2", 32, weights, path, layers, [features], [pixels, pixels[:4]], pixels[:8])
    np.testing.assert_array_equal(again, int8[:4])  # one converted model serves every set
    assert int8.shape == features.shape
    spread = features.std(axis=0) + 1e-9
    error = np.abs(int8 - features) / spread
    assert 0 < np.median(error) < 0.5  # rounded by 8-bit activations: close, and not the float numbers
    assert np.corrcoef(int8.ravel(), features.ravel())[0, 1] > 0.95


def test_a_fine_tuned_runs_backbone_starts_the_experts_head(tmp_path):
    keras = pytest.importorskip("keras")
    from train.model import BACKBONE_NAME, WeightsError, build_backbone, build_model, resolve_weights

    keras.utils.set_random_seed(4)
    run = tmp_path / "finetuned"
    run.mkdir()
    scratch, _ = resolve_weights("none")
    model = build_model("mobilenetv2", 32, ["COVID", "NonCOVID"], scratch, None, 0.2, False)
    model.save(run / "model.keras")
    (run / "run.json").write_text(json.dumps({"architecture": "mobilenetv2", "command": "python -m train --out finetuned",
                                              "metrics": {"val": {"sources": {"a": {"auc": 0.8}, "b": {"auc": 0.9}}}}}))
    weights, path = resolve_weights(str(run))  # the folder, or its model.keras
    assert weights.kind == "run" and weights.pretrained and path == run / "model.keras"
    assert "finetuned" in weights.description and "a 0.800, b 0.900" in weights.description
    keras.utils.set_random_seed(5)  # another random start: the copy must overwrite it
    backbone = build_backbone("mobilenetv2", 32, weights, path)
    trained = model.get_layer(BACKBONE_NAME)
    for layer in (layer for layer in trained.layers if layer.weights):  # input layers are numbered per process
        for mine, theirs in zip(backbone.get_layer(layer.name).get_weights(), layer.get_weights(), strict=True):
            np.testing.assert_array_equal(mine, theirs)
    with pytest.raises(WeightsError, match="another architecture or input size"):
        build_backbone("resnet50", 32, weights, path)
    (run / "run.json").unlink()
    with pytest.raises(WeightsError, match="inside a run folder"):
        resolve_weights(str(run / "model.keras"))


def test_the_int8_view_is_calibrated_on_the_slices_the_conversion_draws(tmp_path):
    """The view's activation ranges are the shipped model's only if both calibrate on the same
    slices: train.experts.calibration_pixels and python -m convert draw them with one function."""
    from convert.calibration import draw_by_source
    from device.core.dataset import list_examples
    from device.core.preprocess import PreprocessSpec, load_slice
    from tests.synthetic import write_image_folder
    from train.data import load_sources
    from train.experts import calibration_pixels

    roots = []
    for index, name in enumerate(("hospital-a", "hospital-b")):
        write_image_folder(tmp_path / name / "train", per_class=6 + 3 * index, seed=40 + index)
        write_image_folder(tmp_path / name / "val", per_class=3, seed=50 + index)
        roots.append(tmp_path / name)
    (tmp_path / "hospital-b" / "train" / "COVID" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # skipped by both
    spec = PreprocessSpec(height=32, width=32, channels=1)
    labels, sources = load_sources(roots, spec, None, show_progress=False)
    examples = [list_examples(root / "train", labels) for root in roots]
    for samples, seed in ((7, 0), (7, 1), (40, 3)):
        picked = calibration_pixels(sources, labels, samples, seed)
        drawn = [example for chosen, _ in draw_by_source(examples, samples, seed) for example in chosen]
        expected = np.stack([load_slice(example.path, spec) for example in drawn if example.path.name != "truncated.png"])
        np.testing.assert_array_equal(picked, expected)
    assert not np.array_equal(calibration_pixels(sources, labels, 7, 0), calibration_pixels(sources, labels, 7, 1))

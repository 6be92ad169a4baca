"""Weights on the int8 grid (``train.snap``, ``--snap-weights``): rounded the way TFLite rounds
them, so full-integer int8 stores exactly the kernels the gated float model runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from tests.tiny_runs import COMMON  # noqa: E402
from tests.tiny_runs import train as _train  # noqa: E402

pytestmark = pytest.mark.slow


def test_a_kernel_is_rounded_onto_the_per_channel_grid_of_its_folded_form():
    from train.snap import snap_kernel

    kernel = np.array([[1.0, 0.25], [0.6, -0.4], [0.3, 0.1]])  # 3 weights, 2 output channels
    plain = snap_kernel(kernel)
    # channel 0: step 1/127; 0.6 -> 76.2 steps -> 76, 0.3 -> 38.1 -> 38
    assert np.allclose(plain[:, 0], [1.0, 76 / 127, 38 / 127], atol=1e-7)
    # channel 1: step 0.4/127; 0.25 -> 79.375 -> 79, 0.1 -> 31.75 -> 32
    assert np.allclose(plain[:, 1], [79 * 0.4 / 127, -0.4, 32 * 0.4 / 127], atol=1e-7)
    # with a BatchNorm factor of 2 on channel 1, the grid is that of the folded kernel,
    # returned in the unfolded scale: the same integers here, since the factor scales the step too
    folded = snap_kernel(kernel, np.array([1.0, 2.0]))
    assert np.allclose(folded, plain, atol=1e-7)
    assert np.array_equal(snap_kernel(np.zeros((3, 1))), np.zeros((3, 1)))


def _tiny_convnet(seed: int):
    import keras

    keras.utils.set_random_seed(seed)
    pixels = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(pixels)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(pixels, keras.layers.Dense(2, activation="softmax")(x))
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):  # BatchNorm that really scales
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 2, n), rng.normal(0, 0.1, n), rng.normal(0, 0.1, n), rng.uniform(0.5, 2, n)])
    return model


def _tiny_branches(seed: int):
    """Two convolutions on one input, each with its own BatchNorm, joined as a ResNet's
    projection block joins them: Keras lists both convolutions before either BatchNorm."""
    import keras

    keras.utils.set_random_seed(seed)
    pixels = keras.Input((8, 8, 3))
    main = keras.layers.Conv2D(4, 3, padding="same", name="block1_3_conv")(pixels)
    shortcut = keras.layers.Conv2D(4, 1, name="block1_0_conv")(pixels)
    main = keras.layers.BatchNormalization(name="block1_3_bn")(main)
    shortcut = keras.layers.BatchNormalization(name="block1_0_bn")(shortcut)
    x = keras.layers.ReLU()(keras.layers.Add()([shortcut, main]))
    model = keras.Model(pixels, keras.layers.Dense(2, activation="softmax", name="classifier")(
        keras.layers.GlobalAveragePooling2D()(x)))
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):  # very different scales per branch
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.2, 5, n), rng.normal(0, 0.1, n), rng.normal(0, 0.1, n), rng.uniform(0.2, 5, n)])
    return model


def _int8_kernels(flatbuffer: bytes) -> list[np.ndarray]:
    """Dequantized convolution kernels of an int8 TFLite file, output channels last."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    kernels = []
    for op in interpreter._get_ops_details():
        if op["op_name"] not in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            continue
        detail = interpreter._get_tensor_details(op["inputs"][1], 0)
        q = np.array(interpreter.get_tensor(op["inputs"][1])).astype(np.float64)
        scales = detail["quantization_parameters"]["scales"]
        axis = detail["quantization_parameters"]["quantized_dimension"]
        shape = [1] * q.ndim
        shape[axis] = -1
        kernels.append(np.moveaxis(q * scales.reshape(shape), axis, -1))
    return kernels


def _folded_kernels(model) -> list[np.ndarray]:
    """Each convolution's kernel with the BatchNorm that reads its output folded in (found by name)."""
    import keras

    from train.snap import batchnorm_fold

    out = []
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            kernel = layer.get_weights()[0]
            if isinstance(layer, keras.layers.DepthwiseConv2D):
                kernel = kernel.reshape(*kernel.shape[:2], -1)
            norm = next(other for other in model.layers if isinstance(other, keras.layers.BatchNormalization)
                        and other.input is layer.output)
            out.append(kernel * batchnorm_fold(norm))
    return out


@pytest.mark.parametrize("snapped", [True, False], ids=["snapped", "as-trained"])
@pytest.mark.parametrize("build", [_tiny_convnet, _tiny_branches], ids=["chain", "branches"])
def test_snapped_kernels_reach_int8_tflite_without_rounding(snapped, build):
    from convert.tflite import to_tflite
    from train.snap import snap_model

    model = build(7)
    if snapped:
        assert snap_model(model)["layers"] == 2
    representative = np.random.default_rng(1).integers(0, 256, (16, 8, 8, 3)).astype(np.uint8)
    int8 = _int8_kernels(to_tflite(model, "int8", list(representative)))
    folded = _folded_kernels(model)
    assert len(int8) == len(folded) == 2
    worst = max(float(np.abs(np.sort(a.ravel()) - np.sort(b.ravel())).max() / np.abs(b).max()) for a, b in zip(int8, folded, strict=True))
    if snapped:
        assert worst < 1e-5  # the same kernels, up to float32 arithmetic
    else:
        assert worst > 1e-3  # random kernels lose a part of a step each


def test_each_convolution_is_paired_with_the_batchnorm_that_reads_its_output():
    from train.rebuild import keras_layers

    model = _tiny_branches(3)
    names = [layer.name for layer in model.layers]
    # Listed as Keras lists a ResNet projection block: the next layer is not the BatchNorm
    assert names[names.index("block1_3_conv") + 1] == "block1_0_bn"
    pairs = {layer.name: norm.name if norm is not None else None for layer, norm in keras_layers(model)}
    assert pairs == {"block1_3_conv": "block1_3_bn", "block1_0_conv": "block1_0_bn", "classifier": None}


def test_a_run_with_snap_weights_saves_a_checkpoint_on_the_grid(tiny_weights_file, split_data, tmp_path):
    import keras

    from train.snap import snap_model

    path, _ = tiny_weights_file
    out = tmp_path / "snapped"
    args = ["--arch", "mobilenetv2", "--data", str(split_data), "--weights", str(path), "--out", str(out), *COMMON,
            "--head-epochs", "0", "--fine-epochs", "1", "--unfreeze-from", "block_16_expand", "--fine-lr", "0.01",
            "--snap-weights"]  # the fine-tune stage alone: it is what snaps
    assert _train(args) == 0
    assert json.loads((out / "run.json").read_text())["recipe"]["snap_weights"] is True
    model = keras.models.load_model(out / "model.keras")
    assert snap_model(model)["max_abs_change"] < 1e-6  # already on the grid: rounding again moves nothing


def test_an_experts_run_with_snap_weights_fits_its_head_on_a_backbone_on_the_grid(tiny_weights_file, split_data, tmp_path):
    import keras

    from train.model import build_backbone, resolve_weights
    from train.snap import snap_model

    path, _ = tiny_weights_file
    weights, resolved = resolve_weights(str(path))
    assert snap_model(build_backbone("mobilenetv2", 32, weights, resolved))["max_abs_change"] > 1e-4  # the start is off the grid
    out = tmp_path / "experts"
    args = ["--arch", "mobilenetv2", "--data", str(split_data), "--weights", str(path), "--out", str(out), "--img-size", "32",
            "--cache", "", "--no-determinism", "-q", "--seed", "3", "--head", "experts", "--trunk-views", "1", "--snap-weights"]
    assert _train(args) == 0
    assert json.loads((out / "metrics.json").read_text())["experts"]["snapped_backbone"] is True
    assert "rounded onto TFLite's int8 grid" in (out / "report.md").read_text()
    model = keras.models.load_model(out / "model.keras")
    assert snap_model(model)["max_abs_change"] < 1e-6  # the backbone the head was fitted on ships as it is


def test_snap_refuses_an_averaged_run(tiny_weights_file, split_data, tmp_path, capsys):
    path, _ = tiny_weights_file
    args = ["--arch", "mobilenetv2", "--data", str(split_data), "--weights", str(path), "--out", str(tmp_path / "x"),
            *COMMON, "--fine-epochs", "1", "--snap-weights", "--ema", "0.99"]
    assert _train(args) == 2
    assert "--snap-weights" in capsys.readouterr().err


def test_snapping_a_finished_run_writes_a_new_run_rescored_on_val(file_run, split_data, tmp_path):
    import keras

    from train.snap import main, snap_model

    out = tmp_path / "snapped-run"
    assert main(["--run", str(file_run), "--data", str(split_data), "--out", str(out), "-q"]) == 0
    run = json.loads((out / "run.json").read_text())
    before = json.loads((file_run / "run.json").read_text())
    assert run["snapped"]["layers"] == 52 and run["snapped"]["val_before"]["threshold"] == before["threshold"]
    assert run["threshold"] == run["snapped"]["val_after"]["threshold"]
    assert run["metrics"]["auc"] == run["snapped"]["val_after"]["roc_auc"]
    assert snap_model(keras.models.load_model(out / "model.keras"))["max_abs_change"] < 1e-6
    assert snap_model(keras.models.load_model(file_run / "model.keras"))["max_abs_change"] > 1e-4  # the source run is untouched
    assert main(["--run", str(file_run), "--data", str(split_data), "--out", str(file_run)]) == 1

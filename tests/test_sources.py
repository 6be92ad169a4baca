"""Several training sources: balanced batches, figures per source, selection on the worst
source, ``ctpi evaluate`` over several folders, and the ResNet50 cut after stage 4.

No ../shared data: tiny synthetic ImageFolders stand in for two hospitals."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from device.core.metrics import (
    binary_metrics,
    choose_threshold,
    choose_threshold_by_source,
    roc_auc,
    source_metrics,
    worst_source_auc,
)
from tests.synthetic import write_image_folder

# --- per-source figures and the one threshold (numpy only) ---------------------------------


def test_per_source_metrics_match_hand_answers():
    y = [1, 1, 0, 0, 1, 0, 0]
    s = [0.9, 0.4, 0.6, 0.1, 0.7, 0.2, 0.3]
    names = ["a", "a", "a", "a", "b", "b", "b"]
    figures = source_metrics(y, s, names, 0.5)
    a, b = figures["sources"]["a"], figures["sources"]["b"]
    # a: TP .9, FN .4, FP .6, TN .1; AUC: .9 beats both negatives, .4 beats only .1 -> 3/4
    assert a["confusion"] == {"tp": 1, "fn": 1, "fp": 1, "tn": 1}
    assert a["accuracy"] == 0.5 and a["auc"] == 0.75 and a["n"] == 4
    assert b["confusion"] == {"tp": 1, "fn": 0, "fp": 0, "tn": 2}
    assert b["accuracy"] == 1.0 and b["auc"] == 1.0
    assert figures["confusion"] == {"tp": 2, "fn": 1, "fp": 1, "tn": 3}
    assert figures["accuracy"] == pytest.approx(5 / 7) and figures["n"] == 7
    assert figures["worst_source_auc"] == 0.75 == worst_source_auc(y, s, names)
    assert list(figures["sources"]) == ["a", "b"]  # data-folder order, not alphabetical by chance
    assert list(source_metrics(y, s, ["z"] * 4 + ["b"] * 3, 0.5)["sources"]) == ["z", "b"]


def _two_hospitals():
    """Hospital a (large) separates well at 0.5; hospital b's scores all sit higher, so 0.5
    calls every b slice positive. Pooled, a drowns b."""
    a_pos, a_neg = [0.55, 0.6, 0.8, 0.9], [0.1, 0.2, 0.3, 0.4]
    b_pos, b_neg = [0.8, 0.9], [0.6, 0.7]
    y = [1] * 4 * 10 + [0] * 4 * 10 + [1, 1, 0, 0]
    s = a_pos * 10 + a_neg * 10 + b_pos + b_neg
    names = ["a"] * 80 + ["b"] * 4
    return np.array(y), np.array(s), np.array(names)


def _worst_j(y, s, names, threshold):
    values = []
    for name in np.unique(names):
        f = binary_metrics(y[names == name], s[names == name], threshold)
        values.append(f["sensitivity"] + f["specificity"] - 1)
    return min(values)


def test_one_threshold_is_chosen_for_the_worst_source():
    y, s, names = _two_hospitals()
    pooled = choose_threshold(y, s, "youden")
    by_source = choose_threshold_by_source(y, s, names, "youden")
    assert pooled < 0.55  # pooled Youden serves hospital a only: b gets specificity 0
    assert _worst_j(y, s, names, pooled) == 0.0
    # (0.6, 0.7) and (0.7, 0.8) both give a worst J of 0.5; the second is better pooled
    assert by_source == pytest.approx(0.75)
    assert _worst_j(y, s, names, by_source) == 0.5


def test_the_sensitivity_rule_keeps_every_source_above_its_floor():
    y, s, names = _two_hospitals()
    threshold = choose_threshold_by_source(y, s, names, "sensitivity95")
    for name in ("a", "b"):
        assert binary_metrics(y[names == name], s[names == name], threshold)["sensitivity"] >= 0.95
    # the highest candidate that keeps a's lowest positive (0.55): halfway to the next score down
    assert threshold == pytest.approx((0.4 + 0.55) / 2)


def test_one_source_gives_exactly_the_single_source_threshold():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    s = np.clip(y * 0.3 + rng.uniform(0, 0.7, 50), 0, 1)
    for rule in ("youden", "sensitivity95"):
        assert choose_threshold_by_source(y, s, ["only"] * 50, rule) == choose_threshold(y, s, rule)


def test_a_source_without_both_labels_cannot_choose_a_threshold():
    with pytest.raises(ValueError, match="'b' has one"):
        choose_threshold_by_source([1, 0, 1, 1], [0.9, 0.1, 0.8, 0.7], ["a", "a", "b", "b"])


# --- ctpi evaluate over several folders ----------------------------------------------------


def test_evaluate_gives_each_source_and_the_pooled_figures(tiny_bundle, synthetic_data, tmp_path, capsys):
    import shutil

    from device.cli import main

    first = shutil.copytree(synthetic_data, tmp_path / "hospital-a")
    second = write_image_folder(tmp_path / "hospital-b" / "val", per_class=5, seed=7)

    def evaluate(*folders):
        assert main(["evaluate", "--model", str(tiny_bundle), *map(str, folders), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    both = evaluate(first, second)
    alone = {"hospital-a": evaluate(first), "hospital-b": evaluate(second)}
    assert list(both["sources"]) == ["hospital-a", "hospital-b"]  # a split folder is named for its parent
    assert both["n"] == 24 + 10 and both["refused"] == 0
    for name, single in alone.items():
        per_source = both["sources"][name]
        for key in ("n", "accuracy", "sensitivity", "specificity", "auc", "confusion", "threshold"):
            assert per_source[key] == single[key], (name, key)
    assert both["worst_source_auc"] == min(alone["hospital-a"]["auc"], alone["hospital-b"]["auc"])
    # the pooled confusion is the sum of the sources'
    for key in ("tp", "fn", "fp", "tn"):
        assert both["confusion"][key] == sum(single["confusion"][key] for single in alone.values())

    assert main(["evaluate", "--model", str(tiny_bundle), str(first), str(second)]) == 0
    table = capsys.readouterr().out
    assert "hospital-a" in table and "hospital-b" in table and "pooled" in table


def test_evaluate_refuses_two_folders_with_one_name(tiny_bundle, synthetic_data, tmp_path, capsys):
    from device.cli import main

    a = write_image_folder(tmp_path / "x" / "site" / "val", per_class=2, seed=1)
    b = write_image_folder(tmp_path / "y" / "site", per_class=2, seed=2)
    assert main(["evaluate", "--model", str(tiny_bundle), str(a), str(b), "--json"]) == 2
    assert "NAME=FOLDER" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tiny_bundle), f"one={a}", f"two={b}", "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)["sources"]) == ["one", "two"]


# --- training: balanced batches, worst-source selection, ResNet50 C4 (TensorFlow) ----------

IMG = 32


def _recipe(**changes):
    from train.recipe import Recipe

    return Recipe(img_size=IMG, augment=False, **changes)


def _source(name: str, counts: tuple[int, int], marker: int):
    """A source whose slices carry their cell in their pixels: marker + label index."""
    from train.data import Source, Split

    targets = np.array([0] * counts[0] + [1] * counts[1])
    pixels = (marker + targets).astype(np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 1), np.uint8)
    split = Split("train", Path(name), [f"{i}.png" for i in range(len(targets))], ["COVID" if t == 0 else "NonCOVID" for t in targets],
                  targets, pixels, "f" * 64, [])
    return Source(name, Path(name), split, split)


@pytest.mark.slow
def test_every_epoch_draws_each_source_and_label_equally():
    pytest.importorskip("tensorflow")
    from train.data import balanced_dataset, balanced_epoch_size

    sources = [_source("small", (3, 9), 10), _source("large", (20, 5), 20)]
    recipe = _recipe(batch_size=8)
    epoch = balanced_epoch_size(sources, 2, recipe.batch_size)
    assert epoch % (4 * 8) == 0 or epoch % 8 == 0 and epoch % 4 == 0
    assert abs(epoch - 37) <= 8  # about as many slices as the sources hold
    dataset = balanced_dataset(sources, 2, recipe, seed=1, epoch_size=epoch)
    batches = list(dataset.take(2 * epoch // 8))  # two epochs
    for start in (0, epoch // 8):
        markers = np.concatenate([np.asarray(x)[:, 0, 0, 0] for x, _ in batches[start : start + epoch // 8]])
        cells, counts = np.unique(markers, return_counts=True)
        assert cells.tolist() == [10, 11, 20, 21] and counts.tolist() == [epoch // 4] * 4
    for x, y in batches:  # and every batch holds two of each cell, with the right target
        markers = np.asarray(x)[:, 0, 0, 0]
        assert sorted(np.unique(markers, return_counts=True)[1].tolist()) == [2, 2, 2, 2]
        assert np.array_equal(np.argmax(np.asarray(y), axis=1), (markers % 10).astype(int))
    # the small COVID cell (3 slices) is seen far more often than once: no slice is left out
    pixels = np.concatenate([np.asarray(x) for x, _ in batches])
    assert (pixels[:, 0, 0, 0] == 10).sum() == epoch // 2 > 3


@pytest.mark.slow
def test_with_one_head_per_source_each_target_sits_in_its_own_sources_row():
    pytest.importorskip("tensorflow")
    from train.data import balanced_dataset, balanced_epoch_size

    sources = [_source("small", (3, 9), 10), _source("large", (20, 5), 20)]
    recipe = _recipe(batch_size=8, label_smoothing=0.1)
    epoch = balanced_epoch_size(sources, 2, recipe.batch_size)
    for x, y in balanced_dataset(sources, 2, recipe, seed=1, epoch_size=epoch, source_rows=True).take(epoch // 8):
        markers, y = np.asarray(x)[:, 0, 0, 0].astype(int), np.asarray(y)
        assert y.shape == (8, 2, 2)
        own = markers // 10 - 1  # 10s: source 0 ("small"), 20s: source 1
        label = markers % 10
        np.testing.assert_allclose(y[np.arange(8), 1 - own], 0.0)  # the other source's head learns nothing here
        expected = np.where(np.arange(2)[None, :] == label[:, None], 0.95, 0.05)  # smoothed in the row itself
        np.testing.assert_allclose(y[np.arange(8), own], expected, rtol=1e-6)


@pytest.mark.slow
def test_one_head_per_source_is_scored_by_each_slices_own_head(tmp_path):
    pytest.importorskip("tensorflow")
    import keras

    from train.callbacks import ValAUCCheckpoint, predict_positive

    x, y, names = _two_feature_data(np.random.default_rng(4))
    inputs = keras.Input((2,))
    rows = keras.layers.Softmax(axis=-1)(keras.layers.Reshape((2, 2))(keras.layers.Dense(4)(inputs)))
    model = keras.Model(inputs, rows)
    # head 0 (hospital a) reads feature 0, head 1 (hospital b) feature 1: [a COVID, a Non, b COVID, b Non]
    model.set_weights([np.array([[4.0, 0, 0, 0], [0, 0, 4.0, 0]], np.float32), np.zeros(4, np.float32)])
    heads = (names == "b").astype(int)
    rows_out = np.asarray(model(x))
    own = rows_out[np.arange(len(x)), heads, 0]
    averaged = rows_out.mean(axis=1)[:, 0]
    # the premise: averaging the heads lets b's head blur a's slices
    assert worst_source_auc(y, own, names) > worst_source_auc(y, averaged, names)
    np.testing.assert_allclose(predict_positive(model, x, 0, batch_size=7, heads=heads), own, rtol=1e-6)
    with pytest.raises(ValueError, match="head"):
        predict_positive(model, x, 0)

    selector = ValAUCCheckpoint(x, y, 0, tmp_path / "best.keras", sources=names, heads=heads)
    selector.set_model(model)
    selector.start_stage("fine", 0, patience=5)
    logs = {}
    selector.on_epoch_end(0, logs)
    assert logs["val_auc"] == pytest.approx(worst_source_auc(y, own, names))
    assert logs["val_auc_a"] == pytest.approx(roc_auc(y[names == "a"], own[names == "a"]))


def _two_feature_data(rng):
    """Hospital a separates on feature 0, hospital b on feature 1."""
    ya, yb = np.repeat([1, 0], 20), np.repeat([1, 0], 5)
    a = np.stack([np.where(ya == 1, 1.0, -1.0) + rng.normal(0, 0.2, 40), rng.normal(0, 1.5, 40)], axis=1)
    b = np.stack([rng.normal(0, 0.3, 10), np.where(yb == 1, 1.0, -1.0) + rng.normal(0, 0.2, 10)], axis=1)
    return np.concatenate([a, b]).astype(np.float32), np.concatenate([ya, yb]), np.array(["a"] * 40 + ["b"] * 10)


@pytest.mark.slow
def test_the_checkpoint_is_the_epoch_with_the_best_worst_source_auc(tmp_path):
    pytest.importorskip("tensorflow")
    import keras

    from train.callbacks import ValAUCCheckpoint

    x, y, names = _two_feature_data(np.random.default_rng(4))
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="softmax")])
    only_a = [np.array([[4.0, -4.0], [0.0, 0.0]], np.float32), np.zeros(2, np.float32)]
    both = [np.array([[1.0, -1.0], [1.0, -1.0]], np.float32), np.zeros(2, np.float32)]
    scores = {}
    for key, weights in (("only_a", only_a), ("both", both)):
        model.set_weights(weights)
        scores[key] = np.asarray(model(x))[:, 0]
    # the premise: pooled, the model that ignores b looks better; on the worst source it is not
    assert roc_auc(y, scores["only_a"]) > roc_auc(y, scores["both"])
    assert worst_source_auc(y, scores["both"], names) > worst_source_auc(y, scores["only_a"], names)

    selector = ValAUCCheckpoint(x, y, 0, tmp_path / "best.keras", sources=names)
    selector.set_model(model)
    selector.start_stage("fine", 0, patience=5)
    for epoch, weights in enumerate((only_a, both, only_a)):
        model.set_weights(weights)
        logs = {}
        selector.on_epoch_end(epoch, logs)
        assert logs["val_auc"] == pytest.approx(worst_source_auc(y, np.asarray(model(x))[:, 0], names))
        assert {"val_auc_a", "val_auc_b", "val_auc_pooled"} <= set(logs)
    assert selector.best_epoch == 2
    saved = keras.models.load_model(tmp_path / "best.keras")
    np.testing.assert_allclose(saved.get_weights()[0], both[0])


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("sources")
    folders = []
    for index, name in enumerate(("hospital-a", "hospital-b")):
        write_image_folder(root / name / "train", per_class=8 + 4 * index, seed=20 + index)
        write_image_folder(root / name / "val", per_class=5, seed=30 + index, size=(96 + 32 * index, 128))
        folders.append(root / name)
    return folders


COMMON = ["--img-size", str(IMG), "--head-epochs", "1", "--fine-epochs", "1", "--cache", "", "--no-determinism", "-q",
          "--seed", "3", "--eager"]  # tests/tiny_runs.py says why --eager


@pytest.fixture(scope="module")
def two_source_run(two_sources, tmp_path_factory) -> Path:
    pytest.importorskip("tensorflow")
    from train.cli import main

    out = tmp_path_factory.mktemp("runs") / "two"
    # the head stage alone (half the tracing of two stages): the figures per source are the point
    args = ["--arch", "mobilenetv2", "--weights", "none", "--out", str(out), *COMMON, "--fine-epochs", "0"]
    for folder in two_sources:
        args += ["--data", str(folder)]
    assert main(args) == 0
    return out


@pytest.mark.slow
def test_a_run_on_two_sources_reports_every_figure_per_source(two_source_run):
    out = two_source_run
    run = json.loads((out / "run.json").read_text())
    data = run["training_data"]
    assert [s["name"] for s in data["sources"]] == ["hospital-a", "hospital-b"]
    assert data["sources"][1]["counts"]["train"] == {"COVID": 12, "NonCOVID": 12}
    assert data["counts"]["train"] == {"COVID": 20, "NonCOVID": 20}
    assert len({s["fingerprint"] for s in data["sources"]} | {data["fingerprint"]}) == 3
    with open(out / "val_scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    y = np.array([row["label"] == "COVID" for row in rows], dtype=int)
    s = np.array([float(row["positive_probability"]) for row in rows])
    names = np.array([row["source"] for row in rows])
    assert sorted(set(names)) == ["hospital-a", "hospital-b"] and len(rows) == 20
    assert run["threshold"] == choose_threshold_by_source(y, s, names, "youden")
    val = run["metrics"]["val"]
    expected = source_metrics(y, s, names, run["threshold"])
    for name in ("hospital-a", "hospital-b"):
        for key in ("n", "accuracy", "sensitivity", "specificity", "auc", "confusion", "ece"):
            assert val["sources"][name][key] == pytest.approx(expected["sources"][name][key]), (name, key)
    assert val["worst_source_auc"] == pytest.approx(expected["worst_source_auc"])
    report = (out / "report.md").read_text()
    assert "Per source (one threshold for all)" in report and "| hospital-b | 10 |" in report
    history = (out / "history.csv").read_text().splitlines()[0]
    assert "val_auc_hospital-a" in history and "val_auc_hospital-b" in history


@pytest.mark.slow
def test_train_evaluate_scores_a_run_per_source_like_training_did(two_source_run, two_sources, capsys, tmp_path):
    """The same slices, sources and scores as the run's val_scores.csv. The tiny run's model is
    nearly constant (P within 1e-7 of each other), so threshold figures are compared only where
    the scores are not tied: a last-bit difference between two predict calls flips such labels."""
    import csv

    from train.evaluate import main

    scores_file = tmp_path / "scores.csv"
    assert main(["--run", str(two_source_run), *[f"--data={folder / 'val'}" for folder in two_sources], "--json", "-q",
                 "--scores", str(scores_file)]) == 0
    printed = json.loads(capsys.readouterr().out)
    stored = json.loads((two_source_run / "run.json").read_text())["metrics"]["val"]
    assert list(printed["sources"]) == ["hospital-a", "hospital-b"]

    def rows(path):
        with open(path, newline="") as handle:
            return {(Path(r["path"]).parts[-2:], r["source"]): (r["label"], float(r["positive_probability"])) for r in csv.DictReader(handle)}

    trained, evaluated = rows(two_source_run / "val_scores.csv"), rows(scores_file)
    assert trained.keys() == evaluated.keys() and len(trained) == 20
    for key, (label, probability) in trained.items():
        assert evaluated[key][0] == label and evaluated[key][1] == pytest.approx(probability, abs=1e-5), key
    tied = np.ptp([p for _, p in trained.values()]) < 1e-4
    for name in ("hospital-a", "hospital-b"):
        for key in ("n", "threshold") + (() if tied else ("accuracy", "sensitivity", "specificity", "auc", "confusion")):
            assert printed["sources"][name][key] == pytest.approx(stored["sources"][name][key], abs=1e-6), (name, key)


@pytest.mark.slow
def test_a_run_with_one_head_per_source_saves_their_average(two_sources, tmp_path):
    pytest.importorskip("tensorflow")
    import keras

    from train.cli import main

    out = tmp_path / "heads"
    args = ["--arch", "mobilenetv2", "--weights", "none", "--out", str(out), *COMMON, "--fine-epochs", "0",
            "--head", "sources"]
    for folder in two_sources:
        args += ["--data", str(folder)]
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["recipe"]["head"] == "sources" and set(run["metrics"]["val"]["sources"]) == {"hospital-a", "hospital-b"}
    saved = keras.models.load_model(out / "model.keras")
    heads = keras.Model(saved.input, saved.get_layer("source_probabilities").output)
    pixels = np.random.default_rng(0).integers(0, 256, (3, IMG, IMG, 1)).astype(np.float32)
    rows = np.asarray(heads(pixels))
    assert rows.shape == (3, 2, 2)
    np.testing.assert_allclose(np.asarray(saved(pixels)), rows.mean(axis=1), rtol=1e-5, atol=1e-7)
    assert "One head per source" in (out / "report.md").read_text()

    # one source (make loso's backbones): one head, which the saved model is
    single = tmp_path / "one"
    assert main(["--arch", "mobilenetv2", "--weights", "none", "--out", str(single), *COMMON, "--fine-epochs", "0",
                 "--head", "sources", "--data", str(two_sources[0])]) == 0
    saved = keras.models.load_model(single / "model.keras")
    rows = np.asarray(keras.Model(saved.input, saved.get_layer("source_probabilities").output)(pixels))
    assert rows.shape == (3, 1, 2)
    np.testing.assert_allclose(np.asarray(saved(pixels)), rows[:, 0], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_sources_with_different_labels_are_refused(two_sources, tmp_path, capsys):
    pytest.importorskip("tensorflow")
    from train.cli import main

    other = tmp_path / "other"
    write_image_folder(other / "train", per_class=3, seed=1)
    write_image_folder(other / "val", per_class=3, seed=2)
    (other / "train" / "COVID").rename(other / "train" / "Pneumonia")
    (other / "val" / "COVID").rename(other / "val" / "Pneumonia")
    code = main(["--arch", "mobilenetv2", "--weights", "none", "--out", str(tmp_path / "run"), *COMMON,
                 "--data", str(two_sources[0]), "--data", str(other)])
    assert code == 2
    assert "sources must share labels" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_c4_weights(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """A ResNet50 cut after stage 4 with random weights, saved the way the shared stage-4
    ImageNet file was: ``save_weights`` of the sub-model ending at ``conv4_block6_out``."""
    pytest.importorskip("tensorflow")
    import keras

    keras.utils.set_random_seed(5)
    full = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(None, None, 3))
    c4 = keras.Model(full.input, full.get_layer("conv4_block6_out").output)
    path = tmp_path_factory.mktemp("weights") / "tiny_resnet50_c4.weights.h5"
    c4.save_weights(path)
    return path, [w.copy() for w in c4.get_weights()]


@pytest.mark.slow
def test_resnet50_takes_raw_grey_pixels_with_caffe_preprocessing_inside_the_graph():
    pytest.importorskip("tensorflow")
    import keras

    from train.model import build_model, resolve_weights

    weights, path = resolve_weights("none")
    model = build_model("resnet50", IMG, ["COVID", "NonCOVID"], weights, path)
    scaled = keras.Model(model.input, model.get_layer("imagenet_means").output)
    grey = np.full((1, IMG, IMG, 1), 200.0, np.float32)
    # Keras' caffe mode: BGR order, ImageNet means subtracted, no scaling (grey makes BGR = RGB)
    np.testing.assert_allclose(np.asarray(scaled(grey))[0, 0, 0], [200 - 103.939, 200 - 116.779, 200 - 123.68], rtol=1e-6)
    backbone = model.get_layer("backbone")
    assert backbone.output.shape[1:] == (IMG // 16, IMG // 16, 1024)  # cut after stage 4: stride 16
    assert not [layer.name for layer in backbone.layers if layer.name.startswith("conv5")]


@pytest.mark.slow
def test_resnet50_starts_from_a_stage_4_weights_file(tiny_c4_weights, tmp_path):
    pytest.importorskip("tensorflow")
    import keras

    from train.model import WeightsError, build_backbone, resolve_weights

    path, expected = tiny_c4_weights
    weights, resolved = resolve_weights(str(path))
    base = build_backbone("resnet50", IMG, weights, resolved)
    got = base.get_weights()
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    assert base.get_layer("conv1_conv").get_weights()[0][0, 0, 0, 0] == expected[0][0, 0, 0, 0]
    # a MobileNetV2 file does not fit a ResNet50: refused with the cause, never half-loaded
    keras.utils.set_random_seed(1)
    other = tmp_path / "mobilenet.weights.h5"
    keras.applications.MobileNetV2(input_shape=(IMG, IMG, 3), include_top=False, weights=None).save_weights(other)
    with pytest.raises(WeightsError, match="does not fit"):
        build_backbone("resnet50", IMG, *resolve_weights(str(other)))


@pytest.mark.slow
def test_trunk_and_tail_compute_exactly_the_whole_classifier(tiny_c4_weights):
    pytest.importorskip("tensorflow")
    from train.model import build_model, resolve_weights, split_model

    weights, path = resolve_weights(str(tiny_c4_weights[0]))
    model = build_model("resnet50", IMG, ["COVID", "NonCOVID"], weights, path)
    trunk, tail = split_model(model, "conv4_block4_1_conv")
    pixels = np.random.default_rng(0).integers(0, 256, (3, IMG, IMG, 1)).astype(np.float32)
    assert trunk.output.shape[1:] == (IMG // 16, IMG // 16, 1024)
    np.testing.assert_allclose(np.asarray(tail(trunk(pixels))), np.asarray(model(pixels)), atol=1e-5)
    tail_layers = {id(layer) for layer in tail.get_layer("tail_backbone").layers}
    assert id(model.get_layer("backbone").get_layer("conv4_block6_3_conv")) in tail_layers  # shared, not copied


@pytest.mark.slow
def test_a_resnet50_run_on_cached_trunk_views_saves_the_whole_trained_classifier(tiny_c4_weights, two_sources, tmp_path):
    pytest.importorskip("tensorflow")
    import keras

    from device.core.preprocess import PreprocessSpec, load_slice
    from train.cli import main

    out = tmp_path / "resnet"
    args = ["--arch", "resnet50", "--weights", str(tiny_c4_weights[0]), "--out", str(out), *COMMON, "--trunk-views", "2"]
    for folder in two_sources:
        args += ["--data", str(folder)]
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["recipe"]["trunk_views"] == 2 and run["recipe"]["unfreeze_from"] == "conv4_block4_1_conv"
    model = keras.models.load_model(out / "model.keras")
    # stage 4's last blocks trained (the file's weights changed), its first blocks did not
    backbone = model.get_layer("backbone")
    initial = dict(zip([w.path for w in backbone.weights], tiny_c4_weights[1], strict=False))
    trained = {w.path: np.asarray(w) for w in backbone.weights}
    changed = {path.split("/")[-2] for path in trained if not np.array_equal(trained[path], initial[path])}
    assert changed and all(name.startswith(("conv4_block4", "conv4_block5", "conv4_block6")) for name in changed)
    with open(out / "val_scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    spec = PreprocessSpec(IMG, IMG, 1)
    folder = {p.name: p for p in two_sources}
    pixels = np.stack([load_slice(folder[r["source"]] / "val" / r["path"], spec) for r in rows]).astype(np.float32)
    np.testing.assert_allclose(np.asarray(model(pixels))[:, 0], [float(r["positive_probability"]) for r in rows], atol=1e-4)


@pytest.mark.slow
def test_leave_one_source_out_trains_on_each_source_and_scores_every_val(two_sources, tiny_weights_file, tmp_path, capsys):
    """Each source's run starts from its own weights (``{source}`` in --weights: the shipped
    MobileNetV2 starts from a backbone fine-tuned on the same sources)."""
    pytest.importorskip("tensorflow")
    from train.evaluate import score_run
    from train.loso import main

    (tmp_path / "w").mkdir()
    for name in ("hospital-a", "hospital-b"):
        shutil.copy(tiny_weights_file[0], tmp_path / "w" / f"{name}.weights.h5")
    report = tmp_path / "docs" / "loso.md"
    train_args = f"--img-size {IMG} --head-epochs 1 --fine-epochs 0 --no-determinism --seed 3 --eager"  # one stage is enough here
    assert main(["--data", str(two_sources[0]), "--data", str(two_sources[1]), "--weights", str(tmp_path / "w" / "{source}.weights.h5"),
                 "--out", str(tmp_path / "runs"), "--report", str(report), "--train-args", train_args, "--cache", ""]) == 0
    text = report.read_text()
    assert (tmp_path / "docs" / "loso.png").stat().st_size > 0
    for trained in ("hospital-a", "hospital-b"):
        run = json.loads((tmp_path / "runs" / trained / "run.json").read_text())
        assert [s["name"] for s in run["training_data"]["sources"]] == [trained]  # one source only
        assert run["initial_weights"]["file"] == f"{trained}.weights.h5"  # from its own source's weights
        unseen = "hospital-b" if trained == "hospital-a" else "hospital-a"
        folder = two_sources[0] if unseen == "hospital-a" else two_sources[1]
        figures, _, _ = score_run(tmp_path / "runs" / trained, [str(folder / "val")])
        row = next(line for line in text.splitlines() if line.startswith(f"| {trained} |"))
        assert f"{figures['auc']:.3f} / {figures['accuracy']:.3f}" in row  # the unseen source's cell

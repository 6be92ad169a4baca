"""``ctpi predict`` and ``ctpi evaluate``: results per file, errors per file, exit codes."""

import json

import pytest

from device.cli import main
from device.core.dataset import list_examples

EVALUATE_KEYS = {
    "n", "accuracy", "sensitivity", "specificity", "precision", "f1", "auc", "confusion", "threshold",
    "ece", "refused", "sources", "worst_source_auc",
}


def run_json(capsys, argv):
    code = main(argv)
    return code, json.loads(capsys.readouterr().out)


def test_predict_separates_the_two_classes_the_tiny_model_was_built_for(tiny_bundle, synthetic_data, capsys):
    examples = list_examples(synthetic_data)
    code, report = run_json(capsys, ["predict", "--model", str(tiny_bundle), "--json", *[str(e.path) for e in examples]])
    assert code == 0
    assert report["model"]["sha256"] and report["backend"]["threads"] >= 1
    for example, result in zip(examples, report["results"], strict=True):
        assert result["file"] == str(example.path)
        assert result["label"] == example.label
        assert set(result["probabilities"]) == {"COVID", "NonCOVID"}
        assert result["positive_probability"] == result["probabilities"]["COVID"]
        assert result["latency_ms"]["total"] > 0
        assert result["model_sha256"] == report["model"]["sha256"]


def test_bad_file_gets_an_error_record_and_the_others_still_run(tiny_bundle, synthetic_data, tmp_path, capsys):
    good = list_examples(synthetic_data)[0].path
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not a slice")
    code, report = run_json(capsys, ["predict", "--model", str(tiny_bundle), "--json", str(empty), str(good), str(text)])
    assert code == 1
    first, second, third = report["results"]
    assert first["reason"] == "empty" and "error" in first
    assert second["label"] == "COVID"
    assert third["reason"] == "not-an-image"


def test_predict_human_output_names_model_and_each_file(tiny_bundle, synthetic_data, capsys):
    good = list_examples(synthetic_data)[-1].path
    assert main(["predict", "--model", str(tiny_bundle), str(good)]) == 0
    out = capsys.readouterr().out
    assert "tiny-texture" in out and good.name in out and "NonCOVID" in out and "ms" in out


def test_evaluate_json_has_exactly_the_documented_keys(tiny_bundle, synthetic_data, capsys):
    code, metrics = run_json(capsys, ["evaluate", "--model", str(tiny_bundle), str(synthetic_data), "--json"])
    assert code == 0
    assert set(metrics) == EVALUATE_KEYS
    assert metrics["n"] == 24
    assert metrics["confusion"] == {"tp": 12, "fn": 0, "fp": 0, "tn": 12}
    assert metrics["accuracy"] == 1.0 and metrics["auc"] == 1.0
    assert metrics["threshold"] == 0.5


def test_evaluate_threshold_zero_calls_everything_positive(tiny_bundle, synthetic_data, capsys):
    _, metrics = run_json(capsys, ["evaluate", "--model", str(tiny_bundle), str(synthetic_data), "--json", "--threshold", "0"])
    assert metrics["sensitivity"] == 1.0 and metrics["specificity"] == 0.0
    assert metrics["confusion"] == {"tp": 12, "fn": 0, "fp": 12, "tn": 0}


def test_evaluate_reports_unreadable_slices_and_scores_the_rest(tiny_bundle, synthetic_data, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    (data / "COVID" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    code = main(["evaluate", "--model", str(tiny_bundle), str(data), "--json"])
    captured = capsys.readouterr()
    assert code == 1
    assert json.loads(captured.out)["n"] == 24
    assert "broken.png" in captured.err and "truncated" in captured.err


def test_evaluate_refuses_folders_that_are_not_labels_of_the_model(tiny_bundle, tmp_path, capsys):
    (tmp_path / "Influenza").mkdir()
    (tmp_path / "Influenza" / "a.png").write_bytes(b"x")
    assert main(["evaluate", "--model", str(tiny_bundle), str(tmp_path)]) == 2
    assert "not labels of the model" in capsys.readouterr().err


@pytest.mark.parametrize("threshold", ["1.5", "-0.1"])
def test_evaluate_refuses_thresholds_outside_zero_one(tiny_bundle, synthetic_data, threshold, capsys):
    assert main(["evaluate", "--model", str(tiny_bundle), str(synthetic_data), "--threshold", threshold]) == 2
    assert "not a probability" in capsys.readouterr().err


def test_broken_bundle_is_a_usage_error_with_the_reason(tmp_path, synthetic_data, capsys):
    assert main(["predict", "--model", str(tmp_path), str(next(synthetic_data.rglob("*.png")))]) == 2
    assert "not a ctpi model bundle" in capsys.readouterr().err

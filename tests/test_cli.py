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


def test_every_verb_maps_to_the_module_that_registers_it():
    import argparse
    import importlib

    from device.cli import VERB_MODULES, VERBS

    registered = {}
    for name in VERB_MODULES:
        subparsers = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(name).register(subparsers)
        registered.update(dict.fromkeys(subparsers.choices, name))
    assert registered == VERBS


def test_the_verb_is_the_first_word_that_is_not_an_option():
    from device.cli import requested_verb

    assert requested_verb(["-v", "dicom", "--port", "11112"]) == "dicom"
    assert requested_verb(["site-check", "--help"]) == "site-check"
    assert requested_verb(["--help"]) is None
    assert requested_verb(["dicmo"]) is None  # argparse then names every verb


def test_help_and_a_mistyped_verb_still_name_every_verb(capsys):
    from device.cli import VERBS

    with pytest.raises(SystemExit) as exit_help:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_help.value.code == 0 and all(verb in out for verb in VERBS)
    with pytest.raises(SystemExit) as exit_typo:
        main(["dicmo"])
    err = capsys.readouterr().err
    assert exit_typo.value.code == 2 and "invalid choice" in err and all(verb in err for verb in VERBS)


def test_a_verb_imports_only_its_own_module():
    """#19: ``ctpi dicom`` and ``ctpi watch`` are long-running services with an 80 MB budget;
    importing every verb's module cost the node about 2 MB. Checked in a fresh interpreter."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import contextlib, io, json, sys\n"
        "from device.cli import VERB_MODULES, main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        "        main(['dicom', '--help'])\n"
        "    except SystemExit as exit:\n"
        "        code = exit.code\n"
        "print(json.dumps({'code': code, 'help': out.getvalue(), 'loaded': [m for m in VERB_MODULES if m in sys.modules]}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    report = json.loads(result.stdout)
    assert report["code"] == 0 and "--send-to" in report["help"]
    assert report["loaded"] == ["device.node.daemon"]

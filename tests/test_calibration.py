"""Calibrated probabilities: the fit, the band, the interval arithmetic, and the calibrate command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from device.core.band import Band, band_figures, choose_band
from device.core.calibration import Calibration, CalibrationError, ece_if_calibrated, fit, logit, sigmoid
from device.core.metrics import expected_calibration_error, roc_auc, roc_auc_interval, wilson_interval


def overconfident(n: int, seed: int):
    """Labels drawn from true probabilities, and an overconfident, shifted model's scores."""
    rng = np.random.default_rng(seed)
    truth = sigmoid(rng.normal(0.0, 1.2, n))
    y = (rng.uniform(size=n) < truth).astype(int)
    return y, sigmoid(2.0 * logit(truth) + 1.0)


def test_calibration_reduces_ece_on_a_miscalibrated_model():
    y, scores = overconfident(4000, seed=1)
    before = expected_calibration_error(y, scores)
    calibration = fit(scores, y)
    after = expected_calibration_error(y, calibration.apply(scores))
    assert before > 0.08 and after < 0.02 and after < before / 4
    assert calibration.a == pytest.approx(1 / 2, abs=0.05) and calibration.b == pytest.approx(-1 / 2, abs=0.1)
    held_out_y, held_out = overconfident(4000, seed=2)  # the map generalises to new slices
    assert expected_calibration_error(held_out_y, calibration.apply(held_out)) < 0.03
    temperature = fit(scores, y, "temperature")
    assert temperature.b == 0.0 and expected_calibration_error(y, temperature.apply(scores)) < before


def test_ece_noise_floor_tells_sampling_noise_from_miscalibration():
    """On few slices even exactly right probabilities show a sizeable ECE: the floor is that
    ECE's distribution (what the model card prints beside the measured one)."""
    rng = np.random.default_rng(5)
    p = rng.uniform(0, 1, 118)
    floor = ece_if_calibrated(p)
    # the same figure by brute force with the metrics' own ECE
    brute = [expected_calibration_error((rng.uniform(size=p.size) < p).astype(int), p) for _ in range(1000)]
    assert floor["median"] == pytest.approx(np.median(brute), abs=0.006)
    assert floor["low"] < floor["median"] < floor["high"] and floor["median"] > 0.05  # 118 slices: far above 0.03
    assert ece_if_calibrated(rng.uniform(0, 1, 20000))["high"] < 0.015  # the floor falls with more slices
    calibrated_y = (rng.uniform(size=p.size) < p).astype(int)
    assert ece_if_calibrated(p, expected_calibration_error(calibrated_y, p))["p_value"] > 0.05
    overconfident_y = (rng.uniform(size=p.size) < p**4).astype(int)  # the model says p, the truth is p^4
    assert ece_if_calibrated(p, expected_calibration_error(overconfident_y, p))["p_value"] < 0.01
    assert ece_if_calibrated(p) == ece_if_calibrated(p)  # seeded: a report is reproducible


def test_calibration_keeps_ranking_and_decisions_when_the_threshold_goes_through_it():
    y, scores = overconfident(500, seed=3)
    calibration = fit(scores, y)
    calibrated = calibration.apply(scores)
    assert roc_auc(y, calibrated) == pytest.approx(roc_auc(y, scores))
    threshold = 0.3
    assert ((scores >= threshold) == (calibrated >= calibration.apply(threshold))).all()
    distribution = calibration.apply_distribution(np.array([0.9, 0.1], np.float32), positive_index=0)
    assert distribution.sum() == pytest.approx(1.0) and distribution[0] == pytest.approx(calibration.apply(0.9), abs=1e-6)


def test_a_perfectly_separating_model_gets_a_finite_map_and_a_reversed_one_is_refused():
    y = np.array([1] * 20 + [0] * 20)
    separated = fit(np.where(y == 1, 0.99, 0.01), y)
    assert np.isfinite(separated.a) and 0 < separated.a < 10
    with pytest.raises(CalibrationError, match="reverse"):
        fit(np.where(y == 1, 0.2, 0.8), y)
    with pytest.raises(CalibrationError, match="both classes"):
        fit([0.2, 0.3], [1, 1])
    assert Calibration.from_manifest(None).apply(0.37) == 0.37
    with pytest.raises(ValueError):
        Calibration.from_manifest({"method": "platt", "a": -1.0, "b": 0.0})


def test_wilson_interval_matches_hand_computation():
    # 8/10: centre (0.8 + 1.96²/20) / (1 + 1.96²/10), half-width 1.96·sqrt(0.016 + 0.009604) / 1.38415
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(12, 12) == pytest.approx((0.7575, 1.0), abs=1e-4)  # no successes missing, still a lower bound
    assert wilson_interval(0, 5)[0] == 0.0
    assert all(np.isnan(wilson_interval(0, 0)))


def test_delong_interval_matches_hand_computation():
    # placements: positives 1 and 1/2, negatives 1/2 and 1 -> AUC 3/4, variance 0.125/2 + 0.125/2
    low, high = roc_auc_interval([1, 1, 0, 0], [0.9, 0.4, 0.6, 0.1])
    assert low == pytest.approx(0.75 - 1.959964 * np.sqrt(0.125), abs=1e-6) and high == 1.0


def test_band_is_narrow_holds_at_most_a_tenth_and_raises_accuracy_outside():
    rng = np.random.default_rng(4)
    sources = {}
    for name, n in (("a", 300), ("b", 120)):
        y = rng.integers(0, 2, n)
        sources[name] = (y, sigmoid(rng.normal(np.where(y == 1, 1.2, -1.2), 1.0)))
    band, info = choose_band(sources, threshold=0.5)
    assert band.low <= 0.5 <= band.high
    for name, (y, p) in sources.items():
        figures = info["figures"][name]
        assert figures["fraction_in_band"] <= 0.10
        assert figures["accuracy_outside"] >= band_figures(y, p, 0.5, None)["accuracy_outside"]
    assert info["figures"]["pooled"]["in_band"] > 0
    easy = {"x": (np.array([1, 1, 0, 0] * 10), np.array([0.9, 0.8, 0.1, 0.2] * 10))}
    assert choose_band(easy, 0.5)[0] == Band(0.5, 0.5)  # already perfect: no band at all


def test_calibrate_command_calibrates_a_bundle_in_place_and_is_idempotent(tmp_path, tiny_bundle, synthetic_data, capsys):
    from convert.calibrate import main
    from device.core.bundle import load_bundle
    from device.core.classifier import Classifier
    from device.core.dataset import list_examples
    from tests.trustdata import copy_bundle

    bundle = copy_bundle(tiny_bundle, tmp_path / "tiny")
    before = Classifier(bundle)
    examples = list_examples(synthetic_data)
    labels_before = [before.predict(e.path).label for e in examples]
    argv = ["--bundle", str(bundle), "--data", str(synthetic_data)]
    assert main(argv) == 0, capsys.readouterr().err
    manifest = load_bundle(bundle).manifest  # verifies every sha256, MODEL_CARD.md and reliability.svg included
    entry = manifest["calibration"]
    assert entry["raw_threshold"] == 0.5 and manifest["threshold"] == pytest.approx(Calibration.from_manifest(entry).apply(0.5))
    assert set(entry["ece_before"]) == set(entry["ece_after"]) == {synthetic_data.name}
    assert "reliability.svg" in manifest["files"] and "uncertain_band" in manifest
    after = Classifier(bundle)
    assert [after.predict(e.path).label for e in examples] == labels_before  # decisions unchanged
    card = (bundle / "MODEL_CARD.md").read_text()
    assert card.count("## Calibration and the uncertain band") == 1 and "ECE before" in card
    floor = entry["reliability"][synthetic_data.name]["after"]["ece_if_calibrated"]
    assert f"{floor['median']:.3f} ({floor['low']:.3f}-{floor['high']:.3f})" in card
    assert main(argv) == 0  # again: refitted from the model's own outputs, not compounded
    again = json.loads((bundle / "manifest.json").read_text())
    assert again["calibration"]["a"] == pytest.approx(entry["a"]) and again["threshold"] == pytest.approx(manifest["threshold"])
    assert (bundle / "MODEL_CARD.md").read_text().count("## Calibration and the uncertain band") == 1


def test_the_auto_map_is_the_one_with_the_smallest_worst_source_ece_above_its_noise_floor():
    """One global map can calibrate the pooled slices while making a source worse; ``auto``
    keeps whichever of no map, Platt and temperature leaves the worst source best."""
    from types import SimpleNamespace

    from convert.calibrate import choose_map

    def source(y, p):
        return SimpleNamespace(y_true=np.asarray(y), raw=np.asarray(p))

    def worst(calibration, sources):  # ECE above what an exactly right P shows on the same slices
        return max(expected_calibration_error(s.y_true, p := np.asarray(calibration.apply(s.raw)))
                   - ece_if_calibrated(p, draws=500)["median"] for s in sources)

    y, scores = overconfident(3000, seed=3)
    rng = np.random.default_rng(4)
    truth = sigmoid(rng.normal(0.0, 1.2, 3000))
    honest = source((rng.uniform(size=3000) < truth).astype(int), truth)  # exactly right P
    cases = {"one overconfident source": [source(y, scores)],
             "a right source beside an underconfident one": [honest, source(y, sigmoid(0.4 * logit(scores)))]}
    chosen = {}
    for name, sources in cases.items():
        all_y = np.concatenate([s.y_true for s in sources])
        all_p = np.concatenate([s.raw for s in sources])
        weights = np.concatenate([np.full(s.y_true.size, 1.0 / s.y_true.size) for s in sources])
        calibration, choice = choose_map(sources, all_y, all_p, weights, "auto")
        candidates = {"identity": Calibration(), "platt": fit(all_p, all_y, "platt", weights),
                      "temperature": fit(all_p, all_y, "temperature", weights)}
        expected = {key: worst(value, sources) for key, value in candidates.items()}
        assert choice["worst_source_ece"] == pytest.approx(expected, abs=1e-4)
        assert calibration.method == min(expected, key=expected.get)
        chosen[name] = calibration.method
    assert chosen["one overconfident source"] != "identity"
    assert Calibration.from_manifest({"method": "identity", "a": 1.0, "b": 0.0}).identity
    assert choose_map(cases["one overconfident source"], y, scores, None, "platt") == (fit(scores, y, "platt"), {})

"""Baseline gates as pure functions (no Beam): intervals, better than chance, not degenerate;
and the one rule for undefined/trivial slice metrics with strict JSON."""
import json

import numpy as np
import pytest

from beam_pipeline.evaluation import baseline, metric_rules


def _binary(scores):
    scores = np.asarray(scores, float)
    return np.stack([1 - scores, scores], axis=1)


def test_auc_and_intervals_match_known_values():
    positive = np.array([True, True, False, False, True])
    scores = np.array([0.9, 0.4, 0.4, 0.1, 0.8])
    # pairs (pos, neg): 0.9>0.4, 0.9>0.1, 0.4=0.4 (half), 0.4>0.1, 0.8>0.4, 0.8>0.1 → 5.5 / 6
    assert baseline.mann_whitney_auc(positive, scores) == pytest.approx(5.5 / 6)
    low, high = baseline.wilson_interval(50, 100)
    assert (low, high) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    low, high = baseline.hanley_mcneil_interval(0.5, 50, 50)
    assert low < 0.5 < high and high - 0.5 == pytest.approx(0.5 - low)


def test_untrained_one_class_model_fails_both_gates():
    labels = np.array([0, 1] * 50)
    probabilities = _binary(np.full(100, 0.97) + np.linspace(0, 0.01, 100))
    chance, degenerate = baseline.baseline_gates(labels, probabilities)
    assert chance["passed"] is False and chance["metric"] == "auc_lower_95"
    assert degenerate["passed"] is False and "--preprocess" in degenerate["message"]
    assert "class 1 for 100.0%" in degenerate["message"]


def test_constant_probabilities_are_degenerate():
    labels = np.array([0, 1, 2] * 20)
    probabilities = np.tile([0.2, 0.5, 0.3], (60, 1)) + 1e-5 * np.arange(60)[:, None]
    gate = baseline.not_degenerate(labels, probabilities)
    assert gate["passed"] is False and gate["metric"] == "probability_spread"


def test_good_models_pass_and_chance_is_relative_to_the_majority():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.clip(labels * 0.6 + rng.normal(0.2, 0.2, 200), 0, 1)
    assert all(g["passed"] for g in baseline.baseline_gates(labels, _binary(scores)))
    # 3 classes, 80% of them class 0: predicting class 0 always is 80% accurate, not skill.
    labels = np.array([0] * 80 + [1] * 10 + [2] * 10)
    always_zero = np.tile([0.6, 0.2, 0.2], (100, 1)) + rng.normal(0, 0.01, (100, 3))
    chance = baseline.better_than_chance(labels, always_zero)
    assert chance["passed"] is False and chance["bound"] == pytest.approx(0.8)
    perfect = np.eye(3)[labels] * 0.9 + 0.05
    assert all(g["passed"] for g in baseline.baseline_gates(labels, perfect))


def test_one_class_labels_do_not_apply_the_gates():
    gates = baseline.baseline_gates(np.ones(10, int), _binary(np.linspace(0.1, 0.9, 10)))
    assert all(g["passed"] and g["applied"] is False for g in gates)
    three_classes = np.tile([0.2, 0.5, 0.3], (10, 1))
    gates = baseline.baseline_gates(np.full(10, 2), three_classes)
    assert all(g["passed"] and g["applied"] is False for g in gates)


def test_undefined_and_trivial_metrics_one_rule():
    one_class = {"mean_label": 1.0, "auc": 0.0, "auc_precision_recall": 1.0, "recall": 0.9}
    assert metric_rules.why_not_meaningful("site=a", "auc", one_class) == "undefined"
    assert metric_rules.why_not_meaningful("site=a", "auc_precision_recall", one_class) \
        == "undefined"
    assert metric_rules.meaningful("site=a", "recall", one_class)
    assert metric_rules.why_not_meaningful("prediction_correct=false", "recall", {}) == "trivial"
    assert metric_rules.why_not_meaningful("prediction_correct=true", "auc[classId:1]", {}) \
        == "trivial"
    assert metric_rules.meaningful("prediction_correct=false", "mean_label", {})
    assert metric_rules.undefined("auc[classId:2]", {}, labels={"0": 3, "1": 4})
    # Recall without positives is undefined; with positives only it is a real figure.
    assert metric_rules.undefined("recall", {"mean_label": 0.0})
    assert not metric_rules.undefined("recall", {"mean_label": 1.0})
    assert metric_rules.undefined("recall[classId:1]", {"mean_label[classId:1]": 0.0})
    assert not metric_rules.undefined("recall[topK:3]", {"mean_label": 0.0})
    cleaned = metric_rules.clean_metrics_table({"site=a": one_class})
    assert cleaned["site=a"]["auc"] is None and cleaned["site=a"]["recall"] == 0.9


def _strict(text):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_json_outputs_are_strict(tmp_path):
    from beam_pipeline.io import outputs

    path = tmp_path / "x.json"
    outputs.write_json_atomic(str(path), {"a": float("nan"), "b": [float("inf"), 1.5],
                                          "c": {"d": np.float32("nan"), "e": "NaN"}})
    data = _strict(path.read_text())
    assert data["a"] is None and data["b"] == [None, 1.5] and data["c"]["d"] is None

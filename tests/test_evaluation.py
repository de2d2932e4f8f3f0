"""TFMA inside the job: per-slice metrics agree with an independent computation from the
attributions Parquet, threshold and slice-gap gates give exit 3, the empty-metrics pitfall is
caught, multi-class configs work, confidence intervals are reported."""
import json

import apache_beam as beam
import keras
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import tensorflow_model_analysis as tfma
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from google.protobuf import text_format
from tensorflow_model_analysis.proto import config_pb2

from beam_pipeline import cli
from beam_pipeline.evaluation import transform as evaluation
from beam_pipeline.errors import OptionError
from conftest import IMAGE_SIZE, gap_model, write_png

SITES = ("s0", "s1", "s2")


def brightness_model(path):
    """P(class 1) = sigmoid(16 (mean brightness − 0.5)): a model with a known, graded signal."""
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    conv = keras.layers.Conv2D(1, 1, use_bias=False, activation="relu", name="conv")
    x = keras.layers.GlobalAveragePooling2D()(conv(inputs))
    dense = keras.layers.Dense(2, activation="softmax", name="head")
    model = keras.Model(inputs, dense(x))
    conv.set_weights([np.full((1, 1, 3, 1), 1 / 3, np.float32)])
    dense.set_weights([np.array([[-8.0, 8.0]], np.float32), np.array([4.0, -4.0], np.float32)])
    model.save(path)
    return str(path)


@pytest.fixture
def binary_audit_data(tmp_path):
    """90 flat-brightness images; labels follow brightness with 25% flipped; masks on the left."""
    rng = np.random.default_rng(7)
    root = tmp_path / "binary"
    rows = []
    for i in range(90):
        level = rng.uniform(0.2, 0.8)
        image = np.clip(level + rng.normal(0, 0.02, (16, 16, 3)), 0, 1)
        write_png(str(root / "img" / f"{i}.png"), (image * 255).astype(np.uint8))
        mask = np.zeros((16, 16), np.uint8)
        mask[:, : 4 + i % 8] = 255
        write_png(str(root / "mask" / f"{i}.png"), mask)
        label = int(level > 0.5) if rng.random() > 0.25 else int(level <= 0.5)
        rows.append({"id": f"e{i}", "image": f"img/{i}.png", "mask": f"mask/{i}.png",
                     "label": label, "site": SITES[i % 3]})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return str(root / "manifest.csv")


def run_cli(*args):
    return cli.main([str(a) for a in args])


def _auc(labels, scores, buckets=None):
    """Mann-Whitney AUC, ties counted half; with ``buckets``, scores are first put into that many
    equal-width buckets, as TFMA's thresholded AUC does."""
    if buckets:
        scores = np.floor(scores * (buckets - 1))
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return greater / (len(pos) * len(neg))


def test_sliced_metrics_agree_with_independent_computation(tmp_path, binary_audit_data):
    out = tmp_path / "out"
    model = brightness_model(tmp_path / "bright.keras")
    assert run_cli("run", "--model", model, "--data", binary_audit_data, "--output", out) == 0
    rows = pd.read_parquet(out / "attributions")
    rows["score"] = rows.probabilities.map(lambda p: p[1])
    result = tfma.load_eval_result(str(out / "tfma"))
    by_slice = {evaluation.slice_name(key): m[""][""] for key, m in result.slicing_metrics}
    assert {"overall", "site=s0", "site=s1", "site=s2", "prediction_correct=true",
            "prediction_correct=false"} <= set(by_slice)
    assert any(name.startswith("attention_on_mask=") for name in by_slice)

    for name, subset in [("overall", rows)] + [(f"site={s}", rows[rows.site == s]) for s in SITES]:
        labels, scores = subset.label.values, subset.score.values
        predicted = scores > 0.5  # TFMA's Precision/Recall default threshold
        tp = (predicted & (labels == 1)).sum()
        metrics = by_slice[name]
        assert metrics["example_count"]["doubleValue"] == len(subset)
        # Within TFMA's bucket approximation of the exact AUC; the same bucketing matches closely.
        assert metrics["auc"]["doubleValue"] == pytest.approx(_auc(labels, scores), abs=3e-3)
        assert metrics["auc"]["doubleValue"] == pytest.approx(
            _auc(labels, scores, buckets=10000), abs=1e-3)
        assert metrics["precision"]["doubleValue"] == pytest.approx(tp / predicted.sum(), abs=1e-6)
        assert metrics["recall"]["doubleValue"] == pytest.approx(tp / (labels == 1).sum(), abs=1e-6)
        accuracy = ((scores > 0.5) == (labels == 1)).mean()
        assert metrics["binary_accuracy"]["doubleValue"] == pytest.approx(accuracy, abs=1e-6)

    run = json.loads((out / "run.json").read_text())
    assert run["tfma"]["config"] == "tfma_configs/binary.pbtxt"
    assert run["tfma"]["metrics"]["site=s1"]["auc"] == pytest.approx(
        by_slice["site=s1"]["auc"]["doubleValue"])
    # No thresholds in the default config: TFMA validates nothing, so nothing fails.
    assert not tfma.load_validation_result(str(out / "tfma")).metric_validations_per_slice
    # Only the error rate and the default baseline gates, which this working model passes.
    assert [g["gate"] for g in run["gates"]] == [
        "max_error_rate", "better_than_chance", "not_degenerate"]
    assert all(g["passed"] for g in run["gates"])
    assert run["verdict_scope"]["performance_thresholds"] is False


def test_threshold_that_must_fail_gives_exit_3(tmp_path, binary_audit_data):
    config = tmp_path / "strict.pbtxt"
    config.write_text("""
        model_specs { label_key: "label" prediction_key: "score" }
        metrics_specs {
          metrics { class_name: "AUC" threshold { value_threshold { lower_bound { value: 0.999 } } } }
          metrics { class_name: "ExampleCount" }
        }""")
    out = tmp_path / "out"
    model = brightness_model(tmp_path / "bright.keras")
    code = run_cli("run", "--model", model, "--data", binary_audit_data, "--output", out,
                   "--tfma-config", config)
    assert code == 3
    run = json.loads((out / "run.json").read_text())
    failed = [g for g in run["gates"] if not g["passed"]]
    assert failed and {g["gate"] for g in failed} == {"tfma_threshold"}
    overall = [g for g in failed if g["slice"] == "overall"]
    assert overall[0]["metric"] == "auc" and overall[0]["value"] < 0.999
    assert overall[0]["bound"] == 0.999 and "below the threshold 0.999" in overall[0]["message"]
    assert run["exit_code"] == 3 and run["status"] == "failed"


def test_slice_gap_gate_and_confidence_intervals(tmp_path, binary_audit_data):
    out = tmp_path / "out"
    model = brightness_model(tmp_path / "bright.keras")
    code = run_cli("run", "--model", model, "--data", binary_audit_data, "--output", out,
                   "--max-slice-gap", "auc=0.0001,recall=1.0", "--confidence-intervals")
    assert code == 3
    run = json.loads((out / "run.json").read_text())
    gaps = {g["metric"]: g for g in run["gates"] if g["gate"] == "max_slice_gap"}
    assert gaps["auc"]["passed"] is False and gaps["auc"]["value"] > 0.0001
    assert gaps["recall"]["passed"] is True
    site_auc = {s: run["tfma"]["metrics"][f"site={s}"]["auc"]["value"] for s in SITES}
    assert gaps["auc"]["value"] == pytest.approx(max(site_auc.values()) - min(site_auc.values()))
    overall_auc = run["tfma"]["metrics"]["overall"]["auc"]
    assert overall_auc["ci_low"] <= overall_auc["value"] <= overall_auc["ci_high"]
    assert overall_auc["ci_low"] < overall_auc["ci_high"]


def test_multiclass_config_on_a_three_class_model(tmp_path, rng):
    from conftest import make_manifest

    manifest = make_manifest(str(tmp_path / "mc"), rng, n=30, num_classes=3, masks=False)
    model = tmp_path / "three.keras"
    gap_model(num_classes=3).save(model)
    out = tmp_path / "out"
    # A random model: useless, so it runs without the baseline gates to test the config.
    assert run_cli("run", "--model", model, "--data", manifest, "--output", out,
                   "--baseline-gates", "off") == 0
    run = json.loads((out / "run.json").read_text())
    assert run["tfma"]["config"] == "tfma_configs/multiclass.pbtxt"
    overall = run["tfma"]["metrics"]["overall"]
    for class_id in range(3):
        assert f"auc[classId:{class_id}]" in overall
    rows = pd.read_parquet(out / "attributions")
    accuracy = (rows.label == rows.predicted_class).mean()
    assert overall["precision[topK:1]"] == pytest.approx(accuracy, abs=1e-6)
    assert overall["recall[topK:3]"] == pytest.approx(1.0)
    plots = tfma.load_eval_result(str(out / "tfma")).plots
    assert plots, "the multi-class confusion matrix plot is written"


def test_plain_column_record_batches_are_caught_not_green(tmp_path):
    """TFMA 0.52 accepts a RecordBatch of plain columns and silently computes nothing: the
    job's reader turns that into an error instead of an empty, passing audit."""
    config = text_format.Parse(
        'model_specs { label_key: "label" prediction_key: "score" } slicing_specs {} '
        'metrics_specs { metrics { class_name: "AUC" } }', config_pb2.EvalConfig())
    plain = pa.RecordBatch.from_arrays([pa.array([0, 1, 1]), pa.array([0.2, 0.7, 0.9], pa.float32())],
                                       ["label", "score"])
    out = str(tmp_path / "plain")
    with beam.Pipeline(runner=FnApiRunner()) as p:
        _ = p | beam.Create([plain]) | tfma.ExtractEvaluateAndWriteResults(
            eval_config=config, output_path=out)
    with pytest.raises(evaluation.EvaluationError, match="no metrics"):
        evaluation.read_tfma_results(out)

    # The job's own conversion gives list-typed columns, which TFMA does evaluate.
    batch = evaluation.to_record_batch([
        evaluation.tfma_features({"label": label, "probabilities": [1 - s, s],
                                  "predicted_class": int(s > 0.5)}, [], None)
        for label, s in [(0, 0.2), (1, 0.7), (1, 0.9)]])
    assert all(pa.types.is_large_list(field.type) for field in batch.schema)
    out = str(tmp_path / "listed")
    with beam.Pipeline(runner=FnApiRunner()) as p:
        _ = p | beam.Create([batch]) | tfma.ExtractEvaluateAndWriteResults(
            eval_config=config, output_path=out)
    assert evaluation.read_tfma_results(out)["overall"]["auc"] == pytest.approx(1.0)


def test_config_completion():
    config, origin = evaluation.load_eval_config(None, 3)
    assert origin == "tfma_configs/multiclass.pbtxt"
    done = evaluation.complete_eval_config(config, 3, ["site"], True, True)
    keys = [tuple(s.feature_keys) for s in done.slicing_specs]
    assert keys.count(()) == 1
    assert {("site",), ("prediction_correct",), ("attention_on_mask",)} <= set(keys)
    binarized = [m for m in done.metrics_specs if m.binarize.class_ids.values]
    assert list(binarized[0].binarize.class_ids.values) == [0, 1, 2]
    # Per class, the share of positives (mean_label[classId:k]) says where AUC is undefined.
    assert "MeanLabel" in {m.class_name for m in binarized[0].metrics}
    assert done.options.compute_confidence_intervals.value
    bad = config_pb2.EvalConfig()
    bad.slicing_specs.add(feature_keys=["scanner"])
    with pytest.raises(OptionError, match="scanner"):
        evaluation.complete_eval_config(bad, 2, ["site"], False, False)
    binary, _ = evaluation.load_eval_config(None, 2)
    with pytest.raises(OptionError, match="multiclass"):
        evaluation.complete_eval_config(binary, 3, [], False, False)


@pytest.mark.parametrize("energy,area,bucket", [
    (0.05, 0.1, "low"), (0.12, 0.1, "medium"), (0.2, 0.1, "high"), (None, 0.1, None),
    (0.5, None, None)])
def test_attention_buckets(energy, area, bucket):
    assert evaluation.attention_bucket(energy, area) == bucket


def test_slice_gap_parsing():
    assert evaluation.parse_slice_gaps("auc=0.05, binary_accuracy=0.1") == {
        "auc": 0.05, "binary_accuracy": 0.1}
    with pytest.raises(OptionError):
        evaluation.parse_slice_gaps("auc")


@pytest.mark.parametrize("name,classes", [("binary.pbtxt", 2), ("binary_with_thresholds.pbtxt", 2),
                                          ("multiclass.pbtxt", 4)])
def test_every_shipped_config_parses_and_completes(name, classes):
    from importlib import resources

    path = str(resources.files("tfma_configs").joinpath(name))
    config, origin = evaluation.load_eval_config(path, classes)
    done = evaluation.complete_eval_config(config, classes, ["site"], True, False)
    assert done.metrics_specs and any(not s.feature_keys for s in done.slicing_specs)


def test_slice_gap_leaves_one_class_slices_out_of_auc_gaps():
    """TFMA reports AUC 0 on a slice holding one class; that is undefined, not a gap of 1."""
    table = {
        "site=a": {"auc": 0.95, "binary_accuracy": 0.90, "mean_label": 0.5},
        "site=b": {"auc": {"value": 0.93}, "binary_accuracy": 0.88, "mean_label": 0.4},
        "site=c": {"auc": 0.0, "binary_accuracy": 0.60, "mean_label": 1.0},  # lesions only
    }
    gates = {g["metric"]: g for g in evaluation.slice_gap_gates(
        table, {"auc": 0.05, "binary_accuracy": 0.05}, ["site"])}
    assert gates["auc"]["passed"] and gates["auc"]["slice"] == "site=b vs site=a"
    assert abs(gates["auc"]["value"] - 0.02) < 1e-9
    # Accuracy is defined on one class: site=c still counts, and fails the gate.
    assert not gates["binary_accuracy"]["passed"]
    assert gates["binary_accuracy"]["slice"] == "site=c vs site=a"
    # AUC-PR is a ranking metric too: undefined on site=c by the same rule.
    table["site=c"]["auc_precision_recall"] = 1.0
    table["site=a"]["auc_precision_recall"] = table["site=b"]["auc_precision_recall"] = 0.9
    pr = evaluation.slice_gap_gates(table, {"auc_precision_recall": 0.01}, ["site"])[0]
    assert pr["passed"] and pr["value"] == 0


def test_gap_gate_ties_and_small_slices():
    table = {f"site={s}": {"auc": 1.0, "example_count": 40} for s in "abc"}
    gate = evaluation.slice_gap_gates(table, {"auc": 0.05}, ["site"], min_slice_size=30)[0]
    assert gate["passed"] and "all 3 slices" in gate["message"]
    assert gate["slice"] == "site=a vs site=c"
    table["site=d"] = {"auc": 0.5, "example_count": 29}  # below --min-slice-size: no gap
    gate = evaluation.slice_gap_gates(table, {"auc": 0.05}, ["site"], min_slice_size=30)[0]
    assert gate["passed"] and "site=d" not in gate["message"]
    assert not evaluation.slice_gap_gates(table, {"auc": 0.05}, ["site"], min_slice_size=0)[0][
        "passed"]


def test_metric_names_derived_from_the_config_and_typos_are_usage_errors():
    from importlib import resources

    from beam_pipeline.errors import UsageError

    config, _ = evaluation.load_eval_config(None, 2)
    names = evaluation.computed_metric_names(config)
    assert {"auc", "auc_precision_recall", "binary_accuracy", "recall", "example_count"} <= set(
        names) and not any(n.endswith("_plot") for n in names)
    with pytest.raises(UsageError, match="Did you mean recall"):
        evaluation.check_gap_metrics({"recal": 0.1}, names, "tfma_configs/binary.pbtxt")
    with pytest.raises(UsageError, match="Did you mean binary_accuracy"):
        evaluation.check_gap_metrics({"accuracy": 0.1}, names, "tfma_configs/binary.pbtxt")
    config, _ = evaluation.load_eval_config(None, 3)
    done = evaluation.complete_eval_config(config, 3, [], False, False)
    names = evaluation.computed_metric_names(done)
    assert {"auc[classId:0]", "auc[classId:2]", "precision[topK:1]", "recall[topK:3]"} <= set(names)
    assert not evaluation.has_thresholds(done)
    path = str(resources.files("tfma_configs").joinpath("binary_with_thresholds.pbtxt"))
    assert evaluation.has_thresholds(evaluation.load_eval_config(path, 2)[0])

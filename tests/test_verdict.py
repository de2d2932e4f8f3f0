"""A verdict a reviewer can trust, end to end: useless models (untrained, double-scaled input)
fail the default baseline gates; the verdict says what it certifies; gate typos are usage errors
(exit 2); thresholds are not applied where a metric is undefined or trivial; every JSON output is
strict JSON with null for undefined metrics."""
import json

import keras
import pandas as pd
import pytest

from beam_pipeline import cli
from conftest import IMAGE_SIZE, gap_model
from test_evaluation import binary_audit_data, brightness_model  # noqa: F401 (fixture)

QUICK = ("--faithfulness-sample", "0", "--sanity-sample", "0", "--permutation-features", "none")


def run_cli(*args):
    return cli.main([str(a) for a in args])


def strict_json(path):
    """Parse as strict JSON: NaN, Infinity and -Infinity are refused."""
    def refuse(name):
        raise ValueError(f"{path} holds the non-JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def double_scaled_model(path):
    """The brightness model behind an in-graph Rescaling(1/255): audited with the default
    --preprocess unit its input is scaled twice, and it sees (almost) black images."""
    inner = keras.models.load_model(brightness_model(path.with_name("inner.keras")))
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    model = keras.Model(inputs, inner(keras.layers.Rescaling(1 / 255)(inputs)))
    model.save(path)
    return str(path)


def _failed(run):
    return {g["gate"] for g in run["gates"] if not g["passed"]}


def test_untrained_model_fails_the_baseline_gates(tmp_path, binary_audit_data):  # noqa: F811
    model = tmp_path / "untrained.keras"
    gap_model(num_classes=2, seed=3).save(model)
    out = tmp_path / "out"
    assert run_cli("run", "--model", model, "--data", binary_audit_data, "--output", out,
                   *QUICK) == 3
    run = strict_json(out / "run.json")
    assert "better_than_chance" in _failed(run)
    chance = next(g for g in run["gates"] if g["gate"] == "better_than_chance")
    assert chance["default"] is True and chance["value"] <= 0.5 and chance["bound"] == 0.5
    assert "--preprocess" in chance["message"]
    scope = run["verdict_scope"]
    assert scope["baseline_gates"] == "on" and scope["performance_thresholds"] is False
    assert "only the default baseline gates" in scope["statement"]
    summary = strict_json(out / "report" / "summary.json")
    assert summary["verdict"]["status"] == "failed"
    assert any(r.startswith("Better than chance (default gate) failed")
               for r in summary["verdict"]["failed"])
    html = (out / "report" / "index.html").read_text()
    assert "What this verdict certifies" in html and "No performance threshold was set" in html


def test_double_scaled_model_fails_and_baseline_gates_can_be_turned_off(
        tmp_path, binary_audit_data):  # noqa: F811
    model = double_scaled_model(tmp_path / "double.keras")
    out = tmp_path / "on"
    assert run_cli("run", "--model", model, "--data", binary_audit_data, "--output", out,
                   *QUICK) == 3
    run = strict_json(out / "run.json")
    # Its ranking survives (brightness order), but its probabilities are flat: degenerate.
    assert "not_degenerate" in _failed(run)
    degenerate = next(g for g in run["gates"] if g["gate"] == "not_degenerate")
    assert "--preprocess" in degenerate["message"]
    # The same model, as it expects its input (--preprocess none): it works and passes.
    out = tmp_path / "right"
    assert run_cli("run", "--model", model, "--data", binary_audit_data, "--output", out,
                   "--preprocess", "none", *QUICK) == 0
    assert {g["gate"] for g in strict_json(out / "run.json")["gates"]} >= {
        "better_than_chance", "not_degenerate"}
    out = tmp_path / "off"
    assert run_cli("run", "--model", model, "--data", binary_audit_data, "--output", out,
                   "--baseline-gates", "off", *QUICK) == 0
    run = strict_json(out / "run.json")
    assert [g["gate"] for g in run["gates"]] == ["max_error_rate"]
    assert run["verdict_scope"]["baseline_gates"] == "off"
    assert "only the error rate (--baseline-gates off" in run["verdict_scope"]["statement"]
    summary = strict_json(out / "report" / "summary.json")
    assert "--baseline-gates off" in summary["verdict"]["scope"]


def test_gate_typos_are_usage_errors(tmp_path, binary_audit_data, capsys):  # noqa: F811
    model = brightness_model(tmp_path / "bright.keras")
    out = tmp_path / "out"
    for typo, suggestion in (("recal=0.1", "Did you mean recall?"),
                             ("accuracy=0.1", "Did you mean binary_accuracy?")):
        assert run_cli("run", "--model", model, "--data", binary_audit_data, "--output", out,
                       "--max-slice-gap", typo) == 2
        err = capsys.readouterr().err
        assert suggestion in err and "usage: xai-audit run" in err and "Traceback" not in err
    assert not out.exists()  # refused in planning, before anything ran
    for command in (["run", "--model", model, "--data", binary_audit_data, "--output", out],
                    ["demo", "--output", out]):
        with pytest.raises(SystemExit) as info:
            run_cli(*command, "--methods", "gradcamm")
        assert info.value.code == 2
        assert "did you mean gradcam?" in capsys.readouterr().err


def test_thresholds_not_applied_where_a_metric_is_undefined_or_trivial(
        tmp_path, binary_audit_data):  # noqa: F811
    """Site s2 holds lesions only: its AUC is undefined (TFMA writes 0). Recall on
    prediction_correct=false is 0 by construction. Neither may fail a gate; accuracy per site
    really fails, with a sentence."""
    frame = pd.read_csv(binary_audit_data)
    frame.loc[frame.site == "s2", "label"] = 1
    frame.to_csv(binary_audit_data, index=False)
    config = tmp_path / "gates.pbtxt"
    config.write_text("""
        model_specs { label_key: "label" prediction_key: "score" }
        metrics_specs {
          metrics { class_name: "ExampleCount" }
          metrics { class_name: "MeanLabel" }
          metrics { class_name: "AUC" threshold { value_threshold { lower_bound { value: 0.6 } } } }
          metrics { class_name: "AUCPrecisionRecall" }
          metrics { class_name: "Recall"
                    threshold { value_threshold { lower_bound { value: 0.3 } } } }
          metrics { class_name: "BinaryAccuracy" per_slice_thresholds {
              slicing_specs { feature_keys: "site" }
              threshold { value_threshold { lower_bound { value: 0.99 } } } } }
        }""")
    out = tmp_path / "out"
    assert run_cli("run", "--model", brightness_model(tmp_path / "b.keras"), "--data",
                   binary_audit_data, "--output", out, "--tfma-config", config, *QUICK) == 3
    run = strict_json(out / "run.json")
    failed = [g for g in run["gates"] if not g["passed"]]
    assert {g["gate"] for g in failed} == {"tfma_threshold"}
    # Where the metric means something, a threshold gates every slice (attention_on_mask AUCs
    # on slices holding both classes too); never site=s2's AUC, never prediction_correct.
    assert not [g for g in failed if g["slice"] == "site=s2" and g["metric"] == "auc"]
    assert not [g for g in failed if g["slice"].startswith("prediction_correct")]
    gate = next(g for g in failed if g["slice"] == "site=s2")
    assert gate["bound"] == 0.99 and gate["bound_kind"] == "lower"
    assert gate["message"] == (f"binary_accuracy at {gate['slice']} is {gate['value']:.4g}, "
                               "below the threshold 0.99.")
    not_applied = {(g["slice"], g["metric"]) for g in run["gates"] if g.get("applied") is False}
    assert ("site=s2", "auc") in not_applied
    assert {("prediction_correct=false", "recall"), ("prediction_correct=false", "auc")} <= \
        not_applied
    assert run["verdict_scope"]["performance_thresholds"] is True
    metrics = run["tfma"]["metrics"]
    assert metrics["site=s2"]["auc"] is None and metrics["site=s2"]["auc_precision_recall"] is None
    assert metrics["site=s0"]["auc"] > 0
    summary = strict_json(out / "report" / "summary.json")
    assert any("not applied at site=s2" in r for r in summary["verdict"]["not_applied"])
    by_column = {g["column"]: g for g in summary["metrics"]["by_column"]}
    site_rows = {r["slice"]: r for r in by_column["site"]["slices"]}
    assert site_rows["site=s2"]["why"]["auc_precision_recall"] == "undefined"
    assert "auc_precision_recall" not in by_column["site"]["gaps"] or \
        by_column["site"]["gaps"]["auc_precision_recall"]["best"] != "site=s2"
    wrong = {r["slice"]: r for r in by_column["prediction_correct"]["slices"]}
    assert wrong["prediction_correct=false"]["why"]["recall"] == "trivial"
    assert ">trivial<" in (out / "report" / "index.html").read_text()

"""Many classes stay bounded with the defaults: per-class figures (TFMA one-vs-rest metrics,
permutation-importance AUC histograms) only up to limits.MAX_PER_CLASS_METRICS classes; above it
micro-averaged and top-k metrics whose size does not grow with the classes."""
import json
import os

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from beam_pipeline.evaluation import transform as evaluation
from beam_pipeline.measures import importance
from beam_pipeline.io import limits
from beam_pipeline.errors import OptionError
from test_job import read_outputs, run_cli

MANY = 1000


def _default_config(num_classes):
    config, _ = evaluation.load_eval_config(None, num_classes)
    return evaluation.complete_eval_config(config, num_classes, [], False, False)


def test_the_default_multiclass_config_has_per_class_metrics_only_up_to_the_bound():
    few = _default_config(limits.MAX_PER_CLASS_METRICS)
    ids = [list(s.binarize.class_ids.values) for s in few.metrics_specs
           if s.binarize.HasField("class_ids")]
    assert ids == [list(range(limits.MAX_PER_CLASS_METRICS))]

    many = _default_config(MANY)
    assert not any(s.binarize.HasField("class_ids") for s in many.metrics_specs)
    micro = [s for s in many.metrics_specs
             if s.aggregate.micro_average and not s.binarize.HasField("top_k_list")]
    assert len(micro) == 1 and {m.class_name for m in micro[0].metrics} >= {"AUC"}
    evaluation.check_eval_config(many, "default")  # TFMA can build it


def test_a_user_config_listing_class_ids_is_kept():
    from google.protobuf import text_format
    from tensorflow_model_analysis.proto import config_pb2

    config = text_format.Parse('metrics_specs { binarize { class_ids { values: [3, 700] } } '
                               'metrics { class_name: "AUC" } }', config_pb2.EvalConfig())
    done = evaluation.complete_eval_config(config, MANY, [], False, False)
    assert list(done.metrics_specs[0].binarize.class_ids.values) == [3, 700]


@pytest.mark.parametrize("text, needle", [
    ("", "names no metrics"),
    ('model_specs { label_key: "label" } slicing_specs {}', "names no metrics"),
    ('metrics_specs { metrics { class_name: "NoSuchMetric" } }', "NoSuchMetric"),
])
def test_a_tfma_config_that_measures_nothing_is_refused_at_planning(tmp_path, text, needle):
    path = tmp_path / "eval.pbtxt"
    path.write_text(text)
    config, origin = evaluation.load_eval_config(str(path), 3)
    done = evaluation.complete_eval_config(config, 3, [], False, False)
    with pytest.raises(OptionError, match=needle):
        evaluation.check_eval_config(done, origin)


def test_importance_keeps_auc_histograms_only_up_to_the_bound():
    rng = np.random.default_rng(0)
    for classes, rows in ((2, 2), (limits.MAX_PER_CLASS_METRICS, limits.MAX_PER_CLASS_METRICS),
                          (MANY, 0)):
        probabilities = rng.dirichlet(np.ones(classes), size=20)
        labels = rng.integers(0, classes, 20)
        partials = importance.metric_partials(probabilities, labels)
        assert partials["hist_pos"].shape == (rows, importance.AUC_BUCKETS)
        assert importance.metric_value(partials, "accuracy") is not None
        assert (importance.metric_value(partials, "auc") is None) == (rows == 0)


def test_a_thousand_class_audit_runs_with_the_defaults(tmp_path):
    rng = np.random.default_rng(3)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(MANY, activation="softmax")(x)).save(
        tmp_path / "model.keras")
    rows = []
    os.makedirs(tmp_path / "data" / "img")
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
            tmp_path / "data" / "img" / f"{i}.png")
        rows.append({"id": f"e{i}", "image": f"img/{i}.png", "label": int(rng.integers(MANY))})
    pd.DataFrame(rows).to_csv(tmp_path / "data" / "manifest.csv", index=False)
    out = tmp_path / "out"
    code = run_cli("run", "--model", tmp_path / "model.keras",
                   "--data", tmp_path / "data" / "manifest.csv", "--output", out)
    assert code in (0, 3)  # done (a random model may fail a gate), not failed
    attributions, errors, run = read_outputs(out)
    assert len(attributions) == 20 and len(errors) == 0
    assert str(limits.MAX_PER_CLASS_METRICS) in run["tfma"]["per_class"]
    overall = run["tfma"]["metrics"]["overall"]
    assert "auc[micro_average]" in overall and "precision[topK:1]" in overall
    assert not [k for k in overall if "classId" in k]
    raw = pd.read_parquet(out / "importance")
    assert raw[raw.metric == "auc"].baseline_hist_pos.map(len).max() == 0
    auc = [f for f in run["importance"]["figures"] if f["metric"] == "auc"]
    assert auc and all(f["importance"] is None for f in auc)
    assert (out / "report" / "index.html").exists()

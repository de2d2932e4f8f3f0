"""The Beam layer's own promises: the model never travels in the pipeline graph, and long runs
log their progress."""
import logging

import apache_beam as beam
import keras

from beam_pipeline import job, pipeline
from conftest import IMAGE_SIZE


def test_model_is_loaded_on_workers_not_pickled_into_the_graph(tmp_path, folder_dataset):
    # A model of ~4 MB: if any DoFn carried it, the graph would be at least that big.
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(1000, activation="relu")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    path = tmp_path / "big.keras"
    model.save(path)
    assert path.stat().st_size > 3_000_000

    plan = job.plan_audit(job.AuditRequest(model=str(path), data=folder_dataset,
                                           output=str(tmp_path / "out")))
    p = beam.Pipeline()
    pipeline.build_pipeline(p, plan.config)
    graph_bytes = len(p.to_runner_api().SerializeToString())
    assert graph_bytes < 300_000, graph_bytes


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_progress_log_reports_examples_and_rate():
    logger = logging.getLogger("xai_audit")
    collect = _Collect()
    logger.addHandler(collect)
    logger.setLevel(logging.INFO)
    try:
        progress = pipeline.ProgressLog(every_s=0.0)
        progress.add(32)
        progress.add(32)
    finally:
        logger.removeHandler(collect)
    assert any("64 examples explained" in line and "images/s" in line for line in collect.lines)

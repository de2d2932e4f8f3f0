"""The Beam layer's own promises: the model never travels in the pipeline graph, and long runs
log their progress."""
import logging
import re

import apache_beam as beam
import keras

from beam_pipeline import job, pipeline
from conftest import IMAGE_SIZE, LogLines, gap_model


def _graph_bytes(model_path, data, output):
    plan = job.plan_audit(job.AuditRequest(model=str(model_path), data=data, output=str(output)))
    p = beam.Pipeline()
    pipeline.build_pipeline(p, plan.config)
    return len(p.to_runner_api().SerializeToString())


def test_model_is_loaded_on_workers_not_pickled_into_the_graph(tmp_path, folder_dataset):
    # A model of ~4 MB: if any DoFn carried it, the graph would grow by at least that much.
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(1000, activation="relu")(x)
    big = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    big.save(tmp_path / "big.keras")
    gap_model(num_classes=3).save(tmp_path / "small.keras")
    big_size = (tmp_path / "big.keras").stat().st_size
    assert big_size > 3_000_000

    with_big = _graph_bytes(tmp_path / "big.keras", folder_dataset, tmp_path / "out")
    with_small = _graph_bytes(tmp_path / "small.keras", folder_dataset, tmp_path / "out")
    assert abs(with_big - with_small) < 10_000, (with_big, with_small)
    assert with_big < 2_000_000  # far under Dataflow's 10 MB cap, TFMA's transforms included


def test_progress_log_reports_examples_and_rate():
    logger = logging.getLogger("xai_audit")
    collect = LogLines()
    logger.addHandler(collect)
    logger.setLevel(logging.INFO)
    try:
        progress = pipeline.ProgressLog(every_s=0.0)
        progress.add(32)
        progress.add(32)
    finally:
        logger.removeHandler(collect)
    assert any("64 examples explained" in line and "images/s" in line for line in collect.lines)
    assert not any("left" in line for line in collect.lines)  # the number of examples is unknown


def test_progress_log_states_the_time_left_when_the_size_is_known():
    logger = logging.getLogger("xai_audit")
    collect = LogLines()
    logger.addHandler(collect)
    logger.setLevel(logging.INFO)
    try:
        progress = pipeline.ProgressLog(every_s=0.0, expected=100)
        progress.add(32)
        progress.add(68)
    finally:
        logger.removeHandler(collect)
    assert re.search(r"32 examples explained .* about \d+ s left for the explain stage "
                     r"\(100 examples\)", collect.lines[0]), collect.lines
    assert "left" not in collect.lines[1]  # done

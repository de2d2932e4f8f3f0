"""The Beam layer's own promises: the model never travels in the pipeline graph (progress
lines: test_terminal.py)."""
import apache_beam as beam
import keras

from beam_pipeline.job import run as job
from beam_pipeline.beam import pipeline
from conftest import IMAGE_SIZE, gap_model


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


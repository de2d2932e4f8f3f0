"""The worker's one model holder (``beam_pipeline.beam.model_holder``): shared per process through
``apache_beam.utils.shared.Shared``, and the layer hooks its explainers add are removed when it
goes, leaving the model as it was loaded."""
import gc
import os

from apache_beam.utils import shared

from beam_pipeline.job import run as job
from beam_pipeline.beam import model_holder
from beam_pipeline.explain import model_io


def _plan(saved_model, folder_dataset, tmp_path, **options):
    return job.plan_audit(job.AuditRequest(model=saved_model, data=folder_dataset,
                                           output=str(tmp_path / "out"), **options)).config


def _hooked(model):
    return [name for name, layer in model_io.iter_layers(model) if "call" in vars(layer)]


def test_hooks_are_released_with_the_holder(saved_model, folder_dataset, tmp_path):
    cfg = _plan(saved_model, folder_dataset, tmp_path, methods=("gradcam", "saliency"))
    holder = model_holder.ModelHolder(cfg)
    model = holder.model
    assert _hooked(model) == []
    assert set(holder.explainers) == {"gradcam", "saliency"}
    assert _hooked(model) == [cfg.layer]
    holder.release()
    assert _hooked(model) == []
    holder.release()  # idempotent

    again = model_holder.ModelHolder(cfg)  # the next run's holder on the same loaded model
    assert again.model is model
    _ = again.explainers
    assert _hooked(model) == [cfg.layer]
    del again
    gc.collect()
    assert _hooked(model) == []  # garbage-collected: released too


def test_the_sweep_hooks_every_swept_layer_and_releases_them(saved_model, folder_dataset,
                                                            tmp_path):
    cfg = _plan(saved_model, folder_dataset, tmp_path, layer="all")
    holder = model_holder.ModelHolder(cfg)
    _ = holder.explainers
    assert set(_hooked(holder.model)) == set(cfg.sweep_layer_names)
    holder.release()
    assert _hooked(holder.model) == []


def test_one_holder_per_process_and_run(saved_model, folder_dataset, tmp_path):
    cfg = _plan(saved_model, folder_dataset, tmp_path)
    handle = shared.Shared()  # what the run's DoFns carry in the graph
    first = model_holder.acquire(handle, cfg)
    assert model_holder.acquire(handle, cfg) is first  # every DoFn instance on the worker
    assert first.predictor is first.predictor
    other = model_holder.acquire(shared.Shared(), cfg)  # another run: its own holder...
    assert other is not first and other.model is first.model  # ...on the process's one model


def test_a_model_saved_again_at_the_same_path_is_loaded_afresh(saved_model):
    model, _ = model_holder.load_classifier(saved_model)
    assert model_holder.load_classifier(saved_model)[0] is model
    stat = os.stat(saved_model)
    os.utime(saved_model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert model_holder.load_classifier(saved_model)[0] is not model
    model_holder.clear()
    reloaded, _ = model_holder.load_classifier(saved_model)
    assert model_holder.load_classifier(saved_model)[0] is reloaded

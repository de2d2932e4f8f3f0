"""One model per worker process, shared with ``apache_beam.utils.shared.Shared`` (as Beam's
RunInference shares its model handle).

* ``load_classifier(path, unsafe)``: (model, ClassifierInfo), loaded and prepared once per
  process: the launcher's validation load is reused by in-process workers. Tagged with the file's
  size and modification time too, so a model re-saved at the same path is loaded afresh.
* ``ModelHolder``: what the DoFns of one run use on a worker — the model, the ``--methods``
  explainers and the predictor, built on first use. The explainers hook layers (captures);
  ``release()`` (or the holder being garbage-collected) removes those hooks, so a model that
  outlives the run (the launcher's, or the next run's) is left as it was loaded.
* ``acquire(handle, cfg)``: the worker's holder for this run, from the DoFn's ``Shared`` handle.

``Shared`` keeps objects through weak references: a DoFn keeps its holder in ``self.holder``
for as long as the runner keeps the DoFn.
"""
import os
import threading
import weakref
from typing import Dict, List, Optional

from apache_beam.utils import shared

from ..explain import (attribution_methods, layer_sweep, registry as method_registry, model_io,
    precision)
from ..explain.explainers import Attribution, Classifier, Predictor

# The classifier loaded on this process: one at a time (a new tag replaces it).
_CLASSIFIER = shared.Shared()


class _Loaded:
    """(model, info) in an object ``Shared`` can hold a weak reference to."""

    def __init__(self, model, info):
        self.model, self.info = model, info


def _file_tag(path: str, unsafe_deserialization: bool) -> tuple:
    try:
        stat = os.stat(path)
        return (path, unsafe_deserialization, stat.st_size, stat.st_mtime_ns)
    except OSError:  # remote, or missing (load_model says which)
        return (path, unsafe_deserialization)


def load_classifier(path: str, unsafe_deserialization: bool = False):
    """(model, ClassifierInfo), loaded and prepared once per process (see the module doc)."""
    loaded = _CLASSIFIER.acquire(
        lambda: _Loaded(*model_io.load_classifier(path, unsafe_deserialization)),
        tag=_file_tag(path, unsafe_deserialization))
    _LAST[0] = loaded
    return loaded.model, loaded.info


# The last classifier loaded, held strongly: the launcher plans, then in-process workers acquire
# their holders, and Shared's own keep-alive may have moved to another Shared in between.
_LAST: List[Optional[_Loaded]] = [None]


def clear() -> None:
    """Forget the process's loaded classifier (benchmarks, tests): the next load reads the file."""
    global _CLASSIFIER
    _LAST[0] = None
    _CLASSIFIER = shared.Shared()


class SweepAsGradCAM:
    """The layer sweep in Grad-CAM's place: ``maps`` is the Grad-CAM of ``--layer``'s layer
    (auto: the last 4-D layer), ``sweep_maps`` every layer's; one backward pass gives both."""

    def __init__(self, sweep: "layer_sweep.GradCAMSweep", layer: str):
        self.sweep, self.layer = sweep, layer
        self.capture = sweep.capture

    def __call__(self, images, targets):
        out = self.sweep(images, targets)
        return {**out, "maps": out["maps"][self.layer], "sweep_maps": out["maps"]}


def build_explainers(cfg, model, info) -> Dict[str, Attribution]:
    """The ``--methods`` explainers, in order, on one model (Grad-CAM as the layer sweep under
    ``--layer all``)."""
    classifier = Classifier(model, info.head)
    uses_layer = any(m in attribution_methods.LAYER_METHODS for m in cfg.methods)
    layer = model_io.find_layer(model, cfg.layer) if uses_layer else None
    methods = {name: attribution_methods.make_method(
                   name, classifier, cfg.input_shape, layer, cfg.method_options)
               for name in cfg.methods if not (cfg.sweep and name == "gradcam")}
    if cfg.sweep and "gradcam" in cfg.methods:
        swept = [(n, l) for n, l in layer_sweep.sweep_layers(model)
                 if n in cfg.sweep_layer_names]
        activation = method_registry.constructor_args("gradcam", cfg.method_options)
        methods = {"gradcam": SweepAsGradCAM(layer_sweep.GradCAMSweep(
            classifier, swept, cfg.input_shape, **activation), cfg.layer), **methods}
    return methods


def _release(captures: list) -> None:
    for capture in captures:
        capture.release()


class ModelHolder:
    """The worker's model for one run, and what is built on it, on first use."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.model, self.info = precision.load_classifier(
            cfg.model_path, cfg.unsafe_deserialization, cfg.precision)
        self._lock = threading.Lock()
        self._explainers: Optional[dict] = None
        self._predictor = None
        self._captures: list = []  # filled as explainers are built; released with the holder
        self._finalizer = weakref.finalize(self, _release, self._captures)

    @property
    def explainers(self) -> Dict[str, Attribution]:
        with self._lock:
            if self._explainers is None:
                self._explainers = build_explainers(self.cfg, self.model, self.info)
                self._captures.extend(m.capture for m in self._explainers.values()
                                      if getattr(m, "capture", None) is not None)
            return self._explainers

    @property
    def predictor(self) -> Predictor:
        with self._lock:
            if self._predictor is None:
                self._predictor = Predictor(
                    Classifier(self.model, self.info.head), self.cfg.input_shape)
            return self._predictor

    def release(self) -> None:
        """Unhook every layer the explainers hooked (idempotent; also when garbage-collected)."""
        self._finalizer()


def holder_tag(cfg) -> tuple:
    """What a holder is built from: a change rebuilds it."""
    return (_file_tag(cfg.model_path, cfg.unsafe_deserialization), cfg.precision, cfg.layer, cfg.sweep,
            tuple(cfg.sweep_layer_names), cfg.input_shape, tuple(cfg.methods),
            tuple(sorted(cfg.method_options.items())))


def acquire(handle: shared.Shared, cfg) -> ModelHolder:
    """This worker's holder for the run that created ``handle`` (one per process)."""
    return handle.acquire(lambda: ModelHolder(cfg), tag=holder_tag(cfg))

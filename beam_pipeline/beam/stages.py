"""The DoFns of the main path (enumerate → keep one per id → decode → explain) and the sanity
check. They tag outputs, count and log; the work is done by plain functions (``sources``,
``decode``, ``explain_batch``, ``quality``) and the model comes from the worker's one
``model_holder.ModelHolder`` (a ``Shared`` handle travels in the graph, never the model).
Every example leaves as exactly one attribution row or one error row.
"""
import functools
import threading
import time
from typing import Dict, List, Optional

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from ..explain import attribution_methods, explain_batch, explainers, model_io
from ..job import cost
from ..io import decode, sources
from . import model_holder, progress
from ..measures import quality
from .audit_config import (ERRORS, EXPLAIN_STAGE, FAITHFULNESS_STAGE, NAMESPACE, SANITY_STAGE,
    SWEEP, SWEEP_MAPS, AuditConfig)
from ..errors import ExampleError
from ..io.records import DecodedExample, ExampleRef, error_row


class EnumerateExamples(beam.DoFn):
    """A source spec (or one TFRecord file) → ExampleRefs; unusable records → error rows."""

    def __init__(self, spec: sources.SourceSpec):
        self.spec = spec
        self.examples_in = Metrics.counter(NAMESPACE, "examples_in")

    def process(self, item):
        refs = (
            sources.iter_tfrecord_refs(self.spec, *item)
            if self.spec.kind == "tfrecord"
            else sources.iter_refs(self.spec)
        )
        for ref in refs:
            self.examples_in.inc()
            if isinstance(ref, dict):
                yield beam.pvalue.TaggedOutput(ERRORS, ref)
            else:
                yield ref


def _ref_order(ref: ExampleRef) -> tuple:
    """Which of several examples sharing an id is audited: the first by source, then by
    content, so every run and runner keeps the same one whatever order the grouping yields."""
    return (ref.source, repr(ref.raw_label), repr(sorted(ref.slices.items())),
            ref.mask_path or "")


class KeepOnePerId(beam.DoFn):
    """(example id, refs) → the one ref audited under that id; any other ref with the same id
    becomes a ``duplicate_id`` error row (under that id, with its own source), so every input
    example is still accounted for exactly once and attribution ids stay unique.

    One pass over the group: a group may be large (a constant id column) and is not held."""

    def __init__(self):
        self.duplicates = Metrics.counter(NAMESPACE, "duplicate_ids")

    def process(self, id_and_refs):
        example_id, refs = id_and_refs
        kept = None
        for ref in refs:
            if kept is None:
                kept = ref
                continue
            if _ref_order(ref) < _ref_order(kept):
                ref, kept = kept, ref
            self.duplicates.inc()
            yield beam.pvalue.TaggedOutput(ERRORS, error_row(
                example_id, ref.source, "read", "duplicate_id",
                f"Another example of the dataset has the same id {example_id!r}; ids must be "
                "unique, so only one of them (the first by source path) is audited. Give every "
                "example its own id (the id column, or unique image paths)."))
        yield kept


def decode_ref(ref: ExampleRef, config: AuditConfig) -> DecodedExample:
    """Read and decode one example (raises ExampleError)."""
    image_bytes, mask_bytes = sources.read_example_bytes(ref, config.source)
    return decode.decode_example(ref, config.image_spec, config.class_names, image_bytes,
                                 mask_bytes, labeled=config.labeled)


class DecodeExamples(beam.DoFn):
    """ExampleRef → DecodedExample (bytes read through FileSystems), or an error row."""

    def __init__(self, config: AuditConfig):
        self.config = config
        self.failed = Metrics.counter(NAMESPACE, "decode_failed")
        self.usecs = Metrics.distribution(NAMESPACE, "decode_usecs")

    def process(self, ref: ExampleRef, total: int = 0):
        start = time.perf_counter()
        try:
            example = decode_ref(ref, self.config)
        except ExampleError as exc:
            self.failed.inc()
            # Handled too: the explain stage's count reaches its total with bad files in it.
            stage_progress(self.config, EXPLAIN_STAGE, explain_total(self.config, total)).add(1)
            yield beam.pvalue.TaggedOutput(
                ERRORS, error_row(ref.example_id, ref.source, exc.stage, exc.error_type, exc.message)
            )
            return
        finally:
            self.usecs.update(int((time.perf_counter() - start) * 1e6))
        yield example


# Progress counters live for the whole run on a worker, not only while a DoFn holds them (a
# count that restarted would log wrong totals), so they are kept here rather than in a Shared.
_COUNTERS: Dict[tuple, progress.StageProgress] = {}
_COUNTERS_LOCK = threading.Lock()


def stage_progress(cfg: AuditConfig, stage: str, total: Optional[int], unit: str = "examples",
                   rate_unit: str = "images/s", every_s: Optional[float] = None,
                   one_worker: bool = False) -> progress.StageProgress:
    """The process's one progress counter of ``stage`` in this run (every DoFn instance on the
    worker adds to it). ``total``: the whole stage's count, None when unknown; ``one_worker``:
    the stage runs whole on one worker (the sanity check), so its total is not shared out."""
    workers = 1 if one_worker and cfg.progress_workers else cfg.progress_workers
    key = (stage, cfg.output)  # the run's own staging folder: a new run, new counts
    with _COUNTERS_LOCK:
        if key not in _COUNTERS:
            _COUNTERS[key] = progress.StageProgress(
                stage, total if workers else None,
                cfg.progress_every_s if every_s is None else every_s, unit, rate_unit,
                max(1, workers))
        return _COUNTERS[key]


def explain_total(cfg: AuditConfig, counted: int) -> Optional[int]:
    """Examples that reach decoding: the job's count of enumerated examples when it is computed
    (sampling needs it; rows the enumeration already turned into errors are not in it), else
    the number known when planning (folders, manifests), else unknown (TFRecords)."""
    return counted or cfg.source.examples_expected or None


class ExplainBatches(beam.DoFn):
    """A batch of DecodedExamples → attribution rows (``explain_batch``); the model is the
    worker's one holder."""

    def __init__(self, config: AuditConfig, models: Optional[shared.Shared] = None):
        self.config = config
        self.models = models or shared.Shared()
        self.ok = Metrics.counter(NAMESPACE, "examples_ok")
        self.failed = Metrics.counter(NAMESPACE, "explain_failed")
        self.batches = Metrics.counter(NAMESPACE, "batches")
        self.msecs = Metrics.distribution(NAMESPACE, "explain_batch_msecs")
        self.faithfulness_msecs = Metrics.distribution(NAMESPACE, "faithfulness_msecs")

    def setup(self):
        self.holder = model_holder.acquire(self.models, self.config)
        self.explainers = self.holder.explainers
        self.settings = explain_batch.RowSettings.of(self.config)

    def _progress(self, total: int) -> None:
        """The explain (and faithfulness) counters: the total is known at planning for folders
        and manifests, else from the count of examples when sampling needs it."""
        cfg = self.config
        known = explain_total(cfg, total)
        self.progress = stage_progress(cfg, EXPLAIN_STAGE, known)
        self.faithfulness_progress = None
        if cfg.faithfulness_sample:
            expected = min(cfg.faithfulness_sample, known) if known else None
            self.faithfulness_progress = stage_progress(
                cfg, FAITHFULNESS_STAGE, expected, unit="sampled examples")

    def process(self, batch: List[DecodedExample], total: int = 0):
        start = time.perf_counter()
        self.sample_rate = self.config.faithfulness_sample / total if total else 0.0
        self._progress(total)
        self.progress.begin()
        ready, no_target = explain_batch.split_targets(self.config.target, batch)
        self.failed.inc(len(no_target))
        for row in no_target:
            yield beam.pvalue.TaggedOutput(ERRORS, row)
        rows, outs = explain_batch.explain_batch(ready, self.explainers, self.settings,
                                                 self._faithfulness)
        if outs and "sweep_maps" in outs.get("gradcam", {}):
            yield from self._sweep_outputs([ex for ex, _ in ready], outs["gradcam"]["sweep_maps"])
        for result in rows:
            if result.get("error_type"):
                self.failed.inc()
                yield beam.pvalue.TaggedOutput(ERRORS, result)
            else:
                self.ok.inc()
                yield result
        self.batches.inc()
        self.msecs.update(int((time.perf_counter() - start) * 1000))
        self.progress.add(len(batch))
        if self.progress.finished and self.faithfulness_progress:
            self.faithfulness_progress.finish()  # its sample is only about the size asked for

    def _faithfulness(self, examples, images, outs) -> Dict[int, tuple]:
        """``explain_batch.faithfulness_aucs`` on the batch's sampled examples, timed."""
        cfg = self.config
        sampled = explain_batch.sampled_indices(examples, cfg.seed, self.sample_rate)
        if not sampled:
            return {}
        self.faithfulness_progress.begin()
        start = time.perf_counter()
        reference = explain_batch.faithfulness_aucs(
            self.holder.predictor, examples, images, outs, sampled, cfg.seed, cfg.batch_size)
        self.faithfulness_msecs.update(int((time.perf_counter() - start) * 1000))
        self.faithfulness_progress.add(len(sampled))
        return reference

    def _sweep_outputs(self, examples: List[DecodedExample], sweep_maps: Dict[str, np.ndarray]):
        """Per-layer localization counters (overall and per slice value), and every layer's
        map for the sampled examples."""
        source = self.config.source
        if source.has_masks:
            for counters in explain_batch.sweep_counters(examples, sweep_maps,
                                                         source.slice_types):
                yield beam.pvalue.TaggedOutput(SWEEP, counters)
        sampled = explain_batch.sampled_indices(examples, self.config.seed, self.sample_rate)
        for row in explain_batch.sweep_map_rows(examples, sweep_maps, sampled):
            yield beam.pvalue.TaggedOutput(SWEEP_MAPS, row)


def _method_on_copy(cfg: AuditConfig, name: str, classifier: explainers.Classifier):
    """The ``name`` explainer on a (randomized) copy of the model."""
    layer = (model_io.find_layer(classifier.model, cfg.layer)
             if name in attribution_methods.LAYER_METHODS else None)
    return attribution_methods.make_method(name, classifier, cfg.input_shape, layer,
                                           cfg.method_options)


class SanityCheck(beam.DoFn):
    """The sampled examples → model-parameter randomization rows per method (Adebayo et al.)."""

    def __init__(self, config: AuditConfig, models: Optional[shared.Shared] = None):
        self.config = config
        self.models = models or shared.Shared()
        self.msecs = Metrics.distribution(NAMESPACE, "sanity_msecs")

    def setup(self):
        self.holder = model_holder.acquire(self.models, self.config)

    def process(self, examples: List[DecodedExample]):
        start = time.perf_counter()
        yield from self._rows(examples)
        self.msecs.update(int((time.perf_counter() - start) * 1000))

    def _rows(self, examples: List[DecodedExample]):
        cfg, model = self.config, self.holder.model
        if cfg.unsafe_deserialization:
            import keras

            # The randomized copy is rebuilt from the model's config, Lambda layers included:
            # the user opted in for this model.
            keras.config.enable_unsafe_deserialization()
        examples = sorted(examples, key=lambda ex: ex.example_id)
        checkpoints = cost.sanity_checkpoints(
            [name for name, _ in quality.parameterized_layers(model)])
        if not examples:
            return
        images = np.stack([ex.image for ex in examples])
        targets = np.full(len(examples), explainers.PREDICTED, np.int32)
        # Maps recomputed per method: every example at every checkpoint and on the original.
        per_method = len(examples) * (len(checkpoints) + 1)
        counter = stage_progress(cfg, SANITY_STAGE, per_method * len(cfg.methods), unit="maps",
                                 rate_unit="maps/s", every_s=0.0, one_worker=True)
        counter.begin()
        # One randomized copy of the model for every method: cloned and randomized once.
        by_method = quality.cascading_randomization_of_methods(
            model, {name: functools.partial(_method_on_copy, cfg, name) for name in cfg.methods},
            images, targets, cfg.seed, layers=checkpoints, batch_size=cfg.batch_size)
        counter.add(per_method * len(cfg.methods))
        yield from explain_batch.sanity_rows(by_method)

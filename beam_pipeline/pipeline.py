"""The thin Beam layer: enumerate → decode → batch → explain → write Parquet.

DoFns hold what is expensive (the model, loaded once per worker in ``setup()`` from its path, so
it never travels in the pipeline graph) and call the pure functions of ``sources``, ``decode``
and ``explainers``. Every example leaves as exactly one attribution row or one error row.
"""
import dataclasses
import functools
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from . import (attention, attribution_methods, cost, decode, evaluation, explainers, importance,
               layer_sweep, layout, method_registry, model_io, progress, quality, sources)
from . import precision
from . import rows as rows_  # ``rows`` is a common local name in this module
from .errors import ExampleError
from .records import DecodedExample, ExampleRef, error_row
from .schemas import (ATTENTION_BY_SLICE_SCHEMA, ERROR_SCHEMA, IMPORTANCE_BY_SLICE_SCHEMA,
                      IMPORTANCE_SCHEMA, IMPORTANCE_SUMMARY_SCHEMA, SANITY_SCHEMA,
                      SWEEP_MAPS_SCHEMA, SWEEP_SCHEMA, attribution_schema)

LOG = logging.getLogger("xai_audit")
ERRORS = "errors"
SWEEP, SWEEP_MAPS = "sweep", "sweep_maps"
NAMESPACE = "xai_audit"
EXPLAIN_STAGE, FAITHFULNESS_STAGE, IMPORTANCE_STAGE, SANITY_STAGE = (
    "Explain", "Faithfulness", "Permutation importance", "Sanity check")
# Beam counters run.json reads back: labeled refs, and those in the importance sample.
IMPORTANCE_LABELED, IMPORTANCE_SAMPLED = "importance_labeled_refs", "importance_sampled_refs"


@dataclass
class AuditConfig:
    """Everything the workers need; small and picklable (paths, not models)."""

    model_path: str
    output: str
    source: sources.SourceSpec
    image_spec: decode.ImageSpec
    class_names: List[str]
    head: str
    layer: str  # qualified layer name, resolved on the launcher
    target: Any = "predicted"  # "predicted" | "label" | int
    batch_size: int = 32
    unsafe_deserialization: bool = False
    progress_every_s: float = 10.0
    # Worker processes sharing the stages (--direct_num_workers in multi_processing mode); each
    # logs its share's progress. 0: unknown (Dataflow), progress is logged without a total.
    progress_workers: int = 1
    eval_config: Any = None  # a completed TFMA EvalConfig, or None to skip TFMA
    methods: List[str] = field(default_factory=lambda: ["gradcam"])
    method_options: Dict[str, Any] = field(default_factory=dict)  # see make_method
    map_size: int = 56  # input-resolution maps are pooled to at most this size
    sweep: bool = False  # --layer all: Grad-CAM at every 4-D layer, one backward pass per batch
    sweep_layer_names: List[str] = field(default_factory=list)
    faithfulness_sample: int = 0  # about this many examples get deletion/insertion AUCs
    sanity_sample: int = 0  # examples for the model-parameter randomization test
    permutation_features: List[Any] = field(default_factory=list)  # importance.Feature
    permutation_repeats: int = 3
    # Labeled examples permutation importance runs on (a seeded sample); None: every one.
    importance_sample: Optional[int] = importance.DEFAULT_SAMPLE
    shard_size: int = 256
    seed: int = 0
    precision: str = precision.DEFAULT  # the model's compute, as planned (precision.plan)
    region_grid: tuple = attention.DEFAULT_GRID  # rows x cols of attention_region's cells

    @property
    def labeled(self) -> bool:
        return self.source.labeled


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


_SHARED: Dict[tuple, Any] = {}
_SHARED_LOCK = threading.Lock()


def _shared(key: tuple, factory):
    """One object per process and key: every DoFn instance on a worker shares the model and its
    compiled functions (as RunInference shares its model handle)."""
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = factory()
        return _SHARED[key]


def stage_progress(cfg: AuditConfig, stage: str, total: Optional[int], unit: str = "examples",
                   rate_unit: str = "images/s", every_s: Optional[float] = None,
                   one_worker: bool = False) -> progress.StageProgress:
    """The process's one progress counter of ``stage`` in this run (every DoFn instance on the
    worker adds to it). ``total``: the whole stage's count, None when unknown; ``one_worker``:
    the stage runs whole on one worker (the sanity check), so its total is not shared out."""
    workers = 1 if one_worker and cfg.progress_workers else cfg.progress_workers
    key = ("progress", stage, cfg.output)  # the run's own staging folder: a new run, new counts
    return _shared(key, lambda: progress.StageProgress(
        stage, total if workers else None,
        cfg.progress_every_s if every_s is None else every_s, unit, rate_unit, max(1, workers)))


def explain_total(cfg: AuditConfig, counted: int) -> Optional[int]:
    """Examples that reach decoding: the job's count of enumerated examples when it is computed
    (sampling needs it; rows the enumeration already turned into errors are not in it), else
    the number known when planning (folders, manifests), else unknown (TFRecords)."""
    return counted or cfg.source.examples_expected or None


def _input_shape(cfg: AuditConfig) -> tuple:
    spec = cfg.image_spec
    return (spec.height, spec.width, spec.channels)


def shared_explainers(cfg: AuditConfig) -> Dict[str, explainers.Attribution]:
    """The ``--methods`` explainers, in order, sharing one model."""
    def build():
        model, info = precision.load_classifier(cfg.model_path, cfg.unsafe_deserialization,
                                                cfg.precision)
        classifier = explainers.Classifier(model, info.head)
        uses_layer = any(m in attribution_methods.LAYER_METHODS for m in cfg.methods)
        layer = model_io.find_layer(model, cfg.layer) if uses_layer else None
        methods = {name: attribution_methods.make_method(
                       name, classifier, _input_shape(cfg), layer, cfg.method_options)
                   for name in cfg.methods if not (cfg.sweep and name == "gradcam")}
        if cfg.sweep and "gradcam" in cfg.methods:
            swept = [(n, l) for n, l in layer_sweep.sweep_layers(model)
                     if n in cfg.sweep_layer_names]
            activation = method_registry.constructor_args("gradcam", cfg.method_options)
            methods = {"gradcam": SweepAsGradCAM(layer_sweep.GradCAMSweep(
                classifier, swept, _input_shape(cfg), **activation), cfg.layer), **methods}
        return methods

    key = ("explainers", cfg.model_path, cfg.unsafe_deserialization, cfg.precision, cfg.layer,
           cfg.sweep, _input_shape(cfg), tuple(cfg.methods),
           tuple(sorted(cfg.method_options.items())))
    return _shared(key, build)


class SweepAsGradCAM:
    """The layer sweep in Grad-CAM's place: ``maps`` is the Grad-CAM of ``--layer``'s layer
    (auto: the last 4-D layer), ``sweep_maps`` every layer's; one backward pass gives both."""

    def __init__(self, sweep: "layer_sweep.GradCAMSweep", layer: str):
        self.sweep, self.layer = sweep, layer

    def __call__(self, images, targets):
        out = self.sweep(images, targets)
        return {**out, "maps": out["maps"][self.layer], "sweep_maps": out["maps"]}


def shared_predictor(cfg: AuditConfig) -> explainers.Predictor:
    def build():
        model, info = precision.load_classifier(cfg.model_path, cfg.unsafe_deserialization,
                                                cfg.precision)
        return explainers.Predictor(explainers.Classifier(model, info.head), _input_shape(cfg))

    key = ("predictor", cfg.model_path, cfg.unsafe_deserialization, cfg.precision,
           _input_shape(cfg))
    return _shared(key, build)


def clear_shared_models() -> None:
    """Forget the process's loaded models and compiled functions (benchmarks, tests)."""
    with _SHARED_LOCK:
        _SHARED.clear()
    model_io.clear_classifiers()


class ExplainBatches(beam.DoFn):
    """A batch of DecodedExamples → attribution rows; the model is loaded once per worker."""

    def __init__(self, config: AuditConfig):
        self.config = config
        self.ok = Metrics.counter(NAMESPACE, "examples_ok")
        self.failed = Metrics.counter(NAMESPACE, "explain_failed")
        self.batches = Metrics.counter(NAMESPACE, "batches")
        self.msecs = Metrics.distribution(NAMESPACE, "explain_batch_msecs")
        self.faithfulness_msecs = Metrics.distribution(NAMESPACE, "faithfulness_msecs")

    def setup(self):
        self.explainers = shared_explainers(self.config)
        self.predictor = shared_predictor(self.config) if self.config.faithfulness_sample else None

    def _targets(self, batch: Sequence[DecodedExample]) -> List[Optional[int]]:
        return rows_.explain_targets(self.config.target, [ex.label for ex in batch])

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
        targets = self._targets(batch)
        ready = []
        for example, target in zip(batch, targets):
            if target is None:
                self.failed.inc()
                yield beam.pvalue.TaggedOutput(ERRORS, error_row(
                    example.example_id, example.source, "explain", "no_label_for_target",
                    "--target label needs a label, and this example has none."))
            else:
                ready.append((example, target))
        rows, outs = self._explain(ready)
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

    def _explain(self, items):
        """(rows, the methods' outputs); on a failing batch, each example alone (no outputs)."""
        if not items:
            return [], None
        images = np.stack([ex.image for ex, _ in items])
        targets = np.array([t for _, t in items], np.int32)
        try:
            outs = {name: method(images, targets) for name, method in self.explainers.items()}
            reference = self._add_faithfulness([ex for ex, _ in items], images, outs)
        except Exception as exc:
            if len(items) == 1:
                ex = items[0][0]
                return [error_row(ex.example_id, ex.source, "explain", "explain_failed",
                                  f"{type(exc).__name__}: {exc}")], None
            # Isolate the example that breaks the batch; the others still get audited.
            return [row for item in items for row in self._explain([item])[0]], None
        return self._rows([ex for ex, _ in items], outs, reference), outs

    def _in_sample(self, example: DecodedExample) -> bool:
        return quality.sample_key(example.example_id, self.config.seed) < self.sample_rate

    def _add_faithfulness(self, examples, images, outs) -> Dict[int, tuple]:
        """Deletion / insertion AUCs of every method for the batch's sampled examples; returns
        {index: (deletion, insertion)} of a seeded random map on the same examples and targets
        (the reference a reviewer compares the methods with)."""
        sampled = [i for i, ex in enumerate(examples) if self._in_sample(ex)]
        if not sampled:
            return {}
        self.faithfulness_progress.begin()
        start = time.perf_counter()
        first = next(iter(outs.values()))
        height, width = images.shape[1:3]
        random_maps = np.stack([quality.random_map(examples[i].example_id, self.config.seed,
                                                   height, width) for i in sampled])
        # Every map set explaining the same classes goes through the model in one batched pass
        # (methods' targets agree unless a near-tie resolves differently: then a pass of its own).
        groups: Dict[bytes, list] = {}
        for name, out in [*outs.items(), (None, {"maps": random_maps, "target_class": None})]:
            targets = (first if name is None else out)["target_class"][sampled]
            groups.setdefault(targets.tobytes(), [targets, []])[1].append((name, out))
        reference = None
        for targets, members in groups.values():
            aucs = quality.deletion_insertion_of_maps(
                self.predictor, images[sampled],
                [out["maps"] if name is None else out["maps"][sampled] for name, out in members],
                targets, batch_size=self.config.batch_size)
            for (name, out), (deletion, insertion) in zip(members, aucs):
                if name is None:
                    reference = {i: (float(d), float(v))
                                 for i, d, v in zip(sampled, deletion, insertion)}
                else:
                    out["deletion_auc"] = {i: float(d) for i, d in zip(sampled, deletion)}
                    out["insertion_auc"] = {i: float(v) for i, v in zip(sampled, insertion)}
        self.faithfulness_msecs.update(int((time.perf_counter() - start) * 1000))
        self.faithfulness_progress.add(len(sampled))
        return reference

    def _sweep_outputs(self, examples: List[DecodedExample], sweep_maps: Dict[str, np.ndarray]):
        """Per-layer localization counters (overall and per slice value), and every layer's
        map for the sampled examples."""
        if self.config.source.has_masks:
            groups = {"overall": list(range(len(examples)))}
            for column in self.config.source.slice_types:
                for i, ex in enumerate(examples):
                    groups.setdefault(f"{column}={ex.slices.get(column)}", []).append(i)
            for group, idx in groups.items():
                counters = layer_sweep.localization_by_layer(
                    {layer: maps[idx] for layer, maps in sweep_maps.items()},
                    [examples[i].mask for i in idx])
                for layer, values in counters.items():
                    yield beam.pvalue.TaggedOutput(SWEEP, ((group, layer), values))
        for i, ex in enumerate(examples):
            if self._in_sample(ex):
                for layer, maps in sweep_maps.items():
                    yield beam.pvalue.TaggedOutput(SWEEP_MAPS, {
                        "example_id": ex.example_id, "layer": layer,
                        "map": maps[i].astype(np.float32).ravel().tolist(),
                        "shape": list(maps[i].shape)})

    def _method_columns(self, name: str, out: Dict[str, np.ndarray],
                        masks: List[Optional[np.ndarray]]) -> List[dict]:
        cfg = self.config
        return rows_.method_columns(name, out, masks, layer=cfg.layer, map_size=cfg.map_size,
                                    faithfulness=bool(cfg.faithfulness_sample),
                                    has_masks=cfg.source.has_masks)

    def _rows(self, examples: List[DecodedExample], outs: Dict[str, Dict[str, np.ndarray]],
              reference: Optional[Dict[int, tuple]] = None):
        masks = [ex.mask for ex in examples]
        per_method = [self._method_columns(name, out, masks) for name, out in outs.items()]
        return rows_.attribution_rows(examples, outs, per_method,
                                      bool(self.config.faithfulness_sample), reference,
                                      self.config.region_grid)


def _method_on_copy(cfg: AuditConfig, name: str, classifier: explainers.Classifier):
    """The ``name`` explainer on a (randomized) copy of the model."""
    layer = (model_io.find_layer(classifier.model, cfg.layer)
             if name in attribution_methods.LAYER_METHODS else None)
    return attribution_methods.make_method(name, classifier, _input_shape(cfg), layer,
                                           cfg.method_options)


class SanityCheck(beam.DoFn):
    """The sampled examples → model-parameter randomization rows per method (Adebayo et al.)."""

    def __init__(self, config: AuditConfig):
        self.config = config
        self.msecs = Metrics.distribution(NAMESPACE, "sanity_msecs")

    def process(self, examples: List[DecodedExample]):
        start = time.perf_counter()
        yield from self._rows(examples)
        self.msecs.update(int((time.perf_counter() - start) * 1000))

    def _rows(self, examples: List[DecodedExample]):
        cfg = self.config
        model, _ = model_io.load_classifier(cfg.model_path, cfg.unsafe_deserialization)
        if cfg.unsafe_deserialization:
            import keras

            # The randomized copy is rebuilt from the model's config, Lambda layers included:
            # the user opted in for this model.
            keras.config.enable_unsafe_deserialization()
        examples = sorted(examples, key=lambda ex: ex.example_id)
        images = np.stack([ex.image for ex in examples]) if examples else None
        targets = np.full(len(examples), explainers.PREDICTED, np.int32)
        layers = [name for name, _ in quality.parameterized_layers(model)]
        checkpoints = cost.sanity_checkpoints(layers)
        if not examples:
            return
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
        for name, rows in by_method.items():
            flagged = quality.flag_insensitive(rows)
            for row in rows:
                yield {"method": name, **row, "flagged": flagged}


class ShardImportance(beam.DoFn):
    """A bucket of labeled examples → shards of at most ``shard_size`` → raw importance rows."""

    def __init__(self, config: AuditConfig):
        self.config = config
        self.shards = Metrics.counter(NAMESPACE, "importance_shards")
        self.msecs = Metrics.distribution(NAMESPACE, "importance_shard_msecs")
        self.forward_images = Metrics.counter(NAMESPACE, "importance_forward_images")

    def setup(self):
        self.predict = shared_predictor(self.config)

    def _labeled_examples(self, refs) -> List[DecodedExample]:
        """The bucket's examples that decode with a label; the others are already error rows of
        the main path (Decode), so they are simply left out here."""
        examples = []
        for ref in refs:
            try:
                example = decode_ref(ref, self.config)
            except ExampleError:
                continue
            if example.label is not None:
                examples.append(example)
        return examples

    def process(self, bucket_and_refs, total: Optional[int] = None):
        bucket, refs = bucket_and_refs
        refs = list(refs)  # paths only: about shard_size of them
        cfg = self.config
        counter = stage_progress(cfg, IMPORTANCE_STAGE, total)
        counter.begin()
        examples = self._labeled_examples(refs)
        counter.add(len(refs) - len(examples))  # error rows and unlabeled: nothing to permute
        for shard, members in importance.split_into_shards(bucket, examples, cfg.shard_size):
            start = time.perf_counter()
            rows = importance.shard_importance(
                self.predict,
                np.stack([ex.image for ex in members]),
                np.array([ex.label for ex in members], np.int64),
                cfg.permutation_features,
                cfg.permutation_repeats,
                cfg.seed,
                shard,
                cfg.batch_size,
                slices=[attention.slice_names(ex.slices, cfg.source.slice_types)[1:]
                        for ex in members],
            )
            self.shards.inc()
            passes = sum(row["slice"] == importance.OVERALL for row in rows)  # per-slice rows
            self.forward_images.inc(len(members) * (1 + passes))  # reuse those predictions
            self.msecs.update(int((time.perf_counter() - start) * 1000))
            counter.add(len(members))
            yield from rows


class PermutationImportance(beam.PTransform):
    """Example refs → DIR/importance/*.parquet (raw, per shard) and
    DIR/importance_summary.parquet (global, combined exactly from the shards' partial sums).

    The refs (paths, a few hundred bytes each) are grouped into buckets and each bucket is decoded
    where it is used: decoded images never go through a grouping step, so the job's memory does
    not grow with the dataset (a local runner holds a grouping step's input in memory; Dataflow
    writes it to its shuffle). Decoding a second time costs far less than the permuted passes.
    """

    def __init__(self, config: AuditConfig, count):
        super().__init__()
        self.config = config
        self.count = count  # AsSingleton of the number of refs

    def expand(self, refs):
        cfg = self.config

        def bucket_of(ref, total):
            buckets = max(1, math.ceil(total / cfg.shard_size))
            return importance.shard_bucket(ref.example_id, buckets), ref

        labeled = refs | "LabeledRefs" >> beam.ParDo(CountLabeledRefs())
        if cfg.importance_sample is None:
            chosen, total = labeled, self.count
        else:
            chosen, total = self._sample(labeled)
        raw = (
            chosen
            | "ToBucket" >> beam.Map(bucket_of, total)
            | "GroupBuckets" >> beam.GroupByKey()
            | "PermuteShards" >> beam.ParDo(ShardImportance(cfg), self.count)
        )
        _ = (
            raw
            | "OverallRows" >> beam.Filter(lambda row: row["slice"] == importance.OVERALL)
            | "ImportanceRecords" >> beam.FlatMap(importance.importance_records)
            | "WriteImportance" >> beam.io.WriteToParquet(
                layout.writer_prefix(cfg.output, layout.IMPORTANCE), IMPORTANCE_SCHEMA,
                file_name_suffix=".parquet",
                # The AUC rows carry 4 x 1000-bucket histograms per class: buffer fewer of them
                # as Python rows (Beam's default is 1000 rows, then 64 MB of Arrow).
                record_batch_size=64, row_group_buffer_size=16 << 20)
        )
        # An additive CombineFn, not a GroupByKey: each worker pre-sums its shards, so the
        # summary holds one accumulator per (slice, feature) however many shards there are.
        summaries = (
            raw
            | "ByFeature" >> beam.Map(lambda row: ((row["slice"], row["feature"]), row))
            | "SumShards" >> beam.CombinePerKey(SumImportancePartials())
            | "Summarize" >> beam.FlatMapTuple(lambda key, per_repeat: [
                {"slice": key[0], **importance.summary_of(key[1], metric, per_repeat)}
                for metric in importance.METRICS])
        )
        _ = (
            summaries
            | "SliceSummaries" >> beam.Filter(lambda row: row["slice"] != importance.OVERALL)
            | "WriteBySlice" >> beam.io.WriteToParquet(
                output_path(cfg.output, "importance_by_slice"), IMPORTANCE_BY_SLICE_SCHEMA,
                file_name_suffix=".parquet", num_shards=1, shard_name_template="")
        )
        return (
            summaries
            | "OverallSummaries" >> beam.Filter(lambda row: row["slice"] == importance.OVERALL)
            | "DropSlice" >> beam.Map(lambda row: {k: v for k, v in row.items() if k != "slice"})
            | "WriteSummary" >> beam.io.WriteToParquet(
                layout.writer_prefix(cfg.output, layout.IMPORTANCE_SUMMARY), IMPORTANCE_SUMMARY_SCHEMA,
                file_name_suffix=".parquet", num_shards=1, shard_name_template="")
        )


    def _sample(self, labeled):
        """The ``importance_sample`` labeled refs with the smallest seeded id keys (the same on
        every run and runner), and their number (for the bucket count) as a side input."""
        cfg = self.config
        smallest = beam.pvalue.AsSingleton(
            labeled
            | "SampleKeys" >> beam.Map(lambda ref: quality.sample_key(ref.example_id, cfg.seed))
            | "SmallestKeys" >> beam.combiners.Top.Smallest(cfg.importance_sample))
        chosen = labeled | "ImportanceSample" >> beam.ParDo(
            KeepSampled(cfg.seed, cfg.importance_sample), smallest)
        return chosen, beam.pvalue.AsSingleton(
            smallest.pvalue | "SampleSize" >> beam.Map(len))


class CountLabeledRefs(beam.DoFn):
    """The refs that carry a label (the population importance is estimated on), counted."""

    def __init__(self):
        self.labeled = Metrics.counter(NAMESPACE, IMPORTANCE_LABELED)

    def process(self, ref):
        if not decode._is_missing(ref.raw_label):
            self.labeled.inc()
            yield ref


class KeepSampled(beam.DoFn):
    """The refs whose seeded key is among the ``size`` smallest, counted."""

    def __init__(self, seed: int, size: int):
        self.seed, self.size = seed, size
        self.sampled = Metrics.counter(NAMESPACE, IMPORTANCE_SAMPLED)

    def process(self, ref, smallest):
        # Fewer keys than asked for: every labeled ref is in the sample.
        key = quality.sample_key(ref.example_id, self.seed)
        if len(smallest) < self.size or key <= smallest[-1]:
            self.sampled.inc()
            yield ref


class SumImportancePartials(beam.CombineFn):
    """Raw importance rows of one feature → {repeat: (baseline, permuted) partial sums}."""

    def create_accumulator(self):
        return {}

    def add_input(self, accumulator, row):
        return importance.add_row(accumulator, row)

    def merge_accumulators(self, accumulators):
        return importance.merge_repeats(accumulators)

    def extract_output(self, accumulator):
        return accumulator


class LayerSweepTable(beam.PTransform):
    """Per-batch localization counters → layer_sweep.parquet: per (slice, layer) means."""

    def __init__(self, config: AuditConfig):
        super().__init__()
        self.config = config

    def expand(self, counters):
        depth = {name: i for i, name in enumerate(self.config.sweep_layer_names)}

        def to_row(key, summed):
            group, layer = key
            means = layer_sweep.localization_means({layer: summed})[layer]
            return {"layer": layer, "depth": depth.get(layer), "slice": group,
                    **{k: _finite(v) for k, v in means.items()}}

        return (
            counters
            | "SumCounters" >> beam.CombinePerKey(_add_counters)
            | "ToRows" >> beam.MapTuple(to_row)
            | "WriteSweep" >> beam.io.WriteToParquet(
                layout.writer_prefix(self.config.output, layout.LAYER_SWEEP), SWEEP_SCHEMA,
                file_name_suffix=".parquet", num_shards=1, shard_name_template="")
        )


def _add_counters(values):
    total: Dict[str, float] = {}
    for value in values:
        for key, number in value.items():
            total[key] = total.get(key, 0) + number
    return total


def _finite(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


output_path = layout.join  # kept for callers; paths live in ``layout``


def build_pipeline(pipeline: beam.Pipeline, config: AuditConfig) -> None:
    """Add the audit's transforms to ``pipeline``."""
    spec = config.source
    if spec.kind == "tfrecord":
        seeds = sorted(sources.tfrecord_file_ids(spec.files).items())
        # The file list travels once, in Create; the DoFns get the spec without it.
        config = dataclasses.replace(config, source=dataclasses.replace(spec, files=[]))
        spec = config.source
    else:
        seeds = [spec.uri]
    enumerated = (
        pipeline
        | "Source" >> beam.Create(seeds)
        # Spread the TFRecord files over workers before reading them.
        | "SpreadFiles" >> beam.Reshuffle()
        | "Enumerate" >> beam.ParDo(EnumerateExamples(spec)).with_outputs(ERRORS, main="refs")
    )
    # Grouping by example id both spreads the examples over workers (as a Reshuffle would, at
    # the same cost: one shuffle of the refs) and finds ids used more than once, wherever the
    # examples came from.
    unique = (
        enumerated.refs
        | "KeyById" >> beam.Map(lambda ref: (ref.example_id, ref))
        | "GroupById" >> beam.GroupByKey()
        | "UniqueIds" >> beam.ParDo(KeepOnePerId()).with_outputs(ERRORS, main="refs")
    )
    # Sampling rates and importance buckets come from the number of refs as enumerated, before
    # the grouping by id: a side input computed upstream of that grouping is ready before the
    # stage that decodes, so decoding, explaining and writing stay one fused stage and decoded
    # images are never held between stages (a side input computed from the decoded examples, or
    # from the grouped refs, would make a local runner buffer every decoded image).
    sampling = config.faithfulness_sample or config.sanity_sample
    count = beam.pvalue.AsSingleton(
        enumerated.refs | "CountExamples" >> beam.combiners.Count.Globally())
    total = count if sampling else 0
    decoded = (
        unique.refs
        | "Decode" >> beam.ParDo(DecodeExamples(config), total).with_outputs(
            ERRORS, main="examples")
    )
    explained = (
        decoded.examples
        | "Batch" >> beam.BatchElements(
            min_batch_size=config.batch_size, max_batch_size=config.batch_size
        )
        | "Explain" >> beam.ParDo(ExplainBatches(config), total).with_outputs(
            ERRORS, SWEEP, SWEEP_MAPS, main="rows")
    )
    if config.sweep:
        _ = explained[SWEEP] | "LayerSweep" >> LayerSweepTable(config)
        _ = explained[SWEEP_MAPS] | "WriteSweepMaps" >> beam.io.WriteToParquet(
            layout.writer_prefix(config.output, layout.LAYER_SWEEP_MAPS), SWEEP_MAPS_SCHEMA,
            file_name_suffix=".parquet", num_shards=1, shard_name_template="")
    if config.sanity_sample:
        _ = (
            decoded.examples
            | "SanitySample" >> beam.Filter(
                lambda ex, n: n and quality.sample_key(ex.example_id, config.seed)
                < config.sanity_sample / n, total)
            | "SanityBatch" >> beam.combiners.ToList()
            | "Sanity" >> beam.ParDo(SanityCheck(config))
            | "WriteSanity" >> beam.io.WriteToParquet(
                layout.writer_prefix(config.output, layout.SANITY), SANITY_SCHEMA,
                file_name_suffix=".parquet", num_shards=1, shard_name_template="")
        )
    schema = attribution_schema(spec.column_types, spec.has_masks, config.methods,
                                bool(config.faithfulness_sample))
    if config.permutation_features:
        _ = unique.refs | "Importance" >> PermutationImportance(config, count)
    if config.eval_config is not None:
        _ = explained.rows | "Evaluate" >> evaluation.EvaluateWithTFMA(
            config.eval_config, layout.join(config.output, layout.TFMA), list(spec.slice_types),
            config.methods[0] if spec.has_masks else None,
        )
    _ = (
        explained.rows
        | "AttentionGroups" >> beam.FlatMap(attention.attention_groups, config.methods[0],
                                            list(spec.slice_types))
        | "SumAttention" >> beam.CombinePerKey(attention.AttentionSum())
        | "AttentionRows" >> beam.MapTuple(attention.attention_row)
        | "WriteAttentionBySlice" >> beam.io.WriteToParquet(
            output_path(config.output, "attention_by_slice"), ATTENTION_BY_SLICE_SCHEMA,
            file_name_suffix=".parquet", num_shards=1, shard_name_template="")
    )
    _ = explained.rows | "WriteAttributions" >> beam.io.WriteToParquet(
        layout.writer_prefix(config.output, layout.ATTRIBUTIONS), schema, file_name_suffix=".parquet"
    )
    _ = (
        (enumerated[ERRORS], unique[ERRORS], decoded[ERRORS], explained[ERRORS])
        | "AllErrors" >> beam.Flatten()
        | "WriteErrors" >> beam.io.WriteToParquet(
            layout.writer_prefix(config.output, layout.ERRORS), ERROR_SCHEMA, file_name_suffix=".parquet"
        )
    )

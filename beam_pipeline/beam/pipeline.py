"""The audit's Beam graph: enumerate → one per id → decode → batch → explain → write Parquet,
with the sanity check, permutation importance, TFMA and the attention table beside it.

This module only wires transforms together. The DoFns are in ``stages`` (main path, sanity
check) and ``importance_stage``; what they compute is in plain functions (``explain_batch``,
``rows``, ``quality``, ``importance``); the model is loaded once per worker by ``model_holder``
(a ``Shared`` handle travels in the graph, never the model). Every example leaves as exactly one
attribution row or one error row.
"""
import dataclasses
import math
from typing import Dict

import apache_beam as beam
from apache_beam.utils import shared

from ..measures import attention, quality
from ..evaluation import transform as evaluation
from ..explain import layer_sweep
from ..io import layout, sources
from . import model_holder
from .audit_config import ERRORS, SWEEP, SWEEP_MAPS, AuditConfig
from .stages import DecodeExamples, EnumerateExamples, ExplainBatches, KeepOnePerId, SanityCheck
from .importance_stage import PermutationImportance
from ..io.schemas import (ATTENTION_BY_SLICE_SCHEMA, ERROR_SCHEMA, SANITY_SCHEMA,
    SWEEP_MAPS_SCHEMA, SWEEP_SCHEMA, attribution_schema)

output_path = layout.join  # kept for callers; paths live in ``layout``


def clear_shared_models() -> None:
    """Forget the process's loaded model (benchmarks: every round pays for its own load)."""
    model_holder.clear()


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
            | "WriteSweep" >> _single_parquet(
                layout.writer_prefix(self.config.output, layout.LAYER_SWEEP), SWEEP_SCHEMA)
        )


def _add_counters(values):
    total: Dict[str, float] = {}
    for value in values:
        for key, number in value.items():
            total[key] = total.get(key, 0) + number
    return total


def _finite(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _single_parquet(prefix: str, schema):
    """One Parquet file named ``prefix``.parquet (the small tables)."""
    return beam.io.WriteToParquet(prefix, schema, file_name_suffix=".parquet", num_shards=1,
                                  shard_name_template="")


def _source_inputs(config: AuditConfig):
    """(what ``Create`` starts from, the config the DoFns get): the TFRecord files with their
    ids, travelling once in Create (the DoFns get the spec without the list), else the URI."""
    spec = config.source
    if spec.kind != "tfrecord":
        return [spec.uri], config
    seeds = sorted(sources.tfrecord_file_ids(spec.files).items())
    return seeds, dataclasses.replace(config, source=dataclasses.replace(spec, files=[]))


def build_pipeline(pipeline: beam.Pipeline, config: AuditConfig) -> None:
    """Add the audit's transforms to ``pipeline``."""
    seeds, config = _source_inputs(config)
    models = shared.Shared()  # one model holder per worker, for every stage of this run
    enumerated = (
        pipeline
        | "Source" >> beam.Create(seeds)
        # Spread the TFRecord files over workers before reading them.
        | "SpreadFiles" >> beam.Reshuffle()
        | "Enumerate" >> beam.ParDo(EnumerateExamples(config.source)).with_outputs(
            ERRORS, main="refs")
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
    count = beam.pvalue.AsSingleton(
        enumerated.refs | "CountExamples" >> beam.combiners.Count.Globally())
    total = count if config.faithfulness_sample or config.sanity_sample else 0
    decoded = unique.refs | "Decode" >> beam.ParDo(DecodeExamples(config), total).with_outputs(
        ERRORS, main="examples")
    explained = (
        decoded.examples
        | "Batch" >> beam.BatchElements(
            min_batch_size=config.batch_size, max_batch_size=config.batch_size)
        | "Explain" >> beam.ParDo(ExplainBatches(config, models), total).with_outputs(
            ERRORS, SWEEP, SWEEP_MAPS, main="rows")
    )
    _add_sweep(config, explained)
    _add_sanity(config, decoded.examples, total, models)
    if config.permutation_features:
        _ = unique.refs | "Importance" >> PermutationImportance(config, count, models)
    _add_row_tables(config, explained.rows)
    _ = (
        (enumerated[ERRORS], unique[ERRORS], decoded[ERRORS], explained[ERRORS])
        | "AllErrors" >> beam.Flatten()
        | "WriteErrors" >> beam.io.WriteToParquet(
            layout.writer_prefix(config.output, layout.ERRORS), ERROR_SCHEMA,
            file_name_suffix=".parquet")
    )


def _add_sweep(config: AuditConfig, explained) -> None:
    """--layer all: the per-(slice, layer) table and the sampled examples' maps."""
    if not config.sweep:
        return
    _ = explained[SWEEP] | "LayerSweep" >> LayerSweepTable(config)
    _ = explained[SWEEP_MAPS] | "WriteSweepMaps" >> _single_parquet(
        layout.writer_prefix(config.output, layout.LAYER_SWEEP_MAPS), SWEEP_MAPS_SCHEMA)


def _add_sanity(config: AuditConfig, examples, total, models) -> None:
    """The randomization test on a seeded sample of the decoded examples, on one worker."""
    if not config.sanity_sample:
        return
    _ = (
        examples
        | "SanitySample" >> beam.Filter(
            lambda ex, n: n and quality.sample_key(ex.example_id, config.seed)
            < config.sanity_sample / n, total)
        | "SanityBatch" >> beam.combiners.ToList()
        | "Sanity" >> beam.ParDo(SanityCheck(config, models))
        | "WriteSanity" >> _single_parquet(
            layout.writer_prefix(config.output, layout.SANITY), SANITY_SCHEMA)
    )


def _add_row_tables(config: AuditConfig, rows) -> None:
    """What is read off the attribution rows: TFMA, attention by slice, the rows themselves."""
    spec = config.source
    if config.eval_config is not None:
        _ = rows | "Evaluate" >> evaluation.EvaluateWithTFMA(
            config.eval_config, layout.join(config.output, layout.TFMA), list(spec.slice_types),
            config.methods[0] if spec.has_masks else None,
        )
    _ = (
        rows
        | "AttentionGroups" >> beam.FlatMap(attention.attention_groups, config.methods[0],
                                            list(spec.slice_types))
        | "SumAttention" >> beam.CombinePerKey(attention.AttentionSum())
        | "AttentionRows" >> beam.MapTuple(attention.attention_row)
        | "WriteAttentionBySlice" >> _single_parquet(
            layout.join(config.output, "attention_by_slice"), ATTENTION_BY_SLICE_SCHEMA)
    )
    schema = attribution_schema(spec.column_types, spec.has_masks, config.methods,
                                bool(config.faithfulness_sample))
    _ = rows | "WriteAttributions" >> beam.io.WriteToParquet(
        layout.writer_prefix(config.output, layout.ATTRIBUTIONS), schema,
        file_name_suffix=".parquet")

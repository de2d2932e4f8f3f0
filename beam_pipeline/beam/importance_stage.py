"""Permutation importance as Beam transforms: labeled refs → (a seeded sample) → buckets →
shards → raw rows, per-slice and global summaries combined exactly from the shards' partial
sums. The arithmetic is ``importance``'s; the predictor is the worker's ``model_holder``.
"""
import math
import time
from typing import List, Optional

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from ..measures import attention, importance, quality
from ..io import decode, layout
from . import model_holder
from .audit_config import (IMPORTANCE_LABELED, IMPORTANCE_SAMPLED, IMPORTANCE_STAGE, NAMESPACE,
    AuditConfig)
from .stages import decode_ref, stage_progress
from ..errors import ExampleError
from ..io.records import DecodedExample
from ..io.schemas import IMPORTANCE_BY_SLICE_SCHEMA, IMPORTANCE_SCHEMA, IMPORTANCE_SUMMARY_SCHEMA


class ShardImportance(beam.DoFn):
    """A bucket of labeled examples → shards of at most ``shard_size`` → raw importance rows."""

    def __init__(self, config: AuditConfig, models: Optional[shared.Shared] = None):
        self.config = config
        self.models = models or shared.Shared()
        self.shards = Metrics.counter(NAMESPACE, "importance_shards")
        self.msecs = Metrics.distribution(NAMESPACE, "importance_shard_msecs")
        self.forward_images = Metrics.counter(NAMESPACE, "importance_forward_images")

    def setup(self):
        self.holder = model_holder.acquire(self.models, self.config)
        self.predict = self.holder.predictor

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

    def __init__(self, config: AuditConfig, count, models: Optional[shared.Shared] = None):
        super().__init__()
        self.config = config
        self.count = count  # AsSingleton of the number of refs
        self.models = models  # the run's Shared model handle

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
            | "PermuteShards" >> beam.ParDo(ShardImportance(cfg, self.models), self.count)
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
                layout.join(cfg.output, "importance_by_slice"), IMPORTANCE_BY_SLICE_SCHEMA,
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

"""TFMA inside the audit job: sliced metrics, confidence intervals and gates on the predictions
the job already computed (no second model pass, no ``eval_shared_model``).

* ``load_eval_config`` / ``complete_eval_config``: a text-format ``EvalConfig`` from
  ``tfma_configs/`` (or the user's), completed with what depends on the run.
* ``tfma_features`` / ``to_record_batch``: attribution rows → the list-typed Arrow RecordBatches
  TFMA 0.52's batched path needs. A RecordBatch of plain columns is accepted by TFMA and then
  silently yields no metrics, so every column here is a ``large_list``.
* ``EvaluateWithTFMA``: the Beam transform. ``read_tfma_results`` reads the metrics back (and
  refuses an output with no metrics); ``threshold_gates`` and ``slice_gap_gates`` turn TFMA's
  validation and the ``--max-slice-gap`` option into gate records for run.json.

What lives where: the config in ``tfma_config``, the results and gates in ``tfma_gates``, the
slice names, lift and the one-class rule in ``metric_rules``; this module feeds TFMA and keeps
the names the job and the tests import from ``evaluation.transform``.
"""
from typing import List, Optional, Sequence

import apache_beam as beam
import pyarrow as pa

from ..errors import EvaluationError
from .metric_rules import (ATTENTION_EDGES, ATTENTION_ON_MASK, ATTENTION_REGION, DERIVED_SLICES,
    PREDICTION_CORRECT, attention_bucket, slice_name)
from .tfma_config import (LABEL, PROBABILITIES, SCORE, TFMA_FEATURE_KEYS, check_eval_config,
    check_slice_columns, complete_eval_config, computed_metric_names, has_thresholds,
    load_eval_config)
from .tfma_gates import (NOT_APPLIED_REASONS, check_gap_metrics, parse_slice_gaps,
    read_tfma_results, slice_gap_gates, threshold_gates)

# Names the job, the report and the tests import from here (the re-exports above).
__all__ = [
    "ATTENTION_EDGES", "ATTENTION_ON_MASK", "ATTENTION_REGION", "DERIVED_SLICES", "LABEL",
    "NOT_APPLIED_REASONS", "PREDICTION_CORRECT", "PROBABILITIES", "SCORE", "TFMA_FEATURE_KEYS",
    "EvaluateWithTFMA", "EvaluationError", "attention_bucket", "check_eval_config",
    "check_gap_metrics", "check_slice_columns", "complete_eval_config", "computed_metric_names",
    "has_thresholds", "load_eval_config", "parse_slice_gaps", "read_tfma_results",
    "slice_gap_gates", "slice_name", "threshold_gates", "tfma_features", "to_record_batch",
]


def tfma_features(row: dict, slice_columns: Sequence[str], attention_method: Optional[str]) -> dict:
    """The per-example features TFMA sees, from one attribution row; ``attention_method`` is the
    method whose mask energy makes the ``attention_on_mask`` slice (None without masks)."""
    probabilities = [float(p) for p in row["probabilities"]]
    features = {
        LABEL: row["label"],
        SCORE: probabilities[1] if len(probabilities) == 2 else None,
        PROBABILITIES: probabilities,
        PREDICTION_CORRECT: "true" if row["label"] == row["predicted_class"] else "false",
        ATTENTION_REGION: row.get(ATTENTION_REGION),
    }
    if attention_method:
        features[ATTENTION_ON_MASK] = attention_bucket(
            row.get(f"{attention_method}_mask_energy"), row.get("mask_area"))
    for column in slice_columns:
        features[column] = row.get(column)
    return features


def _list_column(values: List, kind: str) -> pa.Array:
    """A large_list column: one value per example, or an empty list where the value is missing."""
    if kind == "probabilities":
        return pa.array(values, pa.large_list(pa.float32()))
    wrapped = [[] if v is None else [v] for v in values]
    if kind == "float":
        return pa.array(wrapped, pa.large_list(pa.float32()))
    if kind == "int":
        return pa.array(wrapped, pa.large_list(pa.int64()))
    return pa.array([[str(v[0]).encode()] if v else [] for v in wrapped],
                    pa.large_list(pa.large_binary()))


def _kind(column: str, values: List) -> str:
    if column == PROBABILITIES:
        return "probabilities"
    if column == SCORE:
        return "float"
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return "bytes"
    if present and all(isinstance(v, int) for v in present):
        return "int"
    if present and all(isinstance(v, float) for v in present):
        return "float"
    return "bytes"


def to_record_batch(features: Sequence[dict]) -> pa.RecordBatch:
    """TFMA features of a batch → one RecordBatch with list-typed columns only."""
    columns = list(features[0])
    arrays = []
    for column in columns:
        values = [f[column] for f in features]
        if column == SCORE and all(v is None for v in values):
            values = [None] * len(values)
        arrays.append(_list_column(values, _kind(column, values)))
    return pa.RecordBatch.from_arrays(arrays, columns)


class EvaluateWithTFMA(beam.PTransform):
    """Attribution rows → TFMA metrics, plots and validation under ``output_path``."""

    def __init__(self, eval_config, output_path: str, slice_columns: Sequence[str],
                 attention_method: Optional[str], batch_size: int = 256):
        super().__init__()
        self.eval_config = eval_config
        self.output_path = output_path
        self.slice_columns = list(slice_columns)
        self.attention_method = attention_method
        self.batch_size = batch_size

    def expand(self, rows):
        import tensorflow_model_analysis as tfma

        return (
            rows
            | "Labeled" >> beam.Filter(lambda row: row["label"] is not None)
            | "TFMAFeatures" >> beam.Map(tfma_features, self.slice_columns, self.attention_method)
            | "BatchForTFMA" >> beam.BatchElements(min_batch_size=1, max_batch_size=self.batch_size)
            | "ToRecordBatch" >> beam.Map(to_record_batch)
            | "TFMA" >> tfma.ExtractEvaluateAndWriteResults(
                eval_config=self.eval_config, output_path=self.output_path)
        )

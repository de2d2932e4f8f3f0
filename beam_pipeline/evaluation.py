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
"""
import math
from importlib import resources
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import apache_beam as beam
import pyarrow as pa
from google.protobuf import text_format

from .errors import EvaluationError, OptionError

LABEL, SCORE, PROBABILITIES = "label", "score", "probabilities"
PREDICTION_CORRECT = "prediction_correct"
ATTENTION_ON_MASK = "attention_on_mask"
DERIVED_SLICES = (PREDICTION_CORRECT, ATTENTION_ON_MASK)
# attention_on_mask buckets the share of Grad-CAM mass on the mask relative to the mask's share
# of the image (1 = attention spread evenly, no preference for the annotated region).
ATTENTION_EDGES = (1.0, 1.5)


# --------------------------------------------------------------------------- configuration


def load_eval_config(path: Optional[str], num_classes: int):
    """The ``--tfma-config`` file, or the default for the number of classes."""
    from apache_beam.io.filesystems import FileSystems
    from tensorflow_model_analysis.proto import config_pb2

    if path:
        try:
            with FileSystems.open(path) as handle:
                text = handle.read().decode()
        except Exception as exc:
            raise OptionError(f"--tfma-config {path} could not be read ({exc}).") from None
        origin = path
    else:
        name = "binary.pbtxt" if num_classes == 2 else "multiclass.pbtxt"
        text = resources.files("tfma_configs").joinpath(name).read_text()
        origin = f"tfma_configs/{name}"
    try:
        return text_format.Parse(text, config_pb2.EvalConfig()), origin
    except text_format.ParseError as exc:
        raise OptionError(f"--tfma-config {origin} is not a text-format EvalConfig: {exc}") from None


def attention_bucket(energy: Optional[float], mask_area: Optional[float]) -> Optional[str]:
    """low / medium / high attention on the mask, relative to the mask's share of the image."""
    if energy is None or mask_area is None or mask_area <= 0 or math.isnan(energy):
        return None
    lift = energy / mask_area
    if lift < ATTENTION_EDGES[0]:
        return "low"
    return "medium" if lift < ATTENTION_EDGES[1] else "high"


def complete_eval_config(
    config,
    num_classes: int,
    slice_columns: Sequence[str],
    has_masks: bool,
    confidence_intervals: bool,
):
    """Fill in what depends on the run; returns a new EvalConfig."""
    from tensorflow_model_analysis.proto import config_pb2

    done = config_pb2.EvalConfig()
    done.CopyFrom(config)
    if not done.model_specs:
        done.model_specs.add()
    for spec in done.model_specs:
        spec.label_key = spec.label_key or LABEL
        spec.prediction_key = spec.prediction_key or (SCORE if num_classes == 2 else PROBABILITIES)
        if spec.prediction_key not in (SCORE, PROBABILITIES):
            raise OptionError(
                f"The TFMA config's prediction_key {spec.prediction_key!r} is not a column the job "
                f"feeds TFMA; use {SCORE!r} (probability of class 1, two classes) or "
                f"{PROBABILITIES!r}."
            )
        if spec.prediction_key == SCORE and num_classes != 2:
            raise OptionError(
                f"The TFMA config reads {SCORE!r} (binary), but the model has {num_classes} "
                "classes; use tfma_configs/multiclass.pbtxt."
            )
    available = set(slice_columns) | {PREDICTION_CORRECT} | ({ATTENTION_ON_MASK} if has_masks else set())
    for spec in done.slicing_specs:
        unknown = [k for k in spec.feature_keys if k not in available]
        if unknown:
            raise OptionError(
                f"The TFMA config slices by {', '.join(unknown)}, which the data does not have. "
                f"Slice columns: {', '.join(sorted(available))}."
            )
    if not any(not s.feature_keys and not s.feature_values for s in done.slicing_specs):
        done.slicing_specs.add()  # the overall slice
    single = {s.feature_keys[0] for s in done.slicing_specs if len(s.feature_keys) == 1}
    for column in [*slice_columns, *sorted(available - set(slice_columns))]:
        if column not in single:
            done.slicing_specs.add(feature_keys=[column])
    for metrics_spec in done.metrics_specs:
        if metrics_spec.HasField("binarize") and metrics_spec.binarize.HasField("class_ids") \
                and not metrics_spec.binarize.class_ids.values:
            metrics_spec.binarize.class_ids.values.extend(range(num_classes))
    if confidence_intervals:
        done.options.compute_confidence_intervals.value = True
    return done


# --------------------------------------------------------------------------- rows → TFMA input


def tfma_features(row: dict, slice_columns: Sequence[str], attention_method: Optional[str]) -> dict:
    """The per-example features TFMA sees, from one attribution row; ``attention_method`` is the
    method whose mask energy makes the ``attention_on_mask`` slice (None without masks)."""
    probabilities = [float(p) for p in row["probabilities"]]
    features = {
        LABEL: row["label"],
        SCORE: probabilities[1] if len(probabilities) == 2 else None,
        PROBABILITIES: probabilities,
        PREDICTION_CORRECT: "true" if row["label"] == row["predicted_class"] else "false",
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


# --------------------------------------------------------------------------- results and gates


def slice_name(slice_key: Tuple) -> str:
    """``()`` → "overall", ``(("site", b"a"),)`` → "site=a"."""
    if not slice_key:
        return "overall"
    parts = []
    for column, value in slice_key:
        if isinstance(value, bytes):
            value = value.decode()
        parts.append(f"{column}={value}")
    return ",".join(parts)


def _metric_value(value: dict):
    if "boundedValue" in value:
        bounded = value["boundedValue"]
        return {"value": bounded.get("value"), "ci_low": bounded.get("lowerBound"),
                "ci_high": bounded.get("upperBound")}
    if "doubleValue" in value:
        return value["doubleValue"]
    return None


def read_tfma_results(output_path: str) -> Dict[str, Dict[str, object]]:
    """{slice name: {metric name: value or {value, ci_low, ci_high}}}; raises EvaluationError
    when TFMA wrote no metric at all (the silent-failure pitfall)."""
    import tensorflow_model_analysis as tfma

    try:
        result = tfma.load_eval_result(output_path)
    except Exception as exc:
        raise EvaluationError(
            f"TFMA wrote no readable results under {output_path} ({type(exc).__name__}: {exc})."
        ) from None
    table: Dict[str, Dict[str, object]] = {}
    for slice_key, outputs in result.slicing_metrics:
        metrics: Dict[str, object] = {}
        for output_name, by_sub_key in outputs.items():
            for sub_key, values in by_sub_key.items():
                for metric, value in values.items():
                    scalar = _metric_value(value)
                    if scalar is None:
                        continue
                    name = metric if not sub_key else f"{metric}[{sub_key}]"
                    metrics[name if not output_name else f"{output_name}/{name}"] = scalar
        if metrics:
            table[slice_name(slice_key)] = metrics
    if not table:
        raise EvaluationError(
            f"TFMA ran but computed no metrics under {output_path}. The audit cannot vouch for "
            "the model: check that the data has labels and the TFMA config names metrics."
        )
    return table


def threshold_gates(output_path: str) -> List[dict]:
    """TFMA's own threshold checks, one gate record per failure."""
    import tensorflow_model_analysis as tfma
    from tensorflow_model_analysis.slicer import slicer_lib

    validation = tfma.load_validation_result(output_path)
    gates = []
    for per_slice in validation.metric_validations_per_slice:
        name = slice_name(slicer_lib.deserialize_slice_key(per_slice.slice_key))
        for failure in per_slice.failures:
            key = failure.metric_key
            metric = key.name + (f"[{_sub_key_text(key.sub_key)}]" if key.HasField("sub_key") else "")
            gates.append({
                "gate": "tfma_threshold",
                "passed": False,
                "slice": name,
                "metric": metric,
                "value": _proto_value(failure.metric_value),
                "bound": text_format.MessageToString(failure.metric_threshold, as_one_line=True),
                "message": failure.message,
            })
    return gates


def _sub_key_text(sub_key) -> str:
    return text_format.MessageToString(sub_key, as_one_line=True)


def _proto_value(value):
    which = value.WhichOneof("type")
    if which == "double_value":
        return value.double_value.value
    if which == "bounded_value":
        return value.bounded_value.value.value
    return text_format.MessageToString(value, as_one_line=True)


def parse_slice_gaps(text: Optional[str]) -> Dict[str, float]:
    """``auc=0.05,binary_accuracy=0.1`` → {metric: largest allowed gap}."""
    gaps: Dict[str, float] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        metric, _, bound = part.partition("=")
        try:
            gaps[metric.strip()] = float(bound)
        except ValueError:
            raise OptionError(
                f"--max-slice-gap {text!r}: each item is METRIC=GAP, e.g. auc=0.05."
            ) from None
    return gaps


def _scalar(value) -> Optional[float]:
    if isinstance(value, dict):
        value = value.get("value")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def one_class_slice(metrics: Dict[str, object]) -> bool:
    """A slice whose labels are all one class (binary ``mean_label`` 0 or 1): ranking metrics
    (AUC, AUC-PR) are undefined there, although TFMA reports them as 0."""
    mean_label = _scalar(metrics.get("mean_label"))
    return mean_label is not None and mean_label in (0.0, 1.0)


def slice_gap_gates(
    table: Dict[str, Dict[str, object]], gaps: Dict[str, float], slice_columns: Iterable[str]
) -> List[dict]:
    """For each slice column and metric: best minus worst slice value against the bound.
    Slices where the metric is undefined (AUCs of a one-class slice) are left out of its gap."""
    gates = []
    for column in slice_columns:
        prefix = f"{column}="
        slices = {name: m for name, m in table.items() if name.startswith(prefix) and "," not in name}
        for metric, bound in gaps.items():
            values = {n: _scalar(m.get(metric)) for n, m in slices.items()
                      if not ("auc" in metric and one_class_slice(m))}
            values = {n: v for n, v in values.items() if v is not None}
            if len(values) < 2:
                continue
            best, worst = max(values, key=values.get), min(values, key=values.get)
            gap = values[best] - values[worst]
            gates.append({
                "gate": "max_slice_gap",
                "passed": gap <= bound,
                "slice": f"{worst} vs {best}",
                "metric": metric,
                "value": gap,
                "bound": bound,
                "message": f"{metric} is {values[worst]:.4f} at {worst} and {values[best]:.4f} at "
                           f"{best}: a gap of {gap:.4f} (allowed {bound}).",
            })
    return gates

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

from . import metric_rules
from .errors import EvaluationError, OptionError, UsageError
from .limits import MAX_PER_CLASS_METRICS

LABEL, SCORE, PROBABILITIES = "label", "score", "probabilities"
PREDICTION_CORRECT = "prediction_correct"
ATTENTION_ON_MASK = "attention_on_mask"
# The attributions' attention_region (attention.py): needs no mask, so every run slices by it.
# Its metrics mean something (the region is not cut by the model's decision, unlike
# prediction_correct), so metric_rules treats it as any data column.
ATTENTION_REGION = "attention_region"
DERIVED_SLICES = (PREDICTION_CORRECT, ATTENTION_ON_MASK, ATTENTION_REGION)
# attention_on_mask buckets the share of Grad-CAM mass on the mask relative to the mask's share
# of the image (1 = attention spread evenly, no preference for the annotated region).
ATTENTION_EDGES = (1.0, 1.5)
# The feature keys the job gives TFMA (tfma_features): a data column of one of these names would
# silently replace the model's score or a derived slice.
TFMA_FEATURE_KEYS = (LABEL, SCORE, PROBABILITIES, *DERIVED_SLICES)


def check_slice_columns(slice_columns: Iterable[str]) -> None:
    """Refuse data columns that would take the place of a feature the job computes (OptionError)."""
    clash = sorted(set(slice_columns) & set(TFMA_FEATURE_KEYS))
    if clash:
        raise OptionError(
            f"The data has column(s) {', '.join(clash)} among its slice columns: a name the "
            f"audit gives its own metric features ({', '.join(TFMA_FEATURE_KEYS)}), so the "
            "column would silently replace the model's score, label or derived slices in the "
            "metrics. Rename the column in the "
            "data, or list the slice columns to keep with --slice-columns (or name it as the "
            "label/id/image/mask with --label-column etc. if it is one of those).")


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
    available = (set(slice_columns) | {PREDICTION_CORRECT, ATTENTION_REGION}
                 | ({ATTENTION_ON_MASK} if has_masks else set()))
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
            _fill_class_ids(metrics_spec, num_classes)
        _add_mean_label(metrics_spec)
    if confidence_intervals:
        done.options.compute_confidence_intervals.value = True
    return done


def _add_mean_label(metrics_spec) -> None:
    """Per slice (and class), the share of positives tells where AUC and recall are undefined
    (``metric_rules``); a spec computing those gets MeanLabel if it lacks it."""
    names = {m.class_name for m in metrics_spec.metrics}
    needs = any("AUC" in n or n == "Recall" for n in names)
    if needs and "MeanLabel" not in names and not metrics_spec.binarize.top_k_list.values \
            and not metrics_spec.binarize.k_list.values:
        metrics_spec.metrics.add(class_name="MeanLabel")
def _fill_class_ids(metrics_spec, num_classes: int) -> None:
    """An empty ``class_ids`` means every class, up to MAX_PER_CLASS_METRICS; above that one
    metric set per class costs minutes and gigabytes (1,000 classes), so the spec becomes one
    micro-averaged one-vs-rest set instead (labels and probabilities flattened)."""
    if num_classes <= MAX_PER_CLASS_METRICS:
        metrics_spec.binarize.class_ids.values.extend(range(num_classes))
        return
    metrics_spec.ClearField("binarize")
    metrics_spec.aggregate.micro_average = True


def check_eval_config(config, origin: str) -> None:
    """Refuse, at planning, a config TFMA would run without measuring anything or could not
    build (an unknown metric class): otherwise the job runs and only then finds no metrics."""
    from tensorflow_model_analysis.metrics import metric_specs

    if not any(spec.metrics for spec in config.metrics_specs):
        raise OptionError(
            f"--tfma-config {origin} names no metrics (no metrics_specs with metrics), so TFMA "
            "would measure nothing. Add e.g. metrics_specs { metrics { class_name: "
            "\"ExampleCount\" } metrics { class_name: \"AUC\" } }, start from tfma_configs/, "
            "or pass --tfma-config none to skip TFMA."
        )
    try:
        metric_specs.to_computations(config.metrics_specs, eval_config=config)
    except Exception as exc:  # TFMA raises ValueError/TypeError/ImportError/KeyError here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OptionError(
            f"--tfma-config {origin}: TFMA cannot build its metrics ({first}). Use TFMA metric "
            "class names such as ExampleCount, AUC, Precision, Recall, BinaryAccuracy."
        ) from None


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
    """A number (None for TFMA's "NaN"), or {value, ci_low, ci_high} with confidence intervals."""
    if "boundedValue" in value:
        bounded = value["boundedValue"]
        return {"value": metric_rules.finite(bounded.get("value")),
                "ci_low": metric_rules.finite(bounded.get("lowerBound")),
                "ci_high": metric_rules.finite(bounded.get("upperBound"))}
    if "doubleValue" in value:
        return metric_rules.finite(value["doubleValue"])
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
                    if "boundedValue" not in value and "doubleValue" not in value:
                        continue  # plots and other non-scalar outputs
                    scalar = _metric_value(value)
                    if scalar is None:
                        continue
                    metric = _aggregated_name(metric)
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


def _aggregated_name(metric: str) -> str:
    """TFMA names an aggregated metric by its aggregation's text, "micro_average: true\\n_auc":
    that becomes auc[micro_average]."""
    if "\n_" not in metric:
        return metric
    aggregation, name = metric.rsplit("\n_", 1)
    return f"{name}[{aggregation.split(':')[0].strip()}]"


def threshold_gates(output_path: str, table: Dict[str, Dict[str, object]],
                    min_slice_size: int = 0) -> List[dict]:
    """TFMA's own threshold checks, one gate record per failure, phrased as a sentence. A failure
    on a slice where the metric is undefined or trivial (``metric_rules``), or on a slice (not
    the overall one) of fewer than ``min_slice_size`` examples, is not a failure: it is listed as
    not applied there."""
    import tensorflow_model_analysis as tfma
    from tensorflow_model_analysis.slicer import slicer_lib

    validation = tfma.load_validation_result(output_path)
    gates = []
    for per_slice in validation.metric_validations_per_slice:
        name = slice_name(slicer_lib.deserialize_slice_key(per_slice.slice_key))
        for failure in per_slice.failures:
            key = failure.metric_key
            metric = key.name + (f"[{_sub_key_text(key.sub_key)}]" if key.HasField("sub_key") else "")
            value = metric_rules.finite(_proto_value(failure.metric_value))
            kind, bound = _threshold_bound(failure.metric_threshold, value)
            why = metric_rules.why_not_meaningful(name, metric, table.get(name, {}))
            size = _scalar(table.get(name, {}).get("example_count"))
            if not why and name != "overall" and size is not None and size < min_slice_size:
                why = "small"
            gate = {"gate": "tfma_threshold", "passed": why is not None, "slice": name,
                    "metric": metric, "value": value, "bound": bound, "bound_kind": kind}
            if why:
                gate.update(applied=False, value=None, message=_not_applied(name, metric, why))
            else:
                gate["message"] = _threshold_sentence(name, metric, value, kind, bound,
                                                      failure.message)
            gates.append(gate)
    return gates


NOT_APPLIED_REASONS = {
    "undefined": "{metric} is undefined there (the slice holds one class only)",
    "undefined_recall": "{metric} is undefined there (the slice holds no positive example)",
    "trivial": "{metric} is trivial there (1 or 0 by the slice's definition)",
    "small": "the slice is small (fewer examples than --min-slice-size)",
}


def _not_applied(name: str, metric: str, why: str) -> str:
    if why == "undefined" and metric_rules.base_name(metric) == "recall":
        why = "undefined_recall"
    reason = NOT_APPLIED_REASONS[why].format(metric=metric)
    return f"The {metric} threshold is not applied at {name}: {reason}."


def _threshold_bound(threshold, value: Optional[float]) -> Tuple[str, Optional[float]]:
    """("lower"|"upper"|"change", the bound crossed) of a failed MetricThreshold."""
    bounds = threshold.value_threshold
    lower = bounds.lower_bound.value if bounds.HasField("lower_bound") else None
    upper = bounds.upper_bound.value if bounds.HasField("upper_bound") else None
    if lower is not None and (value is None or value < lower or upper is None):
        return "lower", lower
    if upper is not None:
        return "upper", upper
    return "change", None


def _threshold_sentence(name, metric, value, kind, bound, tfma_message) -> str:
    """"auc at site=site_c is 0.91, below the threshold 0.95"."""
    shown = "undefined" if value is None else f"{value:.4g}"
    if kind == "lower":
        return f"{metric} at {name} is {shown}, below the threshold {bound:g}."
    if kind == "upper":
        return f"{metric} at {name} is {shown}, above the threshold {bound:g}."
    return f"{metric} at {name} is {shown} and fails its change threshold ({tfma_message})."


def _sub_key_text(sub_key) -> str:
    """TFMA's own spelling of a sub key, as in the metrics table: classId:1, topK:3, k:2."""
    for field, label in (("class_id", "classId"), ("top_k", "topK"), ("k", "k")):
        if sub_key.HasField(field):
            return f"{label}:{getattr(sub_key, field).value}"
    return text_format.MessageToString(sub_key, as_one_line=True)


def _proto_value(value):
    which = value.WhichOneof("type")
    if which == "double_value":
        return value.double_value.value
    if which == "bounded_value":
        return value.bounded_value.value.value
    return None


def has_thresholds(config) -> bool:
    """Whether the EvalConfig sets any threshold (TFMA validates only then)."""
    for spec in config.metrics_specs:
        if spec.thresholds or spec.per_slice_thresholds or spec.cross_slice_thresholds:
            return True
        for metric in spec.metrics:
            if metric.HasField("threshold") or metric.per_slice_thresholds \
                    or metric.cross_slice_thresholds:
                return True
    return False


def _metric_name(metric_config) -> Optional[str]:
    """The name TFMA gives a metrics_specs entry: its config's "name", else the name of an
    instance of the tfma.metrics class, else the class name in snake case."""
    import json
    import re

    import tensorflow_model_analysis as tfma

    if metric_config.config:
        for text in (metric_config.config, "{" + metric_config.config + "}"):
            try:
                options = json.loads(text)
            except ValueError:
                continue
            if isinstance(options, dict) and options.get("name"):
                return str(options["name"])
    metric_class = getattr(tfma.metrics, metric_config.class_name, None)
    if metric_class is not None and not metric_config.module:
        try:
            return metric_class().name
        except Exception:  # a class needing arguments: fall through to its snake-case name
            pass
    return re.sub(r"(?<!^)(?=[A-Z])", "_", metric_config.class_name).lower()


def _sub_keys(spec) -> List[str]:
    keys = [""] if not spec.HasField("binarize") or spec.HasField("aggregate") else []
    if spec.HasField("binarize"):
        keys += [f"classId:{k}" for k in spec.binarize.class_ids.values]
        keys += [f"topK:{k}" for k in spec.binarize.top_k_list.values]
        keys += [f"k:{k}" for k in spec.binarize.k_list.values]
    return keys


def computed_metric_names(config) -> List[str]:
    """The scalar metric names a (completed) EvalConfig makes TFMA compute, as they appear in
    run.json's tfma.metrics (``auc``, ``auc[classId:1]``, ``precision[topK:1]``); no plots."""
    names: List[str] = []
    for spec in config.metrics_specs:
        for metric_config in spec.metrics:
            name = _metric_name(metric_config)
            if not name or name.endswith("_plot"):
                continue
            for sub_key in _sub_keys(spec):
                full = f"{name}[{sub_key}]" if sub_key else name
                if full not in names:
                    names.append(full)
    return names


def check_gap_metrics(gaps: Dict[str, float], names: Sequence[str], origin: str) -> None:
    """A --max-slice-gap metric the config does not compute is a usage error (exit 2)."""
    import difflib

    for metric in gaps:
        if metric in names:
            continue
        close = difflib.get_close_matches(metric, names, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise UsageError(
            f"--max-slice-gap {metric}: the TFMA config {origin} computes no metric of that "
            f"name, so no gate would be set.{hint} Metrics it computes: {', '.join(names)}.")


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
    return metric_rules.finite(value)


def slice_gap_gates(
    table: Dict[str, Dict[str, object]], gaps: Dict[str, float], slice_columns: Iterable[str],
    min_slice_size: int = 0,
) -> List[dict]:
    """For each slice column and metric: best minus worst slice value against the bound.
    Slices where the metric means nothing (``metric_rules``) or with fewer than
    ``min_slice_size`` examples (TFMA's example_count) are left out of its gap."""
    gates = []
    for column in slice_columns:
        prefix = f"{column}="
        slices = {name: m for name, m in table.items() if name.startswith(prefix) and "," not in name
                  and (_scalar(m.get("example_count")) or 0) >= min_slice_size}
        for metric, bound in gaps.items():
            values = {n: _scalar(m.get(metric)) for n, m in slices.items()
                      if metric_rules.meaningful(n, metric, m)}
            values = {n: v for n, v in values.items() if v is not None}
            if len(values) < 2:
                continue
            gates.append(_gap_gate(metric, bound, values))
    return gates


def _gap_gate(metric: str, bound: float, values: Dict[str, float]) -> dict:
    # Ties broken by name, so the best and the worst are two different slices.
    ordered = sorted(values, key=lambda n: (values[n], n))
    worst, best = ordered[0], ordered[-1]
    gap = values[best] - values[worst]
    if gap == 0:
        message = (f"{metric} is {values[worst]:.4f} at all {len(values)} slices "
                   f"({', '.join(ordered)}): no gap (allowed {bound}).")
    else:
        message = (f"{metric} is {values[worst]:.4f} at {worst} and {values[best]:.4f} at "
                   f"{best}: a gap of {gap:.4f} (allowed {bound}).")
    return {"gate": "max_slice_gap", "passed": gap <= bound, "slice": f"{worst} vs {best}",
            "metric": metric, "value": gap, "bound": bound, "message": message}

"""Reading TFMA's results back and turning them into gate records for run.json:
``read_tfma_results`` (refuses an output with no metrics: the silent-failure pitfall),
``threshold_gates`` (TFMA's own validation, phrased as sentences; not applied where
``metric_rules`` says the metric means nothing) and ``slice_gap_gates`` (``--max-slice-gap``).
"""
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from google.protobuf import text_format

from . import metric_rules
from ..errors import EvaluationError, OptionError, UsageError
from .metric_rules import slice_name


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
        prefix = metric_rules.slice_prefix(column)
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

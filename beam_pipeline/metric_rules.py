"""One rule for slice metrics that mean nothing on a slice, used by the gates (evaluation), run.json
(job) and the report (report_summary): a metric there is shown as n/a (``null`` in JSON), left out
of best-worst gaps and never gated.

* *undefined*: a ranking metric (AUC, AUC-PR, any ``*auc*``) on a slice that holds one class only
  (no positive or no negative example for the class it ranks). TFMA writes 0 there.
* *trivial*: quality metrics on ``prediction_correct=*`` slices (precision, recall, accuracy,
  AUC...): the slice is cut by the model's own decision, so they are 1 or 0 by construction.
  Counts, label/prediction means and calibration still describe such a slice.

Also ``json_safe``: NaN and ±Infinity become ``None`` so every JSON output is strict JSON.
"""
import math
from typing import Dict, Optional

PREDICTION_CORRECT = "prediction_correct"
# The metrics that still mean something on prediction_correct=true/false; every other metric
# there follows from the slice's definition (all right, or all wrong).
DESCRIPTIVE_METRICS = ("example_count", "weighted_example_count", "mean_label", "mean_prediction",
                       "calibration")


def base_name(metric: str) -> str:
    """``output/auc[classId:1]`` → ``auc``."""
    return metric.rsplit("/", 1)[-1].partition("[")[0]


def is_ranking(metric: str) -> bool:
    return "auc" in base_name(metric)


def positive_class(metric: str) -> int:
    """The class a ranking metric takes as positive: k for ``...[classId:k]``, else 1."""
    sub_key = metric.partition("[")[2]
    if sub_key.startswith("classId:"):
        return int(sub_key[len("classId:"):].rstrip("]"))
    return 1


def finite(value) -> Optional[float]:
    """A finite float, or None (TFMA's JSON writes NaN as the string "NaN")."""
    if isinstance(value, dict):
        value = value.get("value")
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def undefined(metric: str, metrics: Dict[str, object],
              labels: Optional[Dict[str, int]] = None) -> bool:
    """A ranking metric on a slice with one class only. ``labels`` ({class: count}, from the
    attributions) decides when given; else TFMA's binary ``mean_label`` of the slice does."""
    if not is_ranking(metric):
        return False
    positive = positive_class(metric)
    if labels:
        positives = labels.get(str(positive), 0)
        return positives == 0 or positives == sum(labels.values())
    mean_label = finite(metrics.get("mean_label"))
    return mean_label is not None and positive == 1 and mean_label in (0.0, 1.0)


def trivial(slice_name: str, metric: str) -> bool:
    """A quality metric on a prediction_correct slice: 1 or 0 by construction."""
    column = slice_name.partition("=")[0]
    return column == PREDICTION_CORRECT and base_name(metric) not in DESCRIPTIVE_METRICS


def why_not_meaningful(slice_name: str, metric: str, metrics: Dict[str, object],
                       labels: Optional[Dict[str, int]] = None) -> Optional[str]:
    """"undefined" or "trivial" when the metric means nothing on the slice, else None."""
    if trivial(slice_name, metric):
        return "trivial"
    if undefined(metric, metrics, labels):
        return "undefined"
    return None


def meaningful(slice_name: str, metric: str, metrics: Dict[str, object],
               labels: Optional[Dict[str, int]] = None) -> bool:
    return why_not_meaningful(slice_name, metric, metrics, labels) is None


def clean_metrics_table(table: Dict[str, Dict[str, object]]) -> Dict[str, Dict[str, object]]:
    """run.json's TFMA table: undefined metrics become None (TFMA's 0 there is no value)."""
    return {name: {metric: None if undefined(metric, metrics) else value
                   for metric, value in metrics.items()}
            for name, metrics in table.items()}


def json_safe(value):
    """NaN and ±Infinity → None, recursively (``json.dumps(..., allow_nan=False)`` then holds)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return json_safe(value.item())  # numpy scalars
    return value

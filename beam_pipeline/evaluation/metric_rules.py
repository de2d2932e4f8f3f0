"""One rule for slice metrics that mean nothing on a slice, used by the gates (evaluation), run.json
(job.run) and the report (report.summary): a metric there is shown as n/a (``null`` in JSON), left out
of best-worst gaps and never gated.

* *undefined*: a ranking metric (AUC, AUC-PR, any ``*auc*``) on a slice that holds one class only
  (no positive or no negative example for the class it ranks), and recall on a slice with no
  positive example. TFMA writes 0 there. The class shares come from the attributions' labels
  when known, else from TFMA's ``mean_label`` (``mean_label[classId:k]`` per class), which the
  job adds to every EvalConfig that needs it (``evaluation.tfma_config.complete_eval_config``).
* *trivial*: quality metrics on ``prediction_correct=*`` slices (precision, recall, accuracy,
  AUC...): the slice is cut by the model's own decision, so they are 1 or 0 by construction.
  Counts, label/prediction means and calibration still describe such a slice.

Also the slice vocabulary every stage shares: the slices the audit derives
(``prediction_correct``, ``attention_on_mask``, ``attention_region``), how a slice is named
(``slice_label``: "column=value"; ``slice_name``: a TFMA slice key), and ``lift`` (mask energy
over the mask's share of the image) with the ``attention_on_mask`` buckets cut from it; and
``json_safe``: NaN and ±Infinity become ``None`` so every JSON output is strict JSON.
"""
import math
from typing import Any, Dict, Optional, Tuple

OVERALL = "overall"  # the slice of every example
PREDICTION_CORRECT = "prediction_correct"
ATTENTION_ON_MASK = "attention_on_mask"
# The attributions' attention_region (attention.py): needs no mask, so every run slices by it.
# Its metrics mean something (the region is not cut by the model's decision, unlike
# prediction_correct), so the rules below treat it as any data column.
ATTENTION_REGION = "attention_region"
DERIVED_SLICES = (PREDICTION_CORRECT, ATTENTION_ON_MASK, ATTENTION_REGION)
# attention_on_mask buckets the share of Grad-CAM mass on the mask relative to the mask's share
# of the image (1 = attention spread evenly, no preference for the annotated region).
ATTENTION_EDGES = (1.0, 1.5)
# The metrics that still mean something on prediction_correct=true/false; every other metric
# there follows from the slice's definition (all right, or all wrong).
DESCRIPTIVE_METRICS = ("example_count", "weighted_example_count", "mean_label", "mean_prediction",
                       "calibration")


def slice_label(column: str, value: Any) -> str:
    """The slice of the examples whose ``column`` is ``value``: "column=value", as TFMA names it."""
    if isinstance(value, bytes):
        value = value.decode()
    return f"{slice_prefix(column)}{value}"


def slice_prefix(column: str) -> str:
    """What the name of every slice of ``column`` starts with."""
    return f"{column}="


def slice_name(slice_key: Tuple) -> str:
    """A TFMA slice key: ``()`` → "overall", ``(("site", b"a"),)`` → "site=a"."""
    if not slice_key:
        return OVERALL
    return ",".join(slice_label(column, value) for column, value in slice_key)


def lift(energy: Optional[float], mask_area: Optional[float]) -> Optional[float]:
    """Mask energy over the mask's share of the image (1 = no preference for the mask); None
    when either is unknown or the mask is empty."""
    if energy is None or not mask_area or mask_area <= 0 or math.isnan(energy):
        return None
    return energy / mask_area


def attention_bucket(energy: Optional[float], mask_area: Optional[float]) -> Optional[str]:
    """low / medium / high attention on the mask, relative to the mask's share of the image."""
    value = lift(energy, mask_area)
    if value is None:
        return None
    if value < ATTENTION_EDGES[0]:
        return "low"
    return "medium" if value < ATTENTION_EDGES[1] else "high"


def base_name(metric: str) -> str:
    """``output/auc[classId:1]`` → ``auc``."""
    return metric.rsplit("/", 1)[-1].partition("[")[0]


def is_ranking(metric: str) -> bool:
    return "auc" in base_name(metric)


def positive_class(metric: str) -> Optional[int]:
    """The class a metric takes as positive: k for ``...[classId:k]``, 1 without a sub key,
    None for other sub keys (top-k)."""
    sub_key = metric.partition("[")[2]
    if sub_key.startswith("classId:"):
        return int(sub_key[len("classId:"):].rstrip("]"))
    return None if sub_key else 1


def _positive_share(metric: str, metrics: Dict[str, object],
                    labels: Optional[Dict[str, int]]) -> Optional[float]:
    """The share of the slice's examples in the metric's positive class, if known."""
    positive = positive_class(metric)
    if positive is None:
        return None
    if labels:
        if positive == 1 and "[" not in metric and len(labels) > 2:
            return None  # an aggregate over several classes
        return labels.get(str(positive), 0) / sum(labels.values())
    sub_key = metric[metric.index("["):] if "[" in metric else ""
    return finite(metrics.get(f"mean_label{sub_key}"))


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
    """A ranking metric on a one-class slice, or recall on a slice without positives.
    ``labels`` ({class: count}, from the attributions) decides when given; else TFMA's
    ``mean_label`` of the slice does."""
    ranking, recall = is_ranking(metric), base_name(metric) == "recall"
    if not ranking and not recall:
        return False
    share = _positive_share(metric, metrics, labels)
    if share is None:
        return False
    return share == 0.0 or (ranking and share == 1.0)


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

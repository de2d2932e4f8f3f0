"""The report's TFMA tables: per slice column, one row per slice (worst first by the primary
metric), metrics that mean nothing there shown as n/a (``metric_rules``), and best-worst gaps.
"""
from typing import Dict, List, Optional, Sequence

from ..evaluation import metric_rules
from ..evaluation.metric_rules import ATTENTION_ON_MASK, OVERALL, PREDICTION_CORRECT, slice_prefix
from .scan import SliceStats, as_number

MAX_METRIC_COLUMNS = 10
MAX_SLICE_ROWS = 30  # per slice column in the tables (worst first); run.json has them all
PREFERRED_METRICS = (
    "example_count", "auc", "binary_accuracy", "accuracy", "precision[topK:1]",
    "recall[topK:1]", "auc_precision_recall", "precision", "recall", "calibration",
    "mean_label", "mean_prediction",
)
# No best-worst gap: counts, label/prediction means, and calibration (best at 1, not at the top).
NO_GAP_METRICS = ("example_count", "mean_label", "mean_prediction", "calibration")
# The metric that orders slices "worst first", in order of preference.
PRIMARY_METRICS = ("auc", "binary_accuracy", "accuracy", "precision[topK:1]")


def _metric_cell(value) -> Optional[dict]:
    if isinstance(value, dict):
        number = as_number(value.get("value"))
        if number is None:
            return None
        return {"value": number, "ci_low": as_number(value.get("ci_low")),
                "ci_high": as_number(value.get("ci_high"))}
    number = as_number(value)
    return None if number is None else {"value": number, "ci_low": None, "ci_high": None}


def _metric_columns(table: Dict[str, dict]) -> List[str]:
    names = []
    for metrics in table.values():
        names += [n for n, v in metrics.items() if n not in names and _metric_cell(v) is not None]
    ordered = [n for n in PREFERRED_METRICS if n in names]
    ordered += sorted(n for n in names if n not in ordered)
    return ordered[:MAX_METRIC_COLUMNS]


def _slice_row(name: str, metrics: dict, columns: Sequence[str], stats: Dict[str, SliceStats],
               min_slice_size: int = 0):
    """One table row. A metric that means nothing on the slice (``metric_rules``: an AUC on one
    class, a quality metric on prediction_correct) is None, listed in ``not_applicable`` and
    named in ``why`` ("undefined" or "trivial"); ``small``: fewer than --min-slice-size examples
    (left out of gaps)."""
    slice_stats = stats.get(name)
    labels = {str(k): v for k, v in slice_stats.labels.items()} if slice_stats else None
    cells, not_applicable, why = {}, [], {}
    for metric in columns:
        reason = metric_rules.why_not_meaningful(name, metric, metrics, labels)
        if reason and metric != "example_count":
            cells[metric] = None
            not_applicable.append(metric)
            why[metric] = reason
        else:
            cells[metric] = _metric_cell(metrics.get(metric))
    column, _, value = name.partition("=")
    n = slice_stats.n if slice_stats else as_number(metrics.get("example_count"))
    return {"slice": name, "column": column if value else None, "value": value or None,
            "n": n, "small": bool(value) and n is not None and n < min_slice_size,
            "metrics": cells, "not_applicable": not_applicable, "why": why}


def _value(row: dict, metric: str) -> Optional[float]:
    cell = row["metrics"].get(metric)
    return cell["value"] if cell else None


def _gaps(rows: Sequence[dict], columns: Sequence[str]) -> Dict[str, dict]:
    """Best minus worst slice per quality metric (not counts or label/prediction means)."""
    gaps = {}
    for metric in columns:
        if metric in NO_GAP_METRICS:
            continue
        values = [(_value(r, metric), r["slice"]) for r in rows
                  if _value(r, metric) is not None and not r["small"]]
        if len(values) >= 2:
            (low, worst), (high, best) = min(values), max(values)
            gaps[metric] = {"worst": worst, "worst_value": low, "best": best, "best_value": high,
                            "gap": high - low}
    return gaps


def metrics_summary(tfma: dict, slice_columns: Sequence[str], has_masks: bool,
                    stats: Dict[str, SliceStats], min_slice_size: int = 0) -> Optional[dict]:
    """Overall and per-slice TFMA figures, worst slice first, with best-worst gaps (slices
    below ``min_slice_size`` examples are marked small and left out of gaps, as in the gates)."""
    table = tfma.get("metrics") or {}
    if not table:
        return None
    columns = _metric_columns(table)
    primary = next((m for m in PRIMARY_METRICS if m in columns),
                   next((m for m in columns if m != "example_count"), None))
    shown = list(slice_columns) + [PREDICTION_CORRECT] + (
        [ATTENTION_ON_MASK] if has_masks else [])
    by_column = []
    for column in shown:
        rows = [_slice_row(name, metrics, columns, stats, min_slice_size)
                for name, metrics in table.items()
                if name.startswith(slice_prefix(column)) and "," not in name]
        if not rows:
            continue
        rows.sort(key=lambda r: (_value(r, primary) is None, _value(r, primary) or 0.0,
                                 r["slice"]))
        derived = column not in slice_columns
        by_column.append({"column": column, "derived": derived,
                          "slices": rows[:MAX_SLICE_ROWS],
                          "slices_not_shown": max(0, len(rows) - MAX_SLICE_ROWS),
                          "gaps": {} if derived else _gaps(rows, columns)})
    overall = table.get(OVERALL)
    return {
        "columns": columns,
        "primary": primary,
        "confidence_intervals": bool(tfma.get("confidence_intervals")),
        "min_slice_size": min_slice_size,
        "overall": _slice_row(OVERALL, overall, columns, stats) if overall else None,
        "by_column": by_column,
        "all_metrics_in": "run.json: tfma.metrics",
    }

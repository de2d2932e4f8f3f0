"""The report's one streaming pass over the attribution rows: ``scan_attributions`` adds every
row to the ``SliceStats`` of each slice it is in (overall, its data slices, the derived ones) and
offers gallery candidates; ``worst_slices`` bounds the per-slice tables.

Only the small columns of the attribution files are read (Parquet column projection), batch by
batch: memory does not grow with the number of examples.
"""
from typing import Dict, List, Optional, Sequence

from ..evaluation import metric_rules
from ..io import runinfo
from ..evaluation.metric_rules import (ATTENTION_ON_MASK, OVERALL, PREDICTION_CORRECT,
    attention_bucket, lift, slice_label)

# The faithfulness reference: the same measures for a seeded random map on the same examples.
RANDOM_FAITHFULNESS = ("random_deletion_auc", "random_insertion_auc")


def as_number(value) -> Optional[float]:
    """A finite float, or None (TFMA writes "NaN" strings and nulls); unlike
    ``metric_rules.finite`` a ``{value, ci_low, ci_high}`` record is not a number here."""
    return None if isinstance(value, dict) else metric_rules.finite(value)


def _mean(total: float, count: int) -> Optional[float]:
    return total / count if count else None


# --------------------------------------------------------------------------- one pass over rows


class SliceStats:
    """Additive figures of one slice (or "overall") from the attribution rows."""

    def __init__(self):
        self.n = 0
        self.labels: Dict[int, int] = {}
        self.correct = 0
        self.labeled = 0
        self.sums: Dict[str, float] = {}
        self.counts: Dict[str, int] = {}

    def add_value(self, key: str, value) -> None:
        number = as_number(value) if not isinstance(value, bool) else float(value)
        if number is not None:
            self.sums[key] = self.sums.get(key, 0.0) + number
            self.counts[key] = self.counts.get(key, 0) + 1

    def accuracy(self) -> Optional[float]:
        return _mean(self.correct, self.labeled)

    def mean(self, key: str) -> Optional[float]:
        return _mean(self.sums.get(key, 0.0), self.counts.get(key, 0))

    def add_row(self, row: dict, methods: Sequence[str]) -> None:
        self.n += 1
        label = row.get("label")
        if label is not None:
            self.labels[label] = self.labels.get(label, 0) + 1
            self.labeled += 1
            self.correct += int(label == row.get("predicted_class"))
        self.add_value("mask_area", row.get("mask_area"))
        for figure in RANDOM_FAITHFULNESS:
            self.add_value(figure, row.get(figure))
        for method in methods:
            for figure in ("mask_energy", "pointing_hit", "iou", "deletion_auc", "insertion_auc"):
                self.add_value(f"{method}_{figure}", row.get(f"{method}_{figure}"))

    def as_dict(self, methods: Sequence[str]) -> dict:
        out = {"n": self.n, "labels": {str(k): v for k, v in sorted(self.labels.items())},
               "accuracy": self.accuracy(),
               "with_mask": self.counts.get("mask_area", 0),
               "mask_area": self.mean("mask_area")}
        for method in methods:
            energy, area = self.mean(f"{method}_mask_energy"), out["mask_area"]
            out[method] = {
                "mask_energy": energy,
                "energy_lift": lift(energy, area),
                "pointing_hit": self.mean(f"{method}_pointing_hit"),
                "iou": self.mean(f"{method}_iou"),
                "localized": self.counts.get(f"{method}_mask_energy", 0),
                "deletion_auc": self.mean(f"{method}_deletion_auc"),
                "insertion_auc": self.mean(f"{method}_insertion_auc"),
                "faithfulness_n": self.counts.get(f"{method}_deletion_auc", 0),
            }
        return out


def _slice_groups(row: dict, slice_columns: Sequence[str], attention_method: Optional[str]):
    """(the data slices a row belongs to, named as TFMA names them ("column=value"), and the
    slices derived from the audit: prediction_correct, attention_on_mask)."""
    data = [slice_label(column, row[column]) for column in slice_columns
            if row.get(column) is not None]
    derived = []
    if row.get("label") is not None:
        correct = "true" if row["label"] == row.get("predicted_class") else "false"
        derived.append(slice_label(PREDICTION_CORRECT, correct))
    if attention_method:
        bucket = attention_bucket(row.get(f"{attention_method}_mask_energy"), row.get("mask_area"))
        if bucket:
            derived.append(slice_label(ATTENTION_ON_MASK, bucket))
    return data, derived


def _lift(row: dict, method: str) -> Optional[float]:
    return lift(as_number(row.get(f"{method}_mask_energy")), as_number(row.get("mask_area")))


def scan_attributions(paths: Sequence[str], run: dict, picker=None) -> Dict[str, SliceStats]:
    """One streaming pass: per-slice stats, and gallery candidates offered to ``picker`` (per
    data slice value, or "overall" when the data has no slice columns)."""
    methods = run.get("model", {}).get("methods") or ["gradcam"]
    slice_columns = list(run.get("data", {}).get("slice_columns") or [])
    first = methods[0]
    columns = ["example_id", "label", "predicted_class", "probabilities", "mask_area",
               *RANDOM_FAITHFULNESS, *slice_columns]
    for method in methods:
        columns += [f"{method}_{f}" for f in ("mask_energy", "pointing_hit", "iou",
                                              "deletion_auc", "insertion_auc")]
    stats: Dict[str, SliceStats] = {}
    attention = first if run.get("data", {}).get("has_masks") else None
    for row in runinfo.iter_rows(paths, columns):
        data, derived = _slice_groups(row, slice_columns, attention)
        for group in [OVERALL, *data, *derived]:
            stats.setdefault(group, SliceStats()).add_row(row, methods)
        if picker is not None:
            candidate = {**row, "lift": _lift(row, first)}
            for group in (data if slice_columns else [OVERALL]):
                picker.add(group, candidate)
    return stats



def worst_slices(stats: Dict[str, SliceStats], columns: Sequence[str], limit: int) -> List[str]:
    """Per slice column, at most ``limit`` slice values: lowest accuracy first (the largest
    first when unlabeled). Bounds every per-slice table whatever a column's cardinality."""
    chosen = []
    for column in columns:
        names = [n for n in stats if n.split("=", 1)[0] == column]
        names.sort(key=lambda n: (stats[n].accuracy() if stats[n].labeled else -stats[n].n, n))
        chosen += names[:limit]
    return chosen

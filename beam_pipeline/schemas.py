"""Arrow schemas of the Parquet outputs (DESIGN.md, "Output folder")."""
from typing import Dict, Sequence

import pyarrow as pa

from .errors import OptionError

ERROR_SCHEMA = pa.schema(
    [
        ("example_id", pa.string()),
        ("source", pa.string()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
    ]
)

_SLICE_TYPES = {"int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_(), "string": pa.string()}


def attribution_schema(slice_types: Dict[str, str], has_masks: bool,
                       methods: Sequence[str] = ("gradcam",)):
    fields = [
        ("example_id", pa.string()),
        ("label", pa.int64()),
        ("predicted_class", pa.int64()),
        ("probabilities", pa.list_(pa.float32())),
        ("target_class", pa.int64()),
    ]
    for method in methods:
        fields += [(method, pa.list_(pa.float32())), (f"{method}_shape", pa.list_(pa.int32()))]
        if method == "gradcam":
            fields.append(("gradcam_layer", pa.string()))
        if method == "integrated_gradients":
            fields.append(("ig_completeness_gap", pa.float32()))
        if has_masks:
            fields += [
                (f"{method}_mask_energy", pa.float32()),
                (f"{method}_pointing_hit", pa.bool_()),
                (f"{method}_iou", pa.float32()),
            ]
    if has_masks:
        fields.append(("mask_area", pa.float32()))  # the mask's share of the image
    taken = {name for name, _ in fields}
    clash = sorted(taken & set(slice_types))
    if clash:
        raise OptionError(
            f"Slice column(s) {', '.join(clash)} have the name of an output column; rename them "
            "in the data or leave them out of --slice-columns."
        )
    fields += [(name, _SLICE_TYPES[type_name]) for name, type_name in slice_types.items()]
    return pa.schema(fields)


IMPORTANCE_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("feature", pa.string()),
        ("repeat", pa.int32()),
        ("metric", pa.string()),
        ("baseline", pa.float64()),
        ("permuted", pa.float64()),
        ("n", pa.int64()),
        # Additive partials (the shard's sums) the metric is computed from: correct count for
        # accuracy, summed log-loss for log_loss, score histograms [classes x buckets] for auc.
        ("baseline_sum", pa.float64()),
        ("permuted_sum", pa.float64()),
        ("baseline_hist_pos", pa.list_(pa.int64())),
        ("baseline_hist_neg", pa.list_(pa.int64())),
        ("permuted_hist_pos", pa.list_(pa.int64())),
        ("permuted_hist_neg", pa.list_(pa.int64())),
    ]
)

IMPORTANCE_SUMMARY_SCHEMA = pa.schema(
    [
        ("feature", pa.string()),
        ("metric", pa.string()),
        ("importance", pa.float64()),
        ("std", pa.float64()),
        ("ci_low", pa.float64()),
        ("ci_high", pa.float64()),
        ("n", pa.int64()),
    ]
)

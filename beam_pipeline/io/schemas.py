"""Arrow schemas of the Parquet outputs (DESIGN.md, "Output folder")."""
from typing import Dict, Sequence

import pyarrow as pa

from ..explain import registry as method_registry
from ..errors import OptionError

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
                       methods: Sequence[str] = ("gradcam",), faithfulness: bool = False):
    fields = [
        ("example_id", pa.string()),
        ("label", pa.int64()),
        ("predicted_class", pa.int64()),
        ("probabilities", pa.list_(pa.float32())),
        ("target_class", pa.int64()),
    ]
    for method in methods:
        fields += [(method, pa.list_(pa.float32())), (f"{method}_shape", pa.list_(pa.int32()))]
        record = method_registry.get(method)
        if record.resolution == "layer":  # maps at the --layer feature map
            fields.append((f"{method}_layer", pa.string()))
        fields += [(extra.column, pa.type_for_alias(extra.arrow_type))
                   for extra in record.extra_columns]
        if faithfulness:  # on the seeded sample only; null elsewhere
            fields += [(f"{method}_deletion_auc", pa.float32()),
                       (f"{method}_insertion_auc", pa.float32())]
        if has_masks:
            fields += [
                (f"{method}_mask_energy", pa.float32()),
                (f"{method}_pointing_hit", pa.bool_()),
                (f"{method}_iou", pa.float32()),
            ]
    # The cell of the patch grid holding most of the first method's map mass (attention.py).
    fields.append(("attention_region", pa.string()))
    if faithfulness:  # the same measures for a seeded random map: the reference
        fields += [("random_deletion_auc", pa.float32()), ("random_insertion_auc", pa.float32())]
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

# importance_summary's figures per slice value ("column=value"), combined the same way.
IMPORTANCE_BY_SLICE_SCHEMA = pa.schema([("slice", pa.string()), *IMPORTANCE_SUMMARY_SCHEMA])

ATTENTION_BY_SLICE_SCHEMA = pa.schema(
    [
        ("slice", pa.string()),  # "overall" or "column=value"
        ("predicted_class", pa.int64()),
        ("map", pa.list_(pa.float32())),  # the mean of the maps scaled to unit mass, row-major
        ("shape", pa.list_(pa.int32())),
        ("n", pa.int64()),  # maps averaged (maps with no positive mass are left out)
    ]
)

SWEEP_SCHEMA = pa.schema(
    [
        ("layer", pa.string()),
        ("depth", pa.int32()),  # position among the swept layers, input side first
        ("slice", pa.string()),  # "overall" or "column=value"
        ("energy", pa.float64()),  # mean share of the map's mass on the mask
        ("area", pa.float64()),  # mean mask share of the image: a uniform map's energy
        ("pointing_game", pa.float64()),  # share of examples whose map peaks on the mask
        ("n", pa.int64()),  # examples with a mask and a non-zero map
        ("empty", pa.int64()),  # examples with a mask whose map is all zero
    ]
)

SWEEP_MAPS_SCHEMA = pa.schema(
    [
        ("example_id", pa.string()),
        ("layer", pa.string()),
        ("map", pa.list_(pa.float32())),
        ("shape", pa.list_(pa.int32())),
    ]
)

SANITY_SCHEMA = pa.schema(
    [
        ("method", pa.string()),
        ("step", pa.int32()),
        ("randomized_up_to", pa.string()),
        ("spearman_mean", pa.float64()),
        ("spearman_std", pa.float64()),
        ("examples", pa.int64()),  # examples with a defined correlation at this step
        ("sampled", pa.int64()),  # examples compared (the same at every step)
        ("flagged", pa.bool_()),  # the maps barely change when the model is randomized
    ]
)

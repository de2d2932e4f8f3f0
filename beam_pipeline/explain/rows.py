"""Attribution rows from the explainers' outputs: plain functions over arrays, no Beam.

``explain_batch`` calls them for ``beam.stages.ExplainBatches``, which only tags, counts and
logs; tests call them with hand-made outputs (``{"probabilities", "target_class", "maps", ...}``
per method, as ``explainers.Attribution`` returns) in milliseconds.

* ``explain_targets``: the class each example's maps explain, from ``--target``;
* ``method_columns``: one method's columns per example (map, shape, layer, extra columns from its
  ``registry`` record, faithfulness, mask agreement);
* ``attribution_rows``: one row per example, or an error row when the model's outputs are not
  finite.
"""
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from . import attribution_methods, explainers, registry as method_registry
from ..io.records import DecodedExample, error_row

FAITHFULNESS_KEYS = ("deletion_auc", "insertion_auc")


def explain_targets(target: Any, labels: Sequence[Optional[int]]) -> List[Optional[int]]:
    """Per example, the class to explain: ``explainers.PREDICTED`` for ``predicted``, the label
    for ``label`` (None when the example has none: it becomes an error row), else the index."""
    if target == "predicted":
        return [explainers.PREDICTED] * len(labels)
    if target == "label":
        return list(labels)
    return [int(target)] * len(labels)


def method_columns(name: str, out: Dict[str, Any], masks: List[Optional[np.ndarray]], *,
                   layer: str, map_size: int, faithfulness: bool,
                   has_masks: bool) -> List[dict]:
    """Per example, the columns of one method: its map (input-resolution maps pooled to
    ``map_size``), shape, layer, extra columns, faithfulness and agreement with the mask."""
    maps, record = out["maps"], method_registry.get(name)
    written = (attribution_methods.pool_map(maps, map_size)
               if record.resolution == "input" else maps)
    columns = [{name: m.astype(np.float32).ravel().tolist(), f"{name}_shape": list(m.shape)}
               for m in written]
    if record.resolution == "layer":
        for col in columns:
            col[f"{name}_layer"] = layer
    for extra in record.extra_columns:
        for col, value in zip(columns, out[extra.output]):
            col[extra.column] = None if np.isnan(value) else float(value)
    if faithfulness:  # {index: AUC} for the sampled examples; null elsewhere
        for key in FAITHFULNESS_KEYS:
            for i, col in enumerate(columns):
                col[f"{name}_{key}"] = out.get(key, {}).get(i)
    if has_masks:
        energies, hits, areas, ious = explainers.mask_metrics(maps, masks)
        for i, col in enumerate(columns):
            col.update({f"{name}_mask_energy": energies[i], f"{name}_pointing_hit": hits[i],
                        f"{name}_iou": ious[i], "mask_area": areas[i]})
    return columns


def finite_outputs(outs: Dict[str, Dict[str, np.ndarray]], i: int) -> bool:
    """Whether example ``i``'s probabilities and every method's map are finite."""
    first = next(iter(outs.values()))
    return bool(np.all(np.isfinite(first["probabilities"][i])) and all(
        np.all(np.isfinite(out["maps"][i])) for out in outs.values()))


def attribution_rows(examples: List[DecodedExample], outs: Dict[str, Dict[str, np.ndarray]],
                     per_method: List[List[dict]], faithfulness: bool,
                     reference: Optional[Dict[int, tuple]] = None,
                     region_grid: Optional[Sequence[int]] = None) -> List[dict]:
    """One attribution row per example (``per_method``: ``method_columns`` of each method), or
    a ``non_finite_output`` error row; ``reference``: {index: (deletion, insertion)} of the
    seeded random map for the sampled examples; ``region_grid``: (rows, cols) of the
    ``attention_region`` cell holding the first method's peak (None: no such column)."""
    first = next(iter(outs.values()))
    rows = []
    for i, ex in enumerate(examples):
        if not finite_outputs(outs, i):
            rows.append(error_row(ex.example_id, ex.source, "predict", "non_finite_output",
                                  "The model produced NaN or infinite values for this image."))
            continue
        probs = first["probabilities"][i]
        row = {
            "example_id": ex.example_id,
            "label": ex.label,
            "predicted_class": int(np.argmax(probs)),
            "probabilities": probs.astype(np.float32).tolist(),
            "target_class": int(first["target_class"][i]),
        }
        for columns in per_method:
            row.update(columns[i])
        if region_grid is not None:
            row["attention_region"] = _attention_region(per_method[0][i], region_grid)
        if faithfulness:
            row["random_deletion_auc"], row["random_insertion_auc"] = (
                (reference or {}).get(i, (None, None)))
        row.update(ex.slices)
        rows.append(row)
    return rows


def _attention_region(first_method_columns: dict, region_grid: Sequence[int]) -> str:
    """The region of the first method's map as written (``attention.attention_region``)."""
    from ..measures import attention

    name = next(k for k in first_method_columns if k + "_shape" in first_method_columns)
    shape = first_method_columns[name + "_shape"]
    return attention.attention_region(np.asarray(first_method_columns[name]).reshape(shape),
                                      region_grid)

"""Where the model looks, without masks: attention regions and attention by slice (issue 15).

* ``unit_mass``: a map's positive part scaled to sum 1 (the mass the mask metrics also use).
* ``attention_region``: the cell of the permutation-patch grid (``importance.region_name``,
  ``r{i}_c{j}``) holding the map's peak; cells are the grid's fractions of the image, so a 7x7
  Grad-CAM map and a 64x64 saliency map are cut at the same places.
* ``attention_groups`` / ``AttentionSum``: per (slice, predicted class) the sum of unit-mass maps
  and their count, an additive combine (no map is ever grouped), written as
  ``attention_by_slice.parquet`` with the mean map.
* ``region_findings``: slice values whose distribution of attention regions differs from the
  rest, as sentences a reviewer should look at.

Pure NumPy, plus one Beam CombineFn.
"""
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np

from .importance import patch_grid, region_name
from ..evaluation.metric_rules import OVERALL, slice_label

DEFAULT_GRID = (4, 4)  # the grid when --permutation-features has no patches:RxC
# A slice value's share of maps peaking in a region must exceed the other values' share by at
# least this much, over at least REGION_MIN_EXAMPLES examples, to make a finding.
REGION_SHIFT = 0.25
REGION_MIN_EXAMPLES = 20


def region_grid(features: Sequence) -> Tuple[int, int]:
    """The grid of attention_region: the permutation patches' (``patches:RxC``), else 4x4."""
    grid = patch_grid({feature.name: 0.0 for feature in features})
    return (len(grid), len(grid[0])) if grid else DEFAULT_GRID


def unit_mass(values: np.ndarray) -> Optional[np.ndarray]:
    """The map's positive part divided by its sum; None for a map with no positive mass."""
    positive = np.maximum(np.nan_to_num(np.asarray(values, np.float64)), 0.0)
    total = positive.sum()
    return positive / total if total > 0 else None


def peak_cell(shape: Tuple[int, int], index: Tuple[int, int], grid: Tuple[int, int]):
    """The grid cell (row, col) holding the centre of map pixel ``index``: cells are the grid's
    fractions of the image, so a 7x7 Grad-CAM map and a 64x64 saliency map are cut alike."""
    return tuple(int((i + 0.5) * cells / size) for i, size, cells in zip(index, shape, grid))


def attention_region(values: np.ndarray, grid: Tuple[int, int]) -> Optional[str]:
    """``r{i}_c{j}``: the cell holding the map's peak (the pointing game's point; the first
    maximum in row-major order on ties). None for a map with no positive value.

    The peak, not the cell with the most mass: Grad-CAM maps often carry a broad floor (half the
    peak over the whole image), whose mass outweighs a small sharp focus such as a corner marker,
    so "most mass" names the largest cell of floor rather than where the model looks."""
    values = np.nan_to_num(np.asarray(values, np.float64))
    if not values.size or not values.max() > 0:
        return None
    index = np.unravel_index(int(np.argmax(values)), values.shape)
    return region_name(*peak_cell(values.shape, index, grid))


def region_words(region: str, grid: Tuple[int, int]) -> str:
    """``r0_c0`` → ``top left`` (rows top/middle/bottom, columns left/centre/right)."""
    row, col = (int(part[1:]) for part in region.split("_"))

    def word(index, count, first, middle, last):
        return first if index == 0 else last if index == count - 1 else middle

    vertical = word(row, grid[0], "top", "middle", "bottom") if grid[0] > 1 else ""
    horizontal = word(col, grid[1], "left", "centre", "right") if grid[1] > 1 else ""
    return " ".join(w for w in (vertical, horizontal) if w) or "whole image"


def slice_names(row: dict, slice_columns: Sequence[str]) -> List[str]:
    """``overall`` and ``column=value`` for each slice column with a value (TFMA's and the
    report's naming; an example without a value is in no slice of that column, as in TFMA)."""
    return [OVERALL, *(slice_label(column, row[column]) for column in slice_columns
                       if row.get(column) is not None)]


# --------------------------------------------------------------------------- attention by slice


def attention_groups(row: dict, method: str, slice_columns: Sequence[str]):
    """One attribution row → ((slice, predicted class, shape), unit-mass map) per slice it is in;
    nothing for a map with no positive mass."""
    shape = tuple(int(s) for s in row[f"{method}_shape"])
    unit = unit_mass(np.asarray(row[method], np.float64).reshape(shape))
    if unit is None:
        return
    for name in slice_names(row, slice_columns):
        yield (name, int(row["predicted_class"]), shape), unit


class AttentionSum(beam.CombineFn):
    """Unit-mass maps of one key → [summed map, count]: adds, so workers pre-sum."""

    def create_accumulator(self):
        return [None, 0]

    def add_input(self, accumulator, unit):
        total, count = accumulator
        return [unit.copy() if total is None else total + unit, count + 1]

    def merge_accumulators(self, accumulators):
        merged = [None, 0]
        for total, count in accumulators:
            if total is not None:
                merged = [total.copy() if merged[0] is None else merged[0] + total,
                          merged[1] + count]
        return merged

    def extract_output(self, accumulator):
        return accumulator


def attention_row(key, summed) -> dict:
    """The parquet row of one (slice, predicted class, shape): the mean unit-mass map and n."""
    (name, predicted, shape), (total, count) = key, summed
    return {"slice": name, "predicted_class": predicted,
            "map": (total / count).astype(np.float32).ravel().tolist(),
            "shape": list(shape), "n": int(count)}


def mean_maps(rows: Iterable[dict]) -> Dict[Tuple[str, int], Tuple[np.ndarray, int]]:
    """attention_by_slice rows → {(slice, predicted class): (mean unit-mass map, n)}; rows of
    another shape than the first are left out (one method, one shape, in practice)."""
    out: Dict[Tuple[str, int], Tuple[np.ndarray, int]] = {}
    shape = None
    for row in rows:
        shape = shape or tuple(row["shape"])
        if tuple(row["shape"]) == shape and row["n"]:
            out[row["slice"], row["predicted_class"]] = (
                np.asarray(row["map"], np.float64).reshape(shape), row["n"])
    return out


# --------------------------------------------------------------------------- region findings


def region_counts(rows: Iterable[dict], slice_columns: Sequence[str]) -> Dict[str, Dict[str, int]]:
    """{``column=value``: {region: examples}} from attribution rows (region may be None)."""
    counts: Dict[str, Dict[str, int]] = {}
    for row in rows:
        region = row.get("attention_region")
        if region is None:
            continue
        for name in slice_names(row, slice_columns)[1:]:
            per = counts.setdefault(name, {})
            per[region] = per.get(region, 0) + 1
    return counts


def region_findings(counts: Dict[str, Dict[str, int]], grid: Tuple[int, int],
                    shift: float = REGION_SHIFT, min_examples: int = REGION_MIN_EXAMPLES
                    ) -> List[dict]:
    """Per slice value with at least ``min_examples`` maps: the region whose share of its maps
    exceeds the other values' (same column) share by the most, when that is at least ``shift``.
    Largest difference first."""
    found = []
    for name, per in counts.items():
        column = name.split("=", 1)[0]
        n = sum(per.values())
        rest: Dict[str, int] = {}
        for other, other_per in counts.items():
            if other != name and other.split("=", 1)[0] == column:
                for region, k in other_per.items():
                    rest[region] = rest.get(region, 0) + k
        n_rest = sum(rest.values())
        if n < min_examples or not n_rest:
            continue
        region = max(per, key=lambda r: (per[r] / n - rest.get(r, 0) / n_rest, r))
        inside, outside = per[region] / n, rest.get(region, 0) / n_rest
        if inside - outside >= shift:
            found.append({"slice": name, "region": region, "share": inside,
                          "share_elsewhere": outside, "n": n, "n_elsewhere": n_rest,
                          "where": region_words(region, grid)})
    return sorted(found, key=lambda f: (-(f["share"] - f["share_elsewhere"]), f["slice"]))


def region_sentence(finding: dict) -> str:
    column = finding["slice"].split("=", 1)[0]
    return (f"At {finding['slice']}, {100 * finding['share']:.0f}% of maps peak in "
            f"{finding['region']} ({finding['where']}) against "
            f"{100 * finding['share_elsewhere']:.0f}% at the other {column} values "
            f"({finding['n']} and {finding['n_elsewhere']} examples): worth a look at what "
            f"these images hold there, which the model may use at this {column} only.")

"""Which data columns become slices: ``choose_slices`` (columns with too many distinct values are
carried, not sliced), ``--slice-bins`` parsing and the ``<column>_bin`` labels.
"""
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..errors import DataSourceError, OptionError

# A column with more distinct values than this (a continuous number, a timestamp, an id) is not
# a slice by default: it would make slices of one or two examples whose metric "gaps" mean
# nothing. It is still carried to attributions; --slice-columns or --slice-bins make it a slice.
MAX_SLICE_VALUES = 50
BIN_SUFFIX = "_bin"  # --slice-bins age=... slices on the column age_bin
OUT_OF_RANGE_BIN = "out_of_range"  # a value outside every bin (a missing value stays null)


def bin_column(column: str) -> str:
    return column + BIN_SUFFIX


def _edge(value: float) -> str:
    return f"{value:g}"


def bin_label(value: Any, edges: Sequence[float]) -> Optional[str]:
    """``[lo,hi)`` of the bin holding ``value`` (bins are half-open, the last one too),
    ``out_of_range`` outside every bin, None for a missing value."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (isinstance(value, float) and np.isnan(value)):
        return None
    for low, high in zip(edges, edges[1:]):
        if low <= value < high:
            return f"[{_edge(low)},{_edge(high)})"
    return OUT_OF_RANGE_BIN


def parse_slice_bins(items: Optional[Sequence[str]]) -> Dict[str, List[float]]:
    """``--slice-bins age=0,40,65,120`` (repeatable) → {"age": [0, 40, 65, 120]}."""
    bins: Dict[str, List[float]] = {}
    for item in items or []:
        column, _, text = item.partition("=")
        try:
            edges = [float(v) for v in text.split(",")]
        except ValueError:
            edges = []
        if not column.strip() or len(edges) < 2 or any(
                not np.isfinite(e) for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
            raise OptionError(
                f"--slice-bins {item!r}: give COLUMN=EDGES with at least two increasing numbers, "
                "e.g. age=0,40,65,120 (bins [0,40), [40,65), [65,120)).")
        if column.strip() in bins:
            raise OptionError(f"--slice-bins names {column.strip()} twice.")
        bins[column.strip()] = edges
    return bins


def skipped_slices_sentence(skipped: Dict[str, int]) -> str:
    """Why some columns are not slices, and how to make them slices (log, run.json, report)."""
    named = ", ".join(f"{c} ({n} distinct values)" for c, n in skipped.items())
    return (f"Not slicing on {named}: more than {MAX_SLICE_VALUES} distinct values give slices "
            "of one or two examples whose metric gaps mean nothing. They are still written to "
            "attributions. To slice on one, name it in --slice-columns, or bin a numeric one with "
            "--slice-bins COLUMN=EDGES (e.g. --slice-bins age=0,40,65,120).")


def choose_slices(types: Dict[str, str], distinct: Dict[str, int],
                  explicit: Optional[Sequence[str]], bins: Dict[str, List[float]],
                  where: str) -> Dict[str, Any]:
    """Split the data columns into slices, carried-only columns and skipped ones.

    ``types``: every candidate column's type; ``distinct``: distinct values seen per column;
    ``explicit``: --slice-columns (all of them are slices, however many values); ``bins``:
    --slice-bins, whose columns are carried and sliced on as ``<column>_bin``."""
    for column in bins:
        if column not in types:
            raise DataSourceError(f"--slice-bins names {column}, which {where} lacks.")
        if types[column] not in ("int64", "float64"):
            raise OptionError(f"--slice-bins {column}: the column holds {types[column]} values; "
                              "bins need numbers.")
        if bin_column(column) in types:
            raise OptionError(f"--slice-bins {column} would add the slice column "
                              f"{bin_column(column)}, which {where} already has; rename it.")
    if explicit is not None:
        slices = {c: types[c] for c in explicit}
        skipped: Dict[str, int] = {}
    else:
        candidates = [c for c in types if c not in bins]
        skipped = {c: distinct[c] for c in candidates if distinct.get(c, 0) > MAX_SLICE_VALUES}
        slices = {c: types[c] for c in candidates if c not in skipped}
    slices.update({bin_column(c): "string" for c in bins})
    carried = {c: types[c] for c in [*skipped, *bins] if c not in slices}
    return {"slice_types": slices, "carried_types": carried, "skipped_slices": skipped,
            "slice_bins": dict(bins)}

"""The report's figures of where the model looks, with or without masks (issue 15).

* ``attention_section``: the mean unit-mass map per predicted class and slice value (from
  attention_by_slice.parquet), the region each mean map peaks in, and the region findings (a
  slice value whose maps peak in one region far more often than the other values' do), counted
  in one streaming pass over the attributions' ``attention_region`` and slice columns.
* ``importance_by_slice``: per slice value, the patch importances of the report's metric
  (importance_by_slice.parquet), kept when they differ from the overall figures.

Plain Python over the run's files; the pictures are drawn by ``report.plots``.
"""
from typing import Dict, List, Optional, Sequence

from ..measures import attention, importance
from ..io import runinfo
from .summary import _read_rows, as_number, join

MAX_ATTENTION_SLICES = 8  # columns of mean maps drawn (overall first, then values by name)
MAX_ATTENTION_CLASSES = 4  # rows: the most often predicted classes
MAP_DECIMALS = 5  # summary.json keeps the mean maps to this many decimals


def _grid(run: dict) -> tuple:
    return tuple((run.get("attention") or {}).get("region_grid") or attention.DEFAULT_GRID)


def attention_section(output: str, run: dict) -> Optional[dict]:
    """Mean maps per (predicted class, slice value), the cell each peaks in, region findings."""
    rows = _read_rows(join(output, "attention_by_slice.parquet"))
    if not rows:
        return None
    grid = _grid(run)
    means = attention.mean_maps(rows)
    slices = sorted({name for name, _ in means}, key=lambda n: (n != attention.OVERALL, n))
    overall_n = {k: means[attention.OVERALL, k][1] for _, k in means
                 if (attention.OVERALL, k) in means}
    classes = sorted(overall_n, key=lambda k: (-overall_n[k], k))[:MAX_ATTENTION_CLASSES]
    names = (run.get("model") or {}).get("class_names") or []
    shown = slices[:MAX_ATTENTION_SLICES]
    maps = [{"slice": name, "predicted_class": k,
             "class_name": names[k] if 0 <= k < len(names) else str(k),
             "n": means[name, k][1],
             "peak_region": attention.attention_region(means[name, k][0], grid),
             "map": means[name, k][0].round(MAP_DECIMALS).tolist()}
            for k in sorted(classes) for name in shown if (name, k) in means]
    slice_columns = list((run.get("data") or {}).get("slice_columns") or [])
    counts = attention.region_counts(
        runinfo.iter_rows(runinfo.parquet_files(join(output, "attributions")),
                          ["attention_region", *slice_columns]), slice_columns)
    found = attention.region_findings(counts, grid)
    return {"method": (run.get("attention") or {}).get("method"), "grid": list(grid),
            "maps": maps, "slices_shown": len(shown), "slices": len(slices),
            "classes_shown": len(classes), "classes": len(overall_n),
            "region_findings": found,
            "findings": [attention.region_sentence(f) for f in found],
            "shift": attention.REGION_SHIFT, "min_examples": attention.REGION_MIN_EXAMPLES}


def _top(rows: Sequence[dict]) -> Optional[dict]:
    ranked = [r for r in rows if as_number(r["importance"]) is not None]
    return max(ranked, key=lambda r: (r["importance"], r["feature"])) if ranked else None


def _differs(rows: Sequence[dict], overall: Dict[str, dict]) -> Optional[str]:
    """Why a slice value's patch importances are worth their own picture, or None: another
    patch ranks first, or some patch's 95% interval does not overlap its overall interval."""
    top, overall_top = _top(rows), _top(list(overall.values()))
    if top and overall_top and top["feature"] != overall_top["feature"]:
        return f"{top['feature']} ranks first here, {overall_top['feature']} overall"
    for row in rows:
        other = overall.get(row["feature"])
        values = [as_number(v) for v in (row["ci_low"], row["ci_high"],
                                         other and other["ci_low"], other and other["ci_high"])]
        if None not in values and (values[0] > values[3] or values[1] < values[2]):
            return f"{row['feature']}'s interval does not overlap its overall interval"
    return None


def importance_by_slice(output: str, metric: str, overall_rows: Sequence[dict]) -> List[dict]:
    """The slice values whose patch importances differ from overall (``_differs``), by name."""
    rows = _read_rows(join(output, "importance_by_slice.parquet")) or []
    overall = {r["feature"]: r for r in overall_rows}
    overall_top = _top([r for r in overall_rows if r["feature"].startswith("patch_")])
    per_slice: Dict[str, List[dict]] = {}
    for row in rows:
        if row["metric"] == metric and row["feature"].startswith("patch_"):
            per_slice.setdefault(row["slice"], []).append(row)
    out = []
    for name in sorted(per_slice):
        why = _differs(per_slice[name], overall)
        grid = importance.patch_grid({r["feature"]: as_number(r["importance"])
                                      for r in per_slice[name]})
        if why and grid:
            top = _top(per_slice[name])
            here = {r["feature"]: r for r in per_slice[name]}
            out.append({"slice": name, "why": why, "top": top, "patch_grid": grid,
                        "n": top["n"] if top else None,
                        # this slice's figure for the patch that ranks first overall
                        "overall_top_here": here.get(overall_top["feature"]) if overall_top
                        else None})
    return out


def importance_slice_sentence(entry: dict, metric: str, overall_top: Optional[dict],
                              grid: tuple) -> Optional[str]:
    """A finding when another patch ranks first at a slice value than overall, clearly: at that
    slice value its importance lies above the 95% interval of the patch that ranks first
    overall (a near tie between two neighbouring patches is no finding)."""
    top, other = entry["top"], entry.get("overall_top_here")
    if not top or not overall_top or top["feature"] == overall_top["feature"]:
        return None
    value, high = as_number(top["importance"]), as_number(other and other["ci_high"])
    if value is None or high is None or value <= high:
        return None
    region = top["feature"][len("patch_"):]
    where = attention.region_words(region, grid)
    return (f"At {entry['slice']}, shuffling {top['feature']} ({where}) "
            f"costs the most {metric} ({top['importance']:.3f}, 95% interval "
            f"{top['ci_low']:.3f} to {top['ci_high']:.3f}, {top['n']} examples), while overall "
            f"{overall_top['feature']} does: worth checking what that region holds there.")

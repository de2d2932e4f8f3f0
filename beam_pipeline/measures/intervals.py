"""Intervals of the sampled quality figures: the faithfulness AUC means and the paired
differences to the random map, with Student-t 95% intervals. Pure NumPy / SciPy, no TensorFlow:
the launcher computes them from the attribution columns for run.json, the report shows them.
"""
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import stats


def mean_interval(values, level: float = 0.95) -> Tuple[float, float, float]:
    """(mean, low, high): the mean of the finite ``values`` and its Student-t interval at
    ``level`` (the faithfulness AUCs are a seeded sample; the interval says how far the sample
    mean may be from the dataset's). NaN bounds below two values, NaN everything with none."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(values.mean())
    if values.size < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, values.size - 1)
                 * values.std(ddof=1) / np.sqrt(values.size))
    return mean, mean - half, mean + half


def faithfulness_intervals(read_column: Callable[[str], Sequence], methods: Sequence[str],
                           level: float = 0.95) -> Dict[str, Dict[str, dict]]:
    """{method or "random": {"deletion_auc"|"insertion_auc": {value, ci_low, ci_high, n}}}:
    the sample means of the faithfulness columns (``METHOD_deletion_auc``, ...; nulls are the
    examples outside the sample) with their ``mean_interval``. Each method also gets
    ``deletion_auc_minus_random`` / ``insertion_auc_minus_random``: the mean paired difference
    to the random map on the same examples, whose interval says whether the method beats it.
    ``read_column(name)`` returns a column's values (None or NaN where absent)."""
    def column(name):
        return np.asarray(read_column(name), np.float64)  # None (not sampled) becomes NaN

    def figure(values):
        mean, low, high = mean_interval(values, level)
        return {"value": _finite_or_none(mean), "ci_low": _finite_or_none(low),
                "ci_high": _finite_or_none(high), "n": int(np.isfinite(values).sum())}

    random = {m: column(f"random_{m}") for m in ("deletion_auc", "insertion_auc")}
    out: Dict[str, Dict[str, dict]] = {"random": {m: figure(v) for m, v in random.items()}}
    for method in methods:
        for measure, reference in random.items():
            values = column(f"{method}_{measure}")
            out.setdefault(method, {})[measure] = figure(values)
            out[method][f"{measure}_minus_random"] = figure(values - reference)
    return out


def _finite_or_none(value: float) -> Optional[float]:
    return float(value) if np.isfinite(value) else None

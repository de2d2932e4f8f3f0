"""Permutation importance, per shard, with additive partial sums that combine exactly.

A *shard* is a group of examples a worker holds (at most ``--shard-size``). For each feature
(an image patch, a colour channel) and repeat, the feature's pixels are permuted between the
shard's examples and the model re-run. Each (shard, feature, repeat) yields, for the baseline and
the permuted predictions, sums that add across shards: example count, correct count, summed
log-loss, and fixed-bucket histograms of positive/negative scores (binary, or one-vs-rest per
class). Global accuracy, log-loss and AUC computed from the summed partials equal what one machine
computes from the same per-example predictions.

Pure NumPy plus a prediction function: no Beam here.
"""
import hashlib
import math
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import OptionError
from ..io.limits import MAX_PER_CLASS_METRICS
from ..evaluation.metric_rules import OVERALL  # noqa: F401 (the slice of all examples; importers use it)

METRICS = ("accuracy", "log_loss", "auc")
# Labeled examples importance runs on by default: a dataset-level estimate whose interval narrows
# as 1/sqrt(n), so past a few thousand examples more forward passes buy little.
DEFAULT_SAMPLE = 2000
AUC_BUCKETS = 1000  # score histogram resolution; AUC ties within a bucket count half
LOG_LOSS_EPS = 1e-7


@dataclass(frozen=True)
class Feature:
    """A block of input pixels permuted together: rows × cols × channels slices."""

    name: str
    rows: Tuple[int, int]
    cols: Tuple[int, int]
    channels: Optional[Tuple[int, int]] = None  # None: every channel

    def block(self, images: np.ndarray) -> tuple:
        c0, c1 = self.channels or (0, images.shape[-1])
        return (slice(None), slice(*self.rows), slice(*self.cols), slice(c0, c1))

    def write_permuted(self, work: np.ndarray, images: np.ndarray, order: np.ndarray) -> None:
        """In ``work`` (a copy of ``images``), example n's block becomes example order[n]'s.
        Only the block is copied, so a pass costs the block, not the whole shard."""
        block = self.block(images)
        work[block] = images[block][order]

    def restore(self, work: np.ndarray, images: np.ndarray) -> None:
        block = self.block(images)
        work[block] = images[block]

    def permute(self, images: np.ndarray, order: np.ndarray) -> np.ndarray:
        """A copy of ``images`` whose block comes from example ``order[n]`` for example n."""
        out = images.copy()
        self.write_permuted(out, images, order)
        return out


def region_name(row: int, col: int) -> str:
    """A cell of the patch grid: the attention_region values and the patch features' suffix."""
    return f"r{row}_c{col}"


def patch_name(row: int, col: int) -> str:
    return f"patch_{region_name(row, col)}"


_PATCH_NAME = re.compile(r"patch_r(\d+)_c(\d+)")


def patch_grid(importances: Dict[str, Optional[float]]) -> Optional[List[List[Optional[float]]]]:
    """The values of the patch features among ``importances`` ({feature: value}) laid out as the
    image grid, rows × columns (None for a missing cell); None when there are no patches."""
    cells = {}
    for feature, value in importances.items():
        match = _PATCH_NAME.fullmatch(feature)
        if match:
            cells[int(match.group(1)), int(match.group(2))] = value
    if not cells:
        return None
    height, width = max(r for r, _ in cells) + 1, max(c for _, c in cells) + 1
    return [[cells.get((r, c)) for c in range(width)] for r in range(height)]


def parse_features(text: str, height: int, width: int, channels: int) -> List[Feature]:
    """``patches:RxC``, ``channels`` (comma-separated), or ``none`` → features."""
    features: List[Feature] = []
    for part in [p.strip() for p in (text or "").split(",") if p.strip()]:
        if part == "none":
            continue
        grid = re.fullmatch(r"patches:(\d+)x(\d+)", part)
        if grid:
            n_rows, n_cols = int(grid.group(1)), int(grid.group(2))
            if not (1 <= n_rows <= height and 1 <= n_cols <= width):
                raise OptionError(
                    f"--permutation-features {part}: the grid must fit the {height}x{width} input."
                )
            for i in range(n_rows):
                for j in range(n_cols):
                    features.append(Feature(
                        patch_name(i, j),
                        (i * height // n_rows, (i + 1) * height // n_rows),
                        (j * width // n_cols, (j + 1) * width // n_cols),
                    ))
        elif part == "channels":
            features.extend(
                Feature(f"channel_{k}", (0, height), (0, width), (k, k + 1)) for k in range(channels)
            )
        else:
            raise OptionError(
                f"--permutation-features {part!r}: use patches:RxC (e.g. patches:4x4), channels, "
                "or none. Side inputs need a multi-input model, which this version does not audit."
            )
    names = [f.name for f in features]
    if len(set(names)) != len(names):
        raise OptionError("--permutation-features names the same feature twice.")
    return features


def parse_sample(value) -> Optional[int]:
    """``--importance-sample``: a positive number of labeled examples, or ``all`` (None)."""
    if str(value).strip().lower() == "all":
        return None
    try:
        size = int(str(value).strip())
    except ValueError:
        size = 0
    if size < 1:
        raise OptionError(
            f"--importance-sample {value}: give a number of labeled examples (1 or more, "
            f"{DEFAULT_SAMPLE} by default) or all. To skip permutation importance, use "
            "--permutation-features none.")
    return size


def permutation_seed(seed: int, shard: str, feature: str, repeat: int) -> int:
    """A seed from (--seed, shard, feature, repeat), the same on every run and runner."""
    digest = hashlib.sha256(f"{seed}|{shard}|{feature}|{repeat}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def shard_bucket(example_id: str, num_buckets: int) -> int:
    """A stable bucket for an example (Python's hash() differs between processes)."""
    digest = hashlib.sha256(example_id.encode()).digest()
    return int.from_bytes(digest[:8], "little") % num_buckets


def split_into_shards(bucket: int, examples: Sequence, shard_size: int, key=lambda e: e.example_id):
    """A bucket's examples, sorted by id, in shards of at most ``shard_size``: (shard id, list)."""
    ordered = sorted(examples, key=key)
    for start in range(0, len(ordered), shard_size):
        yield f"b{bucket:05d}-{start // shard_size:05d}", ordered[start:start + shard_size]


# --------------------------------------------------------------------------- partial sums


def metric_partials(probabilities: np.ndarray, labels: np.ndarray) -> Dict[str, object]:
    """Additive sums of one set of predictions: n, correct, log-loss sum, score histograms.

    Histograms are [classes, AUC_BUCKETS] of P(class c) for examples of class c (positives) and
    of other classes (negatives); a two-class model uses class 1 only (row 0 stays empty). Above
    MAX_PER_CLASS_METRICS classes there are none ([0, AUC_BUCKETS]: no AUC): 1,000 classes would
    carry 16 MB of histograms per permutation, and a macro AUC over classes that have one or two
    examples in a shard says little.
    """
    probabilities = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels, np.int64)
    n, classes = probabilities.shape
    # A permuted image can drive the model to NaN/inf: that prediction counts as wrong, at the
    # largest log-loss, and has no score for the AUC histograms.
    finite = np.isfinite(probabilities).all(axis=1)
    safe = np.where(finite[:, None], probabilities, 0.0)
    chosen = safe[np.arange(n), labels]
    buckets = np.clip((safe * AUC_BUCKETS).astype(np.int64), 0, AUC_BUCKETS - 1)
    rows = classes if classes <= MAX_PER_CLASS_METRICS else 0
    pos = np.zeros((rows, AUC_BUCKETS), np.int64)
    neg = np.zeros((rows, AUC_BUCKETS), np.int64)
    for c in ([1] if classes == 2 else range(rows)):
        is_pos = labels == c
        pos[c] = np.bincount(buckets[is_pos & finite, c], minlength=AUC_BUCKETS)
        neg[c] = np.bincount(buckets[~is_pos & finite, c], minlength=AUC_BUCKETS)
    return {
        "n": int(n),
        "correct": int(((safe.argmax(axis=1) == labels) & finite).sum()),
        "log_loss_sum": float(-np.log(np.clip(chosen, LOG_LOSS_EPS, 1.0)).sum()),
        "hist_pos": pos,
        "hist_neg": neg,
    }


def add_partials(a: Dict[str, object], b: Dict[str, object]) -> Dict[str, object]:
    return {key: a[key] + b[key] for key in a}


def _histogram_auc(pos: np.ndarray, neg: np.ndarray) -> Optional[float]:
    """P(score_pos > score_neg) with ties (same bucket) counted half."""
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return None
    neg_below = np.concatenate([[0], np.cumsum(neg)[:-1]])
    wins = (pos * neg_below).sum() + 0.5 * (pos * neg).sum()
    return float(wins / (n_pos * n_neg))


def metric_value(partials: Dict[str, object], metric: str) -> Optional[float]:
    """accuracy, log_loss (mean), or auc (binary; macro one-vs-rest over classes with both)."""
    n = partials["n"]
    if n == 0:
        return None
    if metric == "accuracy":
        return partials["correct"] / n
    if metric == "log_loss":
        return partials["log_loss_sum"] / n
    aucs = [_histogram_auc(p, q) for p, q in zip(partials["hist_pos"], partials["hist_neg"])]
    aucs = [a for a in aucs if a is not None]
    return float(np.mean(aucs)) if aucs else None


# --------------------------------------------------------------------------- one shard


def shard_importance(
    predict: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    labels: np.ndarray,
    features: Sequence[Feature],
    repeats: int,
    seed: int,
    shard: str,
    batch_size: int,
    baseline: Optional[np.ndarray] = None,
    slices: Optional[Sequence[Sequence[str]]] = None,
) -> List[dict]:
    """Raw importance rows of one shard: one per (feature, repeat), with the shard's partials.

    ``predict`` maps a batch of images to probabilities; it is called on chunks of at most
    ``batch_size`` so the permuted copies go through the same compiled function as predictions.
    ``slices`` (per example, its ``column=value`` names) adds rows with the partials of each
    slice value's examples under the same permutation (``slice`` key; ``overall`` otherwise):
    the values of one column add up to the overall partials exactly.
    """
    if baseline is None:
        baseline = predict_in_batches(predict, images, batch_size)
    # Examples the model itself answers with NaN/inf are non_finite_output error rows of the main
    # path; they are left out of the shard, as any other example that could not be audited.
    finite = np.isfinite(baseline).all(axis=1)
    if not finite.all():
        images, labels, baseline = images[finite], labels[finite], baseline[finite]
        slices = [s for s, keep in zip(slices, finite) if keep] if slices else None
    if not len(images):
        return []
    groups = slice_members(slices or [])
    base = metric_partials(baseline, labels)
    base_by_slice = {name: metric_partials(baseline[idx], labels[idx])
                     for name, idx in groups.items()}
    rows = []
    work = images.copy()  # one buffer: each pass rewrites and restores just its block
    for feature in features:
        for repeat in range(repeats):
            rng = np.random.default_rng(permutation_seed(seed, shard, feature.name, repeat))
            feature.write_permuted(work, images, rng.permutation(len(images)))
            permuted = predict_in_batches(predict, work, batch_size)
            feature.restore(work, images)
            rows.append({"shard": shard, "feature": feature.name, "repeat": repeat,
                         "slice": OVERALL, "baseline": base,
                         "permuted": metric_partials(permuted, labels)})
            rows += [{"shard": shard, "feature": feature.name, "repeat": repeat, "slice": name,
                      "baseline": base_by_slice[name],
                      "permuted": metric_partials(permuted[idx], labels[idx])}
                     for name, idx in groups.items()]
    return rows


def slice_members(slices: Sequence[Sequence[str]]) -> Dict[str, np.ndarray]:
    """{``column=value``: indices of the examples in it}, from each example's slice names."""
    members: Dict[str, List[int]] = {}
    for index, names in enumerate(slices):
        for name in names:
            members.setdefault(name, []).append(index)
    return {name: np.asarray(idx, np.int64) for name, idx in sorted(members.items())}


def predict_in_batches(predict, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([predict(images[i:i + batch_size])
                           for i in range(0, len(images), batch_size)])


# --------------------------------------------------------------------------- output rows


def importance_records(row: dict) -> List[dict]:
    """One raw row (shard, feature, repeat) → the Parquet rows, one per metric (DESIGN.md).

    Each carries the additive partials its metric is computed from (correct counts, log-loss
    sums, or score histograms), so the global figures can be recomputed from the file alone.
    """
    base, perm = row["baseline"], row["permuted"]
    records = []
    for metric in METRICS:
        record = {
            "shard": row["shard"],
            "feature": row["feature"],
            "repeat": int(row["repeat"]),
            "metric": metric,
            "baseline": metric_value(base, metric),
            "permuted": metric_value(perm, metric),
            "n": base["n"],
        }
        for prefix, partials in (("baseline", base), ("permuted", perm)):
            record[f"{prefix}_sum"] = (
                float(partials["correct"]) if metric == "accuracy"
                else partials["log_loss_sum"] if metric == "log_loss" else None
            )
            for hist in ("hist_pos", "hist_neg"):
                record[f"{prefix}_{hist}"] = (
                    partials[hist].ravel().tolist() if metric == "auc" else None
                )
        records.append(record)
    return records


def importance_of(metric: str, baseline: Optional[float], permuted: Optional[float]):
    """Positive = the feature matters: the drop in accuracy / AUC, the rise in log-loss."""
    if baseline is None or permuted is None:
        return None
    return permuted - baseline if metric == "log_loss" else baseline - permuted


def _t_975(dof: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, dof))


def add_row(per_repeat: Dict[int, Tuple[dict, dict]], row: dict) -> Dict[int, Tuple[dict, dict]]:
    """Add one raw row's partials into ``per_repeat`` ({repeat: (baseline, permuted) sums})."""
    if row["repeat"] in per_repeat:
        base, perm = per_repeat[row["repeat"]]
        per_repeat[row["repeat"]] = (add_partials(base, row["baseline"]),
                                     add_partials(perm, row["permuted"]))
    else:
        per_repeat[row["repeat"]] = (row["baseline"], row["permuted"])
    return per_repeat


def merge_repeats(accumulators: Iterable[Dict[int, Tuple[dict, dict]]]):
    merged: Dict[int, Tuple[dict, dict]] = {}
    for accumulator in accumulators:
        for repeat, (base, perm) in accumulator.items():
            add_row(merged, {"repeat": repeat, "baseline": base, "permuted": perm})
    return merged


def summary_of(feature: str, metric: str, per_repeat: Dict[int, Tuple[dict, dict]]) -> dict:
    """The global figures of one (feature, metric) from its per-repeat sums over all shards."""
    values = [importance_of(metric, metric_value(b, metric), metric_value(p, metric))
              for b, p in per_repeat.values()]
    values = [v for v in values if v is not None]
    n = next(iter(per_repeat.values()))[0]["n"]
    if not values:
        return {"feature": feature, "metric": metric, "importance": None, "std": None,
                "ci_low": None, "ci_high": None, "n": n}
    mean = float(np.mean(values))
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    half = _t_975(len(values) - 1) * std / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return {"feature": feature, "metric": metric, "importance": mean, "std": std,
            "ci_low": mean - half, "ci_high": mean + half, "n": n}

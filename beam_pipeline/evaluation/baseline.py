"""Baseline gates, on by default for labeled data (``--baseline-gates on|off``): the verdict never
says PASSED about a model that does not work, even when the user set no threshold.

* ``better_than_chance``: two classes: the overall AUC's 95% lower bound (Hanley-McNeil) is above
  0.5; more classes: accuracy's 95% lower bound (Wilson) is above the majority-class rate.
* ``not_degenerate``: with two or more classes among the labels, the model does not predict one
  class for (almost) every example, and its probabilities are not (almost) constant.

Pure functions on arrays of labels and probability vectors (``baseline_gates``); the job reads
those two columns of the written attributions (``read_labels_and_probabilities``).
"""
import math
from typing import List, Tuple

import numpy as np
import pyarrow as pa

Z95 = 1.959963984540054  # two-sided 95%
# "One class for almost every example": at least this share of the predictions ...
DOMINANT_PREDICTION_SHARE = 0.99
# ... while the labels hold at least this share of other classes (a dataset that is itself
# 99% one class is the better-than-chance gate's business).
MIN_OTHER_LABEL_SHARE = 0.05
# "Almost constant probabilities": no class's probability varies by more than this (std).
MIN_PROBABILITY_SPREAD = 1e-3
CAUSES = ("Check that the model is trained, that --preprocess matches the pixel range it was "
          "trained on (the model may rescale its input itself: try --preprocess none), and that "
          "the labels are in the model's class order (--class-names).")


def _gate(name: str, passed: bool, metric: str, value, bound, message: str,
          applied: bool = True) -> dict:
    return {"gate": name, "passed": passed, "slice": "overall", "metric": metric,
            "value": value, "bound": bound, "default": True, "applied": applied,
            "message": message}


def mann_whitney_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Exact AUC (ties count half) from average ranks; ``positive`` is a boolean mask."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2.0)[inverse]
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def hanley_mcneil_interval(auc: float, n_pos: int, n_neg: int) -> Tuple[float, float]:
    """95% interval of an AUC from its Hanley-McNeil (1982) standard error."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc)
                + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    se = math.sqrt(max(variance, 0.0))
    return max(0.0, auc - Z95 * se), min(1.0, auc + Z95 * se)


def wilson_interval(successes: int, n: int) -> Tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    p, z2 = successes / n, Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def better_than_chance(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """Binary: AUC lower bound > 0.5. Multiclass: accuracy lower bound > majority-class rate."""
    n, classes = len(labels), probabilities.shape[1]
    if classes == 2:
        positive = labels == 1
        n_pos = int(positive.sum())
        if n_pos in (0, n):
            return _gate("better_than_chance", True, "auc_lower_95", None, 0.5,
                         "Not applied: the labels hold one class only, so AUC is undefined.",
                         applied=False)
        auc = mann_whitney_auc(positive, probabilities[:, 1])
        low, high = hanley_mcneil_interval(auc, n_pos, n - n_pos)
        passed = low > 0.5
        text = (f"AUC is {auc:.3f} over {n} labeled examples (95% interval {low:.3f} to "
                f"{high:.3f}, Hanley-McNeil)")
        message = (f"{text}: better than chance (0.5)." if passed else
                   f"The model is not shown to be better than chance: {text}, and the lower "
                   f"bound must be above 0.5. {CAUSES}")
        return _gate("better_than_chance", passed, "auc_lower_95", low, 0.5, message)
    counts = np.bincount(labels, minlength=classes)
    majority = float(counts.max() / n)
    if majority == 1.0:  # no accuracy beats always naming the one class the labels hold
        return _gate("better_than_chance", True, "accuracy_lower_95", None, majority,
                     "Not applied: the labels hold one class only, so always predicting it is "
                     "already perfect.", applied=False)
    correct = int((probabilities.argmax(axis=1) == labels).sum())
    low, high = wilson_interval(correct, n)
    passed = low > majority
    text = (f"accuracy is {correct / n:.3f} over {n} labeled examples (95% interval {low:.3f} "
            f"to {high:.3f}, Wilson) against {majority:.3f} for always predicting the most "
            "frequent class")
    message = (f"Better than chance: {text}." if passed else
               f"The model is not shown to be better than chance: {text}; the lower bound must "
               f"be above that rate. {CAUSES}")
    return _gate("better_than_chance", passed, "accuracy_lower_95", low, majority, message)


def not_degenerate(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """One class predicted for (almost) every example, or (almost) constant probabilities."""
    n, classes = len(labels), probabilities.shape[1]
    if len(np.unique(labels)) < 2:
        return _gate("not_degenerate", True, "predicted_class_share", None,
                     DOMINANT_PREDICTION_SHARE,
                     "Not applied: the labels hold one class only.", applied=False)
    predicted = np.bincount(probabilities.argmax(axis=1), minlength=classes)
    top = int(predicted.argmax())
    share = float(predicted[top] / n)
    label_share = float((labels == top).sum() / n)
    spread = float(probabilities.std(axis=0).max())
    if spread < MIN_PROBABILITY_SPREAD:
        return _gate("not_degenerate", False, "probability_spread", spread,
                     MIN_PROBABILITY_SPREAD,
                     f"The model's probabilities are almost constant: no class's probability "
                     f"varies by more than {spread:.2g} (standard deviation) over {n} examples, "
                     f"so it does not look at the images. {CAUSES}")
    if share >= DOMINANT_PREDICTION_SHARE and 1 - label_share >= MIN_OTHER_LABEL_SHARE:
        return _gate("not_degenerate", False, "predicted_class_share", share,
                     DOMINANT_PREDICTION_SHARE,
                     f"The model predicts class {top} for {share:.1%} of the {n} examples, "
                     f"while {1 - label_share:.1%} of the labels are other classes. {CAUSES}")
    return _gate("not_degenerate", True, "predicted_class_share", share,
                 DOMINANT_PREDICTION_SHARE,
                 f"The model predicts at most {share:.1%} of the examples as one class and its "
                 f"probabilities vary (standard deviation up to {spread:.3f}).")


def baseline_gates(labels: np.ndarray, probabilities: np.ndarray) -> List[dict]:
    """Both baseline gates on the labeled examples (none when there are none)."""
    if not len(labels):
        return []
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    return [better_than_chance(labels, probabilities), not_degenerate(labels, probabilities)]


def read_labels_and_probabilities(folder: str) -> Tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities as an n×k array) of the labeled rows of an attributions folder;
    reads those two columns only."""
    from ..io import runinfo

    labels = runinfo.read_column(folder, "label")
    vectors = runinfo.read_column(folder, "probabilities")
    if not len(labels):
        return np.zeros(0, np.int64), np.zeros((0, 2))
    labels = pa.concat_arrays(labels.chunks)
    vectors = pa.concat_arrays(vectors.chunks)
    keep = labels.is_valid()
    labels, vectors = labels.filter(keep), vectors.filter(keep)
    if not len(labels):
        return np.zeros(0, np.int64), np.zeros((0, 2))
    flat = vectors.flatten().to_numpy(zero_copy_only=False)
    return labels.to_numpy(zero_copy_only=False).astype(np.int64), flat.reshape(len(labels), -1)


def verdict_scope(enabled: bool, labeled: bool, thresholds: bool) -> dict:
    """What a PASSED verdict certifies (run.json ``verdict_scope``; the report prints
    ``statement`` in the verdict box)."""
    baseline = "on" if enabled and labeled else ("off" if labeled else "not applicable")
    checked = {"on": "the default baseline gates (better than chance, not degenerate) and the "
                     "error rate",
               "off": "the error rate (--baseline-gates off: no baseline gate)",
               "not applicable": "the error rate (the data has no labels: no baseline gate)"}
    if thresholds:
        statement = (f"Checked: the performance thresholds set for this run, {checked[baseline]}.")
    else:
        statement = (f"No performance threshold was set (no thresholds in the TFMA config, no "
                     f"--max-slice-gap): only {checked[baseline]} were checked. A pass "
                     "certifies no level of performance.")
    return {"baseline_gates": baseline, "performance_thresholds": thresholds,
            "statement": statement}

"""Bounds that keep the default audit's cost independent of the number of classes.

A model with hundreds of classes would otherwise get one metric set per class from TFMA's default
multiclass config and one AUC histogram per class per permutation from permutation importance
(1,000 classes: gigabytes and minutes for a handful of images). Above the bound both switch to
figures whose size does not grow with the classes; run.json, the log and the README say so.
"""

# Per-class figures (TFMA one-vs-rest metrics, permutation-importance AUC) for at most this many
# classes. Above it TFMA's default config uses micro-averaged and top-k metrics, and permutation
# importance reports accuracy and log-loss only.
MAX_PER_CLASS_METRICS = 20


def per_class_note(num_classes: int) -> str:
    """What the run measures per class, in words for the log and run.json."""
    if num_classes <= MAX_PER_CLASS_METRICS:
        return f"per-class metrics for all {num_classes} classes"
    return (f"{num_classes} classes is above {MAX_PER_CLASS_METRICS}: no per-class metrics; TFMA's "
            "default config reports micro-averaged one-vs-rest AUC/precision/recall and top-k, and "
            "permutation importance reports accuracy and log-loss (no AUC)")

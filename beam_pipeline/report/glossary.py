"""The report's glossary: one sentence per metric the page shows, saying what it measures and
what a good value looks like. ``GLOSSARY`` is the one dictionary of metric explanations;
``glossary(summary)`` lists the entries of the metrics a given report shows, in page order.
Also the calibration range the report flags (``CALIBRATION_RANGE``), used by its finding."""
from typing import Dict, List, Optional

# Calibration (mean prediction / mean label) outside this range is pointed out in the findings:
# the model predicts the positive class a quarter more, or a fifth less, often than it occurs.
CALIBRATION_RANGE = (0.8, 1.25)

GLOSSARY: Dict[str, str] = {
    "examples": "Examples in the slice (audited ones for the figures from the attributions).",
    "example_count": "Examples TFMA evaluated in the slice.",
    "auc": "Area under the ROC curve: the chance that a random positive example scores above a "
           "random negative one; 0.5 is guessing, 1 is perfect, good is usually above 0.9.",
    "auc_precision_recall": "Area under the precision-recall curve: average precision over all "
                            "thresholds; the share of positives is what guessing gets, 1 is "
                            "perfect; more telling than AUC when positives are rare.",
    "binary_accuracy": "Share of examples whose thresholded prediction (at 0.5) equals the label; "
                       "1 is perfect; compare with the share of the larger class, which a "
                       "constant guess gets.",
    "accuracy": "Share of examples predicted as their label; 1 is perfect; compare with the "
                "share of the largest class, which a constant guess gets.",
    "precision": "Of the examples predicted positive, the share that are positive; 1 is perfect.",
    "recall": "Of the positive examples, the share predicted positive; 1 is perfect.",
    "calibration": "Mean prediction divided by mean label: 1 means the model predicts the "
                   "positive class as often as it occurs; the report flags values outside "
                   f"{CALIBRATION_RANGE[0]}–{CALIBRATION_RANGE[1]}.",
    "mean_label": "Share of positive labels in the slice (the base rate); no good or bad value.",
    "mean_prediction": "Mean predicted probability of the positive class; close to the mean "
                       "label is good.",
    "loss": "The model's loss on the slice; lower is better.",
    "log_loss": "Cross-entropy of the predicted probabilities against the labels; 0 is perfect, "
                "lower is better; it punishes confident mistakes most.",
    "mask energy": "Share of the map's total mass that falls on the annotated mask; higher "
                   "means attention on the annotated region.",
    "lift": "Mask energy divided by the mask's share of the image: 1× is what a map spread "
            "evenly would give, above 1 means attention on the mask, below 1 means elsewhere.",
    "pointing game": "Share of maps whose maximum lies on the mask; higher is better.",
    "IoU": "Overlap (intersection over union) of the map's top region with the mask, 0 to 1; "
           "higher is better.",
    "deletion AUC": "The explained class's probability, averaged while the map's top pixels are "
                    "removed; lower means the map points at what the model uses.",
    "insertion AUC": "The explained class's probability, averaged while the map's top pixels are "
                     "revealed; higher means the map points at what the model uses.",
    "Spearman ρ (sanity check)": "Rank correlation between the maps of the trained and of a "
                                 "partly randomized model; low is good (the maps depend on what "
                                 "the model learned); above 0.5 is flagged.",
    "permutation importance": "Loss in the named metric when a region or channel is shuffled "
                              "between examples; higher means the model relies on it; an "
                              "interval that includes 0 means no measurable reliance.",
    "confidence": "The model's probability for its predicted class, 0 to 1.",
}
SUB_KEYS = {"topK": "counting the top {} predicted classes",
            "classId": "for class {} against the rest", "k": "for the {}-th class"}
UNKNOWN = "Reported by TFMA under this name (see the TFMA metrics documentation); no " \
          "explanation is built in."


def explain(name: str) -> str:
    """The sentence for a metric name, TFMA sub-keys (``precision[topK:1]``) included."""
    if name in GLOSSARY:
        return GLOSSARY[name]
    base, _, sub_key = name.partition("[")
    text = GLOSSARY.get(base, UNKNOWN)
    if sub_key:
        key, _, value = sub_key.rstrip("]").partition(":")
        text += f" Here {SUB_KEYS[key].format(value)}." if key in SUB_KEYS else ""
    return text


def shown_metrics(summary: dict) -> List[str]:
    """Every metric name the report shows, in page order, each once."""
    names: List[str] = []
    metrics = summary.get("metrics")
    if metrics:
        names += ["examples"] + [n for n in metrics["columns"] if n != "example_count"]
    if summary.get("galleries"):
        names += ["confidence"] + (["lift"] if summary.get("localization") else [])
    if summary.get("localization"):
        names += ["mask energy", "lift", "pointing game", "IoU"]
    importance = summary.get("importance")
    if importance:
        names += ["permutation importance", importance["metric"], *importance["metrics"]]
    if summary.get("faithfulness"):
        names += ["deletion AUC", "insertion AUC"]
    if summary.get("sanity"):
        names.append("Spearman ρ (sanity check)")
    return list(dict.fromkeys(names))


def glossary(summary: dict) -> List[dict]:
    """[{"name", "text"}] for every metric the report shows."""
    return [{"name": name, "text": explain(name)} for name in shown_metrics(summary)]


def calibration_off(value: Optional[float]) -> bool:
    low, high = CALIBRATION_RANGE
    return value is not None and not low <= value <= high

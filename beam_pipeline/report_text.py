"""The report's words: findings generated from the figures (worst slice, where attention misses
the annotated region, what matters most, failed sanity checks, failed examples), method notes
and limitations, and the one-line notes of sections that have no input."""
import math
from typing import Dict, List, Optional

from .report_glossary import CALIBRATION_RANGE, calibration_off
from .report_summary import METHOD_NAMES, as_number

def pct(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if 0 < value < 0.1 else f"{100 * value:.0f}%"


def _metric_findings(metrics: Optional[dict]) -> List[str]:
    out = []
    for group in (metrics or {}).get("by_column", []):
        gap = group["gaps"].get(metrics["primary"])
        if group["derived"] or not gap or gap["gap"] <= 0:
            continue
        out.append(f"{gap['worst']} does worst: {metrics['primary']} {gap['worst_value']:.3f} "
                   f"against {gap['best_value']:.3f} at {gap['best']} (a gap of "
                   f"{gap['gap']:.3f}).")
    return out


def _worst_localized(loc: Optional[dict], method: str) -> Optional[tuple]:
    """(worst slice row, best slice row) by pointing-game rate, among data slices."""
    rows = [r for r in (loc or {}).get("rows", [])
            if r["slice"] != "overall" and r[method]["pointing_hit"] is not None]
    if len(rows) < 2:
        return None
    rows.sort(key=lambda r: (r[method]["pointing_hit"], r["slice"]))
    return rows[0], rows[-1]


def _localization_finding(loc: Optional[dict], method: str) -> Optional[str]:
    pair = _worst_localized(loc, method)
    if not pair:
        return None
    worst, best = pair
    w, b = worst[method], best[method]
    if w["pointing_hit"] >= 0.5 * b["pointing_hit"] and (w["energy_lift"] or 1) >= 1:
        return (f"{METHOD_NAMES.get(method, method)} finds the annotated region about equally "
                f"well on every slice ({pct(w['pointing_hit'])} to {pct(b['pointing_hit'])} "
                "of maps peak on the mask).")
    lift, best_lift = w["energy_lift"], b["energy_lift"]
    spread = "" if lift is None or best_lift is None else (
        f"; its share of the map on the mask is {lift:.2f}× the mask's share of the image "
        f"(against {best_lift:.2f}×" + (", less than a map spread evenly" if lift < 1 else "")
        + ")")
    return (f"On {worst['slice']}, {METHOD_NAMES.get(method, method)}'s peak lies on the "
            f"annotated region in {pct(w['pointing_hit'])} of the examples with a mask, against "
            f"{pct(b['pointing_hit'])} on {best['slice']}{spread}.")


def findings(summary: dict) -> List[str]:
    """Plain sentences from the figures: worst slice, where attention misses, what matters."""
    out = _metric_findings(summary.get("metrics"))
    methods = summary["identity"]["methods"] or ["gradcam"]
    loc = summary.get("localization")
    sentence = _localization_finding(loc, methods[0])
    if sentence:
        out.append(sentence)
    pair = _worst_localized(loc, methods[0])
    metric_worst = [g["gaps"][summary["metrics"]["primary"]]["worst"]
                    for g in (summary.get("metrics") or {}).get("by_column", [])
                    if not g["derived"] and summary["metrics"]["primary"] in g["gaps"]]
    if pair and pair[0]["slice"] in metric_worst and \
            pair[0][methods[0]]["pointing_hit"] < 0.5 * pair[1][methods[0]]["pointing_hit"]:
        out.append(f"{pair[0]['slice']} is both where the model does worst and where its "
                   "attention misses the annotated region: it likely relies on something else "
                   "there (a shortcut). The galleries below show what it looks at instead.")
    imp = summary.get("importance")
    if imp and imp["features"]:
        top = [f"{r['feature']} ({as_number(r['importance']):.3f})" for r in imp["features"][:3]]
        out.append(f"Shuffling {top[0]} costs the most {imp['metric']}; then "
                   f"{', '.join(top[1:])}.")
    for method, result in ((summary.get("sanity") or {}).get("verdicts") or {}).items():
        if result["flagged"]:
            out.append(result["statement"])
    acc = summary["accounting"]
    if acc["examples_failed"]:
        kinds = ", ".join(f"{n} {t}" for t, n in acc["errors_by_type"].items())
        out.append(f"{acc['examples_failed']} of {acc['examples_in']} examples could not be "
                   f"audited ({kinds}).")
    out += calibration_findings(summary.get("metrics"))
    return out


METHOD_NOTES = {
    "gradcam": "Grad-CAM shows where, at one convolutional layer, a small change would most "
               "raise the explained class's score: sensitivity-based localization at the "
               "layer's coarse resolution, not a causal account of the decision.",
    "cam": "CAM weighs the last feature maps by the classifier's weights: exact for a global "
           "average pooling head, coarse, and like Grad-CAM it shows association, not cause.",
    "saliency": "Saliency is the gradient at the input: noisy, and sensitive to small "
                "perturbations; it says where the score is locally sensitive.",
    "smoothgrad": "SmoothGrad averages gradients over noisy copies: less noisy than saliency, "
                  "but its picture depends on the noise level chosen.",
    "integrated_gradients": "Integrated Gradients attributes the score difference to a "
                            "baseline image; the result depends on that baseline "
                            "(ig_completeness_gap measures how well it adds up).",
}
GENERAL_NOTES = (
    "Permutation importance shuffles one region or channel between examples and measures the "
    "loss in quality; shuffling breaks correlations between regions, so correlated regions can "
    "share or hide each other's importance, and shuffled images are unlike real ones.",
    "Localization figures compare maps with the annotated masks: a low figure says the map is "
    "elsewhere, not why. Slices with few examples give noisy figures.",
    "Faithfulness (deletion/insertion) and the sanity check run on a seeded sample of "
    "examples; they test the explanation method, not the model.",
)


def method_notes(methods) -> List[str]:
    return [METHOD_NOTES[m] for m in methods if m in METHOD_NOTES] + list(GENERAL_NOTES)


def omitted_notes(run: dict, summary: dict) -> Dict[str, str]:
    """One line per section that has no input, saying why and how to get it."""
    notes = {}
    tfma = run.get("tfma") or {}
    if not summary.get("metrics"):
        reason = tfma.get("skipped_because") or tfma.get("error") or "no TFMA metrics in run.json"
        notes["metrics"] = f"Sliced metrics were not computed: {reason}."
    if not summary.get("galleries"):
        notes["galleries"] = "No examples were audited, so there is nothing to show."
    if not summary.get("localization"):
        notes["localization"] = ("Localization was not measured: the data has no ground-truth "
                                 "masks (--mask-column).")
    if not summary.get("layer_sweep"):
        notes["layer_sweep"] = ("No layer sweep: run with --layer all (or a comma list of "
                                "layers) to see how attention changes with depth.")
    if not summary.get("importance"):
        reason = (run.get("importance") or {}).get("skipped_because") or "no importance summary"
        notes["importance"] = f"Permutation importance was not computed: {reason}."
    if not summary.get("faithfulness"):
        notes["faithfulness"] = "Faithfulness was not measured (--faithfulness-sample 0)."
    if not summary.get("sanity"):
        notes["sanity"] = "The sanity check was not run (--sanity-sample 0)."
    return notes


def calibration_findings(metrics: Optional[dict], limit: int = 3) -> List[str]:
    """One sentence when calibration (mean prediction / mean label) is outside
    CALIBRATION_RANGE overall or on data slices: the farthest from 1 first."""
    rows = [(metrics or {}).get("overall")] + [
        r for g in (metrics or {}).get("by_column", []) if not g["derived"] for r in g["slices"]]
    off = [(r["slice"], r["metrics"]["calibration"]["value"]) for r in rows
           if r and (r["metrics"].get("calibration") or {}).get("value") is not None
           and calibration_off(r["metrics"]["calibration"]["value"])]
    if not off:
        return []
    off.sort(key=lambda pair: (-abs(math.log(pair[1])) if pair[1] > 0 else -math.inf, pair[0]))
    listed = "; ".join(f"{value:.2f} on {name}" for name, value in off[:limit])
    more = f" and {len(off) - limit} more slices" if len(off) > limit else ""
    return [f"Calibration (mean prediction / mean label, 1 is ideal) is outside "
            f"{CALIBRATION_RANGE[0]}–{CALIBRATION_RANGE[1]}: {listed}{more}. Above 1 the model "
            "predicts the positive class more often than it occurs, below 1 less often; its "
            "probabilities should not be read as rates there."]


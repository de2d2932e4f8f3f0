"""The report's words: findings generated from the figures (worst slice, where attention misses
the annotated region, what matters most, failed sanity checks, failed examples), method notes
and limitations, the one-line notes of sections that have no input, and ``visible_controls``,
which every value shown in the HTML passes through."""
import math
import re
from typing import Dict, List, Optional

from .glossary import CALIBRATION_RANGE, calibration_off
from ..explain import registry as method_registry
from .summary import METHOD_NAMES, as_number

# Unicode bidirectional controls (embeddings, overrides, isolates, marks): in an id, path or slice
# value they make text display in another order than it is written (``exe.png`` shown for
# ``gnp.exe``), so the report shows each as a visible code instead of obeying it.
_BIDI_CONTROLS = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def visible_controls(value):
    """``value`` with every bidi control shown as ``[U+202E]``; other values unchanged. HTML-safe
    text (Markup) stays HTML-safe: the replacement holds no markup characters."""
    if not isinstance(value, str) or not _BIDI_CONTROLS.search(value):
        return value
    shown = _BIDI_CONTROLS.sub(lambda m: f"[U+{ord(m.group()):04X}]", str(value))
    return type(value)(shown) if type(value) is not str else shown

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


# Below this pointing-game rate on every slice, a method localizes nowhere: no slice is singled
# out as "missing the mask" (with every rate near 0, the lowest is noise, not a finding).
LOCALIZES_NOWHERE = 0.2
# A slice is singled out when its pointing-game rate is below this share of the best slice's.
SINGLED_OUT = 0.5


def _localization_rows(loc: Optional[dict], method: str) -> List[dict]:
    """The data-slice rows of the localization table with a pointing-game rate for ``method``."""
    return [r for r in (loc or {}).get("rows", [])
            if r["slice"] != "overall" and r[method]["pointing_hit"] is not None]


def _worst_localized(loc: Optional[dict], method: str) -> Optional[dict]:
    """By the pointing-game rate (the measure the sentence states), over the localization
    table's data-slice rows: {"kind": "nowhere" | "even" | "worst", "worst": [rows tied at the
    lowest rate], "best": the row with the highest rate}; None with fewer than two slices."""
    rows = _localization_rows(loc, method)
    if len(rows) < 2:
        return None
    rows.sort(key=lambda r: (r[method]["pointing_hit"], r["slice"]))
    low, high = rows[0][method]["pointing_hit"], rows[-1][method]["pointing_hit"]
    worst = [r for r in rows if r[method]["pointing_hit"] == low]
    if high < LOCALIZES_NOWHERE:
        kind = "nowhere"
    elif low >= SINGLED_OUT * high:
        kind = "even"
    else:
        kind = "worst"
    return {"kind": kind, "worst": worst, "best": rows[-1]}


def _names(methods) -> str:
    names = [METHOD_NAMES.get(m, m) for m in methods]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _localization_nowhere(loc: Optional[dict], methods) -> Optional[str]:
    """One sentence for the methods whose maps peak on the mask rarely on every slice."""
    nowhere = [m for m in methods if (_worst_localized(loc, m) or {}).get("kind") == "nowhere"]
    if not nowhere:
        return None
    rates = [r[m]["pointing_hit"] for m in nowhere for r in _localization_rows(loc, m)]
    verb = "peaks" if len(nowhere) == 1 else "peak"
    return (f"{_names(nowhere)} {verb} on the annotated region in at most {pct(max(rates))} of the "
            f"examples with a mask on any slice ({pct(min(rates))} to {pct(max(rates))}, pointing "
            "game, localization table): these maps do not find the region anywhere, so no slice "
            "is singled out by them.")


def _localization_finding(loc: Optional[dict], method: str) -> Optional[str]:
    """The slice(s) where ``method`` misses the mask, or that it finds it evenly (the methods
    that find it nowhere are grouped by ``_localization_nowhere``)."""
    found = _worst_localized(loc, method)
    if not found or found["kind"] == "nowhere":
        return None
    name = METHOD_NAMES.get(method, method)
    best = found["best"]
    low, high = found["worst"][0][method]["pointing_hit"], best[method]["pointing_hit"]
    if found["kind"] == "even":
        return (f"{name} finds the annotated region about equally well on every slice "
                f"({pct(low)} to {pct(high)} of maps peak on the mask, pointing game).")
    names = " and ".join(r["slice"] for r in found["worst"])
    w = found["worst"][0][method]
    lift, best_lift = w["energy_lift"], best[method]["energy_lift"]
    spread = "" if lift is None or best_lift is None else (
        f"; its share of the map on the mask is {lift:.2f}× the mask's share of the image "
        f"(against {best_lift:.2f}×" + (", less than a map spread evenly" if lift < 1 else "")
        + ")")
    return (f"On {names}, {name}'s peak lies on the annotated region in {pct(low)} of the "
            f"examples with a mask (the lowest pointing-game rate), against {pct(high)} on "
            f"{best['slice']}{spread}.")


def _shortcut_finding(summary: dict, methods) -> Optional[str]:
    """The slice that is both the worst by the primary metric and singled out as missing the
    mask: named only when the two tables agree on the same single slice, with the methods whose
    localization finding names it."""
    metrics = summary.get("metrics") or {}
    metric_worst = {g["gaps"][metrics["primary"]]["worst"] for g in metrics.get("by_column", [])
                    if not g["derived"] and metrics["primary"] in g["gaps"]}
    agreeing: Dict[str, list] = {}
    for method in methods:
        found = _worst_localized(summary.get("localization"), method)
        if found and found["kind"] == "worst" and len(found["worst"]) == 1 \
                and found["worst"][0]["slice"] in metric_worst:
            agreeing.setdefault(found["worst"][0]["slice"], []).append(method)
    if not agreeing:
        return None
    slice_name, named = max(agreeing.items(), key=lambda kv: len(kv[1]))
    return (f"{slice_name} is both where the model does worst ({metrics['primary']}, metrics "
            f"table) and where the attention of {_names(named)} misses the annotated region "
            "(pointing game, localization table): it likely relies on something else there (a "
            "shortcut). The galleries below show what it looks at instead.")


def _faithfulness_findings(faith: Optional[dict]) -> List[str]:
    """Each method against the random map on the same examples (faithfulness table)."""
    if not faith or not faith.get("reference"):
        return []
    ref, out = faith["reference"], []
    beat = [r for r in faith["rows"] if r["beats_random"] == "both"]
    for row in faith["rows"]:
        if row["beats_random"] in (None, "both"):
            continue
        verdict = ("is no more faithful than a random map on either measure"
                   if row["beats_random"] == "neither"
                   else f"beats a random map on {row['beats_random']} only")
        out.append(f"{METHOD_NAMES.get(row['method'], row['method'])} {verdict}: deletion AUC "
                   f"{row['deletion_auc']:.3f} against {ref['deletion_auc']:.3f}, insertion "
                   f"{row['insertion_auc']:.3f} against {ref['insertion_auc']:.3f} for the random "
                   f"map on the same {ref['n']} examples (lower deletion and higher insertion "
                   "are better).")
    if beat:
        names = ", ".join(METHOD_NAMES.get(r["method"], r["method"]) for r in beat)
        out.append(f"{names} {'beats' if len(beat) == 1 else 'beat'} a random map on both "
                   f"faithfulness measures (random map: deletion {ref['deletion_auc']:.3f}, "
                   f"insertion {ref['insertion_auc']:.3f}; faithfulness table).")
    return out


def findings(summary: dict) -> List[str]:
    """Plain sentences from the figures, each from the table or chart the page shows
    (README, "Findings and where they come from")."""
    out = _metric_findings(summary.get("metrics"))
    methods = summary["identity"]["methods"] or ["gradcam"]
    loc = summary.get("localization")
    sentences = [_localization_nowhere(loc, methods)]
    sentences += [_localization_finding(loc, method) for method in methods]
    sentences.append(_shortcut_finding(summary, methods))
    out += [s for s in sentences if s]
    imp = summary.get("importance")
    if imp and imp["features"]:
        top = [f"{r['feature']} ({as_number(r['importance']):.3f})" for r in imp["features"][:3]]
        out.append(f"Shuffling {top[0]} costs the most {imp['metric']}; then "
                   f"{', '.join(top[1:])}.")
    out += (summary.get("attention") or {}).get("findings") or []
    out += (imp or {}).get("slice_findings") or []
    out += _faithfulness_findings(summary.get("faithfulness"))
    for method, result in ((summary.get("sanity") or {}).get("verdicts") or {}).items():
        if result["flagged"] or not result.get("judged", True):
            out.append(result["statement"])
    acc = summary["accounting"]
    if acc["examples_failed"]:
        kinds = ", ".join(f"{n} {t}" for t, n in acc["errors_by_type"].items())
        out.append(f"{acc['examples_failed']} of {acc['examples_in']} examples could not be "
                   f"audited ({kinds}).")
    out += calibration_findings(summary.get("metrics"))
    return out


METHOD_NOTES = method_registry.notes()
GENERAL_NOTES = (
    "Permutation importance shuffles one region or channel between examples and measures the "
    "loss in quality; shuffling breaks correlations between regions, so correlated regions can "
    "share or hide each other's importance, and shuffled images are unlike real ones.",
    "Localization figures compare maps with the annotated masks: a low figure says the map is "
    "elsewhere, not why. Slices with few examples give noisy figures.",
    "Faithfulness (deletion/insertion) and the sanity check run on a seeded sample of "
    "examples; they test the explanation method, not the model.",
)


def importance_sample_sentence(sample: Optional[dict]) -> Optional[str]:
    """What permutation importance was estimated on (run.json importance.sample)."""
    if not sample:
        return None
    used, labeled = sample.get("examples"), sample.get("labeled_examples")
    of = f" of {labeled:,}" if labeled is not None else ""
    if sample.get("requested") == "all":
        return f"Estimated on every labeled example ({used:,}{of})."
    return (f"Estimated on {used:,}{of} labeled examples, seeded (--seed {sample.get('seed')}: "
            f"the examples with the smallest hash of seed and id; --importance-sample "
            f"{sample.get('requested')}). The interval narrows as one over the square root of "
            "the sample size; --importance-sample all uses every labeled example.")


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
    if not summary.get("attention"):
        notes["attention"] = "No attention_by_slice.parquet: no example was audited with a map."
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


"""The report's sections on the explanations themselves: localization against the masks,
faithfulness against a random map, the sanity check (model randomization), the layer sweep and
permutation importance. Read from the scan's ``SliceStats`` and the small Parquet outputs.
"""
from typing import Dict, List, Optional

from ..measures import importance, results
from ..io import layout
from ..explain import registry as method_registry
from ..evaluation.metric_rules import OVERALL
from ..io.paths import join
from .metrics import MAX_SLICE_ROWS
from .scan import SliceStats, as_number, worst_slices
from ..io.runinfo import read_rows

METHOD_NAMES = method_registry.display_names()


def localization(stats: Dict[str, SliceStats], run: dict) -> Optional[dict]:
    """Per method, overall and per data slice: mask energy, its lift over the mask's area,
    pointing-game rate, IoU. None without masks."""
    if not run.get("data", {}).get("has_masks") or OVERALL not in stats:
        return None  # no masks, or nothing audited
    methods = run.get("model", {}).get("methods") or ["gradcam"]
    slice_columns = list(run.get("data", {}).get("slice_columns") or [])
    rows = []
    for name in [OVERALL, *sorted(worst_slices(stats, slice_columns, MAX_SLICE_ROWS))]:
        figures = stats[name].as_dict(methods)
        if figures["with_mask"]:
            rows.append({"slice": name, **figures})
    return {"methods": methods, "rows": rows} if rows else None


def faithfulness(stats: Dict[str, SliceStats], run: dict) -> Optional[dict]:
    """Per method, mean deletion / insertion AUC over the sampled examples, beside the same
    measures for a seeded random map on the same examples (``reference``), and the sample size
    asked for against the one used."""
    if OVERALL not in stats:
        return None
    methods = run.get("model", {}).get("methods") or ["gradcam"]
    overall = stats[OVERALL]
    figures = overall.as_dict(methods)
    rows = [{"method": m, "deletion_auc": figures[m]["deletion_auc"],
             "insertion_auc": figures[m]["insertion_auc"], "n": figures[m]["faithfulness_n"]}
            for m in methods if figures[m]["faithfulness_n"]]
    if not rows:
        return None
    reference = None
    if overall.counts.get("random_deletion_auc"):
        reference = {"method": "random", "deletion_auc": overall.mean("random_deletion_auc"),
                     "insertion_auc": overall.mean("random_insertion_auc"),
                     "n": overall.counts["random_deletion_auc"]}
    intervals = (run.get("quality") or {}).get("faithfulness") or {}
    for row in [*rows, *([reference] if reference else [])]:
        for measure in ("deletion_auc", "insertion_auc"):  # run_manifest: faithfulness_intervals
            figure = (intervals.get(row["method"]) or {}).get(measure) or {}
            if figure.get("ci_low") is not None:
                row[f"{measure}_ci"] = (figure["ci_low"], figure["ci_high"])
    for row in rows:
        row["beats_random"] = _beats_random(row, reference, intervals.get(row["method"]))
    requested = (run.get("options") or {}).get("faithfulness_sample")
    used = max(r["n"] for r in rows)
    return {"rows": rows, "reference": reference, "requested": requested, "used": used,
            "sample_note": sample_note("--faithfulness-sample", requested, used,
                                       (run.get("counts") or {}))}


def _beats_random(row: dict, reference: Optional[dict],
                  paired: Optional[dict] = None) -> Optional[str]:
    """"both", "deletion", "insertion" or "neither": where the method's map is more faithful
    than the random map (lower deletion, higher insertion AUC); None without a reference. With
    the paired differences' 95% intervals (``intervals.faithfulness_intervals``), only where the
    interval excludes 0: a difference within the sampling noise is no evidence."""
    if not reference or None in (row["deletion_auc"], row["insertion_auc"],
                                 reference["deletion_auc"], reference["insertion_auc"]):
        return None
    deletion = row["deletion_auc"] < reference["deletion_auc"]
    insertion = row["insertion_auc"] > reference["insertion_auc"]
    paired = paired or {}
    if (paired.get("deletion_auc_minus_random") or {}).get("ci_high") is not None:
        deletion = paired["deletion_auc_minus_random"]["ci_high"] < 0
    if (paired.get("insertion_auc_minus_random") or {}).get("ci_low") is not None:
        insertion = paired["insertion_auc_minus_random"]["ci_low"] > 0
    return {(True, True): "both", (True, False): "deletion", (False, True): "insertion",
            (False, False): "neither"}[(deletion, insertion)]


def sample_note(option: str, requested: Optional[int], used: int, counts: dict) -> str:
    """Why a seeded sample has the size it has (faithfulness, sanity)."""
    total = counts.get("examples_in")
    if requested is None or not total:
        return f"{used} sampled examples."
    if requested >= total:
        return (f"{option} {requested} asked for at least every example; all {used} audited "
                "examples were used.")
    return (f"{option} {requested} asked for about {requested} of {total:,} examples; {used} were "
            "used. The sample is a seeded hash: each example is kept with probability "
            f"{requested}/{total:,} whatever the order or sharding, so its size varies around "
            "the request (and examples that failed to decode are not in it).")


def sanity(output: str, run: Optional[dict] = None) -> Optional[dict]:
    rows = read_rows(join(output, layout.SANITY))
    if not rows:
        return None
    curves: Dict[str, List[dict]] = {}
    for row in rows:
        curves.setdefault(row["method"], []).append(row)
    for curve in curves.values():
        curve.sort(key=lambda r: r["step"])
    requested = ((run or {}).get("options") or {}).get("sanity_sample")
    verdicts = {}
    for method, last in results.sanity_final_rows(rows).items():
        counts = [r["examples"] for r in curves[method]]
        verdicts[method] = {"flagged": bool(last["flagged"]),
                            "spearman_fully_random": as_number(last["spearman_mean"]),
                            "judged_step": last["step"], "steps": len(curves[method]),
                            "randomized_up_to": last.get("randomized_up_to"),
                            "threshold": results.SANITY_THRESHOLD,
                            "examples": last["examples"], "sampled": last.get("sampled"),
                            "examples_per_step": counts, "requested": requested,
                            # No defined correlation at the judged step: neither passed nor failed.
                            "judged": bool(last["examples"])}
        verdicts[method]["statement"] = sanity_statement(method, verdicts[method])
    judged = {m: v["judged_step"] for m, v in verdicts.items()}
    return {"curves": curves, "verdicts": verdicts, "judged_step": judged,
            "threshold": results.SANITY_THRESHOLD}


def sanity_statement(method: str, result: dict) -> str:
    """The plain sentence the report prints for a method's sanity check: the verdict, the step
    it is judged at (the one the chart marks), and how many examples it rests on and why."""
    name, rho = METHOD_NAMES.get(method, method), result["spearman_fully_random"]
    rho_text = "n/a" if rho is None else f"{rho:.2f}"
    where = (f"at step {result.get('judged_step', '?')} of {result.get('steps', '?')}, with every "
             "layer randomized")
    if not result["examples"]:
        return (f"{name}'s sanity check cannot be judged: {where}, every sampled map was constant "
                "(e.g. all zero), so no rank correlation is defined; it neither passes nor "
                f"fails. {_sanity_counts(result)}")
    if result["flagged"]:
        head = (f"{name} fails its sanity check: {where}, its maps still correlate {rho_text} "
                f"(Spearman) with the original ones, above {result.get('threshold', 0.5)}, so "
                "they show the image more than what the model uses. Do not rely on them.")
    else:
        head = (f"{name} passes its sanity check: {where}, its maps correlate {rho_text} with the "
                f"original ones (a flag needs more than {result.get('threshold', 0.5)}; earlier "
                "steps, with fewer layers randomized, may stay above it).")
    return f"{head} {_sanity_counts(result)}"


def _sanity_counts(result: dict) -> str:
    sampled, examples = result.get("sampled"), result["examples"]
    text = f"The correlation is over {examples} examples"
    if sampled:
        text += f" of the {sampled} sampled"
        if result.get("requested") is not None:
            text += (f" (--sanity-sample {result['requested']}: a seeded hash sample, whose "
                     "size varies around the request)")
        if examples < sampled:
            text += (f"; at this step {sampled - examples} had a constant map (e.g. all zero "
                     "after ReLU), for which a rank correlation is undefined")
    per_step = result.get("examples_per_step") or []
    if len(set(per_step)) > 1:
        text += (f". Per step: {'/'.join(map(str, per_step))} examples, the same sample, fewer "
                 "where maps turned constant")
    return text + "."


def layer_sweep_summary(output: str) -> Optional[dict]:
    rows = read_rows(join(output, layout.LAYER_SWEEP))
    if not rows:
        return None
    overall = sorted((r for r in rows if r["slice"] == OVERALL), key=lambda r: r["depth"] or 0)
    for row in overall:
        row["lift"] = results.sweep_lift(row)
    return {"overall": overall, "best_layer": results.best_sweep_layer(overall)}


def importance_section(output: str) -> Optional[dict]:
    rows = read_rows(join(output, layout.IMPORTANCE_SUMMARY))
    if not rows:
        return None
    by_metric: Dict[str, List[dict]] = {}
    for row in rows:
        by_metric.setdefault(row["metric"], []).append(row)
    metric = "accuracy" if "accuracy" in by_metric else sorted(by_metric)[0]
    shown = sorted(by_metric[metric], key=lambda r: -(as_number(r["importance"]) or 0.0))
    return {"metric": metric, "metrics": sorted(by_metric), "features": shown,
            "patch_grid": importance.patch_grid(
                {r["feature"]: as_number(r["importance"]) for r in shown}),
            "channels": [r for r in shown if r["feature"].startswith("channel_")]}

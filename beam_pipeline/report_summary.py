"""The report's figures: one streaming pass over the attribution rows (``scan_attributions``,
per-slice ``SliceStats``), TFMA's sliced metrics with one-class AUCs shown as n/a
(``metrics_summary``; undefined and trivial metrics by ``metric_rules``), the verdict from
run.json's gates and verdict_scope, and the small tables (errors,
localization, layer sweep, importance, faithfulness, sanity). Plain Python, no rendering.

Only the small columns of the attribution files are read (Parquet column projection), batch by
batch: memory does not grow with the number of examples.
"""
from typing import Dict, List, Optional, Sequence

from apache_beam.io.filesystems import FileSystems

from . import evaluation, importance, layout, method_registry, metric_rules, results, runinfo

MAX_METRIC_COLUMNS = 10
MAX_SLICE_ROWS = 30  # per slice column in the tables (worst first); run.json has them all
MAX_ERROR_EXAMPLES = 20
PREFERRED_METRICS = (
    "example_count", "auc", "binary_accuracy", "accuracy", "precision[topK:1]",
    "recall[topK:1]", "auc_precision_recall", "precision", "recall", "calibration",
    "mean_label", "mean_prediction",
)
# No best-worst gap: counts, label/prediction means, and calibration (best at 1, not at the top).
NO_GAP_METRICS = ("example_count", "mean_label", "mean_prediction", "calibration")
# The metric that orders slices "worst first", in order of preference.
PRIMARY_METRICS = ("auc", "binary_accuracy", "accuracy", "precision[topK:1]")
# The faithfulness reference: the same measures for a seeded random map on the same examples.
RANDOM_FAITHFULNESS = ("random_deletion_auc", "random_insertion_auc")
METHOD_NAMES = method_registry.display_names()


join = layout.join


def exists(path: str) -> bool:
    try:
        return FileSystems.exists(path)
    except Exception:
        return False


_read_rows = runinfo.read_rows  # one reader of the single-file tables


def as_number(value) -> Optional[float]:
    """A finite float, or None (TFMA writes "NaN" strings and nulls); unlike
    ``metric_rules.finite`` a ``{value, ci_low, ci_high}`` record is not a number here."""
    return None if isinstance(value, dict) else metric_rules.finite(value)


def _mean(total: float, count: int) -> Optional[float]:
    return total / count if count else None


# --------------------------------------------------------------------------- one pass over rows


class SliceStats:
    """Additive figures of one slice (or "overall") from the attribution rows."""

    def __init__(self):
        self.n = 0
        self.labels: Dict[int, int] = {}
        self.correct = 0
        self.labeled = 0
        self.sums: Dict[str, float] = {}
        self.counts: Dict[str, int] = {}

    def add_value(self, key: str, value) -> None:
        number = as_number(value) if not isinstance(value, bool) else float(value)
        if number is not None:
            self.sums[key] = self.sums.get(key, 0.0) + number
            self.counts[key] = self.counts.get(key, 0) + 1

    def accuracy(self) -> Optional[float]:
        return _mean(self.correct, self.labeled)

    def mean(self, key: str) -> Optional[float]:
        return _mean(self.sums.get(key, 0.0), self.counts.get(key, 0))

    def add_row(self, row: dict, methods: Sequence[str]) -> None:
        self.n += 1
        label = row.get("label")
        if label is not None:
            self.labels[label] = self.labels.get(label, 0) + 1
            self.labeled += 1
            self.correct += int(label == row.get("predicted_class"))
        self.add_value("mask_area", row.get("mask_area"))
        for figure in RANDOM_FAITHFULNESS:
            self.add_value(figure, row.get(figure))
        for method in methods:
            for figure in ("mask_energy", "pointing_hit", "iou", "deletion_auc", "insertion_auc"):
                self.add_value(f"{method}_{figure}", row.get(f"{method}_{figure}"))

    def as_dict(self, methods: Sequence[str]) -> dict:
        out = {"n": self.n, "labels": {str(k): v for k, v in sorted(self.labels.items())},
               "accuracy": self.accuracy(),
               "with_mask": self.counts.get("mask_area", 0),
               "mask_area": self.mean("mask_area")}
        for method in methods:
            energy, area = self.mean(f"{method}_mask_energy"), out["mask_area"]
            out[method] = {
                "mask_energy": energy,
                "energy_lift": energy / area if energy is not None and area else None,
                "pointing_hit": self.mean(f"{method}_pointing_hit"),
                "iou": self.mean(f"{method}_iou"),
                "localized": self.counts.get(f"{method}_mask_energy", 0),
                "deletion_auc": self.mean(f"{method}_deletion_auc"),
                "insertion_auc": self.mean(f"{method}_insertion_auc"),
                "faithfulness_n": self.counts.get(f"{method}_deletion_auc", 0),
            }
        return out


def _slice_groups(row: dict, slice_columns: Sequence[str], attention_method: Optional[str]):
    """(the data slices a row belongs to, named as TFMA names them ("column=value"), and the
    slices derived from the audit: prediction_correct, attention_on_mask)."""
    data = [f"{column}={row[column]}" for column in slice_columns if row.get(column) is not None]
    derived = []
    if row.get("label") is not None:
        correct = "true" if row["label"] == row.get("predicted_class") else "false"
        derived.append(f"{evaluation.PREDICTION_CORRECT}={correct}")
    if attention_method:
        bucket = evaluation.attention_bucket(row.get(f"{attention_method}_mask_energy"),
                                             row.get("mask_area"))
        if bucket:
            derived.append(f"{evaluation.ATTENTION_ON_MASK}={bucket}")
    return data, derived


def _lift(row: dict, method: str) -> Optional[float]:
    energy, area = as_number(row.get(f"{method}_mask_energy")), as_number(row.get("mask_area"))
    return energy / area if energy is not None and area else None


def scan_attributions(paths: Sequence[str], run: dict, picker=None) -> Dict[str, SliceStats]:
    """One streaming pass: per-slice stats, and gallery candidates offered to ``picker`` (per
    data slice value, or "overall" when the data has no slice columns)."""
    methods = run.get("model", {}).get("methods") or ["gradcam"]
    slice_columns = list(run.get("data", {}).get("slice_columns") or [])
    first = methods[0]
    columns = ["example_id", "label", "predicted_class", "probabilities", "mask_area",
               *RANDOM_FAITHFULNESS, *slice_columns]
    for method in methods:
        columns += [f"{method}_{f}" for f in ("mask_energy", "pointing_hit", "iou",
                                              "deletion_auc", "insertion_auc")]
    stats: Dict[str, SliceStats] = {}
    attention = first if run.get("data", {}).get("has_masks") else None
    for row in runinfo.iter_rows(paths, columns):
        data, derived = _slice_groups(row, slice_columns, attention)
        for group in ["overall", *data, *derived]:
            stats.setdefault(group, SliceStats()).add_row(row, methods)
        if picker is not None:
            candidate = {**row, "lift": _lift(row, first)}
            for group in (data if slice_columns else ["overall"]):
                picker.add(group, candidate)
    return stats


# --------------------------------------------------------------------------- TFMA metrics


def _metric_cell(value) -> Optional[dict]:
    if isinstance(value, dict):
        number = as_number(value.get("value"))
        if number is None:
            return None
        return {"value": number, "ci_low": as_number(value.get("ci_low")),
                "ci_high": as_number(value.get("ci_high"))}
    number = as_number(value)
    return None if number is None else {"value": number, "ci_low": None, "ci_high": None}


def _metric_columns(table: Dict[str, dict]) -> List[str]:
    names = []
    for metrics in table.values():
        names += [n for n, v in metrics.items() if n not in names and _metric_cell(v) is not None]
    ordered = [n for n in PREFERRED_METRICS if n in names]
    ordered += sorted(n for n in names if n not in ordered)
    return ordered[:MAX_METRIC_COLUMNS]


def _slice_row(name: str, metrics: dict, columns: Sequence[str], stats: Dict[str, SliceStats],
               min_slice_size: int = 0):
    """One table row. A metric that means nothing on the slice (``metric_rules``: an AUC on one
    class, a quality metric on prediction_correct) is None, listed in ``not_applicable`` and
    named in ``why`` ("undefined" or "trivial"); ``small``: fewer than --min-slice-size examples
    (left out of gaps)."""
    slice_stats = stats.get(name)
    labels = {str(k): v for k, v in slice_stats.labels.items()} if slice_stats else None
    cells, not_applicable, why = {}, [], {}
    for metric in columns:
        reason = metric_rules.why_not_meaningful(name, metric, metrics, labels)
        if reason and metric != "example_count":
            cells[metric] = None
            not_applicable.append(metric)
            why[metric] = reason
        else:
            cells[metric] = _metric_cell(metrics.get(metric))
    column, _, value = name.partition("=")
    n = slice_stats.n if slice_stats else as_number(metrics.get("example_count"))
    return {"slice": name, "column": column if value else None, "value": value or None,
            "n": n, "small": bool(value) and n is not None and n < min_slice_size,
            "metrics": cells, "not_applicable": not_applicable, "why": why}


def _value(row: dict, metric: str) -> Optional[float]:
    cell = row["metrics"].get(metric)
    return cell["value"] if cell else None


def _gaps(rows: Sequence[dict], columns: Sequence[str]) -> Dict[str, dict]:
    """Best minus worst slice per quality metric (not counts or label/prediction means)."""
    gaps = {}
    for metric in columns:
        if metric in NO_GAP_METRICS:
            continue
        values = [(_value(r, metric), r["slice"]) for r in rows
                  if _value(r, metric) is not None and not r["small"]]
        if len(values) >= 2:
            (low, worst), (high, best) = min(values), max(values)
            gaps[metric] = {"worst": worst, "worst_value": low, "best": best, "best_value": high,
                            "gap": high - low}
    return gaps


def metrics_summary(tfma: dict, slice_columns: Sequence[str], has_masks: bool,
                    stats: Dict[str, SliceStats], min_slice_size: int = 0) -> Optional[dict]:
    """Overall and per-slice TFMA figures, worst slice first, with best-worst gaps (slices
    below ``min_slice_size`` examples are marked small and left out of gaps, as in the gates)."""
    table = tfma.get("metrics") or {}
    if not table:
        return None
    columns = _metric_columns(table)
    primary = next((m for m in PRIMARY_METRICS if m in columns),
                   next((m for m in columns if m != "example_count"), None))
    shown = list(slice_columns) + [evaluation.PREDICTION_CORRECT] + (
        [evaluation.ATTENTION_ON_MASK] if has_masks else [])
    by_column = []
    for column in shown:
        rows = [_slice_row(name, metrics, columns, stats, min_slice_size)
                for name, metrics in table.items()
                if name.startswith(f"{column}=") and "," not in name]
        if not rows:
            continue
        rows.sort(key=lambda r: (_value(r, primary) is None, _value(r, primary) or 0.0,
                                 r["slice"]))
        derived = column not in slice_columns
        by_column.append({"column": column, "derived": derived,
                          "slices": rows[:MAX_SLICE_ROWS],
                          "slices_not_shown": max(0, len(rows) - MAX_SLICE_ROWS),
                          "gaps": {} if derived else _gaps(rows, columns)})
    overall = table.get("overall")
    return {
        "columns": columns,
        "primary": primary,
        "confidence_intervals": bool(tfma.get("confidence_intervals")),
        "min_slice_size": min_slice_size,
        "overall": _slice_row("overall", overall, columns, stats) if overall else None,
        "by_column": by_column,
        "all_metrics_in": "run.json: tfma.metrics",
    }


# --------------------------------------------------------------------------- verdict


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


GATE_TITLES = {"better_than_chance": "Better than chance (default gate)",
               "not_degenerate": "Not degenerate (default gate)",
               "max_slice_gap": "Slice gap", "tfma_threshold": "Threshold"}


def gate_reason(gate: dict, counts: dict) -> str:
    """One sentence per gate, for the verdict: the gate's own message, with numbers."""
    state = "passed" if gate.get("passed") else "failed"
    if gate.get("gate") == "max_error_rate":
        return (f"Error rate {state}: {counts.get('examples_failed', 0)} of "
                f"{counts.get('examples_in', 0)} examples could not be audited "
                f"({100 * (gate.get('value') or 0):.2f}%; allowed {100 * gate['bound']:.2f}%).")
    title = GATE_TITLES.get(gate.get("gate"), gate.get("gate"))
    if gate.get("gate") == "max_slice_gap":
        title = f"Slice gap on {gate['metric']}"
    message = gate.get("message") or f"{gate.get('metric')} at {gate.get('slice')} is " \
                                      f"{_format(gate.get('value'))} (bound {gate.get('bound')})."
    return f"{title} {state}: {message}"


def verdict(run: dict, metrics: Optional[dict]) -> dict:
    """Failed and passed gates as sentences, gates not applied (undefined or trivial metrics),
    and what the verdict certifies (run.json verdict_scope)."""
    gates = run.get("gates") or []
    counts = run.get("counts") or {}
    applied = [g for g in gates if g.get("applied", True)]
    failed = [gate_reason(g, counts) for g in applied if not g.get("passed")]
    passed = [gate_reason(g, counts) for g in applied if g.get("passed")]
    not_applied = [g.get("message", "") for g in gates if not g.get("applied", True)]
    if (run.get("tfma") or {}).get("error"):
        failed.insert(0, f"The sliced evaluation failed: {run['tfma']['error']}")
    nothing = nothing_audited(counts)
    if nothing:
        failed.insert(0, nothing)
    caveats = []
    if counts.get("examples_unlabeled") and (run.get("data") or {}).get("labeled"):
        caveats.append(runinfo.unlabeled_sentence(counts))
    status = run.get("status") or ("passed" if not failed else "failed")
    scope = (run.get("verdict_scope") or {}).get("statement")
    return {"status": status, "exit_code": run.get("exit_code"), "failed": failed,
            "passed": passed, "caveats": caveats, "not_applied": not_applied, "scope": scope,
            "gates": gates}


def nothing_audited(counts: dict) -> Optional[str]:
    """The headline of a run that audited no example: every figure below is missing, and why."""
    if counts.get("examples_ok", 1) or not counts.get("examples_in"):
        return None
    reasons = ", ".join(f"{kind} {n}" for kind, n in
                        sorted((counts.get("errors_by_type") or {}).items(), key=lambda kv: -kv[1]))
    return (f"Nothing was audited: all {counts['examples_in']} examples failed "
            f"({reasons or 'see errors/'}), so there are no metrics, maps or importances for "
            "this model. The reasons per example are in errors/.")


# --------------------------------------------------------------------------- other sections


def identity(run: dict) -> dict:
    model, data, runner = run.get("model", {}), run.get("data", {}), run.get("runner", {})
    return {
        "tool_version": run.get("tool_version"),
        "run_id": run.get("run_id"),
        "started_at": run.get("started_at"),
        "finished_at": run.get("finished_at"),
        # Absolute (run.json keeps both): an archived report names its model unambiguously.
        "model_path": model.get("absolute_path") or model.get("path"),
        "model_path_given": model.get("path"),
        "model_sha256": model.get("sha256"),
        "class_names": model.get("class_names") or [],
        "methods": model.get("methods") or [],
        "gradcam_layer": model.get("gradcam_layer"),
        "model_caveats": model.get("caveats") or [],
        "data_uri": data.get("absolute_uri") or data.get("uri"),
        "data_uri_given": data.get("uri"),
        "data_kind": data.get("kind"),
        "data_fingerprint": data.get("fingerprint"),
        "runner": runner.get("name"),
        "seed": run.get("seed"),
        "libraries": run.get("libraries") or {},
        "command_line": run.get("command_line") or [],
    }


def accounting(run: dict, output: str) -> dict:
    """Counts from run.json, and per (stage, error type) counts and a few examples from errors/
    (streamed: only the first rows' messages are kept)."""
    counts = run.get("counts") or {}
    by_stage: Dict[str, int] = {}
    examples = []
    paths = runinfo.parquet_files(join(output, layout.ERRORS))
    for row in runinfo.iter_rows(paths, ["example_id", "stage", "error_type", "message"]):
        key = f"{row['stage']} / {row['error_type']}"
        by_stage[key] = by_stage.get(key, 0) + 1
        if len(examples) < MAX_ERROR_EXAMPLES:
            examples.append(row)
    examples_in = counts.get("examples_in", 0)
    ok, failed = counts.get("examples_ok", 0), counts.get("examples_failed", 0)
    return {
        "examples_in": examples_in, "examples_ok": ok, "examples_failed": failed,
        "examples_unlabeled": counts.get("examples_unlabeled"),
        "error_rate": counts.get("error_rate"),
        "errors_by_type": counts.get("errors_by_type") or {},
        "errors_by_stage_and_type": dict(sorted(by_stage.items(), key=lambda kv: -kv[1])),
        "error_examples": examples,
        "identity_holds": bool(counts.get("accounting_ok")) and examples_in == ok + failed,
    }


def worst_slices(stats: Dict[str, SliceStats], columns: Sequence[str], limit: int) -> List[str]:
    """Per slice column, at most ``limit`` slice values: lowest accuracy first (the largest
    first when unlabeled). Bounds every per-slice table whatever a column's cardinality."""
    chosen = []
    for column in columns:
        names = [n for n in stats if n.split("=", 1)[0] == column]
        names.sort(key=lambda n: (stats[n].accuracy() if stats[n].labeled else -stats[n].n, n))
        chosen += names[:limit]
    return chosen


def localization(stats: Dict[str, SliceStats], run: dict) -> Optional[dict]:
    """Per method, overall and per data slice: mask energy, its lift over the mask's area,
    pointing-game rate, IoU. None without masks."""
    if not run.get("data", {}).get("has_masks") or "overall" not in stats:
        return None  # no masks, or nothing audited
    methods = run.get("model", {}).get("methods") or ["gradcam"]
    slice_columns = list(run.get("data", {}).get("slice_columns") or [])
    rows = []
    for name in ["overall", *sorted(worst_slices(stats, slice_columns, MAX_SLICE_ROWS))]:
        figures = stats[name].as_dict(methods)
        if figures["with_mask"]:
            rows.append({"slice": name, **figures})
    return {"methods": methods, "rows": rows} if rows else None


def faithfulness(stats: Dict[str, SliceStats], run: dict) -> Optional[dict]:
    """Per method, mean deletion / insertion AUC over the sampled examples, beside the same
    measures for a seeded random map on the same examples (``reference``), and the sample size
    asked for against the one used."""
    if "overall" not in stats:
        return None
    methods = run.get("model", {}).get("methods") or ["gradcam"]
    overall = stats["overall"]
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
        for measure in ("deletion_auc", "insertion_auc"):  # job.py: intervals.faithfulness_intervals
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
    rows = _read_rows(join(output, layout.SANITY))
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
    rows = _read_rows(join(output, layout.LAYER_SWEEP))
    if not rows:
        return None
    overall = sorted((r for r in rows if r["slice"] == "overall"), key=lambda r: r["depth"] or 0)
    for row in overall:
        row["lift"] = results.sweep_lift(row)
    return {"overall": overall, "best_layer": results.best_sweep_layer(overall)}


def importance_section(output: str) -> Optional[dict]:
    rows = _read_rows(join(output, layout.IMPORTANCE_SUMMARY))
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

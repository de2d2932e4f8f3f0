"""What `xai-audit run` and `demo` print on the terminal when the audit is done.

``summary_lines(run, report_path)`` is a pure function of run.json (as a dict) and where the
report went: the verdict with the exit code, each failed gate's sentence, the overall metrics,
the worst slice of every slice column, errors by type, and the absolute report path; about 20
lines, so it reads without scrolling. ``quiet`` keeps the verdict line and the path only.
The figures come from the same helpers as the report (``report.summary``), so the terminal and
the report never disagree on a gate sentence or on which slice is worst.
"""
from typing import List, Optional

from . import summary as report_summary
from ..io import runinfo

MAX_GATE_LINES = 5  # failed gates listed one per line; the rest are counted
MAX_METRICS = 4  # overall metrics on the metrics line
MAX_SLICE_COLUMNS = 6
MAX_ERROR_TYPES = 4

EXIT_MEANINGS = {
    0: "every gate passed",
    1: "the run could not be completed",
    3: "a gate failed",
    4: "more examples failed than --max-error-rate allows",
    5: "every gate passed, but the report could not be written",
}


def _number(value, count: bool = False) -> str:
    """A metric to 3 decimals; a count (``count``, or the example_count metric) as an integer."""
    if isinstance(value, dict):
        value = value.get("value")
    number = report_summary.as_number(value)
    if number is None:
        return "n/a"
    return f"{int(number):,}" if count else f"{number:.3f}"


def gate_sentence(gate: dict, counts: dict) -> str:
    """The gate's own message when the record has one, else the report's sentence for it."""
    return gate.get("message") or report_summary.gate_reason(gate, counts)


def verdict_line(run: dict, exit_code: Optional[int] = None) -> str:
    code = run.get("exit_code") if exit_code is None else exit_code
    word = "PASSED" if code == 0 else ("PASSED, NO REPORT" if code == 5 else "FAILED")
    counts = run.get("counts") or {}
    failed = [g for g in run.get("gates") or [] if not g.get("passed")]
    detail = EXIT_MEANINGS.get(code, "see run.json")
    if failed and code in (3, 4):  # the gates decided; exit 1 (no metrics) says so itself
        detail = f"{len(failed)} of {len(run.get('gates') or [])} gates failed"
    return (f"Verdict: {word} (exit {code}: {detail}); {counts.get('examples_in', 0)} examples in, "
            f"{counts.get('examples_ok', 0)} audited, {counts.get('examples_failed', 0)} failed.")


def _gate_lines(run: dict) -> List[str]:
    counts = run.get("counts") or {}
    lines = []
    if (run.get("tfma") or {}).get("error"):
        lines.append(f"  FAILED: the sliced evaluation failed: {run['tfma']['error']}")
    failed = [g for g in run.get("gates") or [] if not g.get("passed")]
    lines += [f"  FAILED: {gate_sentence(g, counts)}" for g in failed[:MAX_GATE_LINES]]
    if len(failed) > MAX_GATE_LINES:
        lines.append(f"  ... and {len(failed) - MAX_GATE_LINES} more failed gates (run.json gates).")
    return lines


def _scope_lines(run: dict) -> List[str]:
    """What a pass certifies when no performance threshold was set, and what the metrics cover
    when some audited examples have no label: the caveats a reader must not miss."""
    lines = []
    scope = run.get("verdict_scope") or {}
    if scope.get("statement") and not scope.get("performance_thresholds"):
        lines.append(f"Note: {scope['statement']}")
    counts = run.get("counts") or {}
    if counts.get("examples_unlabeled") and (run.get("data") or {}).get("labeled"):
        lines.append(f"Note: {runinfo.unlabeled_sentence(counts)}")
    return lines


def _metric_lines(run: dict) -> List[str]:
    tfma = run.get("tfma") or {}
    if tfma.get("skipped_because"):
        return [f"Metrics: none (TFMA skipped: {tfma['skipped_because']})."]
    slice_columns = list((run.get("data") or {}).get("slice_columns") or [])
    min_slice_size = int((run.get("options") or {}).get("min_slice_size") or 0)
    metrics = report_summary.metrics_summary(tfma, slice_columns, False, {}, min_slice_size)
    if not metrics:
        return [] if tfma.get("error") else ["Metrics: TFMA computed none."]
    lines = []
    overall = metrics.get("overall")
    if overall:
        shown = [(m, c) for m, c in overall["metrics"].items() if c is not None][:MAX_METRICS]
        lines.append("Overall: " + ", ".join(
            f"{m} {_number(c, m == 'example_count')}" for m, c in shown) + ".")
    primary = metrics["primary"]
    worst = []
    for group in metrics["by_column"][:MAX_SLICE_COLUMNS]:
        values = [(r["metrics"].get(primary) or {}).get("value") for r in group["slices"]]
        known = [v for v in values if v is not None]
        if len(known) < 2:
            continue  # one slice, or none with a defined value: nothing is worst
        row = group["slices"][0]  # worst first (report.metrics.metrics_summary)
        if min(known) == max(known):
            worst.append(f"  {group['column']}: every slice at {primary} {_number(known[0])}")
            continue
        worst.append(f"  {group['column']}: {row['slice']} ({primary} {_number(values[0])}, "
                     f"n={_number(row['n'], count=True)})")
    if worst:
        lines += [f"Worst slice by {primary}:"] + worst
    return lines


def _error_line(run: dict) -> List[str]:
    by_type = (run.get("counts") or {}).get("errors_by_type") or {}
    if not by_type:
        return []
    ranked = sorted(by_type.items(), key=lambda item: (-item[1], item[0]))
    text = ", ".join(f"{name} {count}" for name, count in ranked[:MAX_ERROR_TYPES])
    if len(ranked) > MAX_ERROR_TYPES:
        text += f", {len(ranked) - MAX_ERROR_TYPES} more types"
    return [f"Errors by type: {text} (rows in errors/)."]


def report_line(report_path: Optional[str], output: str) -> str:
    if report_path:
        return f"Report: {report_path}"
    return (f"Report: not written (see the log above); re-render it with "
            f"`xai-audit report {output}`.")


def summary_lines(run: dict, report_path: Optional[str], output: str = "",
                  exit_code: Optional[int] = None, quiet: bool = False) -> List[str]:
    """The end-of-run summary, one string per line. ``report_path``: the report's absolute path
    or URI (None when it could not be written); ``exit_code``: the command's final code when it
    differs from run.json's (a report that failed turns 0 into 5)."""
    head, tail = verdict_line(run, exit_code), report_line(report_path, output)
    if quiet:
        return [head, tail]
    lines = [head, *_gate_lines(run), *_scope_lines(run), *_metric_lines(run), *_error_line(run)]
    if not (run.get("counts") or {}).get("accounting_ok", True):
        lines.append("Accounting mismatch: examples in != audited + failed (run.json counts).")
    return lines + [tail]

"""The report's verdict: every gate of run.json as one sentence (failed, passed, not applied),
the headline of a run that audited nothing, and what the verdict certifies (verdict_scope).
"""
from typing import Optional

from ..io import runinfo


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

"""The report's figures: one streaming pass over the attribution rows (``scan_attributions``,
per-slice ``SliceStats``), TFMA's sliced metrics with one-class AUCs shown as n/a
(``metrics_summary``; undefined and trivial metrics by ``metric_rules``), the verdict from
run.json's gates and verdict_scope, and the small tables (errors,
localization, layer sweep, importance, faithfulness, sanity). Plain Python, no rendering.

Only the small columns of the attribution files are read (Parquet column projection), batch by
batch: memory does not grow with the number of examples.

What lives where: the pass over the rows in ``scan``, the TFMA tables in ``metrics``, the
verdict in ``verdict``, localization / faithfulness / sanity / sweep / importance in
``measures``. This module has the run's identity and accounting and
keeps the names the report, the terminal summary and the tests import from ``report.summary``.
"""
from typing import Dict

from ..io import layout, runinfo
from ..explain import precision
from ..io.paths import exists, join
from .measures import (METHOD_NAMES, faithfulness, importance_section, layer_sweep_summary,
    localization, sample_note, sanity, sanity_statement)
from .metrics import (MAX_METRIC_COLUMNS, MAX_SLICE_ROWS, NO_GAP_METRICS, PREFERRED_METRICS,
    PRIMARY_METRICS, metrics_summary)
from .scan import RANDOM_FAITHFULNESS, SliceStats, as_number, scan_attributions, worst_slices
from .verdict import GATE_TITLES, gate_reason, nothing_audited, verdict

MAX_ERROR_EXAMPLES = 20
_read_rows = runinfo.read_rows  # one reader of the single-file tables

# Names the report, the terminal summary and the tests import from here (re-exports above).
__all__ = [
    "GATE_TITLES", "MAX_ERROR_EXAMPLES", "MAX_METRIC_COLUMNS", "MAX_SLICE_ROWS", "METHOD_NAMES",
    "NO_GAP_METRICS", "PREFERRED_METRICS", "PRIMARY_METRICS", "RANDOM_FAITHFULNESS",
    "SliceStats", "accounting", "as_number", "exists", "faithfulness", "gate_reason",
    "identity", "importance_section", "join", "layer_sweep_summary", "localization",
    "metrics_summary", "nothing_audited", "sample_note", "sanity", "sanity_statement",
    "scan_attributions", "verdict", "worst_slices",
]


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
        "precision": precision.summary_line(run.get("precision")),
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

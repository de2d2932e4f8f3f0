"""run.json: what a finished run records (DESIGN.md), from its plan and its outputs.

``count_outputs`` counts the files a reader will see against the job's own input counter;
``run_json(RunRecord)`` assembles the manifest: model, data, runner, options, counts, timings,
cost, TFMA, importance, attention, quality, gates and the verdict's scope.
"""
import io
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from ..beam import audit_config
from ..evaluation import baseline
from ..measures import intervals, quality
from ..io import layout, limits, runinfo, sources
from .exit_codes import EXIT_OK
from .plan import AuditRequest, Plan


@dataclass
class RunRecord:
    """What run.json is made of, besides the files the run wrote."""

    request: AuditRequest
    plan: Plan
    pipeline: beam.Pipeline
    started: str  # ISO time the run started
    counts: dict  # count_outputs
    counters: Dict[str, float]  # Beam counters (runinfo.beam_counters)
    tfma_summary: dict
    gates: List[dict]
    exit_code: int


def count_outputs(output: str, counters: Dict[str, float]) -> dict:
    """Counts from the files a reader will see, checked against the job's own input counter."""
    ok_ids = runinfo.read_column(layout.join(output, "attributions"), "example_id")
    labels = runinfo.read_column(layout.join(output, "attributions"), "label")
    error_types = runinfo.read_column(layout.join(output, "errors"), "error_type")
    failed, total = len(error_types), len(ok_ids) + len(error_types)
    examples_in = int(counters.get("examples_in", total))
    # Audited examples with an empty label: they have maps and predictions, but no metric.
    unlabeled = (runinfo.read_column(layout.join(output, "attributions"), "label")
                 .null_count if len(ok_ids) else 0)
    return {
        "examples_in": examples_in,
        "examples_ok": len(ok_ids),
        "examples_unlabeled": unlabeled,
        "examples_failed": failed,
        "examples_labeled_ok": len(labels) - labels.null_count,
        "error_rate": failed / total if total else 0.0,
        "errors_by_type": runinfo.value_counts(error_types),
        "accounting_ok": examples_in == total and runinfo.distinct_count(ok_ids) == len(ok_ids),
    }


def run_json(run: RunRecord) -> dict:
    """The run.json payload (DESIGN.md); the caller adds run_id and output_files."""
    req, plan, config = run.request, run.plan, run.plan.config
    options = run.pipeline.options.get_all_options(drop_default=True)
    return {
        "tool": "xai-audit",
        "tool_version": runinfo.tool_version(),
        "command_line": runinfo.command_line(),
        "started_at": run.started,
        "finished_at": runinfo.now_iso(),
        "status": "passed" if run.exit_code == EXIT_OK else "failed",
        "exit_code": run.exit_code,
        "model": _model_section(req, plan),
        "data": _data_section(req, config.source),
        "runner": {"name": options.get("runner") or _runner_name(run.pipeline),
                   "options": options},
        "seed": req.seed,
        "options": {k: v for k, v in asdict(req).items() if k not in ("model", "data", "output")},
        "libraries": runinfo.library_versions(),
        "counts": run.counts,
        "timings_s": plan.timings,
        "cost": {"estimate": plan.cost_estimate, "stage_busy_s": _stage_seconds(run.counters)},
        "precision": plan.precision,
        "beam_counters": run.counters,
        "tfma": run.tfma_summary,
        "importance": _importance_summary(plan, run.counters),
        "attention": {"method": config.methods[0], "region_grid": list(config.region_grid),
                      "by_slice": layout.join(config.output, layout.ATTENTION_BY_SLICE)},
        "quality": _quality_summary(plan),
        "gates": run.gates,
        "verdict_scope": baseline.verdict_scope(req.baseline_gates, config.source.labeled,
                                                plan.performance_thresholds),
    }


def _model_section(req: AuditRequest, plan: Plan) -> dict:
    config, info = plan.config, plan.model_info
    return {
        "path": req.model,
        "absolute_path": runinfo.absolute_uri(req.model),
        "sha256": plan.model_sha256,
        "input_shape": [info.height, info.width, info.channels],
        "num_classes": info.num_classes,
        "class_names": config.class_names,
        "head": info.head,
        "logit_source": info.head_source,
        "caveats": info.caveats,
        "gradcam_layer": config.layer,
        "methods": config.methods,
    }


def _data_section(req: AuditRequest, source: sources.SourceSpec) -> dict:
    return {
        "uri": req.data,
        "absolute_uri": runinfo.absolute_uri(req.data),
        "kind": source.kind,
        "fingerprint": source.fingerprint,
        "labeled": source.labeled,
        "has_masks": source.has_masks,
        "slice_columns": source.slice_types,
        # Written to attributions, not sliced on: too many values, or binned (slice_bins).
        "carried_columns": source.carried_types,
        "skipped_slice_columns": source.skipped_slices,
        "skipped_slice_columns_note": (sources.skipped_slices_sentence(
            source.skipped_slices) if source.skipped_slices else None),
        "slice_bins": source.slice_bins,
        "files": len(source.files) or None,
    }


def _stage_seconds(counters: Dict[str, float]) -> Dict[str, Optional[float]]:
    """Busy seconds per stage, summed over workers, from the Beam distributions (None where the
    runner has no metrics). The explain batches include their faithfulness curves: subtracted."""
    def seconds(name):
        value = counters.get(f"{name}_sum")
        return None if value is None else value / 1000.0

    explain, faithfulness = seconds("explain_batch_msecs"), seconds("faithfulness_msecs")
    return {
        "explain": None if explain is None else explain - (faithfulness or 0.0),
        "importance": seconds("importance_shard_msecs"),
        "faithfulness": faithfulness,
        "sanity": seconds("sanity_msecs"),
    }


def _read_table(path: str) -> List[dict]:
    with FileSystems.open(path) as handle:
        return pq.read_table(io.BytesIO(handle.read())).to_pylist()


def _quality_summary(plan: Plan) -> dict:
    """Sanity-check verdicts per method and where the layer sweep's attention lands best."""
    cfg = plan.config
    summary: dict = {"faithfulness_sample": cfg.faithfulness_sample,
                     "sanity_sample": cfg.sanity_sample}
    if cfg.faithfulness_sample:  # the sample size used, against the one asked for
        column = runinfo.read_column(layout.join(cfg.output, "attributions"),
                                     f"{cfg.methods[0]}_deletion_auc")
        summary["faithfulness_examples"] = len(column) - column.null_count
        summary["faithfulness"] = intervals.faithfulness_intervals(lambda name: runinfo.read_column(
            layout.join(cfg.output, "attributions"), name).to_numpy(), cfg.methods)
    if cfg.sanity_sample:
        rows = _read_table(layout.join(cfg.output, "sanity.parquet"))
        summary["sanity"] = {m: {"flagged": r["flagged"], "spearman_fully_random": r["spearman_mean"],
                                 "judged_step": r["step"], "examples": r["examples"],
                                 "sampled": r.get("sampled")}
                             for m, r in quality.sanity_final_rows(rows).items()}
    if cfg.sweep:
        rows = _read_table(layout.join(cfg.output, "layer_sweep.parquet"))
        summary["layer_sweep"] = {"layers": len(cfg.sweep_layer_names),
                                  "best_layer_by_energy_lift": quality.best_sweep_layer(rows)}
    return summary


def _importance_sample(plan: Plan, rows: List[dict], counters: Dict[str, float]) -> dict:
    """The sample importance ran on: asked for, used (examples in the figures), and the labeled
    population it was drawn from (a Beam counter: None where the runner has no metrics)."""
    cfg = plan.config
    labeled = counters.get(audit_config.IMPORTANCE_LABELED)
    return {
        "requested": "all" if cfg.importance_sample is None else cfg.importance_sample,
        "examples": max((r["n"] or 0 for r in rows), default=0),
        "labeled_examples": None if labeled is None else int(labeled),
        "selected": (None if counters.get(audit_config.IMPORTANCE_SAMPLED) is None
                     else int(counters[audit_config.IMPORTANCE_SAMPLED])),
        "seed": cfg.seed,
        "selection": "every labeled example" if cfg.importance_sample is None else
                     "the labeled examples with the smallest sha256(seed, id) keys",
    }


def _importance_summary(plan: Plan, counters: Optional[Dict[str, float]] = None) -> dict:
    cfg = plan.config
    if not cfg.permutation_features:
        return {"skipped_because": plan.importance_skipped_because}
    path = layout.join(cfg.output, "importance_summary.parquet")
    with FileSystems.open(path) as handle:
        table = pq.read_table(io.BytesIO(handle.read()))
    rows = sorted(table.to_pylist(), key=lambda r: (r["metric"], -(r["importance"] or 0.0)))
    return {
        "summary": path,
        "features": [f.name for f in cfg.permutation_features],
        "repeats": cfg.permutation_repeats,
        "shard_size": cfg.shard_size,
        "per_class": limits.per_class_note(plan.model_info.num_classes),
        "sample": _importance_sample(plan, rows, counters or {}),
        "figures": rows,
    }


def _runner_name(p: beam.Pipeline) -> str:
    """The runner that ran ``p``: PortableRunner (and Flink's and Spark's, its subclasses) clear
    --runner from the options they submit, so the options alone would not say."""
    name = type(p.runner).__name__
    return "FnApiRunner (local)" if name == "FnApiRunner" else name

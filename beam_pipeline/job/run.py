"""The audit job as a whole: plan on the launcher, run the Beam pipeline, account and record.

``plan.plan_audit`` validates everything that can be validated before a worker starts and raises
``AuditError`` with advice; ``run_audit`` runs the pipeline, reads the outputs back to count them,
gates them, writes run.json (``run_manifest``) and the report, and returns the exit code
(``exit_codes``).

The pipeline writes into a staging folder inside ``--output`` and the files get their final names
only when it has finished, run.json last (``outputs``): a killed run leaves no half-written final
file, and an earlier run in the folder is refused unless ``--overwrite``. With Beam's
``--dry_run`` (DataflowRunner) the job is only translated (``launch.translate_only``): nothing is
written, nothing submitted, and nothing needs the network.
"""
import logging
import os
import time
from typing import List, Optional, Sequence, Tuple

from apache_beam.options.pipeline_options import PipelineOptions

from ..evaluation import baseline, transform as evaluation, metric_rules
from . import cost, launch, run_manifest
from ..io import layout, limits, outputs, runinfo
from ..beam import pipeline
from .exit_codes import (EXIT_ERROR_RATE, EXIT_FAILED, EXIT_GATE, EXIT_OK, EXIT_REPORT, EXIT_USAGE,
    of_gates)
from .launch import make_pipeline, progress_workers
from .plan import AuditRequest, Plan, plan_audit

LOG = logging.getLogger("xai_audit")
# The job's API (cli, demo, bench, tests import these from here).
__all__ = ["AuditRequest", "Plan", "plan_audit", "run_audit", "make_pipeline", "progress_workers",
           "print_summary", "write_report_after_run", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE",
           "EXIT_GATE", "EXIT_ERROR_RATE", "EXIT_REPORT"]


def run_audit(req: AuditRequest, beam_args: Sequence[str], summary: str = "full") -> int:
    """Plan, run, account, gate. Returns the exit code (DESIGN.md).

    Outputs are written into a staging folder and promoted to their final names after the
    pipeline, run.json last (``outputs``); a ``--dry_run`` stops after translating the job.
    ``summary``: what is printed on stdout at the end (``report.terminal``): ``full``,
    ``quiet`` (the verdict and the report path) or ``none`` (the caller prints it).
    """
    started = runinfo.now_iso()
    options = PipelineOptions(list(beam_args))
    dry_run = launch.is_dry_run(options)
    if dry_run:
        launch.check_dry_run(req, options)
    launch.check_remote_paths(req, options, dry_run)
    launch.check_runner(options)
    final = req.output.rstrip("/")
    launch.check_output_target(final)
    run_id = outputs.new_run_id()
    if dry_run:
        plan = plan_audit(req)
        plan.config.output = outputs.staging_path(final, run_id)
        plan.config.progress_workers = progress_workers(options)
        return launch.translate_only(req, plan, beam_args, final)
    if not req.overwrite:  # refuse before the (slow) planning; reads only
        outputs.refuse_earlier_run(final)
    created = "://" not in final and not os.path.exists(final)
    # One run per folder: the lock is held from before planning until the report is written.
    outputs.acquire_lock(final, run_id, started, take_stale=req.overwrite)
    try:
        return _run_locked(req, beam_args, started, run_id, summary)
    finally:
        outputs.release_lock(final, run_id)
        if created and os.path.isdir(final) and not os.listdir(final):
            os.rmdir(final)  # a run refused at planning leaves no folder it made


def _run_locked(req: AuditRequest, beam_args: Sequence[str], started: str, run_id: str,
                summary: str) -> int:
    """The run proper, with the output folder's lock held; ``summary`` as in run_audit."""
    plan = plan_audit(req)
    final = plan.config.output
    staging = outputs.staging_path(final, run_id)
    p, result = _run_staged(req, plan, beam_args, started, run_id, staging)
    counters = runinfo.beam_counters(result)
    counts = run_manifest.count_outputs(final, counters)
    tfma_summary, gates, evaluation_error = _gates(req, plan, counts)
    exit_code = EXIT_FAILED if evaluation_error else of_gates(gates)
    payload = run_manifest.run_json(run_manifest.RunRecord(
        req, plan, p, started, counts, counters, tfma_summary, gates, exit_code))
    payload["run_id"] = run_id
    payload["output_files"] = outputs.run_files(final)  # what --overwrite may remove later
    # run.json last and atomically: its presence means every other output is complete.
    outputs.write_json_atomic(layout.join(final, outputs.RUN_JSON), payload)
    outputs.finish(staging)
    LOG.info("Pipeline finished in %.1f s; writing the compliance report.",
             plan.timings["pipeline_s"])
    report_path = write_report_after_run(final)
    if not report_path and exit_code == EXIT_OK:
        exit_code = EXIT_REPORT
    if summary != "none":
        print_summary(payload, report_path, final, exit_code, quiet=summary == "quiet")
    if evaluation_error:
        raise evaluation_error
    return exit_code


def _run_staged(req: AuditRequest, plan: Plan, beam_args: Sequence[str], started: str,
                run_id: str, staging: str):
    """(pipeline, result): the pipeline run into ``staging``, its files then promoted to their
    final names in ``--output``; ``plan.config.output`` is the final folder again after."""
    config = plan.config
    final = config.output
    config.output = staging  # every transform writes under the staging folder
    config.progress_workers = progress_workers(PipelineOptions(list(beam_args)))
    outputs.prepare_folder(final, req.overwrite)
    outputs.start_staging(staging, run_id, started)
    promoting = False
    try:
        p, result = _run_pipeline(req, plan, beam_args, final)
        start = time.perf_counter()
        promoting = True
        outputs.promote(staging, final)
        plan.timings["promote_outputs_s"] = time.perf_counter() - start
    except BaseException:
        # Before promotion nothing final exists: drop the staging folder. During it, keep the
        # folder (its marker tells the next run these are an unfinished run's leftovers).
        if not promoting:
            outputs.abandon(staging)
        raise
    config.output = final
    return p, result


def _run_pipeline(req: AuditRequest, plan: Plan, beam_args: Sequence[str], final: str):
    """Build and run the pipeline (writing under the staging folder); (pipeline, result)."""
    start = time.perf_counter()
    p = make_pipeline(beam_args)
    pipeline.build_pipeline(p, plan.config)
    plan.timings["build_pipeline_s"] = time.perf_counter() - start
    for line in cost.estimate_lines(plan.cost_estimate):
        LOG.info("%s", line)
    LOG.info("Auditing %s with %s (layer %s) into %s", req.data, req.model, plan.config.layer,
             final)
    start = time.perf_counter()
    result = p.run()
    result.wait_until_finish()
    plan.timings["pipeline_s"] = time.perf_counter() - start
    return p, result


def _gates(req: AuditRequest, plan: Plan, counts: dict):
    """(TFMA summary, every gate, the EvaluationError if TFMA's results could not be read)."""
    error_gate = {
        "gate": "max_error_rate",
        "passed": counts["error_rate"] <= req.max_error_rate,
        "slice": "overall",
        "metric": "error_rate",
        "value": counts["error_rate"],
        "bound": req.max_error_rate,
    }
    evaluation_error = None
    start = time.perf_counter()
    try:
        tfma_summary, tfma_gates = _evaluation_results(req, plan, counts)
    except evaluation.EvaluationError as exc:
        evaluation_error = exc
        tfma_summary, tfma_gates = {"error": str(exc)}, []
    plan.timings["read_tfma_s"] = time.perf_counter() - start
    start = time.perf_counter()
    gates = [error_gate, *_baseline_gates(req, plan), *tfma_gates]
    plan.timings["baseline_gates_s"] = time.perf_counter() - start
    return tfma_summary, gates, evaluation_error


def _evaluation_results(req: AuditRequest, plan: Plan, counts: dict) -> Tuple[dict, List[dict]]:
    """TFMA's figures for run.json and the gates they feed (raises EvaluationError if empty)."""
    if plan.config.eval_config is None:
        return {"skipped_because": plan.tfma_skipped_because}, []
    if not counts["examples_labeled_ok"]:
        # Nothing labeled was audited: TFMA has nothing to measure, which the error-rate gate
        # and the report already say; it is not a TFMA failure.
        reason = ("no example could be audited (see errors/)" if not counts["examples_ok"]
                  else "none of the audited examples has a label")
        return {"skipped_because": reason}, []
    tfma_dir = layout.join(plan.config.output, layout.TFMA)
    with outputs.local_folder(tfma_dir) as readable:
        table = evaluation.read_tfma_results(readable)
        gates = evaluation.threshold_gates(readable, table, req.min_slice_size)
    gates += evaluation.slice_gap_gates(
        table, evaluation.parse_slice_gaps(req.max_slice_gap), plan.config.source.slice_types,
        req.min_slice_size)
    summary = {
        "output": tfma_dir,
        "config": plan.tfma_config_origin,
        "per_class": limits.per_class_note(plan.model_info.num_classes),
        "confidence_intervals": req.confidence_intervals,
        "metrics": metric_rules.clean_metrics_table(table),  # undefined AUCs: null, not 0
    }
    return summary, gates


def _baseline_gates(req: AuditRequest, plan: Plan) -> List[dict]:
    """The default gates, from the labels and probabilities of the written attributions."""
    if not req.baseline_gates or not plan.config.source.labeled:
        return []
    folder = layout.join(plan.config.output, layout.ATTRIBUTIONS)
    return baseline.baseline_gates(*baseline.read_labels_and_probabilities(folder))


def print_summary(run: dict, report_path: Optional[str], output: str, exit_code: int,
                  quiet: bool = False) -> None:
    """The end-of-run summary on stdout (the log goes to stderr): what a person reads first."""
    from ..report import terminal as terminal_summary

    lines = terminal_summary.summary_lines(run, report_path, runinfo.absolute_uri(output),
                                           exit_code, quiet)
    print(("" if quiet else "\n") + "\n".join(lines), flush=True)  # a blank line after the log


def write_report_after_run(output: str) -> Optional[str]:
    """The compliance report from the finished run's files. It comes after run.json, so a
    failure here loses nothing of the audit: it is logged (with the traceback, as it is a bug or
    an environment problem, not a user error) and the run's exit code says so (5) when it would
    otherwise be 0; a failed gate (3, 4) or a failed run (1) keeps its own code."""
    from ..report import render as report

    try:
        path = report.write_report(output)
    except Exception:
        LOG.exception(
            "The audit is done and run.json is written, but the compliance report could not be "
            "written. Re-render it with `xai-audit report %s` once the cause is fixed.", output)
        return None
    return runinfo.absolute_uri(path)

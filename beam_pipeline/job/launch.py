"""Before and instead of a run: the runner, the output target, Dataflow's rules, dry runs.

``make_pipeline`` picks the engine (local runs use the FnApiRunner); ``check_runner``,
``check_output_target``, ``check_remote_paths`` and ``check_dry_run`` refuse what cannot work
before anything is written; ``translate_only`` is ``--dry_run``: the real job translated for
Dataflow, nothing written, nothing submitted, no network (no cloud output is listed, no cloud
input read).
"""
import logging
import os
import time
from typing import List, Sequence, Tuple

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from ..io import outputs
from ..beam import pipeline
from ..errors import OptionError
from .exit_codes import EXIT_OK
from .plan import AuditRequest, Plan

LOG = logging.getLogger("xai_audit")
LOCAL_RUNNERS = (None, "DirectRunner", "direct", "FnApiRunner")
DATAFLOW_RUNNERS = ("DataflowRunner", "TestDataflowRunner")
DATAFLOW_GRAPH_LIMIT_BYTES = 10 * 1024 * 1024


def make_pipeline(beam_args: Sequence[str]) -> beam.Pipeline:
    """A pipeline on the runner the Beam flags name; local runs use the FnApiRunner.

    Beam 2.77's DirectRunner first tries to download the Prism runner binary (with no time-out);
    the FnApiRunner is the engine the DirectRunner falls back to, runs with no download and
    honours --direct_num_workers and --direct_running_mode.
    """
    options = PipelineOptions(list(beam_args))
    runner_name = options.view_as(StandardOptions).runner
    if runner_name in LOCAL_RUNNERS:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return beam.Pipeline(runner=FnApiRunner(), options=options)
    return beam.Pipeline(options=options)


def progress_workers(options: PipelineOptions) -> int:
    """How many processes share the stages' progress: 1 in-process (threads share one count),
    --direct_num_workers with multi_processing, 0 (unknown: no total) on a remote runner."""
    from apache_beam.options.pipeline_options import DirectOptions

    if options.view_as(StandardOptions).runner not in LOCAL_RUNNERS:
        return 0
    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode == "multi_processing":
        return max(1, direct.direct_num_workers or 1)
    return 1


def is_dry_run(options: PipelineOptions) -> bool:
    """Beam's ``--dry_run`` takes a value (``--dry_run=True``); the CLI turns a bare flag into it."""
    from apache_beam.options.pipeline_options import TestOptions

    return str(options.view_as(TestOptions).dry_run).strip().lower() in ("true", "1", "yes")


def _is_dataflow(options: PipelineOptions) -> bool:
    runner = options.view_as(StandardOptions).runner or ""
    return runner.split(".")[-1] in DATAFLOW_RUNNERS


def check_runner(options: PipelineOptions) -> None:
    """An unknown --runner is refused before anything is written (Beam raises a ValueError)."""
    name = options.view_as(StandardOptions).runner
    if name in LOCAL_RUNNERS:
        return
    from apache_beam.runners.runner import create_runner

    try:
        create_runner(name)
    except (ValueError, ImportError) as exc:
        raise OptionError(f"--runner {name} cannot be used: {exc}") from None


def check_output_target(output: str) -> None:
    if "://" not in output and os.path.exists(output) and not os.path.isdir(output):
        raise OptionError(
            f"--output {output} is an existing file; the audit writes a folder of outputs. "
            "Name a new or existing folder."
        )


def check_dry_run(req: AuditRequest, options: PipelineOptions) -> None:
    """A dry run is Dataflow's translation without submission; make sure it stays offline.

    With no valid ``gs://`` temp or staging location Beam goes online to find or create a
    default bucket, so a dry run refuses that up front (exit 1) instead of hanging offline.
    Planning reads the model and the data (and a TFMA config): from cloud storage that needs
    the network and credentials (minutes of retries offline), so a dry run refuses such paths
    at once. The output location is never touched (``translate_only``).
    """
    if not _is_dataflow(options):
        raise OptionError(
            "--dry_run translates the job for Dataflow without submitting it: it needs "
            "--runner DataflowRunner (with --project, --region, --temp_location gs://...)."
        )
    from apache_beam.options.pipeline_options import GoogleCloudOptions
    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator
    from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner

    cloud = options.view_as(GoogleCloudOptions)
    validator = PipelineOptionsValidator(options, DataflowRunner())
    temp_errors = validator.validate_gcs_path(cloud, "temp_location")
    staging_errors = validator.validate_gcs_path(cloud, "staging_location")
    if temp_errors and staging_errors:
        raise OptionError(
            f"{temp_errors[0].strip()} A dry run needs --temp_location gs://BUCKET/PATH (a valid "
            "bucket name: lowercase letters, digits, dashes); without it Beam would go online "
            "to create a default bucket."
        )
    errors = validator.validate()  # what Beam checks before translating (project id, region...)
    if errors:
        raise OptionError("Dataflow would refuse the options: " + " ".join(
            e.strip() for e in errors))
    remote = [f"--{name.replace('_', '-')} {value}" for name, value in _planned_inputs(req)
              if "://" in value]
    if remote:
        raise OptionError(
            f"{', '.join(remote)}: a dry run plans the job offline and cannot read cloud "
            "storage (that needs the network and credentials). Copy the file(s) to local paths "
            "for the dry run (e.g. gcloud storage cp), or leave out --dry_run to read them; "
            "the output location may stay gs://, a dry run never touches it.")


def _planned_inputs(req: AuditRequest) -> List[Tuple[str, str]]:
    """The inputs planning reads on the launcher, as (option, value)."""
    inputs = [("model", req.model), ("data", req.data)]
    if req.tfma_config and req.tfma_config != "none":
        inputs.append(("tfma_config", req.tfma_config))
    return inputs


def _local_paths(req: AuditRequest) -> List[str]:
    return [f"--{name} {value}" for name, value in
            (("model", req.model), ("data", req.data), ("output", req.output))
            if "://" not in value]


def check_remote_paths(req: AuditRequest, options: PipelineOptions, dry_run: bool) -> None:
    """Dataflow workers cannot see the launcher's disk: model, data and output must be URIs."""
    local = _local_paths(req) if _is_dataflow(options) else []
    if not local:
        return
    text = (f"{', '.join(local)}: Dataflow workers cannot read the launcher's local files; "
            "upload them to gs:// and give those URIs.")
    if not dry_run:
        raise OptionError(text)
    LOG.warning("Dry run: %s (the real run will refuse local paths)", text)


def translate_only(req: AuditRequest, plan: Plan, beam_args: Sequence[str], final: str) -> int:
    """--dry_run: translate the real pipeline for Dataflow; write nothing, submit nothing.

    A local output folder is inspected (reads only) to warn of a run the real one would refuse;
    a cloud one is not even listed: that needs the network and credentials."""
    if "://" in final:
        LOG.info("Dry run: %s is not checked offline; the real run refuses it if it holds an "
                 "earlier run (unless --overwrite).", final)
    else:
        state = outputs.inspect_folder(final)  # reads only
        if state.finished_run and not req.overwrite:
            LOG.warning("Dry run: the real run would refuse %s: %s", final,
                        outputs.refusal_message(state))
    start = time.perf_counter()
    p = make_pipeline(beam_args)
    pipeline.build_pipeline(p, plan.config)
    result = p.run()
    graph_bytes = len(result.job.proto_pipeline.SerializeToString())
    if graph_bytes >= DATAFLOW_GRAPH_LIMIT_BYTES:
        raise OptionError(
            f"The translated job graph is {graph_bytes / 1e6:.1f} MB, above Dataflow's 10 MB "
            "limit; Dataflow would reject the job."
        )
    LOG.info(
        "Dry run: the job translated for Dataflow in %.1f s (serialized pipeline graph %d bytes, "
        "%.2f%% of Dataflow's 10 MB limit; %d transforms). Nothing was submitted and nothing "
        "was written to %s.", time.perf_counter() - start, graph_bytes,
        100 * graph_bytes / DATAFLOW_GRAPH_LIMIT_BYTES,
        len(result.job.proto_pipeline.components.transforms), final,
    )
    return EXIT_OK

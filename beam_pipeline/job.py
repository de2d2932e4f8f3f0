"""The audit job as a whole: plan on the launcher, run the Beam pipeline, account and record.

``plan_audit`` validates everything that can be validated before a worker starts (data, model,
layer, classes, options) and raises ``AuditError`` with advice; ``run_audit`` runs the pipeline,
reads the outputs back to count them, writes run.json and returns the exit code.

The pipeline writes into a staging folder inside ``--output`` and the files get their final names
only when it has finished, run.json last (``outputs``): a killed run leaves no half-written final
file, and an earlier run in the folder is refused unless ``--overwrite``. With Beam's
``--dry_run`` (DataflowRunner) the job is only translated: nothing is written, nothing submitted,
and nothing needs the network (no cloud output is listed, no cloud input read: ``_check_dry_run``).
"""
import io
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from . import (attention, attribution_methods, baseline, cost, decode, evaluation, importance,
               layer_sweep, layout, limits, method_registry, metric_rules, model_io, outputs,
               pipeline, quality, runinfo, sources)
from . import intervals
from .schemas import attribution_schema
from .errors import OptionError, UsageError

LOG = logging.getLogger("xai_audit")
LOCAL_RUNNERS = (None, "DirectRunner", "direct", "FnApiRunner")
DATAFLOW_RUNNERS = ("DataflowRunner", "TestDataflowRunner")
DATAFLOW_GRAPH_LIMIT_BYTES = 10 * 1024 * 1024

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_GATE, EXIT_ERROR_RATE, EXIT_REPORT = 0, 1, 2, 3, 4, 5


@dataclass
class AuditRequest:
    """The ``run`` options, as parsed from the command line (DESIGN.md)."""

    model: str
    data: str
    output: str
    image_column: str = "image"
    label_column: str = "label"
    mask_column: str = "mask"
    id_column: str = "id"
    slice_columns: Optional[List[str]] = None
    slice_bins: Optional[List[str]] = None  # --slice-bins COLUMN=EDGES, repeatable
    class_names: Optional[List[str]] = None
    preprocess: str = "unit"
    methods: Sequence[str] = ("gradcam",)
    layer: str = "auto"
    target: str = "predicted"
    batch_size: int = 32
    seed: int = 0
    max_error_rate: float = 0.01
    unsafe_deserialization: bool = False
    image_size: Optional[str] = None
    max_image_pixels: int = decode.DEFAULT_MAX_IMAGE_PIXELS
    max_image_bytes: int = sources.DEFAULT_MAX_IMAGE_BYTES
    read_timeout: float = sources.DEFAULT_READ_TIMEOUT_S
    map_size: int = 56
    gradcam_activation: str = method_registry.default("gradcam_activation")
    smoothgrad_samples: int = method_registry.default("smoothgrad_samples")
    smoothgrad_sigma: float = method_registry.default("smoothgrad_sigma")
    ig_steps: int = method_registry.default("ig_steps")
    ig_baseline: str = method_registry.default("ig_baseline")
    faithfulness_sample: int = cost.DEFAULT_FAITHFULNESS_SAMPLE
    sanity_sample: int = cost.DEFAULT_SANITY_SAMPLE
    tfma_config: Optional[str] = None  # a path, None for the default, "none" to skip TFMA
    confidence_intervals: bool = False
    max_slice_gap: Optional[str] = None  # e.g. "auc=0.05,binary_accuracy=0.1"
    min_slice_size: int = 30  # slices with fewer examples are left out of slice gaps
    baseline_gates: bool = True  # better than chance, not degenerate (labeled data)
    permutation_features: str = "patches:4x4"
    permutation_repeats: int = 3
    importance_sample: Any = importance.DEFAULT_SAMPLE  # N, or "all"
    shard_size: int = 256
    overwrite: bool = False  # replace an earlier run in --output (else it is refused)
    allow_paths_outside_data: bool = False


@dataclass
class Plan:
    config: pipeline.AuditConfig
    model_info: model_io.ClassifierInfo
    model_sha256: str
    timings: Dict[str, float]
    tfma_config_origin: Optional[str] = None
    tfma_skipped_because: Optional[str] = None
    importance_skipped_because: Optional[str] = None
    performance_thresholds: bool = False  # the TFMA config has thresholds, or --max-slice-gap
    cost_estimate: Optional[dict] = None  # cost.estimate: image passes per stage


def _check_options(req: AuditRequest) -> None:
    known = attribution_methods.ALL_METHODS
    unknown = [m for m in req.methods if m not in known]
    if unknown or not req.methods:
        raise OptionError(
            f"--methods {','.join(req.methods)}: name one or more of {', '.join(known)}."
        )
    if len(set(req.methods)) != len(req.methods):
        raise OptionError("--methods names a method twice.")
    method_registry.check_options(req.methods, _method_options(req))
    if req.map_size < 1:
        raise OptionError("--map-size must be at least 1.")
    if (req.layer == "all" or "," in req.layer) and "gradcam" not in req.methods:
        raise OptionError(f"--layer {req.layer} sweeps Grad-CAM; add gradcam to --methods.")
    if req.faithfulness_sample < 0 or req.sanity_sample < 0:
        raise OptionError("--faithfulness-sample and --sanity-sample must be 0 or more.")
    if req.batch_size < 1:
        raise OptionError("--batch-size must be at least 1.")
    if not 0.0 <= req.max_error_rate <= 1.0:
        raise OptionError("--max-error-rate is a fraction between 0 and 1.")
    if req.max_image_pixels < 1:
        raise OptionError("--max-image-pixels must be positive.")
    if req.min_slice_size < 0:
        raise OptionError("--min-slice-size must be 0 or more.")
    if req.max_image_bytes < 1:
        raise OptionError("--max-image-bytes must be positive.")
    if not 0 < req.read_timeout <= 86400:  # also refuses nan and inf
        raise OptionError("--read-timeout is a number of seconds above 0 and at most 86400.")
    repeated = sorted({n for n in req.class_names or [] if req.class_names.count(n) > 1})
    if repeated:
        raise OptionError(
            f"--class-names names {', '.join(repeated)} more than once; give each class index "
            "its own name, in the model's index order.")


def _method_options(req: AuditRequest) -> Dict[str, Any]:
    """The options the explainers are built with (run.json's options keep the request's)."""
    return {**{key: getattr(req, key) for key in method_registry.OPTIONS}, "seed": req.seed}


def _class_names(req: AuditRequest, spec: sources.SourceSpec, num_classes: int) -> List[str]:
    if req.class_names:
        if len(req.class_names) != num_classes:
            raise OptionError(
                f"--class-names gives {len(req.class_names)} names but the model has "
                f"{num_classes} classes."
            )
        return list(req.class_names)
    if spec.label_names == []:
        raise OptionError(
            "The TFRecords hold labels as text; give the class names in index order with "
            "--class-names."
        )
    if spec.label_names:
        if len(spec.label_names) != num_classes:
            raise OptionError(
                f"The data has {len(spec.label_names)} classes ({', '.join(spec.label_names)}) but "
                f"the model has {num_classes} outputs. Pass --class-names in the model's index "
                "order if some classes are absent from the data."
            )
        return list(spec.label_names)
    return [f"class_{k}" for k in range(num_classes)]


def _target(req: AuditRequest, spec: sources.SourceSpec, num_classes: int):
    if req.target in ("predicted", "label"):
        if req.target == "label" and not spec.labeled:
            raise OptionError("--target label needs labels, and the data has none.")
        return req.target
    try:
        index = int(req.target)
    except ValueError:
        raise OptionError(
            f"--target {req.target!r} must be predicted, label, or a class index."
        ) from None
    if not 0 <= index < num_classes:
        raise OptionError(f"--target {index} is outside the model's classes 0..{num_classes - 1}.")
    return index


def _image_spec(req: AuditRequest, info: model_io.ClassifierInfo) -> decode.ImageSpec:
    size = decode.parse_image_size(req.image_size)
    if info.height and info.width:
        if size and size != (info.height, info.width):
            raise OptionError(
                f"--image-size {req.image_size} differs from the model's fixed input "
                f"{info.height}x{info.width}; leave it out."
            )
        size = (info.height, info.width)
    if not size:
        raise OptionError(
            "The model accepts any image size; choose the size to audit at with --image-size HxW."
        )
    return decode.ImageSpec(size[0], size[1], info.channels, req.preprocess, req.max_image_pixels)


def _gradcam_layers(model, req: AuditRequest):
    """(the layer of the gradcam(_plus_plus) columns, the swept layers or []) for --layer."""
    if not any(m in attribution_methods.LAYER_METHODS for m in req.methods):
        return None, []
    if req.layer == "all":
        return model_io.find_layer(model, "auto")[0], [n for n, _ in layer_sweep.sweep_layers(model)]
    if "," in req.layer:
        names = [model_io.find_layer(model, part.strip())[0] for part in req.layer.split(",")]
        return names[-1], names
    return model_io.find_layer(model, req.layer)[0], []


def plan_audit(req: AuditRequest) -> Plan:
    """Validate the request on the launcher; raises AuditError subclasses with advice."""
    _check_options(req)
    timings = {}
    start = time.perf_counter()
    columns = sources.ColumnNames(req.image_column, req.label_column, req.mask_column, req.id_column)
    spec = sources.inspect_source(req.data, columns, req.slice_columns,
                                  req.allow_paths_outside_data,
                                  sources.parse_slice_bins(req.slice_bins),
                                  sources.ReadLimits(req.max_image_bytes, req.read_timeout))
    if spec.skipped_slices:
        LOG.warning("%s", sources.skipped_slices_sentence(spec.skipped_slices))
    evaluation.check_slice_columns(spec.slice_types)  # before loading the model: exit 1 fast
    timings["inspect_data_s"] = time.perf_counter() - start

    start = time.perf_counter()
    model, info = model_io.load_classifier(req.model, req.unsafe_deserialization)
    for caveat in info.caveats:
        LOG.warning("Model caveat: %s", caveat)
    layer_name, sweep_names = _gradcam_layers(model, req)
    if "cam" in req.methods:
        attribution_methods.cam_layers(model)  # a model without a GAP → Dense head: exit 1 now
    sha = model_io.model_sha256(req.model)
    timings["inspect_model_s"] = time.perf_counter() - start

    config = pipeline.AuditConfig(
        model_path=req.model,
        output=req.output.rstrip("/"),
        source=spec,
        image_spec=_image_spec(req, info),
        class_names=_class_names(req, spec, info.num_classes),
        head=info.head,
        layer=layer_name,
        target=_target(req, spec, info.num_classes),
        batch_size=req.batch_size,
        unsafe_deserialization=req.unsafe_deserialization,
        methods=list(req.methods),
        method_options=_method_options(req),
        map_size=req.map_size,
        sweep=bool(sweep_names),
        sweep_layer_names=sweep_names,
        faithfulness_sample=req.faithfulness_sample,
        sanity_sample=req.sanity_sample,
        seed=req.seed,
    )
    # Fails early (exit 1) when a slice column clashes with an output column.
    attribution_schema(spec.column_types, spec.has_masks, req.methods, bool(req.faithfulness_sample))
    plan = Plan(config=config, model_info=info, model_sha256=sha, timings=timings)
    if info.num_classes > limits.MAX_PER_CLASS_METRICS:
        LOG.info("Per-class figures: %s.", limits.per_class_note(info.num_classes))
    _plan_importance(req, plan)
    plan.cost_estimate = _cost_estimate(plan, model)
    start = time.perf_counter()
    _plan_evaluation(req, plan)
    timings["plan_tfma_s"] = time.perf_counter() - start
    return plan


def _plan_importance(req: AuditRequest, plan: Plan) -> None:
    if req.permutation_repeats < 1:
        raise OptionError("--permutation-repeats must be at least 1.")
    if req.shard_size < 1:
        raise OptionError("--shard-size must be at least 1.")
    spec = plan.config.image_spec
    features = importance.parse_features(
        req.permutation_features, spec.height, spec.width, spec.channels)
    cfg = plan.config
    cfg.permutation_repeats, cfg.shard_size, cfg.seed = (
        req.permutation_repeats, req.shard_size, req.seed)
    cfg.importance_sample = importance.parse_sample(req.importance_sample)
    cfg.region_grid = attention.region_grid(features)  # also without labels: no importance
    if not features:
        plan.importance_skipped_because = "--permutation-features none"
    elif not cfg.source.labeled:
        plan.importance_skipped_because = "the data has no labels"
    else:
        cfg.permutation_features = features


def _cost_estimate(plan: Plan, model) -> dict:
    """Image passes per stage (cost.estimate) from the plan and the model's layers."""
    cfg = plan.config
    # The layers the sanity check randomizes (quality.parameterized_layers, without making
    # frozen layers trainable on the launcher's model).
    parameterized = sum(1 for _, layer in model_io.iter_layers(model)
                        if layer.trainable_weights or (not layer.trainable and layer.weights))
    methods = ["gradcam" if cfg.sweep and m == "gradcam" else m for m in cfg.methods]
    return cost.estimate(
        cfg.source.examples_expected, None, methods, cfg.method_options,
        cfg.faithfulness_sample, cfg.sanity_sample, cfg.importance_sample,
        len(cfg.permutation_features), cfg.permutation_repeats, parameterized)


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


def _plan_evaluation(req: AuditRequest, plan: Plan) -> None:
    """Choose and complete the TFMA config, or record why TFMA is skipped."""
    gaps = evaluation.parse_slice_gaps(req.max_slice_gap)  # malformed: a usage problem, now
    spec = plan.config.source
    if req.tfma_config == "none":
        if gaps:
            raise UsageError("--max-slice-gap gates TFMA's metrics; it cannot be used with "
                             "--tfma-config none.")
        plan.tfma_skipped_because = "--tfma-config none"
        return
    if not spec.labeled:
        if req.tfma_config or req.max_slice_gap:
            raise OptionError(
                "TFMA metrics and gates need labels, and the data has none; leave out "
                "--tfma-config / --max-slice-gap, or add a label column."
            )
        plan.tfma_skipped_because = "the data has no labels"
        return
    config, origin = evaluation.load_eval_config(req.tfma_config, plan.model_info.num_classes)
    plan.config.eval_config = evaluation.complete_eval_config(
        config, plan.model_info.num_classes, list(spec.slice_types), spec.has_masks,
        req.confidence_intervals,
    )
    evaluation.check_eval_config(plan.config.eval_config, origin)
    plan.tfma_config_origin = origin
    evaluation.check_gap_metrics(
        gaps, evaluation.computed_metric_names(plan.config.eval_config), origin)
    plan.performance_thresholds = bool(gaps) or evaluation.has_thresholds(config)


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


def _check_dry_run(req: AuditRequest, options: PipelineOptions) -> None:
    """A dry run is Dataflow's translation without submission; make sure it stays offline.

    With no valid ``gs://`` temp or staging location Beam goes online to find or create a
    default bucket, so a dry run refuses that up front (exit 1) instead of hanging offline.
    Planning reads the model and the data (and a TFMA config): from cloud storage that needs
    the network and credentials (minutes of retries offline), so a dry run refuses such paths
    at once. The output location is never touched (``_translate_only``).
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


def _check_remote_paths(req: AuditRequest, options: PipelineOptions, dry_run: bool) -> None:
    """Dataflow workers cannot see the launcher's disk: model, data and output must be URIs."""
    local = _local_paths(req) if _is_dataflow(options) else []
    if not local:
        return
    text = (f"{', '.join(local)}: Dataflow workers cannot read the launcher's local files; "
            "upload them to gs:// and give those URIs.")
    if not dry_run:
        raise OptionError(text)
    LOG.warning("Dry run: %s (the real run will refuse local paths)", text)


def _translate_only(req: AuditRequest, plan: Plan, beam_args: Sequence[str], final: str) -> int:
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


def _count_outputs(output: str, counters: Dict[str, float]) -> dict:
    """Counts from the files a reader will see, checked against the job's own input counter."""
    ok_ids = runinfo.read_column(pipeline.output_path(output, "attributions"), "example_id")
    labels = runinfo.read_column(pipeline.output_path(output, "attributions"), "label")
    error_types = runinfo.read_column(pipeline.output_path(output, "errors"), "error_type")
    failed, total = len(error_types), len(ok_ids) + len(error_types)
    examples_in = int(counters.get("examples_in", total))
    # Audited examples with an empty label: they have maps and predictions, but no metric.
    unlabeled = (runinfo.read_column(pipeline.output_path(output, "attributions"), "label")
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
    tfma_dir = pipeline.output_path(plan.config.output, "tfma")
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


def _read_table(path: str) -> List[dict]:
    with FileSystems.open(path) as handle:
        return pq.read_table(io.BytesIO(handle.read())).to_pylist()


def _quality_summary(plan: Plan) -> dict:
    """Sanity-check verdicts per method and where the layer sweep's attention lands best."""
    cfg = plan.config
    summary: dict = {"faithfulness_sample": cfg.faithfulness_sample,
                     "sanity_sample": cfg.sanity_sample}
    if cfg.faithfulness_sample:  # the sample size used, against the one asked for
        column = runinfo.read_column(pipeline.output_path(cfg.output, "attributions"),
                                     f"{cfg.methods[0]}_deletion_auc")
        summary["faithfulness_examples"] = len(column) - column.null_count
        summary["faithfulness"] = intervals.faithfulness_intervals(lambda name: runinfo.read_column(
            pipeline.output_path(cfg.output, "attributions"), name).to_numpy(), cfg.methods)
    if cfg.sanity_sample:
        rows = _read_table(pipeline.output_path(cfg.output, "sanity.parquet"))
        summary["sanity"] = {m: {"flagged": r["flagged"], "spearman_fully_random": r["spearman_mean"],
                                 "judged_step": r["step"], "examples": r["examples"],
                                 "sampled": r.get("sampled")}
                             for m, r in quality.sanity_final_rows(rows).items()}
    if cfg.sweep:
        rows = _read_table(pipeline.output_path(cfg.output, "layer_sweep.parquet"))
        summary["layer_sweep"] = {"layers": len(cfg.sweep_layer_names),
                                  "best_layer_by_energy_lift": quality.best_sweep_layer(rows)}
    return summary


def _importance_sample(plan: Plan, rows: List[dict], counters: Dict[str, float]) -> dict:
    """The sample importance ran on: asked for, used (examples in the figures), and the labeled
    population it was drawn from (a Beam counter: None where the runner has no metrics)."""
    cfg = plan.config
    labeled = counters.get(pipeline.IMPORTANCE_LABELED)
    return {
        "requested": "all" if cfg.importance_sample is None else cfg.importance_sample,
        "examples": max((r["n"] or 0 for r in rows), default=0),
        "labeled_examples": None if labeled is None else int(labeled),
        "selected": (None if counters.get(pipeline.IMPORTANCE_SAMPLED) is None
                     else int(counters[pipeline.IMPORTANCE_SAMPLED])),
        "seed": cfg.seed,
        "selection": "every labeled example" if cfg.importance_sample is None else
                     "the labeled examples with the smallest sha256(seed, id) keys",
    }


def _importance_summary(plan: Plan, counters: Optional[Dict[str, float]] = None) -> dict:
    cfg = plan.config
    if not cfg.permutation_features:
        return {"skipped_because": plan.importance_skipped_because}
    path = pipeline.output_path(cfg.output, "importance_summary.parquet")
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


def _baseline_gates(req: AuditRequest, plan: Plan) -> List[dict]:
    """The default gates, from the labels and probabilities of the written attributions."""
    if not req.baseline_gates or not plan.config.source.labeled:
        return []
    folder = pipeline.output_path(plan.config.output, "attributions")
    return baseline.baseline_gates(*baseline.read_labels_and_probabilities(folder))


def _exit_code(gates: List[dict]) -> int:
    """4 when too many examples failed (the figures cover too little of the data), else 3 when
    any other gate failed, else 0."""
    failed = {g["gate"] for g in gates if not g["passed"]}
    if "max_error_rate" in failed:
        return EXIT_ERROR_RATE
    return EXIT_GATE if failed else EXIT_OK


def run_audit(req: AuditRequest, beam_args: Sequence[str], summary: str = "full") -> int:
    """Plan, run, account, gate. Returns the exit code (DESIGN.md).

    Outputs are written into a staging folder and promoted to their final names after the
    pipeline, run.json last (``outputs``); a ``--dry_run`` stops after translating the job.
    ``summary``: what is printed on stdout at the end (``terminal_summary``): ``full``,
    ``quiet`` (the verdict and the report path) or ``none`` (the caller prints it).
    """
    started = runinfo.now_iso()
    options = PipelineOptions(list(beam_args))
    dry_run = is_dry_run(options)
    if dry_run:
        _check_dry_run(req, options)
    _check_remote_paths(req, options, dry_run)
    _check_runner(options)
    final = req.output.rstrip("/")
    _check_output_target(final)
    run_id = outputs.new_run_id()
    if dry_run:
        plan = plan_audit(req)
        plan.config.output = outputs.staging_path(final, run_id)
        plan.config.progress_workers = progress_workers(options)
        return _translate_only(req, plan, beam_args, final)
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


def _check_runner(options: PipelineOptions) -> None:
    """An unknown --runner is refused before anything is written (Beam raises a ValueError)."""
    name = options.view_as(StandardOptions).runner
    if name in LOCAL_RUNNERS:
        return
    from apache_beam.runners.runner import create_runner

    try:
        create_runner(name)
    except (ValueError, ImportError) as exc:
        raise OptionError(f"--runner {name} cannot be used: {exc}") from None


def _check_output_target(output: str) -> None:
    if "://" not in output and os.path.exists(output) and not os.path.isdir(output):
        raise OptionError(
            f"--output {output} is an existing file; the audit writes a folder of outputs. "
            "Name a new or existing folder."
        )


def _run_locked(req: AuditRequest, beam_args: Sequence[str], started: str, run_id: str,
                summary: str) -> int:
    """The run proper, with the output folder's lock held; ``summary`` as in run_audit."""
    plan = plan_audit(req)
    config = plan.config
    final = config.output
    staging = outputs.staging_path(final, run_id)
    config.output = staging  # every transform writes under the staging folder
    config.progress_workers = progress_workers(PipelineOptions(list(beam_args)))

    outputs.prepare_folder(final, req.overwrite)
    outputs.start_staging(staging, run_id, started)
    promoting = False
    try:
        start = time.perf_counter()
        p = make_pipeline(beam_args)
        pipeline.build_pipeline(p, config)
        plan.timings["build_pipeline_s"] = time.perf_counter() - start
        for line in cost.estimate_lines(plan.cost_estimate):
            LOG.info("%s", line)
        LOG.info("Auditing %s with %s (layer %s) into %s", req.data, req.model, config.layer,
                 final)
        start = time.perf_counter()
        result = p.run()
        result.wait_until_finish()
        plan.timings["pipeline_s"] = time.perf_counter() - start
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

    counters = runinfo.beam_counters(result)
    counts = _count_outputs(final, counters)
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
    exit_code = EXIT_FAILED if evaluation_error else _exit_code(gates)
    payload = _run_json(req, plan, p, started, counts, counters, tfma_summary, gates, exit_code)
    payload["run_id"] = run_id
    payload["output_files"] = outputs.run_files(final)  # what --overwrite may remove later
    # run.json last and atomically: its presence means every other output is complete.
    outputs.write_json_atomic(pipeline.output_path(final, outputs.RUN_JSON), payload)
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


def print_summary(run: dict, report_path: Optional[str], output: str, exit_code: int,
                  quiet: bool = False) -> None:
    """The end-of-run summary on stdout (the log goes to stderr): what a person reads first."""
    from . import terminal_summary

    lines = terminal_summary.summary_lines(run, report_path, runinfo.absolute_uri(output),
                                           exit_code, quiet)
    print(("" if quiet else "\n") + "\n".join(lines), flush=True)  # a blank line after the log


def write_report_after_run(output: str) -> Optional[str]:
    """The compliance report from the finished run's files. It comes after run.json, so a
    failure here loses nothing of the audit: it is logged (with the traceback, as it is a bug or
    an environment problem, not a user error) and the run's exit code says so (5) when it would
    otherwise be 0; a failed gate (3, 4) or a failed run (1) keeps its own code."""
    from . import report

    try:
        path = report.write_report(output)
    except Exception:
        LOG.exception(
            "The audit is done and run.json is written, but the compliance report could not be "
            "written. Re-render it with `xai-audit report %s` once the cause is fixed.", output)
        return None
    return runinfo.absolute_uri(path)


def _run_json(req, plan, p, started, counts, counters, tfma_summary, gates, exit_code) -> dict:
    config, info = plan.config, plan.model_info
    options = p.options.get_all_options(drop_default=True)
    return {
        "tool": "xai-audit",
        "tool_version": runinfo.tool_version(),
        "command_line": runinfo.command_line(),
        "started_at": started,
        "finished_at": runinfo.now_iso(),
        "status": "passed" if exit_code == EXIT_OK else "failed",
        "exit_code": exit_code,
        "model": {
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
        },
        "data": {
            "uri": req.data,
            "absolute_uri": runinfo.absolute_uri(req.data),
            "kind": config.source.kind,
            "fingerprint": config.source.fingerprint,
            "labeled": config.source.labeled,
            "has_masks": config.source.has_masks,
            "slice_columns": config.source.slice_types,
            # Written to attributions, not sliced on: too many values, or binned (slice_bins).
            "carried_columns": config.source.carried_types,
            "skipped_slice_columns": config.source.skipped_slices,
            "skipped_slice_columns_note": (sources.skipped_slices_sentence(
                config.source.skipped_slices) if config.source.skipped_slices else None),
            "slice_bins": config.source.slice_bins,
            "files": len(config.source.files) or None,
        },
        "runner": {"name": options.get("runner") or _runner_name(p), "options": options},
        "seed": req.seed,
        "options": {k: v for k, v in asdict(req).items() if k not in ("model", "data", "output")},
        "libraries": runinfo.library_versions(),
        "counts": counts,
        "timings_s": plan.timings,
        "cost": {"estimate": plan.cost_estimate, "stage_busy_s": _stage_seconds(counters)},
        "beam_counters": counters,
        "tfma": tfma_summary,
        "importance": _importance_summary(plan, counters),
        "attention": {"method": config.methods[0], "region_grid": list(config.region_grid),
                      "by_slice": layout.join(config.output, layout.ATTENTION_BY_SLICE)},
        "quality": _quality_summary(plan),
        "gates": gates,
        "verdict_scope": baseline.verdict_scope(req.baseline_gates, config.source.labeled,
                                                plan.performance_thresholds),
    }


def _runner_name(p: beam.Pipeline) -> str:
    """The runner that ran ``p``: PortableRunner (and Flink's and Spark's, its subclasses) clear
    --runner from the options they submit, so the options alone would not say."""
    name = type(p.runner).__name__
    return "FnApiRunner (local)" if name == "FnApiRunner" else name

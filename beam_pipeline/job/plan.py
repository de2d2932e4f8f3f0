"""Planning on the launcher: ``AuditRequest`` (the ``run`` options) → ``Plan``.

``plan_audit`` validates everything that can be validated before a worker starts (options, data,
model, layer, classes, method options, TFMA config) and raises ``AuditError`` subclasses with
advice; it completes the ``AuditConfig`` the workers get, the cost estimate, and why TFMA or
importance is skipped.
"""
import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from ..measures import attention, importance
from ..explain import attribution_methods, layer_sweep, registry as method_registry, model_io
from . import cost
from ..io import decode, limits, sources
from ..evaluation import transform as evaluation
from ..beam import model_holder
from ..explain import precision
from ..beam.audit_config import AuditConfig
from ..errors import OptionError, UsageError
from ..io.schemas import attribution_schema

LOG = logging.getLogger("xai_audit")


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
    precision: str = precision.DEFAULT  # the model's compute: float32 | bfloat16
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
    config: AuditConfig
    model_info: model_io.ClassifierInfo
    model_sha256: str
    timings: Dict[str, float]
    tfma_config_origin: Optional[str] = None
    tfma_skipped_because: Optional[str] = None
    importance_skipped_because: Optional[str] = None
    performance_thresholds: bool = False  # the TFMA config has thresholds, or --max-slice-gap
    cost_estimate: Optional[dict] = None  # cost.estimate: image passes per stage
    precision: Optional[dict] = None  # precision.Comparison: requested, used, why, figures


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
    precision.check(req.precision)  # before the model is loaded: exit 2 at once
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
    model, info = model_holder.load_classifier(req.model, req.unsafe_deserialization)
    for caveat in info.caveats:
        LOG.warning("Model caveat: %s", caveat)
    layer_name, sweep_names = _gradcam_layers(model, req)
    if "cam" in req.methods:
        attribution_methods.cam_layers(model)  # a model without a GAP → Dense head: exit 1 now
    sha = model_io.model_sha256(req.model)
    timings["inspect_model_s"] = time.perf_counter() - start

    config = AuditConfig(
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
    plan.precision = precision.plan(req.precision, config).as_dict()
    timings["plan_precision_s"] = time.perf_counter() - start
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

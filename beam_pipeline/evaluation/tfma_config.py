"""The TFMA ``EvalConfig`` of a run: loading it (``--tfma-config`` or ``tfma_configs/``),
completing it with what depends on the run (prediction key, slicing specs, class ids, MeanLabel),
and checking it at planning (``check_eval_config``, ``computed_metric_names``,
``check_slice_columns``) so a config that would measure nothing stops the job before it runs.
"""
from importlib import resources
from typing import Iterable, List, Optional, Sequence

from google.protobuf import text_format

from ..errors import OptionError
from ..io.limits import MAX_PER_CLASS_METRICS
from .metric_rules import ATTENTION_ON_MASK, ATTENTION_REGION, DERIVED_SLICES, PREDICTION_CORRECT

LABEL, SCORE, PROBABILITIES = "label", "score", "probabilities"
# The feature keys the job gives TFMA (evaluation.transform.tfma_features): a data column of one of these
# names would silently replace the model's score or a derived slice.
TFMA_FEATURE_KEYS = (LABEL, SCORE, PROBABILITIES, *DERIVED_SLICES)


def check_slice_columns(slice_columns: Iterable[str]) -> None:
    """Refuse data columns that would take the place of a feature the job computes (OptionError)."""
    clash = sorted(set(slice_columns) & set(TFMA_FEATURE_KEYS))
    if clash:
        raise OptionError(
            f"The data has column(s) {', '.join(clash)} among its slice columns: a name the "
            f"audit gives its own metric features ({', '.join(TFMA_FEATURE_KEYS)}), so the "
            "column would silently replace the model's score, label or derived slices in the "
            "metrics. Rename the column in the "
            "data, or list the slice columns to keep with --slice-columns (or name it as the "
            "label/id/image/mask with --label-column etc. if it is one of those).")


def load_eval_config(path: Optional[str], num_classes: int):
    """The ``--tfma-config`` file, or the default for the number of classes."""
    from apache_beam.io.filesystems import FileSystems
    from tensorflow_model_analysis.proto import config_pb2

    if path:
        try:
            with FileSystems.open(path) as handle:
                text = handle.read().decode()
        except Exception as exc:
            raise OptionError(f"--tfma-config {path} could not be read ({exc}).") from None
        origin = path
    else:
        name = "binary.pbtxt" if num_classes == 2 else "multiclass.pbtxt"
        text = resources.files("tfma_configs").joinpath(name).read_text()
        origin = f"tfma_configs/{name}"
    try:
        return text_format.Parse(text, config_pb2.EvalConfig()), origin
    except text_format.ParseError as exc:
        raise OptionError(f"--tfma-config {origin} is not a text-format EvalConfig: {exc}") from None


def complete_eval_config(
    config,
    num_classes: int,
    slice_columns: Sequence[str],
    has_masks: bool,
    confidence_intervals: bool,
):
    """Fill in what depends on the run; returns a new EvalConfig."""
    from tensorflow_model_analysis.proto import config_pb2

    done = config_pb2.EvalConfig()
    done.CopyFrom(config)
    if not done.model_specs:
        done.model_specs.add()
    for spec in done.model_specs:
        spec.label_key = spec.label_key or LABEL
        spec.prediction_key = spec.prediction_key or (SCORE if num_classes == 2 else PROBABILITIES)
        if spec.prediction_key not in (SCORE, PROBABILITIES):
            raise OptionError(
                f"The TFMA config's prediction_key {spec.prediction_key!r} is not a column the job "
                f"feeds TFMA; use {SCORE!r} (probability of class 1, two classes) or "
                f"{PROBABILITIES!r}."
            )
        if spec.prediction_key == SCORE and num_classes != 2:
            raise OptionError(
                f"The TFMA config reads {SCORE!r} (binary), but the model has {num_classes} "
                "classes; use tfma_configs/multiclass.pbtxt."
            )
    available = (set(slice_columns) | {PREDICTION_CORRECT, ATTENTION_REGION}
                 | ({ATTENTION_ON_MASK} if has_masks else set()))
    for spec in done.slicing_specs:
        unknown = [k for k in spec.feature_keys if k not in available]
        if unknown:
            raise OptionError(
                f"The TFMA config slices by {', '.join(unknown)}, which the data does not have. "
                f"Slice columns: {', '.join(sorted(available))}."
            )
    if not any(not s.feature_keys and not s.feature_values for s in done.slicing_specs):
        done.slicing_specs.add()  # the overall slice
    single = {s.feature_keys[0] for s in done.slicing_specs if len(s.feature_keys) == 1}
    for column in [*slice_columns, *sorted(available - set(slice_columns))]:
        if column not in single:
            done.slicing_specs.add(feature_keys=[column])
    for metrics_spec in done.metrics_specs:
        if metrics_spec.HasField("binarize") and metrics_spec.binarize.HasField("class_ids") \
                and not metrics_spec.binarize.class_ids.values:
            _fill_class_ids(metrics_spec, num_classes)
        _add_mean_label(metrics_spec)
    if confidence_intervals:
        done.options.compute_confidence_intervals.value = True
    return done


def _add_mean_label(metrics_spec) -> None:
    """Per slice (and class), the share of positives tells where AUC and recall are undefined
    (``metric_rules``); a spec computing those gets MeanLabel if it lacks it."""
    names = {m.class_name for m in metrics_spec.metrics}
    needs = any("AUC" in n or n == "Recall" for n in names)
    if needs and "MeanLabel" not in names and not metrics_spec.binarize.top_k_list.values \
            and not metrics_spec.binarize.k_list.values:
        metrics_spec.metrics.add(class_name="MeanLabel")
def _fill_class_ids(metrics_spec, num_classes: int) -> None:
    """An empty ``class_ids`` means every class, up to MAX_PER_CLASS_METRICS; above that one
    metric set per class costs minutes and gigabytes (1,000 classes), so the spec becomes one
    micro-averaged one-vs-rest set instead (labels and probabilities flattened)."""
    if num_classes <= MAX_PER_CLASS_METRICS:
        metrics_spec.binarize.class_ids.values.extend(range(num_classes))
        return
    metrics_spec.ClearField("binarize")
    metrics_spec.aggregate.micro_average = True


def check_eval_config(config, origin: str) -> None:
    """Refuse, at planning, a config TFMA would run without measuring anything or could not
    build (an unknown metric class): otherwise the job runs and only then finds no metrics."""
    from tensorflow_model_analysis.metrics import metric_specs

    if not any(spec.metrics for spec in config.metrics_specs):
        raise OptionError(
            f"--tfma-config {origin} names no metrics (no metrics_specs with metrics), so TFMA "
            "would measure nothing. Add e.g. metrics_specs { metrics { class_name: "
            "\"ExampleCount\" } metrics { class_name: \"AUC\" } }, start from tfma_configs/, "
            "or pass --tfma-config none to skip TFMA."
        )
    try:
        metric_specs.to_computations(config.metrics_specs, eval_config=config)
    except Exception as exc:  # TFMA raises ValueError/TypeError/ImportError/KeyError here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OptionError(
            f"--tfma-config {origin}: TFMA cannot build its metrics ({first}). Use TFMA metric "
            "class names such as ExampleCount, AUC, Precision, Recall, BinaryAccuracy."
        ) from None



def has_thresholds(config) -> bool:
    """Whether the EvalConfig sets any threshold (TFMA validates only then)."""
    for spec in config.metrics_specs:
        if spec.thresholds or spec.per_slice_thresholds or spec.cross_slice_thresholds:
            return True
        for metric in spec.metrics:
            if metric.HasField("threshold") or metric.per_slice_thresholds \
                    or metric.cross_slice_thresholds:
                return True
    return False


def _metric_name(metric_config) -> Optional[str]:
    """The name TFMA gives a metrics_specs entry: its config's "name", else the name of an
    instance of the tfma.metrics class, else the class name in snake case."""
    import json
    import re

    import tensorflow_model_analysis as tfma

    if metric_config.config:
        for text in (metric_config.config, "{" + metric_config.config + "}"):
            try:
                options = json.loads(text)
            except ValueError:
                continue
            if isinstance(options, dict) and options.get("name"):
                return str(options["name"])
    metric_class = getattr(tfma.metrics, metric_config.class_name, None)
    if metric_class is not None and not metric_config.module:
        try:
            return metric_class().name
        except Exception:  # a class needing arguments: fall through to its snake-case name
            pass
    return re.sub(r"(?<!^)(?=[A-Z])", "_", metric_config.class_name).lower()


def _sub_keys(spec) -> List[str]:
    keys = [""] if not spec.HasField("binarize") or spec.HasField("aggregate") else []
    if spec.HasField("binarize"):
        keys += [f"classId:{k}" for k in spec.binarize.class_ids.values]
        keys += [f"topK:{k}" for k in spec.binarize.top_k_list.values]
        keys += [f"k:{k}" for k in spec.binarize.k_list.values]
    return keys


def computed_metric_names(config) -> List[str]:
    """The scalar metric names a (completed) EvalConfig makes TFMA compute, as they appear in
    run.json's tfma.metrics (``auc``, ``auc[classId:1]``, ``precision[topK:1]``); no plots."""
    names: List[str] = []
    for spec in config.metrics_specs:
        for metric_config in spec.metrics:
            name = _metric_name(metric_config)
            if not name or name.endswith("_plot"):
                continue
            for sub_key in _sub_keys(spec):
                full = f"{name}[{sub_key}]" if sub_key else name
                if full not in names:
                    names.append(full)
    return names

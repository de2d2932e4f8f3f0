"""``--precision float32|bfloat16``: the model's compute in bfloat16, every output in float32.

What lives here:

* ``bfloat16_classifier``: a copy of a prepared classifier whose layers run under Keras'
  ``mixed_bfloat16`` dtype policy (variables stay float32, each layer casts its inputs to
  bfloat16). The copy is rebuilt layer by layer from the configs (``quality.classifier_copy``'s
  way, so Keras 3, tf_keras and nested models all work) with the weights copied; the input layer
  stays float32, so the first layer's cast sits *inside* the differentiated graph and input
  gradients (saliency, SmoothGrad, IG) flow through it. ``explainers.Classifier.logits`` casts
  the logits back to float32, and Grad-CAM casts activations and gradients to float32, so
  probabilities and maps keep the float32 schema.
* ``load_classifier``: the (model, info) the workers use for a run's precision, once per process.
* ``compare``: at planning, float32 and bfloat16 on a few of the user's own decoded examples:
  per-method map rank correlation, largest probability difference and the speed ratio.
* ``decide``: the pure rule that turns those figures into the precision used, with a reason.
"""
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Optional, Sequence

import numpy as np

from ..errors import UsageError

LOG = logging.getLogger("xai_audit")

FLOAT32, BFLOAT16 = "float32", "bfloat16"
CHOICES = (FLOAT32, BFLOAT16)
DEFAULT = FLOAT32
HELP = ("the model's compute: bfloat16 is used only if it agrees with float32 on a few of your "
        f"examples and is faster, else float32 with the reason logged; outputs stay float32 "
        f"[{DEFAULT}]")
POLICY = "mixed_bfloat16"

# bfloat16 keeps 8 significant bits (relative step 2^-8 ≈ 0.4%). Maps are compared by rank: the
# report ranks regions, and a map's scale is not part of the contract.
MIN_MAP_CORRELATION = 0.99
# A probability moved by 0.02 can flip only a prediction within 0.02 of a tie, and moves a
# calibration bin or a TFMA threshold metric by about as much; past that the audit would no
# longer describe the float32 model the user ships.
MAX_PROBABILITY_DIFF = 0.02
# Faster means at least 10% faster: below that the ratio is within the noise of a shared
# machine, and the lower precision would be bought for nothing.
MIN_SPEEDUP = 1.1
# The user's examples the two precisions are compared on: each method runs once per precision
# on them (Integrated Gradients: 64 passes each), so few.
COMPARE_EXAMPLES = 8
TIMED_REPEATS = 3  # timed calls of each precision's unit pass after one warm-up call


def check(value: str) -> None:
    """Raises UsageError (exit 2, as argparse's choices) unless ``value`` is one of CHOICES."""
    if value not in CHOICES:
        raise UsageError(f"--precision {value!r} is not one of {', '.join(CHOICES)}.")


# --------------------------------------------------------------------------- the bfloat16 model


def bfloat16_classifier(model):
    """(copy, ClassifierInfo): ``model`` (prepared or not) rebuilt under ``mixed_bfloat16``."""
    from ..measures.quality import cloned_classifier

    return cloned_classifier(model, POLICY)


_BFLOAT16: Dict[tuple, tuple] = {}
_LOCK = threading.Lock()


def load_classifier(path: str, unsafe_deserialization: bool, precision: str = DEFAULT):
    """(model, ClassifierInfo) for ``precision``, built once per process and model."""
    from ..beam import model_holder

    model, info = model_holder.load_classifier(path, unsafe_deserialization)
    if precision != BFLOAT16:
        return model, info
    with _LOCK:
        key = (path, unsafe_deserialization)
        # Rebuilt when model_holder loaded the file afresh (re-saved, or its cache cleared).
        if key not in _BFLOAT16 or _BFLOAT16[key][0] is not model:
            if unsafe_deserialization:  # the copy is rebuilt from configs, Lambda layers too
                import keras

                keras.config.enable_unsafe_deserialization()
            _BFLOAT16[key] = (model, *bfloat16_classifier(model))
        return _BFLOAT16[key][1:]


# --------------------------------------------------------------------------- the decision


@dataclass
class Comparison:
    """Figures of float32 against bfloat16 on the same examples (run.json ``precision``)."""

    requested: str
    used: str = FLOAT32
    reason: str = ""
    examples: int = 0
    timed: Optional[str] = None  # the explainer whose images/s were compared
    map_correlation: Dict[str, float] = field(default_factory=dict)  # method → mean Spearman
    max_probability_diff: Optional[float] = None
    float32_images_per_s: Optional[float] = None
    bfloat16_images_per_s: Optional[float] = None
    speedup: Optional[float] = None

    def as_dict(self) -> dict:
        return asdict(self)


def decide(map_correlation: Dict[str, float], max_probability_diff: float,
           speedup: float) -> tuple:
    """(precision used, reason): bfloat16 only if every method's maps rank like float32's, the
    probabilities agree, and it is faster. Pure: the figures are given."""
    low = {m: r for m, r in map_correlation.items() if not r >= MIN_MAP_CORRELATION}
    if low:
        worst = ", ".join(f"{m} {r:.3f}" for m, r in sorted(low.items()))
        return FLOAT32, (f"bfloat16 maps disagree with float32 (mean rank correlation {worst}, "
                         f"needed ≥ {MIN_MAP_CORRELATION})")
    if not max_probability_diff <= MAX_PROBABILITY_DIFF:
        return FLOAT32, (f"bfloat16 probabilities differ from float32 by up to "
                         f"{max_probability_diff:.3g} (allowed {MAX_PROBABILITY_DIFF})")
    if not speedup >= MIN_SPEEDUP:
        return FLOAT32, (f"bfloat16 is not faster on this machine ({speedup:.2f}× float32, "
                         f"needed ≥ {MIN_SPEEDUP}×)")
    return BFLOAT16, (f"maps agree (rank correlation ≥ {MIN_MAP_CORRELATION}), probabilities "
                      f"within {MAX_PROBABILITY_DIFF}, {speedup:.2f}× faster")


# --------------------------------------------------------------------------- the comparison


def _run_all(explainers: Dict[str, Callable], images: np.ndarray, targets: np.ndarray) -> dict:
    return {name: explain(images, targets) for name, explain in explainers.items()}


def timed_method(methods: Sequence[str], options: dict) -> Optional[str]:
    """The first of ``methods`` that costs one pass per image (cost.method_passes), timed as it
    is already traced; None: none is, and a saliency unit pass is timed instead."""
    from ..job.cost import method_passes

    return next((m for m in methods if method_passes(m, options)["forward"] <= 1), None)


def _unit_pass(model, head: str, shape: tuple) -> Callable:
    """One forward and one backward pass to the input per image (saliency): the unit every
    method's cost is made of (cost.py), so its ratio is the run's; timing it instead of every
    method keeps the check cheap when Integrated Gradients asks for 64 passes per image."""
    from . import attribution_methods, explainers

    return attribution_methods.make_method(
        "saliency", explainers.Classifier(model, head), shape, None, {})


def _seconds(reference: Callable, candidate: Callable, images, targets) -> tuple:
    """(float32 s, bfloat16 s): best of TIMED_REPEATS calls each after one warm-up call each,
    alternated so that a neighbour's load on a shared machine hits both alike."""
    reference(images, targets), candidate(images, targets)  # warm-up: traces and compiles
    best = [float("inf"), float("inf")]
    for _ in range(TIMED_REPEATS):
        for i, method in enumerate((reference, candidate)):
            start = time.perf_counter()
            method(images, targets)
            best[i] = min(best[i], time.perf_counter() - start)
    return tuple(best)


def map_correlations(ref: dict, low: dict) -> Dict[str, float]:
    """Per method, the mean over examples of the Spearman rank correlation of the two maps."""
    from ..measures.quality import rank_correlations

    out = {}
    for name in ref:
        values = rank_correlations(np.asarray(ref[name]["maps"], np.float64),
                                   np.asarray(low[name]["maps"], np.float64))
        # A constant map (no attention) has no rank: equal constant maps agree, else they do not.
        same = [np.allclose(a, b) for a, b in zip(ref[name]["maps"], low[name]["maps"])]
        values = np.where(np.isnan(values), np.where(same, 1.0, 0.0), values)
        out[name] = float(np.mean(values))
    return out


def compare(make_explainers: Callable[[object, str], Dict[str, Callable]], reference: tuple,
            candidate: tuple, images: np.ndarray, requested: str = BFLOAT16,
            timed: Optional[str] = None) -> Comparison:
    """Run ``make_explainers(model, head)`` on the float32 ``reference`` and the bfloat16
    ``candidate`` (model, info) over ``images`` (the predicted class explained), time the
    explainer named ``timed`` (None: a saliency unit pass), and decide the run's precision."""
    (model, info), (low_model, low_info) = reference, candidate
    targets = np.full(len(images), -1, np.int32)  # explainers.PREDICTED
    pair = make_explainers(model, info.head), make_explainers(low_model, low_info.head)
    ref, low = (_run_all(explainers, images, targets) for explainers in pair)
    if timed:
        timers = pair[0][timed], pair[1][timed]
    else:
        shape = tuple(images.shape[1:])
        timers = _unit_pass(model, info.head, shape), _unit_pass(low_model, low_info.head, shape)
    ref_s, low_s = _seconds(*timers, images, targets)
    result = Comparison(requested=requested, examples=len(images),
                        timed=timed or "saliency (unit pass)")
    result.map_correlation = map_correlations(ref, low)
    result.max_probability_diff = float(max(
        np.max(np.abs(ref[m]["probabilities"] - low[m]["probabilities"])) for m in ref))
    result.float32_images_per_s = len(images) / ref_s
    result.bfloat16_images_per_s = len(images) / low_s
    result.speedup = ref_s / low_s
    result.used, result.reason = decide(result.map_correlation, result.max_probability_diff,
                                        result.speedup)
    return result


# --------------------------------------------------------------------------- planning


def sample_images(cfg, count: int = COMPARE_EXAMPLES) -> np.ndarray:
    """The first ``count`` examples of the run's data that decode, as the workers decode them
    ([n, H, W, C] float32; n may be 0). Unreadable ones are skipped: the run reports them."""
    from ..errors import ExampleError
    from ..beam.stages import decode_ref
    from ..io.sources import iter_refs

    images = []
    for ref in iter_refs(cfg.source):
        if isinstance(ref, dict):  # an error row of the listing
            continue
        try:
            images.append(decode_ref(ref, cfg).image)
        except ExampleError:
            continue
        if len(images) >= count:
            break
    return np.stack(images).astype(np.float32) if images else np.zeros((0,), np.float32)


def run_explainers(cfg) -> Callable[[object, str], Dict[str, Callable]]:
    """``make_explainers(model, head)`` for the run's methods (the layer sweep compared at its
    ``--layer`` map, which is what its ``maps`` column holds)."""
    from . import attribution_methods, explainers, model_io

    def make(model, head: str) -> Dict[str, Callable]:
        classifier = explainers.Classifier(model, head)
        uses_layer = any(m in attribution_methods.LAYER_METHODS for m in cfg.methods)
        layer = model_io.find_layer(model, cfg.layer) if uses_layer else None
        shape = (cfg.image_spec.height, cfg.image_spec.width, cfg.image_spec.channels)
        return {name: attribution_methods.make_method(name, classifier, shape, layer,
                                                      cfg.method_options)
                for name in cfg.methods}

    return make


def _bfloat16_or_reason(cfg, images: np.ndarray) -> tuple:
    """(the bfloat16 (model, info), None), or (None, why it cannot be compared)."""
    if not len(images):
        return None, "no example of the data decoded, so bfloat16 could not be compared"
    try:
        return load_classifier(cfg.model_path, cfg.unsafe_deserialization, BFLOAT16), None
    except Exception as exc:  # a layer that cannot be rebuilt from its config: audit as float32
        text = str(exc).strip()
        return None, (f"the model could not be rebuilt under {POLICY} ({type(exc).__name__}: "
                      f"{text.splitlines()[0] if text else ''})")


def plan(requested: str, cfg) -> Comparison:
    """The precision the run uses (also set as ``cfg.precision``), compared on the user's data."""
    check(requested)
    if requested == FLOAT32:
        return Comparison(requested=FLOAT32, used=FLOAT32, reason="requested")
    images = sample_images(cfg)
    candidate, reason = _bfloat16_or_reason(cfg, images)
    if candidate is None:
        result = Comparison(requested=requested, reason=reason)
    else:
        reference = load_classifier(cfg.model_path, cfg.unsafe_deserialization)
        result = compare(run_explainers(cfg), reference, candidate, images, requested,
                         timed_method(cfg.methods, cfg.method_options))
    cfg.precision = result.used
    log_decision(result)
    return result


def summary_line(record: Optional[dict]) -> str:
    """One line for the log and the report's run details."""
    if not record or record.get("requested", FLOAT32) == FLOAT32:
        return "float32"
    return f"{record['used']} (requested {record['requested']}): {record['reason']}"


def log_decision(result: Comparison) -> None:
    if result.used == result.requested:
        LOG.info("Precision: %s.", summary_line(result.as_dict()))
    else:
        LOG.warning("Precision: falling back to float32: %s.", result.reason)

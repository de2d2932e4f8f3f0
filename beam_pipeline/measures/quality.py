"""How good are the explanations? Two measures from the literature and a sampling helper.
Pure TensorFlow / NumPy, no Beam.

* Faithfulness, ``deletion_insertion`` (Petsiuk et al. 2018, RISE): pixels are removed (replaced
  by a baseline) or revealed in the order of the map, and the target-class probability is
  recorded along the way. A faithful map makes it fall fast when its top pixels are deleted (low
  deletion AUC) and rise fast when they are inserted into the baseline (high insertion AUC). All
  perturbed images of a batch go through the model in chunks of ``batch_size``, one call each.
* Sanity, ``cascading_randomization`` (Adebayo et al. 2018): the parameterized layers of a *copy*
  of the model are re-initialised from the output backwards, and after each step the maps of the
  same images and the same (original) target classes are compared with the original maps by
  Spearman rank correlation. A method whose maps stay the same when the model no longer means
  anything explains the input, not the model: ``flag_insensitive`` says so.
* ``random_map``: a seeded random map per example, the faithfulness reference.
* ``seeded_sample``: a deterministic sample of example ids, keyed by a hash of (seed, id), so it
  does not depend on the order or sharding in which the ids arrive (``sample_key`` is the key,
  for a Beam ``Top.Smallest`` or a per-shard threshold).
"""
import hashlib
import heapq
import warnings
import zlib
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np
import tensorflow as tf
from scipy import stats

from ..explain import model_io
from ..explain.attribution_methods import _blur, _gaussian_kernel
from ..job.cost import FAITHFULNESS_STEPS
from ..errors import OptionError
from ..explain.explainers import PREDICTED, Classifier
# Reading the results back (no TensorFlow, for the report) lives in ``results``; re-exported.
from .results import SANITY_THRESHOLD, best_sweep_layer, sanity_final_rows, sweep_lift

FAITHFULNESS_BASELINES = ("blur", "black")
_TIE_BREAK_SEED = 0  # fixed: the order of equal-attribution pixels is part of the measure

# --------------------------------------------------------------------------- faithfulness


def random_map(example_id, seed: int, height: int, width: int) -> np.ndarray:
    """A uniform random map [height, width] fixed by (seed, example id): the reference a
    method's deletion / insertion AUC is compared with (a map that knows nothing)."""
    digest = _sample_digest(example_id, seed)
    rng = np.random.default_rng(int.from_bytes(digest[8:16], "big"))
    return rng.random((height, width), dtype=np.float32)


def deletion_insertion(predict_target: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
                       maps: np.ndarray, targets: np.ndarray, steps: int = FAITHFULNESS_STEPS,
                       baseline: str = "blur", blur_sigma: float = 0.1,
                       batch_size: int = 64) -> Tuple[np.ndarray, np.ndarray]:
    """(deletion AUC [B], insertion AUC [B]) of the target-class probability, trapezoid rule over
    the fraction of pixels perturbed, k/steps for k = 0..steps. Lower deletion and higher
    insertion AUC = more faithful; both are probabilities averaged over the curve, in [0, 1].

    ``predict_target``: images [N, H, W, C] → probabilities [N, K], e.g. ``explainers.Predictor``.
    ``maps`` [B, h, w] at any resolution (upsampled bilinearly); ``targets`` [B] class indices,
    ``explainers.PREDICTED`` meaning the class predicted for the clean image. ``baseline``:
    ``blur`` (Gaussian of ``blur_sigma`` × the shorter side, as Integrated Gradients' blur
    baseline) or ``black`` (zeros).
    """
    deletion, insertion = perturbation_curves(predict_target, images, maps, targets, steps,
                                              baseline, blur_sigma, batch_size)
    return trapezoid_auc(deletion), trapezoid_auc(insertion)


def perturbation_curves(predict_target, images, maps, targets, steps: int = FAITHFULNESS_STEPS,
                        baseline: str = "blur", blur_sigma: float = 0.1,
                        batch_size: int = 64) -> Tuple[np.ndarray, np.ndarray]:
    """The deletion and insertion curves behind ``deletion_insertion``, [B, steps + 1] each.

    Point k perturbs the top round(k/steps · H·W) pixels of the map (all channels of a pixel).
    Deletion's first point and insertion's last are the clean image, deletion's last and
    insertion's first the baseline, so each example costs 2·steps model inputs, not 2·(steps+1).
    """
    _check_batch(np.asarray(images), maps, targets)
    return perturbation_curves_of_maps(predict_target, images, [maps], targets, steps, baseline,
                                       blur_sigma, batch_size)[0]


def perturbation_curves_of_maps(predict_target, images, map_sets: Sequence[np.ndarray], targets,
                                steps: int = FAITHFULNESS_STEPS, baseline: str = "blur", blur_sigma: float = 0.1,
                                batch_size: int = 64) -> List[Tuple[np.ndarray, np.ndarray]]:
    """``perturbation_curves`` of several map sets (e.g. every method's and a random map) on the
    same images and targets, one (deletion, insertion) pair per set. The perturbed images of every
    set go through the model together, in full chunks of ``batch_size`` (a few sampled examples
    per explain batch still fill the model's batches), and the baselines (a blur of every image)
    and the resolved targets are computed once."""
    images = np.asarray(images, np.float32)
    steps = _positive(steps, "Faithfulness steps")
    batch_size = _positive(batch_size, "Faithfulness batch size")
    for maps in map_sets:
        _check_batch(images, maps, targets)
    count, height, width = images.shape[:3]
    if count == 0 or not map_sets:
        empty = np.zeros((0, steps + 1), np.float32)
        return [(empty, empty.copy()) for _ in map_sets]
    bases = faithfulness_baselines(images, baseline, blur_sigma)
    # Row r of ``ranks`` is map set r // count on image r % count.
    ranks = np.concatenate([pixel_ranks(maps, height, width) for maps in map_sets])
    targets = _resolve_targets(predict_target, images, np.asarray(targets, np.int64))
    # Per row: deletion k = 0..steps, then insertion k = 1..steps-1 (the ends are shared).
    kept = _pixel_counts(steps, height * width)
    per_row_n = np.concatenate([kept, kept[1:steps]])
    per_row_insert = np.arange(2 * steps) > steps
    rows = len(ranks)
    scores = np.empty(rows * 2 * steps, np.float32)
    row = np.repeat(np.arange(rows), 2 * steps)
    n_top = np.tile(per_row_n, rows)
    insert = np.tile(per_row_insert, rows)
    for start in range(0, scores.size, batch_size):
        part = slice(start, start + batch_size)
        batch = _perturb(images, bases, ranks, row[part], n_top[part], insert[part])
        probabilities = np.asarray(predict_target(batch))
        scores[part] = probabilities[np.arange(len(batch)), targets[row[part] % count]]
    scores = scores.reshape(len(map_sets), count, 2 * steps)
    curves = []
    for per_set in scores:
        deletion = per_set[:, : steps + 1]
        insertion = np.concatenate([deletion[:, steps:], per_set[:, steps + 1:],
                                    deletion[:, :1]], 1)
        curves.append((deletion, insertion))
    return curves


def deletion_insertion_of_maps(predict_target, images, map_sets, targets, steps: int = FAITHFULNESS_STEPS,
                               baseline: str = "blur", blur_sigma: float = 0.1,
                               batch_size: int = 64) -> List[Tuple[np.ndarray, np.ndarray]]:
    """``deletion_insertion`` of several map sets in one batched pass: [(deletion, insertion)]."""
    return [(trapezoid_auc(d), trapezoid_auc(i)) for d, i in perturbation_curves_of_maps(
        predict_target, images, map_sets, targets, steps, baseline, blur_sigma, batch_size)]


def trapezoid_auc(curves: np.ndarray) -> np.ndarray:
    """Area under curves [B, n + 1] sampled at 0, 1/n, ..., 1 (trapezoid rule), [B]."""
    curves = np.asarray(curves, np.float64)
    n = curves.shape[1] - 1
    return ((curves.sum(1) - 0.5 * (curves[:, 0] + curves[:, -1])) / n).astype(np.float32)


def faithfulness_baselines(images: np.ndarray, baseline: str, blur_sigma: float = 0.1):
    """What removed pixels become, [B, H, W, C]: the blurred image or zeros."""
    if baseline not in FAITHFULNESS_BASELINES:
        raise OptionError(f"Faithfulness baseline {baseline!r} is not one of "
                          f"{', '.join(FAITHFULNESS_BASELINES)}.")
    if baseline == "black":
        return np.zeros_like(images)
    taps = _gaussian_kernel(blur_sigma, images.shape[1:])
    return _blur(tf.convert_to_tensor(images), taps).numpy()


def pixel_ranks(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """[B, H·W] rank of every pixel (0 = most attributed) of the maps upsampled bilinearly to
    H×W. Ties (e.g. the zeros of a ReLU'd map) are broken by one fixed pseudo-random order, not by
    raster order, which would delete the top rows first; NaN counts as least attributed."""
    maps = np.asarray(maps, np.float32)
    up = tf.image.resize(maps[..., None], (height, width), method="bilinear").numpy()
    values = np.nan_to_num(up.reshape(len(maps), -1), nan=-np.inf)
    tie_break = np.random.default_rng(_TIE_BREAK_SEED).permutation(height * width)
    order = np.lexsort((np.broadcast_to(tie_break, values.shape), -values), axis=-1)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(order.shape[1]), order.shape), 1)
    return ranks


def _pixel_counts(steps: int, pixels: int) -> np.ndarray:
    """round(k/steps · pixels) for k = 0..steps, in integers (exactly 0 and all at the ends)."""
    return (np.arange(steps + 1) * pixels + steps // 2) // steps


def _perturb(images, bases, ranks, row, n_top, insert) -> np.ndarray:
    """One chunk of perturbed images: the top ``n_top`` pixels (of the map of ``ranks[row]``)
    come from the baseline (deletion) or from the image (insertion); the others from the other
    one. Row r's image is r % len(images)."""
    height, width = images.shape[1:3]
    top = (ranks[row] < n_top[:, None]).reshape(-1, height, width, 1)
    insert = insert[:, None, None, None]
    example = row % len(images)
    image, base = images[example], bases[example]
    return np.where(top, np.where(insert, image, base), np.where(insert, base, image))


def _resolve_targets(predict_target, images, targets) -> np.ndarray:
    unresolved = targets == PREDICTED
    if unresolved.any():
        targets = targets.copy()
        targets[unresolved] = np.asarray(predict_target(images[unresolved])).argmax(-1)
    return targets


def _check_batch(images, maps, targets) -> None:
    if images.ndim != 4:
        raise ValueError(f"Images must be [B, H, W, C], not shape {images.shape}.")
    maps_shape = np.shape(maps)
    if len(maps_shape) != 3 or maps_shape[0] != len(images) or len(targets) != len(images):
        raise ValueError(f"Maps [B, h, w] and targets [B] must match the {len(images)} images "
                         f"(maps {maps_shape}, {len(targets)} targets).")


def _positive(value, what: str) -> int:
    if int(value) != value or value < 1:
        raise OptionError(f"{what} must be a positive integer, not {value!r}.")
    return int(value)


# --------------------------------------------------------------------------- sanity check


def cascading_randomization(model, make_method: Callable[[Classifier], Callable], images,
                            targets, seed: int, layers: Optional[Sequence[str]] = None,
                            batch_size: int = 32) -> List[Dict]:
    """Model-parameter randomization test, cascading from the output (Adebayo et al. 2018).

    ``model`` is never modified: a copy is made, prepared (head switched to logits) and given to
    ``make_method(classifier)`` once; its parameterized layers are then re-initialised in place
    from the output backwards, so the method must read the weights when called (every method of
    this project does: its compiled function reads the variables), and is traced only once.

    Each step randomizes one more layer, and ``randomized_up_to`` names the deepest one
    randomized so far. ``layers`` (plain or qualified names) limits the rows to those
    checkpoints, still randomizing every layer above each; the last row always has every layer
    randomized. Rows: ``step`` (1, 2, ...), ``randomized_up_to``, ``spearman_mean`` and
    ``spearman_std`` over examples of the rank correlation of the flattened maps, and
    ``examples``, the number of examples where it is defined (not when a map is constant, e.g. a
    Grad-CAM all zero after ReLU; NaN mean when none is).

    Target classes are those of the original model (``PREDICTED`` is resolved once, on it), so
    every step explains the same class. A layer's trainable tensors (frozen ones too; not batch
    norm's moving statistics) become independent normal draws with the mean and std of the
    original tensor, seeded by ``seed`` and the layer's name: activations keep their scale, and
    a layer's draw does not depend on the checkpoints chosen.
    """
    return cascading_randomization_of_methods(model, {"method": make_method}, images, targets,
                                              seed, layers, batch_size)["method"]


def cascading_randomization_of_methods(model, make_methods: Dict[str, Callable], images,
                                       targets, seed: int,
                                       layers: Optional[Sequence[str]] = None,
                                       batch_size: int = 32) -> Dict[str, List[Dict]]:
    """``cascading_randomization`` of several methods ({name: make_method}) on one copy of the
    model: it is cloned and randomized once, each method is traced once on it, and at every
    checkpoint every method's maps are recomputed. The rows per method are those of separate
    runs (the draws depend on the seed and the layer name only)."""
    copy, classifier = classifier_copy(model)
    methods = {name: make(classifier) for name, make in make_methods.items()}
    originals = {name: _explain(method, images, targets, batch_size)
                 for name, method in methods.items()}
    top_down = parameterized_layers(copy)[::-1]
    rows: Dict[str, List[Dict]] = {name: [] for name in methods}
    randomized = 0
    for step, stop in enumerate(_checkpoints(top_down, layers), start=1):
        for name, layer in top_down[randomized: stop + 1]:
            randomize_layer(layer, name, seed)
        randomized = stop + 1
        for name, method in methods.items():
            original = originals[name]  # its target classes are fixed from the original model
            maps = _explain(method, images, original["target_class"], batch_size)["maps"]
            rows[name].append(_summary_row(step, top_down[stop][0],
                                           rank_correlations(original["maps"], maps)))
    return rows


def flag_insensitive(rows: Sequence[Dict], threshold: float = SANITY_THRESHOLD) -> bool:
    """True if the maps still correlate above ``threshold`` with the original ones once every
    layer is randomized (the last row): the method does not depend on the model."""
    if not rows:
        raise ValueError("flag_insensitive needs the rows of cascading_randomization.")
    last = rows[-1]["spearman_mean"]
    return bool(np.isfinite(last) and last > threshold)


def rank_correlations(maps_a: np.ndarray, maps_b: np.ndarray) -> np.ndarray:
    """Per example Spearman correlation of two batches of maps, flattened, [B]; NaN where either
    map is constant."""
    maps_a, maps_b = np.asarray(maps_a), np.asarray(maps_b)
    if maps_a.shape != maps_b.shape:
        raise ValueError(f"Maps of shapes {maps_a.shape} and {maps_b.shape} cannot be compared.")
    out = np.full(len(maps_a), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        for i, (a, b) in enumerate(zip(maps_a, maps_b)):
            out[i] = stats.spearmanr(a.ravel(), b.ravel()).statistic
    return out


def cloned_classifier(model, dtype_policy: Optional[str] = None):
    """(copy, ClassifierInfo): same architecture and weights, new variables, head switched to
    logits; every layer but the input under ``dtype_policy`` when given (the variables stay
    float32). Works for Keras 3 and tf_keras, nested models, and models whose head
    ``model_io.prepare_classifier`` already switched (their ``_linear`` is not serializable)."""
    library = _keras_library(model)

    def clone_layer(layer):
        if model_io._is_model(layer):
            return library.models.clone_model(layer, clone_function=clone_layer)
        config = layer.get_config()
        if getattr(layer, "activation", None) is model_io._linear:
            config["activation"] = "linear"  # prepare_classifier switches the copy's head again
        if dtype_policy and type(layer).__name__ != "InputLayer":
            config["dtype"] = dtype_policy
        return layer.__class__.from_config(config)

    copy = library.models.clone_model(model, clone_function=clone_layer)
    copy.set_weights(model.get_weights())
    return copy, model_io.prepare_classifier(copy)


def classifier_copy(model) -> Tuple[object, Classifier]:
    """(copy, Classifier of the copy): ``cloned_classifier`` in float32."""
    copy, info = cloned_classifier(model)
    return copy, Classifier(copy, info.head)


def parameterized_layers(model) -> List[Tuple[str, object]]:
    """(qualified name, layer) of the layers with trainable tensors, input to output. Frozen
    layers count: they are made trainable (on the copy this is called on) so that a frozen
    backbone is randomized too."""
    found = []
    for name, layer in model_io.iter_layers(model):
        layer.trainable = True
        if layer.trainable_weights:
            found.append((name, layer))
    return found


def randomize_layer(layer, name: str, seed: int) -> None:
    """Replace each trainable tensor of ``layer`` by normal draws with its mean and std."""
    rng = np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])
    for variable in layer.trainable_weights:
        value = np.asarray(variable.numpy())
        wide = value.astype(np.float64)
        variable.assign(rng.normal(wide.mean(), wide.std(), value.shape).astype(value.dtype))


def _checkpoints(top_down: List[Tuple[str, object]], layers: Optional[Sequence[str]]):
    """Indices into ``top_down`` after which a row is measured, ending at the last layer."""
    if not top_down:
        raise OptionError("The model has no layer with trainable weights to randomize.")
    if layers is None:
        return list(range(len(top_down)))
    indices = set()
    for spec in layers:
        matches = [i for i, (name, layer) in enumerate(top_down)
                   if spec == name or spec == layer.name]
        if len(matches) != 1:
            names = ", ".join(name for name, _ in top_down[::-1])
            problem = "matches no" if not matches else "is ambiguous among the"
            raise OptionError(f"Randomization layer {spec!r} {problem} layers with weights: "
                              f"{names}.")
        indices.add(matches[0])
    return sorted(indices | {len(top_down) - 1})


def _explain(method, images, targets, batch_size: int) -> Dict[str, np.ndarray]:
    """``method`` over the images in chunks: maps and target classes, concatenated."""
    images = np.asarray(images, np.float32)
    targets = np.asarray(targets, np.int32)
    parts = [method(images[i: i + batch_size], targets[i: i + batch_size])
             for i in range(0, len(images), _positive(batch_size, "Sanity batch size"))]
    return {key: np.concatenate([np.asarray(p[key]) for p in parts])
            for key in ("maps", "target_class")}


def _summary_row(step: int, layer_name: str, correlations: np.ndarray) -> Dict:
    defined = correlations[np.isfinite(correlations)]
    return {
        "step": step,
        "randomized_up_to": layer_name,
        "spearman_mean": float(defined.mean()) if defined.size else float("nan"),
        "spearman_std": float(defined.std()) if defined.size else float("nan"),
        "examples": int(defined.size),
        # The examples compared: the same at every step. ``examples`` may be fewer, as a map that
        # is constant at this step (e.g. Grad-CAM all zero) has no rank correlation.
        "sampled": int(correlations.size),
    }


def _keras_library(model):
    """The Keras that built ``model`` (keras 3 or tf_keras), for ``clone_model``."""
    if type(model).__module__.startswith("tf_keras"):
        import tf_keras

        return tf_keras
    import keras

    return keras


# --------------------------------------------------------------------------- sampling


def sample_key(example_id, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, id): keep the ids with the smallest keys (or
    those below a fraction) to sample the same examples whatever their order or sharding."""
    return int.from_bytes(_sample_digest(example_id, seed)[:8], "big") / 2.0 ** 64


def seeded_sample(example_ids: Iterable, size: int, seed: int) -> Set:
    """The ``size`` distinct ids with the smallest ``sample_key`` (all of them if fewer)."""
    if int(size) != size or size < 0:
        raise OptionError(f"Sample size must be a non-negative integer, not {size!r}.")
    unique = set(example_ids)
    if size >= len(unique):
        return unique
    return set(heapq.nsmallest(int(size), unique,
                               key=lambda i: (_sample_digest(i, seed), _id_bytes(i))))


def _sample_digest(example_id, seed: int) -> bytes:
    return hashlib.sha256(str(int(seed)).encode("ascii") + b"\0" + _id_bytes(example_id)).digest()


def _id_bytes(example_id) -> bytes:
    if isinstance(example_id, bytes):
        return example_id
    return str(example_id).encode("utf-8")

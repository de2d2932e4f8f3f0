"""More attribution methods beside ``explainers.GradCAM``, with the same batched contract.

Every method takes a prepared ``explainers.Classifier`` (head switched to logits) and the input
shape, compiles one ``tf.function`` with an ``input_signature`` of ``[None, H, W, C]`` float32
images and ``[None]`` int32 targets (one trace serves every batch size), and is called as
``method(images, targets)`` → dict of numpy arrays:

* ``probabilities`` [B, K] and ``target_class`` [B] (``explainers.PREDICTED`` resolved), always of
  the *clean* input, also for the methods that perturb it;
* ``maps`` float32 [B, h, w]: CAM at its feature layer's resolution, the others at the input's;
* ``completeness_gap`` [B] for ``IntegratedGradients`` only.

Methods (``name`` is the key the pipeline will use):

* ``CAM`` (Zhou et al. 2016): Σ_k W[k, c] A^k for models that end in feature map → global average
  pooling → Dense. ReLU'd by default, like Grad-CAM, so that on these models CAM = Grad-CAM · h·w;
  ``relu=False`` keeps the paper's signed map.
* ``Saliency``: max over channels of |∂y/∂x| (y: the target logit).
* ``SmoothGrad``: mean saliency over noisy copies; the noise of each example is keyed by a
  fingerprint of its pixels and the seed, so a map does not depend on how Beam batched it.
* ``IntegratedGradients``: midpoint Riemann sum of gradients along the straight path from a
  ``black``, ``uniform`` or ``blur`` baseline; map = Σ_c |attribution| (``signed=True``: Σ_c).

``pool_map`` area-averages input-resolution maps down to at most ``size``×``size`` so Parquet
stays small. Pure TensorFlow, no Beam.
"""
import math
from typing import Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from . import registry as method_registry, model_io
from ..errors import OptionError
from .explainers import Attribution, Classifier, LayerCapture

DEFAULT_MAP_SIZE = 56
BASELINES = method_registry.OPTIONS["ig_baseline"].choices
# Methods that need nothing of the architecture but differentiability (for CAM's refusal).
ANY_MODEL_METHODS = tuple(m.name for m in method_registry.METHODS.values() if m.any_model)

# Layers that are the identity at inference, allowed between the pooling and the Dense for CAM.
_INFERENCE_IDENTITIES = (
    "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianDropout",
    "GaussianNoise", "AlphaDropout", "ActivityRegularization", "Flatten",
)
_LINEAR = (None, "linear", "_linear")  # "_linear": what prepare_classifier puts in a head
_HEADS = ("softmax", "sigmoid")


# --------------------------------------------------------------------------- shared plumbing


def _channel_max_abs(gradients: tf.Tensor) -> tf.Tensor:
    """Saliency of gradients [..., C]: max over channels of |g| (Simonyan et al. 2014)."""
    return tf.reduce_max(tf.abs(gradients), axis=-1)


def _value_range(images: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
    """Per image min and max over all pixels and channels, [B] each."""
    return tf.reduce_min(images, axis=(1, 2, 3)), tf.reduce_max(images, axis=(1, 2, 3))


def _positive_int(value, what: str) -> int:
    if int(value) != value or value < 1:
        raise OptionError(f"{what} must be a positive integer, not {value!r}.")
    return int(value)


# --------------------------------------------------------------------------- seeded noise


def example_keys(images: tf.Tensor, seed: int) -> tf.Tensor:
    """[B, 2] int64 random keys: the seed and a 64-bit fingerprint of each image's pixels.

    Keying by content rather than by position in the batch makes a perturbation method's map of
    an image the same whichever batch (Beam bundle) it arrives in.
    """
    fingerprints = tf.bitcast(tf.fingerprint(images), tf.int64)  # [B, 8] uint8 → [B]
    return tf.stack([tf.fill(tf.shape(fingerprints), tf.constant(seed, tf.int64)), fingerprints],
                    axis=1)


def seeded_draws(keys: tf.Tensor, ids: tf.Tensor, dims: Sequence, kind: str = "normal"):
    """[B, m, *dims] draws, standard normal or uniform in [0, 1): copy ``ids[j]`` of example b is
    drawn from ``keys[b]`` folded with ``ids[j]`` alone, so it does not depend on which copies are
    drawn together (SmoothGrad's passes) nor on the other examples.

    Stateless ops keep the compiled function a pure function of its inputs.
    """
    if kind not in ("normal", "uniform"):
        raise ValueError(f"seeded_draws kind must be normal or uniform, not {kind!r}.")
    b, m = tf.shape(keys)[0], tf.size(ids)
    pair_keys = tf.repeat(keys, m, axis=0)  # example-major, as the copies are laid out
    pair_ids = tf.tile(tf.cast(ids, tf.int64), [b])
    draw = tf.random.stateless_normal if kind == "normal" else tf.random.stateless_uniform

    def one(args):
        key, copy_id = args
        return draw(dims, seed=tf.random.experimental.stateless_fold_in(key, copy_id))

    # One draw per (example, copy) key: stateless ops take one seed each. The loop is over noise
    # generation only; the forward/backward stays batched.
    draws = tf.map_fn(one, (pair_keys, pair_ids), fn_output_signature=tf.float32)
    return tf.reshape(draws, [b, m, *dims])


# --------------------------------------------------------------------------- CAM


def _activation_name(layer) -> Optional[str]:
    if type(layer).__name__ == "Softmax":
        return "softmax"
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", None) if activation is not None else None


def cam_layers(model) -> Tuple[str, object, object]:
    """(qualified name, layer) of the feature map CAM weighs, and the final Dense layer.

    Needs the layers after the last 4-D layer (in nesting-expanded order, as ``--layer auto``
    sees them) to be: GlobalAveragePooling2D, inference identities (Dropout, Flatten, ...), the
    Dense, and at most a softmax/sigmoid head layer. The Dense must be linear (after
    ``prepare_classifier``) or itself the softmax/sigmoid head. Raises OptionError otherwise.
    """

    def refuse(why: str):
        raise OptionError(
            f"CAM needs a model whose last feature map goes through global average pooling "
            f"straight into the final Dense layer; {why}. Use one of "
            f"{', '.join(ANY_MODEL_METHODS)} instead, which work on any differentiable "
            "classifier."
        )

    try:
        feature_name, feature = model_io.find_layer(model, "auto")
    except OptionError:
        refuse("this model has no layer with a 4-D (batch, height, width, channels) output")
    layers = [layer for _, layer in model_io.iter_layers(model)]
    tail = layers[next(i for i, layer in enumerate(layers) if layer is feature) + 1:]
    described = ", ".join(type(layer).__name__ for layer in tail) or "nothing"
    head_layer = None
    if tail and type(tail[-1]).__name__ in ("Softmax", "Activation"):
        head_layer = tail.pop()
        if _activation_name(head_layer) not in _LINEAR + _HEADS:
            refuse(f"after {feature_name} it has {described}")
    core = [layer for layer in tail if type(layer).__name__ not in _INFERENCE_IDENTITIES]
    kinds = [type(layer).__name__ for layer in core]
    if kinds != ["GlobalAveragePooling2D", "Dense"] or tail[-1] is not core[1]:
        refuse(f"after {feature_name} it has {described}")
    pooling, dense = core
    if getattr(pooling, "data_format", "channels_last") != "channels_last":
        refuse("its global average pooling is channels_first")
    allowed = _LINEAR if head_layer is not None else _LINEAR + _HEADS
    if _activation_name(dense) not in allowed:
        refuse(f"its final Dense layer has a {_activation_name(dense)} activation, so the logit is "
               "not linear in the pooled features")
    channels = feature.output.shape[-1]
    if int(dense.kernel.shape[0]) != channels:
        refuse(f"the final Dense layer takes {dense.kernel.shape[0]} features, not the "
               f"{channels} channels of {feature_name}")
    return feature_name, feature, dense


class CAM(Attribution):
    """Class activation map: Σ_k W[k, c] A^k, A the feature map feeding global average pooling and
    W the final Dense kernel (the bias is constant over space and left out).

    ``relu=True`` (default) clips negative evidence as Grad-CAM does, so both methods give maps
    on one footing and, on these models, CAM = Grad-CAM · h·w exactly. ``relu=False`` gives the
    original signed map. Maps are at the feature map's resolution, not normalized.
    """

    name = "cam"

    def __init__(self, classifier: Classifier, input_shape: Sequence[int], relu: bool = True):
        self.layer_name, layer, self.dense = cam_layers(classifier.model)
        self.relu = relu
        self.capture = LayerCapture(layer)
        super().__init__(classifier, input_shape)

    def _explain(self, images, targets):
        # No tape: CAM needs the activations, not their gradients.
        logits, activations = self.capture.forward(None, self.classifier.logits, images)
        probabilities = self.classifier.probabilities(logits)
        targets = self.classifier.resolve_targets(targets, probabilities)
        activations = tf.cast(activations, tf.float32)
        kernel = tf.cast(self.dense.kernel, tf.float32)  # [channels, units]
        per_unit = tf.einsum("bhwk,ku->bhwu", activations, kernel)
        # Each location's per-unit sums are logits of that location (bias-free); target_scores
        # is linear in the logits, so applying it per location picks W[:, c] for softmax and ±w
        # for one sigmoid unit, with the same sign convention as every other method.
        h, w = [d if d is not None else tf.shape(activations)[i + 1]
                for i, d in enumerate(activations.shape[1:3])]
        units = per_unit.shape[-1]
        scores = self.classifier.target_scores(tf.reshape(per_unit, [-1, units]),
                                               tf.repeat(targets, h * w))
        maps = tf.reshape(scores, [-1, h, w])
        if self.relu:
            maps = tf.nn.relu(maps)
        return {"probabilities": probabilities, "target_class": targets, "maps": maps}


# --------------------------------------------------------------------------- gradient methods


class Saliency(Attribution):
    """Vanilla gradient: max over channels of |∂y/∂x|, y the target logit. [B, H, W]."""

    name = "saliency"

    def _explain(self, images, targets):
        # One forward/backward: the clean pass that gives the probabilities is the one
        # differentiated.
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(images)
            probabilities, targets, scores = self._predict(images, targets)
            total = tf.reduce_sum(scores)
        maps = _channel_max_abs(tape.gradient(total, images))
        return {"probabilities": probabilities, "target_class": targets, "maps": maps}


class SmoothGrad(Attribution):
    """SmoothGrad (Smilkov et al. 2017): mean over ``samples`` copies x + ε, ε ~ N(0, s²) with
    s = ``sigma`` · (max − min of the image), of the copy's saliency (max_c |∂y/∂x|).

    The target is resolved on the clean image. Noise is keyed by ``seed`` and the image's content
    (see ``example_keys``), so maps are reproducible whatever the batching; ``samples_per_pass``
    copies of every image go through one forward/backward, and the result does not depend on it.
    """

    name = "smoothgrad"

    def __init__(self, classifier: Classifier, input_shape: Sequence[int],
                 samples: int = method_registry.default("smoothgrad_samples"),
                 sigma: float = method_registry.default("smoothgrad_sigma"), seed: int = 0,
                 samples_per_pass: int = 16):
        self.samples = _positive_int(samples, "SmoothGrad samples")
        self.samples_per_pass = _positive_int(samples_per_pass, "SmoothGrad samples per pass")
        if not sigma >= 0:
            raise OptionError(f"SmoothGrad sigma must be ≥ 0, not {sigma!r}.")
        self.sigma = float(sigma)
        self.seed = int(seed)
        super().__init__(classifier, input_shape)

    def _explain(self, images, targets):
        probabilities, targets, _ = self._predict(images, targets)
        keys = example_keys(images, self.seed)
        low, high = _value_range(images)
        scale = (self.sigma * (high - low))[:, None, None, None, None]
        dims = self._dims(images)

        def noisy_copies(ids):
            return images[:, None] + scale * seeded_draws(keys, ids, dims, "normal")

        total = self._sum_over_copies(
            images, targets, self.samples, self.samples_per_pass, noisy_copies,
            lambda gradients: tf.reduce_sum(_channel_max_abs(gradients), axis=1),
            tf.zeros_like(images[..., 0]),
        )
        return {"probabilities": probabilities, "target_class": targets,
                "maps": total / self.samples}


class IntegratedGradients(Attribution):
    """Integrated Gradients (Sundararajan et al. 2017) of the target logit f.

    attribution = (x − x0) · mean of ∇f at x0 + α(x − x0), α at the ``steps`` midpoints
    (k + ½)/steps (midpoint Riemann sum: error O(1/steps²), like the trapezoid rule, with one
    gradient per step). ``baseline`` x0 is a string:

    * ``black``: zeros (black in [0, 1] inputs; mid-grey for [-1, 1] preprocessing);
    * ``uniform``: uniform noise in [min, max] of the image, keyed by ``seed`` and its content;
    * ``blur``: the image blurred by a Gaussian of standard deviation ``blur_sigma`` × its
      shorter side (normalized at the borders, so a flat image stays flat).

    maps = Σ_c |attribution| (where the evidence is, of either sign), or with ``signed=True``
    Σ_c attribution, whose total over the map is f(x) − f(x0) up to the completeness gap.
    ``completeness_gap`` = |Σ attribution − (f(x) − f(x0))| / |f(x) − f(x0)|, per example (NaN
    when f(x) = f(x0)); more steps shrink it.
    """

    name = "integrated_gradients"

    def __init__(self, classifier: Classifier, input_shape: Sequence[int],
                 steps: int = method_registry.default("ig_steps"),
                 baseline: str = method_registry.default("ig_baseline"), seed: int = 0,
                 blur_sigma: float = 0.1,
                 signed: bool = False, steps_per_pass: int = 16):
        if baseline not in BASELINES:
            raise OptionError(f"Integrated Gradients baseline {baseline!r} is not one of "
                              f"{', '.join(BASELINES)}.")
        self.steps = _positive_int(steps, "Integrated Gradients steps")
        self.steps_per_pass = _positive_int(steps_per_pass, "Integrated Gradients steps per pass")
        self.baseline = baseline
        self.seed = int(seed)
        self.signed = signed
        if baseline == "blur":
            self._blur_kernel = _gaussian_kernel(blur_sigma, input_shape)
        super().__init__(classifier, input_shape)

    def baselines(self, images: tf.Tensor) -> tf.Tensor:
        """The baseline x0 of every image, [B, H, W, C] (callable eagerly, for inspection)."""
        images = tf.convert_to_tensor(images, tf.float32)
        if self.baseline == "black":
            return tf.zeros_like(images)
        if self.baseline == "uniform":
            low, high = _value_range(images)
            noise = seeded_draws(example_keys(images, self.seed), tf.constant([0]),
                                 self._dims(images), "uniform")[:, 0]
            return low[:, None, None, None] + (high - low)[:, None, None, None] * noise
        return _blur(images, self._blur_kernel)

    def _explain(self, images, targets):
        probabilities, targets, scores = self._predict(images, targets)
        baselines = self.baselines(images)
        baseline_scores = self.classifier.target_scores(self.classifier.logits(baselines),
                                                        targets)
        delta = images - baselines

        def interpolants(ids):
            alphas = (tf.cast(ids, tf.float32) + 0.5) / self.steps
            return baselines[:, None] + alphas[None, :, None, None, None] * delta[:, None]

        gradient_sum = self._sum_over_copies(
            images, targets, self.steps, self.steps_per_pass, interpolants,
            lambda gradients: tf.reduce_sum(gradients, axis=1), tf.zeros_like(images),
        )
        attributions = delta * gradient_sum / self.steps
        maps = tf.reduce_sum(attributions if self.signed else tf.abs(attributions), axis=-1)
        expected = scores - baseline_scores
        error = tf.abs(tf.reduce_sum(attributions, axis=(1, 2, 3)) - expected)
        gap = tf.where(expected != 0.0, error / tf.abs(expected), float("nan"))
        return {"probabilities": probabilities, "target_class": targets, "maps": maps,
                "completeness_gap": gap}


def _gaussian_kernel(blur_sigma: float, input_shape: Sequence[int]) -> np.ndarray:
    """1-D Gaussian taps for ``blur_sigma`` × the shorter image side (needs a static size)."""
    height, width = input_shape[0], input_shape[1]
    if height is None or width is None:
        raise OptionError("The blur baseline needs a fixed image size (give --image-size).")
    if not blur_sigma > 0:
        raise OptionError(f"The blur baseline's sigma must be > 0, not {blur_sigma!r}.")
    sigma = blur_sigma * min(height, width)
    # Taps beyond the longer side never overlap the image.
    radius = max(1, min(int(math.ceil(3 * sigma)), max(height, width) - 1))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def _blur(images: tf.Tensor, taps: np.ndarray) -> tf.Tensor:
    """Separable Gaussian blur, zero-padded and divided by the blur of ones (normalized
    convolution): border pixels average only the image, so nothing darkens towards the edges."""
    channels = images.shape[-1]

    def separable(x):
        column = np.tile(taps[:, None, None, None], (1, 1, channels, 1))
        x = tf.nn.depthwise_conv2d(x, column, [1, 1, 1, 1], "SAME")
        row = np.tile(taps[None, :, None, None], (1, 1, channels, 1))
        return tf.nn.depthwise_conv2d(x, row, [1, 1, 1, 1], "SAME")

    return separable(images) / separable(tf.ones_like(images[:1]))


# --------------------------------------------------------------------------- storage


def pool_map(maps: np.ndarray, size: int = DEFAULT_MAP_SIZE) -> np.ndarray:
    """Area-average maps [B, H, W] down to [B, min(H, size), min(W, size)], float32.

    Input-resolution maps (224×224) become size×size, keeping each region's mean (so mass shares
    on a mask are kept); a side already at most ``size`` (CAM/Grad-CAM's 7×7) is left as is,
    since upsampling would only add bytes.
    """
    maps = np.asarray(maps, np.float32)
    if maps.ndim != 3:
        raise ValueError(f"pool_map takes maps [B, H, W], not shape {maps.shape}.")
    target = (min(maps.shape[1], size), min(maps.shape[2], size))
    if target == maps.shape[1:]:
        return maps
    pooled = tf.image.resize(maps[..., None], target, method="area")
    return pooled.numpy()[..., 0].astype(np.float32)


# Views of the registry, for the code that asks "which methods are ...".
INPUT_RESOLUTION_METHODS = method_registry.names_with("input")
LAYER_METHODS = method_registry.names_with("layer")  # explain the --layer feature map
ALL_METHODS = method_registry.NAMES


def make_method(name: str, classifier: Classifier, input_shape: Sequence[int], gradcam_layer,
                options: dict) -> Attribution:
    """The explainer ``--methods`` names, configured from the run's ``options`` (keys of
    ``registry.OPTIONS`` and ``seed``; missing ones take their defaults).
    ``gradcam_layer`` is (qualified name, layer) for the methods at the ``--layer`` map."""
    record = method_registry.get(name)
    kwargs = method_registry.constructor_args(name, options)
    if record.resolution == "layer":
        layer_name, layer = gradcam_layer
        return record.load()(classifier, layer, layer_name, input_shape, **kwargs)
    return record.load()(classifier, input_shape, **kwargs)

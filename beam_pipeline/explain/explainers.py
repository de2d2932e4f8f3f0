"""Batched attribution methods, pure TensorFlow (no Beam): a batch of images and targets in,
a batch of maps out, inside one compiled function per model.

``Classifier`` wraps a prepared Keras model (head switched to logits by ``model_io``) and knows
how to turn logits into probabilities and the score to explain. ``LayerCapture`` hooks one layer,
wherever it is nested, so its activations can be differentiated without rebuilding the graph
(rebuilding is what breaks for a ResNet inside a Sequential). ``GradCAM`` is the first method;
a variant overrides ``channel_weights`` only.
"""
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf

PREDICTED = -1  # target value meaning "explain the predicted class"


class Classifier:
    """A Keras classifier whose output is logits: ``softmax`` over K units or one ``sigmoid``."""

    def __init__(self, model, head: str):
        self.model = model
        self.head = head

    def logits(self, images: tf.Tensor) -> tf.Tensor:
        return tf.cast(self.model(images, training=False), tf.float32)

    def probabilities(self, logits: tf.Tensor) -> tf.Tensor:
        if self.head == "sigmoid":
            p = tf.sigmoid(logits[:, 0])
            return tf.stack([1.0 - p, p], axis=1)
        return tf.nn.softmax(logits, axis=-1)

    def target_scores(self, logits: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
        """The pre-softmax logit of each target; for one sigmoid unit z: z for class 1, -z for 0."""
        if self.head == "sigmoid":
            sign = tf.where(targets == 1, 1.0, -1.0)
            return sign * logits[:, 0]
        return tf.gather(logits, targets, axis=1, batch_dims=1)

    def resolve_targets(self, targets: tf.Tensor, probabilities: tf.Tensor) -> tf.Tensor:
        predicted = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        return tf.where(targets == PREDICTED, predicted, targets)


class Predictor:
    """Probabilities only (no gradients), in one compiled function for every batch size."""

    def __init__(self, classifier: Classifier, input_shape: Sequence[int]):
        self.classifier = classifier
        self._compiled = tf.function(
            lambda images: classifier.probabilities(classifier.logits(images)),
            input_signature=[tf.TensorSpec([None, *input_shape], tf.float32)],
        )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self._compiled(tf.convert_to_tensor(images, tf.float32)).numpy()


def hook_call(layer, make_wrapper: Callable) -> Callable[[], None]:
    """Replace ``layer.call`` with ``make_wrapper(original call)``; returns ``unhook``.

    Hooks stack (a sweep and a Grad-CAM on the same layer): ``unhook`` marks this hook released
    and removes released hooks from the outside in; one still wrapped by a live hook stays in its
    chain, passing calls through, until that one goes too. The layer is then as it was loaded.
    """
    had_own, original = "call" in vars(layer), layer.call
    wrapper = make_wrapper(original)
    wrapper.xai_hook = {"original": original, "had_own": had_own, "released": False}
    layer.call = wrapper

    def unhook():
        wrapper.xai_hook["released"] = True
        _unwind(layer)

    return unhook


def _unwind(layer) -> None:
    while True:
        hook = getattr(vars(layer).get("call"), "xai_hook", None)
        if hook is None or not hook["released"]:
            return
        if hook["had_own"]:
            layer.call = hook["original"]
        else:  # the class's own method shows through again
            object.__delattr__(layer, "call")


class LayerCapture:
    """Records a layer's output on every call and makes the active tape watch it.

    Replacing the instance's ``call`` works for Keras 3 and tf_keras alike and for any nesting
    depth, because the outer model still calls the same layer object. ``release()`` unhooks it.
    """

    def __init__(self, layer):
        self.layer = layer
        self.tape: Optional[tf.GradientTape] = None
        self.output = None

        def wrap(original):
            def call_and_capture(*args, **kwargs):
                out = original(*args, **kwargs)
                if self.tape is not None:
                    self.tape.watch(out)
                self.output = out
                return out
            return call_and_capture

        self.release = hook_call(layer, wrap)

    def forward(self, tape: tf.GradientTape, fn, *args):
        """Run ``fn(*args)`` with the layer watched on ``tape``; returns (fn's result, activation)."""
        self.tape = tape
        try:
            result = fn(*args)
        finally:
            self.tape = None
        return result, self.output


class Attribution:
    """Compile + call + numpy, shared by every method; subclasses implement ``_explain``."""

    name = ""

    def __init__(self, classifier: Classifier, input_shape: Sequence[int]):
        self.classifier = classifier
        self.input_shape = tuple(input_shape)
        self._compiled = tf.function(
            self._explain,
            input_signature=[
                tf.TensorSpec([None, *self.input_shape], tf.float32),
                tf.TensorSpec([None], tf.int32),
            ],
        )

    def _explain(self, images: tf.Tensor, targets: tf.Tensor) -> Dict[str, tf.Tensor]:
        raise NotImplementedError

    def __call__(self, images: np.ndarray, targets: np.ndarray) -> Dict[str, np.ndarray]:
        out = self._compiled(tf.convert_to_tensor(images, tf.float32),
                             tf.convert_to_tensor(targets, tf.int32))
        return {key: value.numpy() for key, value in out.items()}

    def tracing_count(self) -> int:
        return self._compiled.experimental_get_tracing_count()

    # Helpers for the gradient methods.

    def _predict(self, images: tf.Tensor, targets: tf.Tensor):
        """(probabilities, resolved targets, target logits) of the clean images."""
        logits = self.classifier.logits(images)
        probabilities = self.classifier.probabilities(logits)
        targets = self.classifier.resolve_targets(targets, probabilities)
        return probabilities, targets, self.classifier.target_scores(logits, targets)

    def _input_gradients(self, inputs: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
        """∂(target logit)/∂input for a batch. Examples are independent in inference mode, so the
        gradient of the sum is each example's own gradient; weights are not watched."""
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(inputs)
            scores = self.classifier.target_scores(self.classifier.logits(inputs), targets)
            total = tf.reduce_sum(scores)
        return tape.gradient(total, inputs)

    def _dims(self, images: tf.Tensor) -> list:
        """[H, W, C] as Python ints where static (keeps shapes static through reshapes)."""
        return [d if d is not None else tf.shape(images)[i + 1]
                for i, d in enumerate(self.input_shape)]

    def _sum_over_copies(self, images: tf.Tensor, targets: tf.Tensor, count: int, per_pass: int,
                         make_copies: Callable, reduce: Callable, initial: tf.Tensor) -> tf.Tensor:
        """Σ over ``count`` perturbed copies of every image of ``reduce(gradients)``.

        ``make_copies(ids)`` gives [B, m, H, W, C] copies for the copy indices ``ids`` [m];
        ``reduce`` maps their gradients [B, m, H, W, C] to a sum over m. Each pass is one
        forward/backward over B·m images with m ≤ ``per_pass``, which bounds memory.
        """
        dims = self._dims(images)

        def one_pass(start, total):
            ids = tf.range(start, tf.minimum(start + per_pass, count))
            m = tf.size(ids)
            copies = tf.reshape(make_copies(ids), [-1, *dims])
            # Copies are laid out example-major, so example b's target repeats m times.
            gradients = self._input_gradients(copies, tf.repeat(targets, m))
            return start + per_pass, total + reduce(tf.reshape(gradients, [-1, m, *dims]))

        # parallel_iterations=1: passes do not depend on each other's gradients, and running
        # them concurrently would bring back the memory that splitting into passes saves.
        _, total = tf.while_loop(lambda start, _: start < count, one_pass,
                                 (tf.constant(0), initial), parallel_iterations=1)
        return total



def gradcam_activation(name: str):
    """The final activation of Grad-CAM's map: relu (positive evidence) or abs (magnitude)."""
    if name not in ("relu", "abs"):
        raise ValueError(f"Grad-CAM activation {name!r} is not relu or abs")
    return tf.nn.relu if name == "relu" else tf.abs


def gradcam_maps(activations: tf.Tensor, gradients: tf.Tensor, channel_weights,
                 activation) -> tf.Tensor:
    """activation(Σ_k w_k A^k), w = channel_weights(A, ∂y/∂A): [B, h, w] from [B, h, w, K].

    The one Grad-CAM formula: ``GradCAM`` at one layer and ``layer_sweep.GradCAMSweep`` at many
    both call it."""
    activations = tf.cast(activations, tf.float32)
    gradients = tf.cast(gradients, tf.float32)
    weights = channel_weights(activations, gradients)
    return activation(tf.einsum("bhwk,bk->bhw", activations, weights))


class GradCAM(Attribution):
    """Grad-CAM: ReLU(Σ_k α_k A^k) with α_k the spatial mean of ∂y/∂A^k (y: the target logit).

    ``activation="abs"`` keeps the magnitude of negative evidence too (|Σ_k α_k A^k|). Maps are
    at the layer's resolution and not normalized. Subclasses change how channels are weighted by
    overriding ``channel_weights``.
    """

    name = "gradcam"

    def __init__(self, classifier: Classifier, layer, layer_name: str, input_shape: Sequence[int],
                 activation: str = "relu"):  # registry's gradcam_activation default
        self.layer_name = layer_name
        self.activation = gradcam_activation(activation)
        self.capture = LayerCapture(layer)
        super().__init__(classifier, input_shape)

    def channel_weights(self, activations: tf.Tensor, gradients: tf.Tensor) -> tf.Tensor:
        """[B, h, w, K] activations and gradients → [B, K] channel weights."""
        return tf.reduce_mean(gradients, axis=(1, 2))

    def _explain(self, images: tf.Tensor, targets: tf.Tensor) -> Dict[str, tf.Tensor]:
        # Only the captured activation is differentiated; not watching the weights keeps the
        # trace smaller and faster.
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            logits, activations = self.capture.forward(tape, self.classifier.logits, images)
            probabilities = self.classifier.probabilities(logits)
            targets = self.classifier.resolve_targets(targets, probabilities)
            # Examples are independent in inference mode, so one gradient of the sum gives each
            # example's own gradient.
            scores = tf.reduce_sum(self.classifier.target_scores(logits, targets))
        # The gradient is taken of the captured tensor itself: a cast of it (a bfloat16 model's
        # activation) is off the tape's path, and its gradient would be None.
        gradients = tape.gradient(scores, activations)
        maps = gradcam_maps(activations, gradients, self.channel_weights, self.activation)
        return {"probabilities": probabilities, "target_class": targets, "maps": maps}


class GradCAMPlusPlus(GradCAM):
    """Grad-CAM++ (Chattopadhay et al. 2018): channel weights Σ_ij a_ij^k ReLU(∂y/∂A_ij^k) with
    a_ij^k = g² / (2g² + Σ_ab A_ab^k g³), g = ∂y/∂A_ij^k — the closed form for an exponential
    score, as xplique and pytorch-grad-cam compute it. Positions with a zero gradient get a = 0.
    Weighs every positive location instead of the spatial mean, so several instances of a class
    in one image all show up."""

    name = "gradcam_plus_plus"

    def channel_weights(self, activations: tf.Tensor, gradients: tf.Tensor) -> tf.Tensor:
        squared = tf.square(gradients)
        activation_sums = tf.reduce_sum(activations, axis=(1, 2), keepdims=True)
        denominator = 2.0 * squared + activation_sums * squared * gradients
        alphas = tf.math.divide_no_nan(squared, denominator)
        return tf.reduce_sum(alphas * tf.nn.relu(gradients), axis=(1, 2))


def mask_metrics(maps: np.ndarray, masks: List[Optional[np.ndarray]]):
    """Per example, from one bilinear upsampling of the map to the mask's resolution:

    * energy: share of the (ReLU'd) map's mass inside the mask;
    * hit: whether the map's maximum lies in the mask (pointing game);
    * area: the mask's share of the image (what the energy would be for a uniform map);
    * iou: IoU with the mask of the map's top region, as many of the highest-attribution pixels
      as the mask has (a map that picks out exactly the mask scores 1).

    Four lists with None where there is no mask; energy, hit and iou are None too where the map
    is all zero (no attention to place), iou also where the mask is empty.
    """
    n = len(masks)
    energies, hits, areas, ious = [None] * n, [None] * n, [None] * n, [None] * n
    with_mask = [i for i, m in enumerate(masks) if m is not None]
    if not with_mask:
        return energies, hits, areas, ious
    height, width = masks[with_mask[0]].shape
    up = tf.image.resize(maps[with_mask][..., None].astype(np.float32), (height, width),
                         method="bilinear").numpy()[..., 0]
    for row, i in enumerate(with_mask):
        mask = masks[i].astype(bool)
        areas[i] = float(mask.mean())
        positive = np.maximum(up[row], 0.0)
        total = float(positive.sum())
        if total <= 0.0:
            continue
        energies[i] = float(positive[mask].sum() / total)
        hits[i] = bool(mask.flat[int(np.argmax(positive))])
        if mask.any():
            top = np.zeros(mask.size, bool)
            top[np.argsort(-up[row].ravel(), kind="stable")[: int(mask.sum())]] = True
            ious[i] = float((top & mask.ravel()).sum() / (top | mask.ravel()).sum())
    return energies, hits, areas, ious


def mask_agreement(maps: np.ndarray, masks: List[Optional[np.ndarray]]):
    """(energies, hits, areas) of ``mask_metrics``."""
    return mask_metrics(maps, masks)[:3]

"""Grad-CAM layer sweep: Grad-CAM at every convolutional layer of a classifier, in one forward and
one backward pass per batch, and how well each layer's maps agree with ground-truth masks.

* ``sweep_layers(model)``: (qualified name, layer) of every layer with a 4-D (batch, h, w, c)
  output, in depth order, nested models expanded (``model_io.iter_layers``). Layers used more than
  once (shared) are skipped: their captured output would be only one of their calls.
* ``GradCAMSweep(classifier, layers, input_shape)``: hooks every layer (``LayerSetCapture``, the
  multi-layer ``explainers.LayerCapture``), runs the model once under one tape and takes one
  ``tape.gradient(score, [A_1..A_L])``; each layer's map is ``explainers.gradcam_maps`` (ReLU, or
  abs with ``activation="abs"``), the same as ``explainers.GradCAM`` at that layer. One compiled function for every batch size;
  ``sweep(images, targets)`` → ``{"probabilities", "target_class", "maps": {name: [B, h, w]}}``.
* ``localization_by_layer(maps_by_layer, masks)``: per layer, additive sums and counts of mask
  energy and pointing-game hits (``explainers.mask_agreement``), so a Beam ``CombineFn`` can add
  them over batches (``add_localization``); ``localization_means`` turns the total into means.

Pure TensorFlow + numpy, no Beam.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from . import explainers, model_io
from .explainers import Classifier, GradCAM, gradcam_activation, gradcam_maps, mask_agreement

# --------------------------------------------------------------------------- which layers


def _four_d_output(layer) -> bool:
    try:
        return len(layer.output.shape) == 4
    except Exception:  # no single output (never called, or tf_keras refusing a shared layer)
        return False


def sweep_layers(model) -> List[Tuple[str, object]]:
    """(qualified name, layer) of every layer with a 4-D output, depth first, nested models
    expanded; layers not called exactly once per forward pass (shared layers) are left out.

    Sharing is read off one forward pass on a blank image: Keras' inbound-node lists cannot tell,
    as a loaded Sequential model keeps several nodes per layer.
    """
    found, seen = [], set()
    for name, layer in model_io.iter_layers(model):
        if id(layer) in seen or not _four_d_output(layer):
            continue
        seen.add(id(layer))
        found.append((name, layer))
    if not found:
        return found
    shape = [1] + [d or 32 for d in model.inputs[0].shape[1:]]
    counting = LayerSetCapture([layer for _, layer in found])
    try:
        _, _, calls = counting.forward(
            None, lambda x: model(x, training=False), tf.zeros(shape, model.inputs[0].dtype))
    finally:
        counting.release()  # a look at the model, not a hook it keeps
    return [pair for pair, count in zip(found, calls) if count == 1]


# --------------------------------------------------------------------------- capture


class LayerSetCapture:
    """``explainers.LayerCapture`` for many layers at once: during ``forward`` every hooked layer's
    output is recorded and watched on the tape, and its calls are counted.

    Like ``LayerCapture`` it replaces the instance's ``call`` with a wrapper of whatever ``call``
    was there, so it stacks with other captures (a ``GradCAM`` on one of the layers, another
    sweep): each wrapper acts only while its own ``forward`` runs. ``release()`` unhooks them.
    """

    def __init__(self, layers: Sequence):
        self.layers = list(layers)
        self._tape: Optional[tf.GradientTape] = None
        self._active = False
        self._outputs: List[Optional[tf.Tensor]] = [None] * len(self.layers)
        self._calls = [0] * len(self.layers)
        self._unhooks = [self._hook(index, layer) for index, layer in enumerate(self.layers)]

    def _hook(self, index: int, layer):
        def wrap(original):
            def call_and_capture(*args, **kwargs):
                out = original(*args, **kwargs)
                if self._active:
                    if self._tape is not None:
                        self._tape.watch(out)
                    self._outputs[index] = out
                    self._calls[index] += 1
                return out
            return call_and_capture

        return explainers.hook_call(layer, wrap)

    def release(self) -> None:
        """Unhook every layer (``explainers.hook_call``)."""
        for unhook in self._unhooks:
            unhook()

    def forward(self, tape: Optional[tf.GradientTape], fn, *args):
        """Run ``fn(*args)`` with every layer watched on ``tape``; returns (fn's result, list of
        the layers' outputs in order, list of how many times each layer was called)."""
        self._tape, self._active = tape, True
        self._outputs = [None] * len(self.layers)
        self._calls = [0] * len(self.layers)
        try:
            result = fn(*args)
        finally:
            self._tape, self._active = None, False
        return result, list(self._outputs), list(self._calls)


# --------------------------------------------------------------------------- the sweep


class GradCAMSweep:
    """Grad-CAM at every layer of ``layers`` ((qualified name, layer) pairs, as ``sweep_layers``
    gives) in one forward and one backward pass.

    The backward pass reaches the earliest layer, so it costs about what one input-gradient costs;
    every layer's map then is an einsum. Maps are at each layer's resolution, not normalized, and
    equal ``explainers.GradCAM``'s at that layer (the gradient with respect to an intermediate
    tensor is the total derivative, whichever other tensors are also sources).
    """

    name = "gradcam_sweep"

    def __init__(self, classifier: Classifier, layers: Sequence[Tuple[str, object]],
                 input_shape: Sequence[int], activation: str = "relu"):
        layers = list(layers)
        if not layers:
            raise ValueError("GradCAMSweep needs at least one layer (sweep_layers found none with "
                             "a 4-D output).")
        names = [name for name, _ in layers]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"GradCAMSweep got layer names more than once: {duplicates}.")
        self.classifier = classifier
        self.activation = gradcam_activation(activation)  # --gradcam-activation
        self.layer_names = names
        self.input_shape = tuple(input_shape)
        self.capture = LayerSetCapture([layer for _, layer in layers])
        self._compiled = tf.function(
            self._explain,
            input_signature=[
                tf.TensorSpec([None, *self.input_shape], tf.float32),
                tf.TensorSpec([None], tf.int32),
            ],
        )

    # Grad-CAM's own weights: the sweep is Grad-CAM at many layers, not a second version of it.
    channel_weights = GradCAM.channel_weights

    def _explain(self, images: tf.Tensor, targets: tf.Tensor):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            logits, activations, calls = self.capture.forward(
                tape, self.classifier.logits, images)
            probabilities = self.classifier.probabilities(logits)
            targets = self.classifier.resolve_targets(targets, probabilities)
            # Examples are independent in inference mode: the gradient of the sum is each
            # example's own gradient.
            scores = tf.reduce_sum(self.classifier.target_scores(logits, targets))
        wrong = [f"{name} ({count}×)" for name, count in zip(self.layer_names, calls)
                 if count != 1]
        if wrong:
            raise ValueError(
                "Grad-CAM needs each swept layer to run exactly once per forward pass; these did "
                f"not: {', '.join(wrong)}. Leave them out (sweep_layers skips shared layers).")
        # One backward pass for every layer. A layer the score does not depend on gets zero
        # gradients, hence an all-zero map.
        gradients = tape.gradient(scores, activations,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
        maps = {name: gradcam_maps(activation, gradient, self.channel_weights, self.activation)
                for name, activation, gradient in zip(self.layer_names, activations, gradients)}
        return {"probabilities": probabilities, "target_class": targets, "maps": maps}

    def __call__(self, images: np.ndarray, targets: np.ndarray) -> Dict[str, object]:
        out = self._compiled(tf.convert_to_tensor(images, tf.float32),
                             tf.convert_to_tensor(targets, tf.int32))
        return tf.nest.map_structure(lambda value: value.numpy(), out)

    def tracing_count(self) -> int:
        return self._compiled.experimental_get_tracing_count()


# --------------------------------------------------------------------------- localization

# Additive per-layer counters: sums and counts, so batches (and Beam accumulators) just add up.
#   masked_n   examples with a mask
#   empty_n    of those, examples whose map is all zero (no energy, no pointing: left out of both)
#   energy_sum / energy_n   share of the upsampled map's mass inside the mask
#   area_sum   mask share of the image over the same examples (a uniform map's energy: baseline)
#   hits / hit_n            pointing game: the map's maximum falls inside the mask
LOCALIZATION_KEYS = ("masked_n", "empty_n", "energy_sum", "energy_n", "area_sum", "hits", "hit_n")


def localization_by_layer(maps_by_layer: Dict[str, np.ndarray],
                          masks: Sequence[Optional[np.ndarray]]) -> Dict[str, Dict[str, float]]:
    """Per layer, sums and counts of mask agreement over the batch's examples that have a mask.

    ``maps_by_layer``: {layer: [B, h, w]} (``GradCAMSweep``'s ``maps``); ``masks``: B bool [H, W]
    arrays or None. Maps are ReLU'd and upsampled bilinearly to the mask size by
    ``explainers.mask_agreement``. Returns {layer: {key: number for key in LOCALIZATION_KEYS}}.
    """
    masks = list(masks)
    summary = {}
    for name, maps in maps_by_layer.items():
        maps = np.asarray(maps)
        if len(maps) != len(masks):
            raise ValueError(f"Layer {name} has {len(maps)} maps for {len(masks)} masks.")
        energies, hits, areas = mask_agreement(maps, masks)
        with_energy = [i for i, e in enumerate(energies) if e is not None]
        with_hit = [h for h in hits if h is not None]
        masked = sum(area is not None for area in areas)
        summary[name] = {
            "masked_n": masked,
            "empty_n": masked - len(with_energy),
            "energy_sum": float(sum(energies[i] for i in with_energy)),
            "energy_n": len(with_energy),
            "area_sum": float(sum(areas[i] for i in with_energy)),
            "hits": int(sum(with_hit)),
            "hit_n": len(with_hit),
        }
    return summary


def add_localization(total: Dict[str, Dict[str, float]],
                     part: Dict[str, Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    """The sum of two ``localization_by_layer`` results (a new dict; layers of either)."""
    summed = {name: dict(counters) for name, counters in total.items()}
    for name, counters in part.items():
        into = summed.setdefault(name, {key: 0 for key in LOCALIZATION_KEYS})
        for key in LOCALIZATION_KEYS:
            into[key] = into.get(key, 0) + counters.get(key, 0)
    return summed


def localization_means(summed: Dict[str, Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    """Per layer: ``energy`` (mean mask energy), ``area`` (mean mask share over the same
    examples: what a uniform map would score), ``pointing_game`` (hit rate), with NaN where there
    was nothing to average, and the counts ``n`` (examples scored) and ``empty``."""

    def ratio(numerator, denominator):
        return float(numerator) / denominator if denominator else math.nan

    return {
        name: {
            "energy": ratio(c["energy_sum"], c["energy_n"]),
            "area": ratio(c["area_sum"], c["energy_n"]),
            "pointing_game": ratio(c["hits"], c["hit_n"]),
            "n": int(c["energy_n"]),
            "empty": int(c["empty_n"]),
        }
        for name, c in summed.items()
    }

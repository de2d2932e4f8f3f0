"""Grad-CAM against closed forms on hand-built models: softmax and sigmoid heads, logits,
nested models, the compiled function's single trace."""
import keras
import numpy as np
import pytest
import tf_keras

from beam_pipeline.explain import explainers, model_io
from beam_pipeline.errors import ModelLoadError, OptionError

from conftest import IMAGE_SIZE, conv_activations, gap_model


def _explainer(model, layer="auto"):
    info = model_io.prepare_classifier(model)
    name, layer_obj = model_io.find_layer(model, layer)
    shape = tuple(model.inputs[0].shape[1:])
    return explainers.GradCAM(explainers.Classifier(model, info.head), layer_obj, name, shape), info


def _images(n=5, channels=3, seed=0):
    return np.random.default_rng(seed).random((n, IMAGE_SIZE, IMAGE_SIZE, channels)).astype("float32")


def _closed_form(activations, weights_for_target):
    """ReLU(Σ_k w_k A^k) / (h·w) for GAP → dense."""
    h, w = activations.shape[1:3]
    return np.maximum(np.einsum("bhwk,bk->bhw", activations, weights_for_target), 0) / (h * w)


def test_gradcam_matches_closed_form_for_gap_dense_softmax():
    model = gap_model(num_classes=3)
    images = _images()
    acts = conv_activations(model, images)
    probabilities = model(images).numpy()
    weights = model.get_layer("head").kernel.numpy()
    explainer, info = _explainer(model)
    targets = np.array([0, 1, 2, -1, 1], np.int32)
    out = explainer(images, targets)
    resolved = targets.copy()
    resolved[3] = probabilities[3].argmax()
    np.testing.assert_array_equal(out["target_class"], resolved)
    np.testing.assert_allclose(out["probabilities"], probabilities, atol=1e-6)
    expected = _closed_form(acts, weights[:, resolved].T)
    np.testing.assert_allclose(out["maps"], expected, rtol=1e-4, atol=1e-7)
    assert info.head == "softmax" and info.num_classes == 3


def test_gradcam_plus_plus_matches_closed_form_for_gap_dense():
    """With GAP → dense, ∂y/∂A_ij^k = w_k/(hw) =: g_k everywhere, so Grad-CAM++'s
    a^k = g²/(2g² + S_k g³) = 1/(2 + S_k g_k) (S_k = Σ_ij A_ij^k) and its channel weight is
    hw·ReLU(g_k)/(2 + S_k g_k): unlike Grad-CAM, negative evidence channels get weight 0."""
    model = gap_model(num_classes=3)
    images = _images()
    acts = conv_activations(model, images)
    weights = model.get_layer("head").kernel.numpy()
    name, layer = model_io.find_layer(model, "auto")
    info = model_io.prepare_classifier(model)
    explainer = explainers.GradCAMPlusPlus(explainers.Classifier(model, info.head), layer, name,
                                           model.inputs[0].shape[1:])
    targets = np.array([0, 1, 2, 0, 1], np.int32)
    out = explainer(images, targets)
    h, w = acts.shape[1:3]
    g = weights[:, targets].T / (h * w)  # [B, K]
    sums = acts.sum(axis=(1, 2))
    channel_weights = h * w * np.maximum(g, 0) / (2 + sums * g)
    expected = np.maximum(np.einsum("bhwk,bk->bhw", acts, channel_weights), 0)
    assert np.any(weights < 0)  # the case where Grad-CAM++ and Grad-CAM differ
    np.testing.assert_allclose(out["maps"], expected, rtol=1e-4, atol=1e-7)
    assert explainer.name == "gradcam_plus_plus" and explainer.tracing_count() == 1


def test_gradcam_uses_logit_not_softmax_probability():
    """The softmax head is switched to its logit: maps equal those of the same net with a linear
    head, and differ from the gradient of the probability."""
    softmax_model = gap_model(num_classes=3, activation="softmax", seed=3)
    linear_model = gap_model(num_classes=3, activation=None, seed=3)
    images = _images(seed=1)
    p = softmax_model(images).numpy()  # before the explainer switches the head to logits
    targets = np.zeros(5, np.int32)
    from_softmax, _ = _explainer(softmax_model)
    from_logits, info = _explainer(linear_model)
    maps = from_softmax(images, targets)["maps"]
    np.testing.assert_allclose(maps, from_logits(images, targets)["maps"], rtol=1e-5, atol=1e-8)
    assert info.head == "softmax"  # a linear multi-unit output is treated as logits

    # The probability's gradient is the logit's, reweighted by p_c (δ_cj − p_j): not the same map.
    acts = conv_activations(softmax_model, images)
    w = softmax_model.get_layer("head").kernel.numpy()
    dp_dz = p[:, :1] * (np.eye(3)[0][None] - p)  # ∂p_0/∂z_j
    prob_weights = dp_dz @ w.T
    prob_maps = _closed_form(acts, prob_weights)
    assert not np.allclose(maps, prob_maps, rtol=1e-2)


def test_separate_softmax_activation_layer_is_removed_too():
    base = gap_model(num_classes=3, activation=None, seed=5)
    outputs = keras.layers.Activation("softmax", name="probs")(base.output)
    model = keras.Model(base.inputs, outputs)
    images = _images(seed=2)
    expected_probs = model(images).numpy()
    explainer, info = _explainer(model)
    out = explainer(images, np.full(5, 2, np.int32))
    np.testing.assert_allclose(out["probabilities"], expected_probs, atol=1e-6)
    acts = conv_activations(model, images)
    w = model.get_layer("head").kernel.numpy()
    np.testing.assert_allclose(out["maps"], _closed_form(acts, np.repeat(w[:, 2][None], 5, 0)),
                               rtol=1e-4, atol=1e-7)
    assert "probs" in info.head_source


def test_single_sigmoid_gives_two_class_probabilities_and_signed_logit():
    model = gap_model(num_classes=1, activation="sigmoid", seed=7)
    images = _images(seed=3)
    p = model(images).numpy()[:, 0]
    explainer, info = _explainer(model)
    assert info.num_classes == 2 and info.head == "sigmoid"
    acts = conv_activations(model, images)
    w = model.get_layer("head").kernel.numpy()[:, 0]
    for target, sign in ((1, 1.0), (0, -1.0)):
        out = explainer(images, np.full(5, target, np.int32))
        np.testing.assert_allclose(out["probabilities"], np.stack([1 - p, p], 1), atol=1e-6)
        expected = _closed_form(acts, np.repeat(sign * w[None], 5, 0))
        np.testing.assert_allclose(out["maps"], expected, rtol=1e-4, atol=1e-7)
    predicted = explainer(images, np.full(5, -1, np.int32))["target_class"]
    np.testing.assert_array_equal(predicted, (p >= 0.5).astype(int))


def _nested(outer="sequential"):
    """A convolutional base (Functional) inside a Sequential or Functional classifier."""
    base_in = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="base_conv1")(base_in)
    x = keras.layers.Conv2D(6, 3, activation="relu", name="base_conv2")(x)
    base = keras.Model(base_in, x, name="backbone")
    head = keras.layers.Dense(3, activation="softmax", name="head")
    if outer == "sequential":
        model = keras.Sequential(
            [keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3)), base,
             keras.layers.GlobalAveragePooling2D(), head])
    else:
        inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
        y = keras.layers.Rescaling(1.0)(inputs)
        y = base(y)
        y = keras.layers.GlobalAveragePooling2D()(y)
        model = keras.Model(inputs, head(y))
    return model, base


@pytest.mark.parametrize("outer", ["sequential", "functional"])
def test_auto_layer_searches_inside_nested_models(outer):
    model, base = _nested(outer)
    name, _ = model_io.find_layer(model, "auto")
    assert name == "backbone/base_conv2"
    images = _images(seed=4)
    acts = conv_activations(base, images, "base_conv2")
    w = model.get_layer("head").kernel.numpy()
    explainer, _ = _explainer(model)
    out = explainer(images, np.array([0, 1, 2, 0, 1], np.int32))
    expected = _closed_form(acts, w[:, [0, 1, 2, 0, 1]].T)
    np.testing.assert_allclose(out["maps"], expected, rtol=1e-4, atol=1e-7)
    # An earlier nested layer by plain or qualified name.
    assert model_io.find_layer(model, "base_conv1")[0] == "backbone/base_conv1"
    assert model_io.find_layer(model, "backbone/base_conv1")[0] == "backbone/base_conv1"


def test_real_application_backbone_nested_in_sequential():
    backbone = keras.applications.MobileNetV2(
        weights=None, include_top=False, input_shape=(32, 32, 3), alpha=0.35)
    model = keras.Sequential([keras.Input((32, 32, 3)), backbone,
                              keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(2, activation="softmax")])
    name, _ = model_io.find_layer(model, "auto")
    assert name.startswith(backbone.name + "/") and name.endswith("out_relu")
    info = model_io.prepare_classifier(model)
    layer = model_io.find_layer(model, "auto")[1]
    explainer = explainers.GradCAM(explainers.Classifier(model, info.head), layer, name, (32, 32, 3))
    out = explainer(np.random.default_rng(0).random((3, 32, 32, 3)).astype("float32"),
                    np.full(3, -1, np.int32))
    assert out["maps"].shape == (3, 1, 1)
    assert np.all(np.isfinite(out["maps"]))


def test_one_trace_for_all_batch_sizes():
    explainer, _ = _explainer(gap_model())
    for n in (4, 1, 7, 4):
        explainer(_images(n), np.full(n, -1, np.int32))
    assert explainer.tracing_count() == 1


def test_tf_keras_model_works_like_keras3():
    model = tf_keras.Sequential([
        tf_keras.layers.Conv2D(4, 3, activation="relu", input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
                               name="conv"),
        tf_keras.layers.GlobalAveragePooling2D(),
        tf_keras.layers.Dense(2, activation="softmax", name="head"),
    ])
    images = _images(seed=6)
    acts = tf_keras.Model(model.inputs, model.get_layer("conv").output)(images).numpy()
    w = model.get_layer("head").kernel.numpy()
    explainer, _ = _explainer(model)
    out = explainer(images, np.ones(5, np.int32))
    np.testing.assert_allclose(out["maps"], _closed_form(acts, np.repeat(w[:, 1][None], 5, 0)),
                               rtol=1e-4, atol=1e-7)


def test_layer_errors_name_the_problem():
    model = gap_model()
    with pytest.raises(OptionError, match="no layer of that name"):
        model_io.find_layer(model, "conv9")
    with pytest.raises(OptionError, match="4-D"):
        model_io.find_layer(model, "head")
    dense_only = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises((OptionError, ModelLoadError)):
        model_io.prepare_classifier(dense_only)
        model_io.find_layer(dense_only, "auto")


def test_mask_agreement_energy_and_pointing():
    maps = np.zeros((3, 2, 2), np.float32)
    maps[0, 0, 0] = 1.0  # all attention top-left
    maps[1] = 1.0  # uniform
    masks = [np.zeros((4, 4), bool), np.zeros((4, 4), bool), None]
    masks[0][:2, :2] = True
    masks[1][:2, :2] = True
    energies, hits, areas = explainers.mask_agreement(maps, masks)
    assert energies[0] > 0.5 and hits[0] is True
    assert energies[1] == pytest.approx(0.25) and areas[1] == pytest.approx(0.25)
    assert energies[2] is None and hits[2] is None and areas[2] is None

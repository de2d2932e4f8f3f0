"""CAM, Saliency, SmoothGrad and Integrated Gradients against closed forms and finite differences
on tiny hand-built models; their shared contract (keys, shapes, one trace); pool_map."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from beam_pipeline.explain import attribution_methods as am
from beam_pipeline.explain import explainers, model_io
from beam_pipeline.errors import OptionError

from conftest import IMAGE_SIZE, conv_activations, gap_model

SMOOTH_SIZE = 8
SMOOTH_CHANNELS = 2


def smooth_model(num_classes=3, activation="softmax", dtype="float32", seed=0):
    """conv(tanh) → conv(softplus) → GAP → dense on 8×8×2 images: smooth everywhere, so finite
    differences and Riemann sums converge. The float64 twin (same float32 weights) serves as the
    reference for finite differences."""
    rng = np.random.default_rng(seed)
    inputs = keras.Input((SMOOTH_SIZE, SMOOTH_SIZE, SMOOTH_CHANNELS), dtype=dtype)
    layers = [keras.layers.Conv2D(4, 3, activation="tanh", dtype=dtype, name="conv1"),
              keras.layers.Conv2D(5, 3, activation="softplus", dtype=dtype, name="conv2")]
    x = inputs
    for layer in layers:
        x = layer(x)
    x = keras.layers.GlobalAveragePooling2D(dtype=dtype)(x)
    head = keras.layers.Dense(num_classes, activation=activation, dtype=dtype, name="head")
    model = keras.Model(inputs, head(x))
    for layer, scale in zip(layers + [head], (0.6, 0.6, 1.5)):
        layer.set_weights([rng.normal(0, scale, w.shape).astype("float32").astype(dtype)
                           for w in layer.get_weights()])
    return model


def _classifier(model):
    info = model_io.prepare_classifier(model)
    return explainers.Classifier(model, info.head)


def _shape(model):
    return tuple(model.inputs[0].shape[1:])


def _images(n, size=SMOOTH_SIZE, channels=SMOOTH_CHANNELS, seed=0):
    return np.random.default_rng(seed).random((n, size, size, channels)).astype("float32")


def _gradcam(model):
    name, layer = model_io.find_layer(model, "auto")
    return explainers.GradCAM(_classifier(model), layer, name, _shape(model))


# --------------------------------------------------------------------------- CAM


@pytest.mark.parametrize("classes,activation", [(3, "softmax"), (1, "sigmoid")])
def test_cam_is_gradcam_times_area_and_signed_closed_form(classes, activation):
    model = gap_model(num_classes=classes, activation=activation, seed=2)
    images = _images(5, IMAGE_SIZE, 3, seed=1)
    acts = conv_activations(model, images)
    kernel = model.get_layer("head").kernel.numpy()
    targets = np.array([0, 1, 1, -1, 0], np.int32) if classes == 1 else \
        np.array([0, 1, 2, -1, 1], np.int32)
    gradcam = _gradcam(model)
    cam = am.CAM(gradcam.classifier, _shape(model))
    signed = am.CAM(gradcam.classifier, _shape(model), relu=False)
    expected_gradcam = gradcam(images, targets)
    out, raw = cam(images, targets), signed(images, targets)
    assert cam.layer_name == "conv" and out["maps"].shape == (5, 14, 14)
    np.testing.assert_array_equal(out["target_class"], expected_gradcam["target_class"])
    np.testing.assert_allclose(out["probabilities"], expected_gradcam["probabilities"], atol=1e-6)
    # Sums over channels cancel, so small entries carry float32 error of the largest ones.
    expected = expected_gradcam["maps"] * 14 * 14
    np.testing.assert_allclose(out["maps"], expected, rtol=1e-4, atol=1e-5 * expected.max())
    resolved = out["target_class"]
    if classes == 1:  # one sigmoid unit: class 1 is +w, class 0 is −w
        weights = np.where(resolved[:, None] == 1, 1.0, -1.0) * kernel[:, 0][None]
    else:
        weights = kernel[:, resolved].T
    closed = np.einsum("bhwk,bk->bhw", acts, weights)
    np.testing.assert_allclose(raw["maps"], closed, rtol=1e-4, atol=1e-5 * np.abs(closed).max())
    assert (closed < 0).any()  # the signed variant really keeps negative evidence


def _backbone(with_pooling):
    base_in = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="base_conv1")(base_in)
    x = keras.layers.Conv2D(6, 3, activation="relu", name="base_conv2")(x)
    if with_pooling:
        x = keras.layers.GlobalAveragePooling2D(name="base_gap")(x)
    return keras.Model(base_in, x, name="backbone")


@pytest.mark.parametrize("layout", ["sequential_dropout", "pooling_inside_softmax_layer"])
def test_cam_finds_structure_through_nested_models(layout):
    if layout == "sequential_dropout":
        model = keras.Sequential([
            keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3)), _backbone(False),
            keras.layers.GlobalAveragePooling2D(), keras.layers.Dropout(0.5),
            keras.layers.Dense(3, activation="softmax", name="head")])
    else:
        inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
        logits = keras.layers.Dense(3, name="head")(_backbone(True)(inputs))
        model = keras.Model(inputs, keras.layers.Softmax()(logits))
    images = _images(4, IMAGE_SIZE, 3, seed=3)
    gradcam = _gradcam(model)
    cam = am.CAM(gradcam.classifier, _shape(model))
    assert cam.layer_name == "backbone/base_conv2"
    targets = np.array([0, 1, 2, -1], np.int32)
    expected = gradcam(images, targets)["maps"] * 12 * 12
    np.testing.assert_allclose(cam(images, targets)["maps"], expected,
                               rtol=1e-4, atol=1e-5 * expected.max())


def _refused_models():
    shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
    conv = lambda: keras.layers.Conv2D(4, 3, activation="relu")  # noqa: E731
    yield "flatten", keras.Sequential([keras.Input(shape), conv(), keras.layers.Flatten(),
                                       keras.layers.Dense(3, activation="softmax")])
    yield "max pooling", keras.Sequential([keras.Input(shape), conv(),
                                           keras.layers.GlobalMaxPooling2D(),
                                           keras.layers.Dense(3, activation="softmax")])
    yield "hidden dense", keras.Sequential([keras.Input(shape), conv(),
                                            keras.layers.GlobalAveragePooling2D(),
                                            keras.layers.Dense(8, activation="relu"),
                                            keras.layers.Dense(3, activation="softmax")])
    yield "no feature map", keras.Sequential([keras.Input(shape),
                                              keras.layers.GlobalAveragePooling2D(),
                                              keras.layers.Dense(3, activation="softmax")])


@pytest.mark.parametrize("case,model", list(_refused_models()))
def test_cam_refuses_other_architectures_and_names_the_alternatives(case, model):
    with pytest.raises(OptionError, match="gradcam, gradcam_plus_plus, saliency, smoothgrad, "
                                          "integrated_gradients"):
        am.CAM(_classifier(model), _shape(model))


# --------------------------------------------------------------------------- Saliency


def _finite_difference_gradients(model64, images, targets, eps=1e-4):
    """Central differences of the target logit in float64, all pixels of all images in one
    batch: [B, H, W, C]."""
    b, n = images.shape[0], images[0].size
    steps = (np.eye(n) * eps).reshape(n, *images.shape[1:])
    x = images.astype(np.float64)
    batch = np.concatenate([x[:, None] + steps[None], x[:, None] - steps[None]], axis=1)
    logits = model64(batch.reshape(-1, *images.shape[1:]), training=False).numpy()
    logits = logits.reshape(b, 2 * n, -1)[np.arange(b), :, targets]  # [B, 2n]
    return ((logits[:, :n] - logits[:, n:]) / (2 * eps)).reshape(images.shape)


def test_saliency_matches_float64_finite_differences():
    model = smooth_model(seed=4)
    model64 = smooth_model(activation=None, dtype="float64", seed=4)
    images = _images(2, seed=5)
    saliency = am.Saliency(_classifier(model), _shape(model))
    out = saliency(images, np.array([2, -1], np.int32))
    reference = _finite_difference_gradients(model64, images, out["target_class"])
    np.testing.assert_allclose(out["maps"], np.abs(reference).max(axis=-1), rtol=1e-3, atol=1e-6)
    assert out["maps"].shape == (2, SMOOTH_SIZE, SMOOTH_SIZE) and out["maps"].max() > 1e-3


# --------------------------------------------------------------------------- SmoothGrad


def test_seeded_draws_are_standard_and_keyed_by_content():
    images = _images(3, seed=6)
    keys = am.example_keys(images, seed=7)
    draws = am.seeded_draws(keys, tf.range(4), [SMOOTH_SIZE, SMOOTH_SIZE, 2]).numpy()
    assert draws.shape == (3, 4, SMOOTH_SIZE, SMOOTH_SIZE, 2)
    assert abs(draws.mean()) < 0.05 and abs(draws.std() - 1.0) < 0.05
    # One copy drawn alone, or an image keyed in another batch, gets the same noise.
    alone = am.seeded_draws(am.example_keys(images[2:], 7), tf.constant([3]),
                            [SMOOTH_SIZE, SMOOTH_SIZE, 2]).numpy()
    np.testing.assert_array_equal(alone[0, 0], draws[2, 3])
    assert not np.allclose(draws[0, 0], draws[1, 0]) and not np.allclose(draws[0, 0], draws[0, 1])
    uniform = am.seeded_draws(keys, tf.range(2), [4, 4, 1], "uniform").numpy()
    assert uniform.min() >= 0.0 and uniform.max() < 1.0


def test_smoothgrad_is_mean_saliency_of_its_noisy_copies():
    model = smooth_model(seed=8)
    classifier = _classifier(model)
    images, targets = _images(3, seed=9), np.array([0, -1, 2], np.int32)
    samples, sigma, seed = 6, 0.2, 11
    smooth = am.SmoothGrad(classifier, _shape(model), samples=samples, sigma=sigma, seed=seed,
                           samples_per_pass=4)
    out = smooth(images, targets)
    # Rebuild the copies outside the compiled function and take plain saliency of each.
    noise = am.seeded_draws(am.example_keys(images, seed), tf.range(samples),
                            list(images.shape[1:])).numpy()
    scale = sigma * (images.max(axis=(1, 2, 3)) - images.min(axis=(1, 2, 3)))
    copies = images[:, None] + scale[:, None, None, None, None] * noise
    per_copy = am.Saliency(classifier, _shape(model))(
        copies.reshape(-1, *images.shape[1:]), np.repeat(out["target_class"], samples))
    expected = per_copy["maps"].reshape(3, samples, SMOOTH_SIZE, SMOOTH_SIZE).mean(axis=1)
    np.testing.assert_allclose(out["maps"], expected, rtol=1e-5, atol=1e-7)
    plain = am.Saliency(classifier, _shape(model))(images, targets)
    np.testing.assert_array_equal(out["target_class"], plain["target_class"])
    np.testing.assert_allclose(out["probabilities"], plain["probabilities"], atol=1e-6)
    assert not np.allclose(out["maps"], plain["maps"], rtol=1e-2)


def test_smoothgrad_is_reproducible_whatever_the_batching_or_passes():
    model = smooth_model(seed=12)
    classifier = _classifier(model)
    images, targets = _images(4, seed=13), np.array([0, 1, 2, 0], np.int32)
    one_pass = am.SmoothGrad(classifier, _shape(model), samples=7, seed=3, samples_per_pass=7)
    three_passes = am.SmoothGrad(classifier, _shape(model), samples=7, seed=3,
                                 samples_per_pass=3)
    maps = one_pass(images, targets)["maps"]
    np.testing.assert_array_equal(one_pass(images, targets)["maps"], maps)
    np.testing.assert_allclose(three_passes(images, targets)["maps"], maps, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(one_pass(images[::-1], targets[::-1])["maps"], maps[::-1],
                               rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(one_pass(images[2:3], targets[2:3])["maps"], maps[2:3],
                               rtol=1e-5, atol=1e-8)
    other_seed = am.SmoothGrad(classifier, _shape(model), samples=7, seed=4)
    assert not np.allclose(other_seed(images, targets)["maps"], maps, rtol=1e-3)
    assert one_pass.tracing_count() == 1


def test_smoothgrad_of_a_linear_model_is_its_saliency():
    """With a gradient independent of the input, noise changes nothing."""
    model = gap_model(activation=None, seed=14)
    model.get_layer("conv").activation = keras.activations.linear
    classifier = _classifier(model)
    images, targets = _images(2, IMAGE_SIZE, 3, seed=15), np.array([1, 2], np.int32)
    smooth = am.SmoothGrad(classifier, _shape(model), samples=5, sigma=0.5)(images, targets)
    plain = am.Saliency(classifier, _shape(model))(images, targets)
    np.testing.assert_allclose(smooth["maps"], plain["maps"], rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------- Integrated Gradients


@pytest.mark.parametrize("baseline", am.BASELINES)
def test_integrated_gradients_completeness_within_one_percent(baseline):
    model = smooth_model(seed=16)
    classifier = _classifier(model)
    images, targets = _images(4, seed=17), np.array([0, 1, 2, -1], np.int32)
    ig = am.IntegratedGradients(classifier, _shape(model), steps=64, baseline=baseline,
                                signed=True)
    out = ig(images, targets)
    assert out["completeness_gap"].shape == (4,) and out["completeness_gap"].dtype == np.float32
    assert np.all(out["completeness_gap"] <= 0.01), out["completeness_gap"]
    # The signed map's total is f(x) − f(x0), f the target logit computed by the model itself.
    baselines = ig.baselines(images).numpy()
    logits = model(np.concatenate([images, baselines]), training=False).numpy()
    t = out["target_class"]
    expected = logits[np.arange(4), t] - logits[4 + np.arange(4), t]
    np.testing.assert_allclose(out["maps"].sum(axis=(1, 2)), expected,
                               rtol=0.01, atol=1e-3 * np.abs(expected).max())


def test_integrated_gradients_of_a_linear_model_is_input_times_gradient():
    model = gap_model(activation="softmax", seed=18)
    model.get_layer("conv").activation = keras.activations.linear
    classifier = _classifier(model)
    images, targets = _images(3, IMAGE_SIZE, 3, seed=19), np.array([0, 1, 2], np.int32)
    out = am.IntegratedGradients(classifier, _shape(model), steps=4, baseline="black")(
        images, targets)
    x = tf.constant(images)
    with tf.GradientTape() as tape:
        tape.watch(x)
        scores = tf.gather(model(x, training=False), targets, axis=1, batch_dims=1)
    gradients = tape.gradient(scores, x).numpy()
    np.testing.assert_allclose(out["maps"], np.abs(images * gradients).sum(axis=-1),
                               rtol=1e-4, atol=1e-7)
    assert np.all(out["completeness_gap"] < 1e-4)


def test_integrated_gradients_passes_do_not_change_the_result():
    model = smooth_model(seed=20)
    classifier = _classifier(model)
    images, targets = _images(3, seed=21), np.full(3, -1, np.int32)
    whole = am.IntegratedGradients(classifier, _shape(model), steps=20, steps_per_pass=20)
    split = am.IntegratedGradients(classifier, _shape(model), steps=20, steps_per_pass=7)
    a, b = whole(images, targets), split(images, targets)
    np.testing.assert_allclose(a["maps"], b["maps"], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(a["completeness_gap"], b["completeness_gap"], atol=1e-5)


def test_baselines_uniform_and_blur():
    model = smooth_model(seed=22)
    classifier = _classifier(model)
    images = _images(3, seed=23)
    uniform = am.IntegratedGradients(classifier, _shape(model), baseline="uniform", seed=5)
    noise = uniform.baselines(images).numpy()
    assert noise.shape == images.shape
    low, high = images.min(axis=(1, 2, 3)), images.max(axis=(1, 2, 3))
    assert np.all(noise.min(axis=(1, 2, 3)) >= low) and np.all(noise.max(axis=(1, 2, 3)) <= high)
    np.testing.assert_array_equal(uniform.baselines(images[1:2]).numpy()[0], noise[1])
    blur = am.IntegratedGradients(classifier, _shape(model), baseline="blur", blur_sigma=0.2)
    flat = np.full((1, SMOOTH_SIZE, SMOOTH_SIZE, SMOOTH_CHANNELS), 0.7, np.float32)
    np.testing.assert_allclose(blur.baselines(flat).numpy(), flat, rtol=1e-6)
    blurred = blur.baselines(images).numpy()
    assert blurred.std(axis=(1, 2)).max() < images.std(axis=(1, 2)).min()
    ndimage = pytest.importorskip("scipy.ndimage")
    sigma = 0.2 * SMOOTH_SIZE  # radius ceil(3σ) = int(3σ + ½) here, as scipy truncates

    def gaussian(x):
        return ndimage.gaussian_filter(x.astype(np.float64), (0, sigma, sigma, 0),
                                       mode="constant", truncate=3.0)

    reference = gaussian(images) / gaussian(np.ones_like(images))
    np.testing.assert_allclose(blurred, reference, rtol=1e-5, atol=1e-6)


def test_option_errors():
    model = smooth_model()
    classifier = _classifier(model)
    with pytest.raises(OptionError, match="black, uniform, blur"):
        am.IntegratedGradients(classifier, _shape(model), baseline="white")
    with pytest.raises(OptionError, match="steps"):
        am.IntegratedGradients(classifier, _shape(model), steps=0)
    with pytest.raises(OptionError, match="sigma"):
        am.SmoothGrad(classifier, _shape(model), sigma=-1.0)
    with pytest.raises(OptionError, match="fixed image size"):
        am.IntegratedGradients(classifier, (None, None, 2), baseline="blur")


# --------------------------------------------------------------------------- shared contract


@pytest.mark.parametrize("classes,activation", [(3, "softmax"), (1, "sigmoid")])
def test_every_method_shares_the_contract_and_traces_once(classes, activation):
    model = smooth_model(num_classes=classes, activation=activation, seed=24)
    classifier = _classifier(model)
    shape = _shape(model)
    name, layer = model_io.find_layer(model, "auto")
    methods = [explainers.GradCAMPlusPlus(classifier, layer, name, shape),
               am.CAM(classifier, shape), am.Saliency(classifier, shape),
               am.SmoothGrad(classifier, shape, samples=4, samples_per_pass=3),
               am.IntegratedGradients(classifier, shape, steps=8, steps_per_pass=5)]
    assert [m.name for m in methods] == ["gradcam_plus_plus", "cam", "saliency", "smoothgrad",
                                         "integrated_gradients"]
    # Grad-CAM++ and CAM: conv2's 4×4 map; the rest: the input's 8×8.
    map_sizes = [(4, 4)] * 2 + [(SMOOTH_SIZE, SMOOTH_SIZE)] * 3
    reference = None
    for method, map_size in zip(methods, map_sizes):
        for n in (3, 1):
            images = _images(n, seed=25)
            out = method(images, np.full(n, explainers.PREDICTED, np.int32))
            common = {"probabilities", "target_class", "maps"}
            extra = {"completeness_gap"} if method.name == "integrated_gradients" else set()
            assert set(out) == common | extra
            assert out["maps"].dtype == np.float32 and out["maps"].shape == (n, *map_size)
            assert np.all(np.isfinite(out["maps"]))
            assert out["probabilities"].shape == (n, 2 if classes == 1 else 3)
            np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, atol=1e-6)
            if n == 3:
                if reference is None:
                    reference = out
                np.testing.assert_allclose(out["probabilities"], reference["probabilities"],
                                           atol=1e-6)
                np.testing.assert_array_equal(out["target_class"], reference["target_class"])
        assert method.tracing_count() == 1, method.name


# --------------------------------------------------------------------------- pool_map


def test_pool_map_averages_down_and_leaves_small_maps():
    maps = np.random.default_rng(26).random((2, 112, 112)).astype(np.float32)
    pooled = am.pool_map(maps)
    assert pooled.shape == (2, 56, 56) and pooled.dtype == np.float32
    np.testing.assert_allclose(pooled, maps.reshape(2, 56, 2, 56, 2).mean(axis=(2, 4)),
                               rtol=1e-5, atol=1e-6)
    odd = np.random.default_rng(27).random((2, 100, 70)).astype(np.float32)
    pooled = am.pool_map(odd, size=32)
    assert pooled.shape == (2, 32, 32)
    np.testing.assert_allclose(pooled.mean(axis=(1, 2)), odd.mean(axis=(1, 2)), rtol=1e-4)
    small = np.ones((1, 7, 7), np.float32)
    assert am.pool_map(small) is not None and am.pool_map(small).shape == (1, 7, 7)
    assert am.pool_map(np.ones((1, 100, 20), np.float32), size=56).shape == (1, 56, 20)


# --------------------------------------------------------------------------- the demo's heads


def test_cam_applies_to_the_average_pooling_demo_model_only():
    from beam_pipeline.demo import data as demo

    feature_name, _, dense = am.cam_layers(demo.build_demo_model("average"))
    assert (feature_name, dense.name) == ("conv4", "predictions")
    with pytest.raises(OptionError, match="global average pooling"):
        am.cam_layers(demo.build_demo_model("max"))

"""Explanation quality: deletion/insertion faithfulness on a model that looks at one known region,
cascading model-parameter randomization (Grad-CAM and Saliency pass, a model-blind edge map is
flagged, the user's model is untouched), and the seeded example sample."""
import keras
import numpy as np
import pytest
import tf_keras

from beam_pipeline.explain import attribution_methods as am
from beam_pipeline.explain import explainers, model_io
from beam_pipeline.measures import intervals, quality
from beam_pipeline.report import measures as report_measures
from beam_pipeline.errors import OptionError

from conftest import IMAGE_SIZE

SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)

# --------------------------------------------------------------------------- faithfulness


def region_model():
    """Class 1 iff the top-left 8×8 quadrant has fine texture: crop → ±checkerboard detectors
    (ReLU) → GAP → dense. Nothing outside the quadrant reaches the output; a checkerboard there
    gives p1 ≈ 0.95, a black or blurred quadrant p1 ≈ 0.05."""
    inputs = keras.Input(SHAPE)
    x = keras.layers.Cropping2D(((0, IMAGE_SIZE // 2), (0, IMAGE_SIZE // 2)))(inputs)
    conv = keras.layers.Conv2D(2, 2, activation="relu", use_bias=False)
    x = keras.layers.GlobalAveragePooling2D()(conv(x))
    dense = keras.layers.Dense(2, activation="softmax")
    model = keras.Model(inputs, dense(x))
    checker = np.array([[1.0, -1.0], [-1.0, 1.0]], np.float32)
    kernel = np.zeros((2, 2, 3, 2), np.float32)
    kernel[..., 0] = checker[..., None] / 3
    kernel[..., 1] = -checker[..., None] / 3
    conv.set_weights([kernel])
    dense.set_weights([np.array([[0.0, 3.0], [0.0, 3.0]], np.float32),
                       np.array([0.0, -3.0], np.float32)])
    return model


def checker_images(n=3, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    board = ((yy + xx) % 2).astype(np.float32)[None, ..., None]
    return np.clip(board + 0.1 * rng.standard_normal((n, *SHAPE)), 0, 1).astype(np.float32)


def quadrant_map(n, row, col):
    """4×4 maps lighting the quadrant (row, col) of the image."""
    maps = np.zeros((n, 4, 4), np.float32)
    maps[:, 2 * row: 2 * row + 2, 2 * col: 2 * col + 2] = 1.0
    return maps


def predictor(model):
    info = model_io.prepare_classifier(model)
    return explainers.Predictor(explainers.Classifier(model, info.head), SHAPE)


class CountingPredictor:
    def __init__(self, predict):
        self.predict, self.sizes = predict, []

    def __call__(self, images):
        self.sizes.append(len(images))
        return self.predict(images)


@pytest.fixture(scope="module")
def region_predictor():
    return predictor(region_model())


def test_several_map_sets_share_full_batches_and_equal_separate_passes(region_predictor):
    """One sampled example, two map sets, 4 steps: 2 × 8 perturbed images, one full batch of 16
    (separately: two half batches); the AUCs are those of separate passes."""
    images, targets = checker_images(n=1), np.ones(1, np.int32)
    sets = [quadrant_map(1, 0, 0), quadrant_map(1, 1, 1)]
    counting = CountingPredictor(region_predictor)
    together = quality.deletion_insertion_of_maps(counting, images, sets, targets, steps=4,
                                                  batch_size=16)
    assert counting.sizes == [16]
    for maps, (deletion, insertion) in zip(sets, together):
        alone = quality.deletion_insertion(region_predictor, images, maps, targets, steps=4,
                                           batch_size=16)
        np.testing.assert_allclose(deletion, alone[0], atol=1e-6)
        np.testing.assert_allclose(insertion, alone[1], atol=1e-6)
    assert together[0][0][0] < together[1][0][0]  # the used region is deleted faster


@pytest.mark.parametrize("baseline", ["black", "blur"])
def test_map_on_the_region_the_model_uses_is_more_faithful(region_predictor, baseline):
    images, targets = checker_images(), np.ones(3, np.int32)
    right = quality.deletion_insertion(region_predictor, images, quadrant_map(3, 0, 0), targets,
                                       steps=8, baseline=baseline)
    wrong = quality.deletion_insertion(region_predictor, images, quadrant_map(3, 1, 1), targets,
                                       steps=8, baseline=baseline)
    assert np.all(right[0] < wrong[0] - 0.3), (right, wrong)  # deletion: lower is better
    assert np.all(right[1] > wrong[1] + 0.3), (right, wrong)  # insertion: higher is better


def test_curves_shapes_ends_and_batched_calls(region_predictor):
    images, maps = checker_images(3, seed=1), quadrant_map(3, 0, 0)
    targets = np.array([1, 0, 1], np.int32)
    counting = CountingPredictor(region_predictor)
    deletion, insertion = quality.perturbation_curves(counting, images, maps, targets, steps=4,
                                                      baseline="black", batch_size=7)
    assert deletion.shape == insertion.shape == (3, 5)
    # 2·steps model inputs per example (clean and baseline shared by both curves), in chunks.
    assert sum(counting.sizes) == 3 * 2 * 4 and max(counting.sizes) == 7
    assert len(counting.sizes) == int(np.ceil(24 / 7))
    clean = region_predictor(images)[np.arange(3), targets]
    black = region_predictor(np.zeros_like(images))[np.arange(3), targets]
    np.testing.assert_allclose(deletion[:, 0], clean, rtol=1e-6)
    np.testing.assert_allclose(insertion[:, -1], clean, rtol=1e-6)
    np.testing.assert_allclose(deletion[:, -1], black, rtol=1e-6)
    np.testing.assert_allclose(insertion[:, 0], black, rtol=1e-6)
    aucs = quality.deletion_insertion(region_predictor, images, maps, targets, steps=4,
                                      baseline="black")
    np.testing.assert_allclose(aucs[0], quality.trapezoid_auc(deletion), rtol=1e-6)
    assert all(a.shape == (3,) and np.all((a >= 0) & (a <= 1)) for a in aucs)


def test_deterministic_and_independent_of_chunking(region_predictor):
    images = checker_images(4, seed=2)
    maps = np.random.default_rng(3).random((4, 5, 5)).astype(np.float32)
    targets = np.array([1, 1, 0, -1], np.int32)
    first = quality.deletion_insertion(region_predictor, images, maps, targets, steps=6)
    again = quality.deletion_insertion(region_predictor, images, maps, targets, steps=6)
    other_chunks = quality.deletion_insertion(region_predictor, images, maps, targets, steps=6,
                                              batch_size=5)
    for a, b, c in zip(first, again, other_chunks):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-7)
    # PREDICTED is resolved to the class predicted for the clean image.
    predicted = region_predictor(images[3:]).argmax(-1)
    resolved = quality.deletion_insertion(region_predictor, images[3:], maps[3:],
                                          predicted.astype(np.int32), steps=6)
    np.testing.assert_allclose(first[0][3:], resolved[0], rtol=1e-5)


def test_trapezoid_and_tie_breaking():
    curves = np.array([[0.3] * 5, [0.0, 0.25, 0.5, 0.75, 1.0]])
    np.testing.assert_allclose(quality.trapezoid_auc(curves), [0.3, 0.5], rtol=1e-6)
    ranks = quality.pixel_ranks(np.zeros((2, 3, 3), np.float32), 8, 8)
    assert sorted(ranks[0]) == list(range(64)) and np.array_equal(ranks[0], ranks[1])
    assert not np.array_equal(ranks[0], np.arange(64))  # not raster order
    peak = np.zeros((1, 8, 8), np.float32)
    peak[0, 5, 2] = 1.0
    assert quality.pixel_ranks(peak, 8, 8)[0, 5 * 8 + 2] == 0


def test_faithfulness_option_errors(region_predictor):
    images, maps, targets = checker_images(2), quadrant_map(2, 0, 0), np.ones(2, np.int32)
    with pytest.raises(OptionError, match="baseline"):
        quality.deletion_insertion(region_predictor, images, maps, targets, baseline="noise")
    with pytest.raises(OptionError, match="steps"):
        quality.deletion_insertion(region_predictor, images, maps, targets, steps=0)
    with pytest.raises(ValueError, match="match"):
        quality.deletion_insertion(region_predictor, images, maps[:1], targets)


def test_mean_interval_is_the_student_t_interval():
    # 1..5: mean 3, sample sd sqrt(2.5), t(0.975, 4) = 2.776445.
    mean, low, high = intervals.mean_interval([1.0, 2.0, 3.0, np.nan, 4.0, 5.0])
    half = 2.776445 * np.sqrt(2.5) / np.sqrt(5)
    assert mean == pytest.approx(3.0)
    assert (low, high) == pytest.approx((3.0 - half, 3.0 + half), rel=1e-6)
    assert np.isnan(intervals.mean_interval([0.4])[1]) and intervals.mean_interval([0.4])[0] == 0.4
    assert np.isnan(intervals.mean_interval([])[0])


def test_faithfulness_intervals_per_method_and_random_reference():
    columns = {"gradcam_deletion_auc": [0.1, None, 0.3], "gradcam_insertion_auc": [0.9, None, 0.7],
               "random_deletion_auc": [0.5, None, 0.5], "random_insertion_auc": [0.5, None, None]}
    out = intervals.faithfulness_intervals(columns.__getitem__, ["gradcam"])
    deletion = out["gradcam"]["deletion_auc"]
    assert deletion["value"] == pytest.approx(0.2) and deletion["n"] == 2
    assert deletion["ci_low"] < 0.1 and deletion["ci_high"] > 0.3  # two values: a wide interval
    assert out["random"]["deletion_auc"]["ci_low"] == pytest.approx(0.5)  # no spread
    assert out["random"]["insertion_auc"] == {"value": 0.5, "ci_low": None, "ci_high": None,
                                              "n": 1}
    # Paired with the random map on the same examples: -0.4 and -0.2.
    paired = out["gradcam"]["deletion_auc_minus_random"]
    assert paired["value"] == pytest.approx(-0.3) and paired["n"] == 2
    assert out["gradcam"]["insertion_auc_minus_random"]["n"] == 1


def test_beating_the_random_map_needs_the_paired_interval_to_exclude_zero():
    row = {"method": "gradcam", "deletion_auc": 0.50, "insertion_auc": 0.60}
    reference = {"deletion_auc": 0.51, "insertion_auc": 0.59}
    assert report_measures._beats_random(row, reference) == "both"  # point figures only
    noise = {"deletion_auc_minus_random": {"ci_low": -0.03, "ci_high": 0.01},
             "insertion_auc_minus_random": {"ci_low": 0.002, "ci_high": 0.02}}
    assert report_measures._beats_random(row, reference, noise) == "insertion"


# --------------------------------------------------------------------------- sanity check


def conv_model(seed=0):
    """conv → conv → GAP → dense, 'same' padding (with 'valid', border pixels have a smaller
    saliency whatever the weights, a structure shared by any two random nets)."""
    rng = np.random.default_rng(seed)
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(x))
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32)
                               for w in layer.get_weights()])
    return model


def gradcam_factory(layer_spec="auto"):
    def make(classifier):
        name, layer = model_io.find_layer(classifier.model, layer_spec)
        return explainers.GradCAM(classifier, layer, name, SHAPE)
    return make


def saliency_factory(classifier):
    return am.Saliency(classifier, SHAPE)


class EdgeMap:
    """Not an explanation of the model: the gradient magnitude of the image."""

    def __init__(self, classifier):
        self.classifier = classifier

    def __call__(self, images, targets):
        dy, dx = np.gradient(images.mean(-1), axis=(1, 2))
        return {"maps": np.hypot(dy, dx), "target_class": targets}


def _images(n=8, seed=1):
    return np.random.default_rng(seed).random((n, *SHAPE)).astype(np.float32)


@pytest.mark.parametrize("factory", [gradcam_factory(), saliency_factory],
                         ids=["gradcam", "saliency"])
def test_model_dependent_methods_lose_correlation_and_model_is_untouched(factory):
    model = conv_model()
    images = _images()
    weights, outputs = model.get_weights(), model(images).numpy()
    rows = quality.cascading_randomization(model, factory, images, np.full(8, -1, np.int32),
                                           seed=0)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["randomized_up_to"] for r in rows] == ["head", "conv2", "conv1"]
    assert rows[-1]["spearman_mean"] < 0.3 and rows[-1]["examples"] > 0, rows
    assert not quality.flag_insensitive(rows)
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)
    # Still the user's softmax head (the logit switch happened on the copy only).
    np.testing.assert_array_equal(model(images).numpy(), outputs)


def test_model_blind_edge_map_is_flagged():
    rows = quality.cascading_randomization(conv_model(), EdgeMap, _images(), np.zeros(8, np.int32),
                                           seed=0)
    assert all(r["spearman_mean"] > 0.99 for r in rows), rows
    assert quality.flag_insensitive(rows)


def test_targets_stay_those_of_the_original_model():
    seen = []

    class Recording(am.Saliency):
        def __call__(self, images, targets):
            seen.append(np.array(targets))
            return super().__call__(images, targets)

    model = conv_model(seed=4)
    images = _images(6, seed=5)
    predicted = model(images).numpy().argmax(-1)
    quality.cascading_randomization(model, lambda c: Recording(c, SHAPE), images,
                                    np.full(6, -1, np.int32), seed=1, batch_size=4)
    assert len(seen) == 2 * 4  # original + 3 steps, two chunks each
    for chunk in range(2, len(seen), 2):
        np.testing.assert_array_equal(np.concatenate(seen[chunk: chunk + 2]), predicted)


def test_checkpoints_and_seeded_draws():
    model, images, targets = conv_model(), _images(4), np.zeros(4, np.int32)
    full = quality.cascading_randomization(model, gradcam_factory("conv2"), images, targets,
                                           seed=7)
    some = quality.cascading_randomization(model, gradcam_factory("conv2"), images, targets,
                                           seed=7, layers=["conv2"])
    # The bottom layer is always added, so the last row is the fully random model; a layer's
    # draw depends on the seed and its name only, so rows agree with the full cascade.
    assert [r["randomized_up_to"] for r in some] == ["conv2", "conv1"]
    assert some[0]["spearman_mean"] == pytest.approx(full[1]["spearman_mean"], abs=1e-6)
    assert some[1]["spearman_mean"] == pytest.approx(full[2]["spearman_mean"], abs=1e-6)
    other_seed = quality.cascading_randomization(model, gradcam_factory("conv2"), images,
                                                 targets, seed=8)
    assert other_seed[-1]["spearman_mean"] != full[-1]["spearman_mean"]
    with pytest.raises(OptionError, match="gap"):
        quality.cascading_randomization(model, saliency_factory, images, targets, seed=0,
                                        layers=["gap"])


def test_several_methods_share_one_randomized_copy(monkeypatch):
    """Two methods: the model is cloned once, and each method's rows equal a separate run."""
    model, images, targets = conv_model(), _images(4), np.zeros(4, np.int32)
    alone = {"gradcam": quality.cascading_randomization(model, gradcam_factory("conv2"), images,
                                                        targets, seed=3),
             "edges": quality.cascading_randomization(model, EdgeMap, images, targets, seed=3)}
    clones = []
    original_copy = quality.classifier_copy
    monkeypatch.setattr(quality, "classifier_copy",
                        lambda m: clones.append(m) or original_copy(m))
    together = quality.cascading_randomization_of_methods(
        model, {"gradcam": gradcam_factory("conv2"), "edges": EdgeMap}, images, targets, seed=3)
    assert len(clones) == 1 and set(together) == {"gradcam", "edges"}
    for name, rows in together.items():
        assert [r["randomized_up_to"] for r in rows] == [r["randomized_up_to"] for r in alone[name]]
        np.testing.assert_allclose([r["spearman_mean"] for r in rows],
                                   [r["spearman_mean"] for r in alone[name]], atol=1e-6)


def test_copy_of_prepared_nested_frozen_models():
    """A model whose head prepare_classifier already switched (its ``_linear`` does not
    serialize), a frozen backbone nested in a Sequential, and tf_keras."""
    images = _images(3)
    for library in (keras, tf_keras):
        layers = library.layers
        base_in = library.Input(SHAPE)
        x = layers.Conv2D(4, 3, padding="same", activation="relu", name="base_conv")(base_in)
        base = library.Model(base_in, layers.BatchNormalization(name="bn")(x), name="backbone")
        base.trainable = False
        model = library.Sequential([library.Input(SHAPE), base,
                                    layers.GlobalAveragePooling2D(),
                                    layers.Dense(2, activation="softmax", name="head")])
        model_io.prepare_classifier(model)
        logits = model(images).numpy()
        copy, classifier = quality.classifier_copy(model)
        assert copy is not model and classifier.head == "softmax"
        np.testing.assert_allclose(classifier.logits(images).numpy(), logits, rtol=1e-6)
        names = [n for n, _ in quality.parameterized_layers(copy)]
        assert names == ["backbone/base_conv", "backbone/bn", "head"]
        weights = model.get_weights()
        rows = quality.cascading_randomization(model, saliency_factory, images,
                                               np.ones(3, np.int32), seed=0)
        assert [r["randomized_up_to"] for r in rows] == ["head", "backbone/bn",
                                                         "backbone/base_conv"]
        assert base.trainable is False
        for before, after in zip(weights, model.get_weights()):
            np.testing.assert_array_equal(before, after)


def test_rank_correlations_and_flag():
    a = np.arange(18, dtype=np.float32).reshape(2, 3, 3)
    b = np.stack([a[0] ** 2, np.zeros((3, 3))])  # monotone; constant → undefined
    corr = quality.rank_correlations(a, b)
    assert corr[0] == pytest.approx(1.0) and np.isnan(corr[1])
    assert not quality.flag_insensitive([{"spearman_mean": float("nan")}])
    assert quality.flag_insensitive([{"spearman_mean": 0.2}, {"spearman_mean": 0.6}])
    assert not quality.flag_insensitive([{"spearman_mean": 0.9}, {"spearman_mean": 0.4}])


# --------------------------------------------------------------------------- sampling


def test_seeded_sample_ignores_order_and_sharding():
    ids = [f"ex{i:04d}" for i in range(200)]
    sample = quality.seeded_sample(ids, 20, seed=3)
    assert len(sample) == 20 and sample <= set(ids)
    assert quality.seeded_sample(reversed(ids), 20, seed=3) == sample
    assert quality.seeded_sample(ids + ids[:50], 20, seed=3) == sample  # duplicates
    # Any subset that contains the sample gives the same sample (a shard's view composes), and
    # the sample is the ids with the smallest sample_key.
    subset = sorted(sample | set(ids[::3]))
    assert quality.seeded_sample(subset, 20, seed=3) == sample
    assert set(sorted(ids, key=lambda i: quality.sample_key(i, 3))[:20]) == sample
    assert quality.seeded_sample(ids, 20, seed=4) != sample
    assert quality.seeded_sample(ids[:5], 20, seed=3) == set(ids[:5])
    assert quality.seeded_sample([1, 2, b"x"], 2, seed=0) <= {1, 2, b"x"}
    assert 0.0 <= quality.sample_key("ex0001", 3) < 1.0
    with pytest.raises(OptionError):
        quality.seeded_sample(ids, -1, seed=0)


def test_reading_sanity_and_sweep_results():
    sanity = [{"method": "a", "step": 0, "flagged": True}, {"method": "a", "step": 2, "flagged": False},
              {"method": "b", "step": 1, "flagged": True}, {"method": "a", "step": 1, "flagged": True}]
    final = quality.sanity_final_rows(sanity)
    assert {m: r["step"] for m, r in final.items()} == {"a": 2, "b": 1}
    sweep = [{"layer": "conv1", "slice": "overall", "energy": 0.2, "area": 0.1},
             {"layer": "conv2", "slice": "overall", "energy": 0.3, "area": 0.1},
             {"layer": "conv3", "slice": "site=x", "energy": 0.9, "area": 0.1},
             {"layer": "conv4", "slice": "overall", "energy": None, "area": 0.1}]
    assert quality.best_sweep_layer(sweep) == "conv2"
    assert quality.sweep_lift(sweep[3]) is None and quality.best_sweep_layer(sweep[2:]) is None

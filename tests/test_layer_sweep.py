"""Grad-CAM layer sweep: equal to one-layer Grad-CAM at every layer of a nested model, layer
discovery on a real application backbone, one trace, per-layer localization with known answers,
and the sweep's cost against one-layer Grad-CAM (printed, not asserted)."""
import time

import keras
import numpy as np
import pytest

from beam_pipeline.explain import explainers, layer_sweep, model_io

from conftest import IMAGE_SIZE, gap_model

SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)


def _images(n=5, seed=0, shape=SHAPE):
    return np.random.default_rng(seed).random((n, *shape)).astype("float32")


def _nested():
    """A Functional backbone (3 convs and a pooling) inside a Sequential with GAP → Dense.
    Seeded: with unseeded weights a layer's Grad-CAM can be all zeros (every weighted sum
    negative before the ReLU), and the map comparisons below would compare zeros."""
    keras.utils.set_random_seed(3)
    base_in = keras.Input(SHAPE)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv1")(base_in)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Conv2D(6, 3, padding="same", name="conv2")(x)  # linear: signed activations
    x = keras.layers.Conv2D(5, 3, activation="relu", name="conv3")(x)
    backbone = keras.Model(base_in, x, name="backbone")
    return keras.Sequential([keras.Input(SHAPE), backbone, keras.layers.GlobalAveragePooling2D(),
                             keras.layers.Dense(3, activation="softmax", name="head")])


def _classifier(model):
    return explainers.Classifier(model, model_io.prepare_classifier(model).head)


@pytest.fixture(scope="module")
def mobilenet():
    backbone = keras.applications.MobileNetV2(
        weights=None, include_top=False, input_shape=(32, 32, 3), alpha=0.35)
    model = keras.Sequential([keras.Input((32, 32, 3)), backbone,
                              keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(2, activation="softmax")])
    return model, backbone, _classifier(model)


# --------------------------------------------------------------------------- layers


def test_sweep_layers_finds_nested_layers_in_order():
    model = _nested()
    names = [name for name, _ in layer_sweep.sweep_layers(model)]
    assert names == ["backbone/conv1", "backbone/pool", "backbone/conv2", "backbone/conv3"]


def test_sweep_layers_on_mobilenet_nested_in_sequential(mobilenet):
    model, backbone, _ = mobilenet
    layers = layer_sweep.sweep_layers(model)
    names = [name for name, _ in layers]
    assert len(layers) > 50
    assert all(name.startswith(backbone.name + "/") for name in names)
    assert names[-1].endswith("out_relu")
    assert names[-1] == model_io.find_layer(model, "auto")[0]
    # Depth order: the order the backbone lists its layers in.
    order = {id(layer): i for i, layer in enumerate(backbone.layers)}
    positions = [order[id(layer)] for _, layer in layers]
    assert positions == sorted(positions)


def test_sweep_layers_skips_shared_layers():
    inputs = keras.Input(SHAPE)
    shared = keras.layers.Conv2D(3, 3, padding="same", name="shared")
    x = keras.layers.Conv2D(3, 3, padding="same", name="once")(inputs)
    x = shared(shared(x))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x)))
    assert [name for name, _ in layer_sweep.sweep_layers(model)] == ["once"]
    # Given a shared layer anyway, the sweep refuses rather than give a partial gradient.
    sweep = layer_sweep.GradCAMSweep(_classifier(model), [("shared", shared)], SHAPE)
    with pytest.raises(ValueError, match="shared \\(2×\\)"):
        sweep(_images(2), np.zeros(2, np.int32))


# --------------------------------------------------------------------------- maps


def test_sweep_equals_single_layer_gradcam_at_every_layer():
    model = _nested()
    classifier = _classifier(model)
    layers = layer_sweep.sweep_layers(model)
    images = _images(6, seed=1)
    targets = np.array([0, 1, 2, -1, 1, -1], np.int32)

    # A GradCAM hooked before the sweep, and one GradCAM per layer hooked after it: each layer
    # ends up wrapped by two or three captures, which must not disturb one another.
    name0, layer0 = layers[0]
    early = explainers.GradCAM(classifier, layer0, name0, SHAPE)
    before = early(images, targets)["maps"]
    sweep = layer_sweep.GradCAMSweep(classifier, layers, SHAPE)
    out = sweep(images, targets)
    assert set(out["maps"]) == {name for name, _ in layers}

    for name, layer in layers:
        single = explainers.GradCAM(classifier, layer, name, SHAPE)(images, targets)
        np.testing.assert_array_equal(out["target_class"], single["target_class"])
        np.testing.assert_allclose(out["probabilities"], single["probabilities"], atol=1e-6)
        assert out["maps"][name].dtype == np.float32
        assert out["maps"][name].shape == single["maps"].shape
        assert single["maps"].max() > 0  # a real comparison, not zeros against zeros
        np.testing.assert_allclose(out["maps"][name], single["maps"], rtol=1e-4, atol=1e-7)

    np.testing.assert_allclose(early(images, targets)["maps"], before, rtol=1e-6)
    # The sweep still works after the per-layer GradCAMs wrapped its wrappers, and so does a
    # second sweep over the same layers.
    again = layer_sweep.GradCAMSweep(classifier, layers, SHAPE)(images, targets)
    for name, _ in layers:
        np.testing.assert_allclose(sweep(images, targets)["maps"][name], out["maps"][name],
                                   rtol=1e-6)
        np.testing.assert_allclose(again["maps"][name], out["maps"][name], rtol=1e-6)


def test_sweep_on_sigmoid_head_matches_gradcam():
    model = gap_model(num_classes=1, activation="sigmoid", seed=7)
    classifier = _classifier(model)
    layers = layer_sweep.sweep_layers(model)
    assert [name for name, _ in layers] == ["conv"]
    images = _images(4, seed=2)
    for target in (0, 1):
        targets = np.full(4, target, np.int32)
        maps = layer_sweep.GradCAMSweep(classifier, layers, SHAPE)(images, targets)["maps"]
        single = explainers.GradCAM(classifier, layers[0][1], "conv", SHAPE)(images, targets)
        np.testing.assert_allclose(maps["conv"], single["maps"], rtol=1e-4, atol=1e-7)


def test_one_trace_for_all_batch_sizes():
    model = _nested()
    sweep = layer_sweep.GradCAMSweep(_classifier(model), layer_sweep.sweep_layers(model), SHAPE)
    for n in (4, 1, 7):
        out = sweep(_images(n), np.full(n, -1, np.int32))
        assert all(maps.shape[0] == n for maps in out["maps"].values())
    assert sweep.tracing_count() == 1


def test_sweep_refuses_no_layers_and_duplicate_names():
    model = _nested()
    classifier = _classifier(model)
    with pytest.raises(ValueError, match="at least one layer"):
        layer_sweep.GradCAMSweep(classifier, [], SHAPE)
    name, layer = layer_sweep.sweep_layers(model)[0]
    with pytest.raises(ValueError, match="more than once"):
        layer_sweep.GradCAMSweep(classifier, [(name, layer), (name, layer)], SHAPE)


# --------------------------------------------------------------------------- localization


def _hand_made():
    """4 examples, 4×4 masks (top-left 2×2 quadrant: area 1/4) except the last (no mask).

    Layer ``fine`` (4×4 maps, no resampling): mass 3 in / 1 out (energy .75, hit), 1 in / 3 out
    (.25, miss), all zero (empty). Layer ``coarse`` (2×2 maps, upsampled ×2 bilinearly with half
    pixel centres, so a one-hot cell spreads as [1, .75, .25, 0] along each axis): one-hot
    top-left (energy 1.75² / 2² = .765625, hit), one-hot bottom-right (.25² / 4 = .015625, miss),
    all negative (zero after ReLU: empty).
    """
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    masks = [mask, mask.copy(), mask.copy(), None]
    fine = np.zeros((4, 4, 4), np.float32)
    fine[0, 0, 0], fine[0, 3, 3] = 3.0, 1.0
    fine[1, 1, 1], fine[1, 2, 2] = 1.0, 3.0
    fine[3] = 5.0  # no mask: ignored
    coarse = np.zeros((4, 2, 2), np.float32)
    coarse[0, 0, 0] = 1.0
    coarse[1, 1, 1] = 1.0
    coarse[2] = -1.0
    coarse[3, 0, 0] = 1.0  # no mask: ignored
    return {"fine": fine, "coarse": coarse}, masks


def test_localization_by_layer_known_answers():
    maps, masks = _hand_made()
    summary = layer_sweep.localization_by_layer(maps, masks)
    fine, coarse = summary["fine"], summary["coarse"]
    assert fine["masked_n"] == 3 and fine["empty_n"] == 1
    assert fine["energy_n"] == 2 and fine["energy_sum"] == pytest.approx(0.75 + 0.25)
    assert fine["hits"] == 1 and fine["hit_n"] == 2
    assert fine["area_sum"] == pytest.approx(0.5)
    assert coarse["masked_n"] == 3 and coarse["empty_n"] == 1 and coarse["energy_n"] == 2
    assert coarse["energy_sum"] == pytest.approx(0.765625 + 0.015625)
    assert coarse["hits"] == 1 and coarse["hit_n"] == 2

    means = layer_sweep.localization_means(summary)
    assert means["fine"]["energy"] == pytest.approx(0.5)
    assert means["fine"]["area"] == pytest.approx(0.25)
    assert means["fine"]["pointing_game"] == pytest.approx(0.5)
    assert means["coarse"]["energy"] == pytest.approx(0.390625)
    assert means["fine"]["n"] == 2 and means["fine"]["empty"] == 1


def test_localization_is_additive_over_batches():
    maps, masks = _hand_made()
    whole = layer_sweep.localization_by_layer(maps, masks)
    first = layer_sweep.localization_by_layer({k: v[:1] for k, v in maps.items()}, masks[:1])
    rest = layer_sweep.localization_by_layer({k: v[1:] for k, v in maps.items()}, masks[1:])
    summed = layer_sweep.add_localization(layer_sweep.add_localization({}, first), rest)
    assert summed.keys() == whole.keys()
    for name in whole:
        for key in layer_sweep.LOCALIZATION_KEYS:
            assert summed[name][key] == pytest.approx(whole[name][key]), (name, key)


def test_localization_without_masks_gives_nan_means():
    maps, _ = _hand_made()
    summary = layer_sweep.localization_by_layer(maps, [None] * 4)
    assert summary["fine"]["masked_n"] == 0 and summary["fine"]["energy_n"] == 0
    means = layer_sweep.localization_means(summary)
    assert np.isnan(means["fine"]["energy"]) and np.isnan(means["fine"]["pointing_game"])


def test_localization_of_sweep_output_end_to_end():
    model = _nested()
    sweep = layer_sweep.GradCAMSweep(_classifier(model), layer_sweep.sweep_layers(model), SHAPE)
    out = sweep(_images(3, seed=5), np.full(3, -1, np.int32))
    mask = np.zeros(SHAPE[:2], bool)
    mask[4:12, 4:12] = True
    summary = layer_sweep.localization_by_layer(out["maps"], [mask, None, mask])
    assert set(summary) == set(out["maps"])
    for counters in summary.values():
        assert counters["masked_n"] == 2
        assert counters["energy_n"] + counters["empty_n"] == 2
        assert 0.0 <= counters["energy_sum"] <= counters["energy_n"]


# --------------------------------------------------------------------------- cost


def _median_seconds(fn, repeats=7):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def test_sweep_cost_against_single_layer_gradcam(mobilenet, capsys):
    """Prints the sweep's time over one-layer Grad-CAM (the issue's target: ≤ 2×); wall-clock
    on a shared machine is not asserted."""
    model, _, classifier = mobilenet
    layers = layer_sweep.sweep_layers(model)
    name, layer = model_io.find_layer(model, "auto")
    single = explainers.GradCAM(classifier, layer, name, (32, 32, 3))
    sweep = layer_sweep.GradCAMSweep(classifier, layers, (32, 32, 3))
    images = _images(8, seed=3, shape=(32, 32, 3))
    targets = np.full(8, -1, np.int32)
    out = sweep(images, targets)  # trace both before timing
    reference = single(images, targets)
    np.testing.assert_allclose(out["maps"][name], reference["maps"], rtol=1e-4, atol=1e-7)
    assert len(out["maps"]) == len(layers)
    assert all(np.all(np.isfinite(m)) for m in out["maps"].values())

    t_single = _median_seconds(lambda: single(images, targets))
    t_sweep = _median_seconds(lambda: sweep(images, targets))
    forward = explainers.Predictor(classifier, (32, 32, 3))
    forward(images)
    t_forward = _median_seconds(lambda: forward(images))
    with capsys.disabled():
        print(f"\n[layer sweep] MobileNetV2(alpha=0.35, 32×32), batch 8, {len(layers)} layers: "
              f"forward only {t_forward * 1e3:.1f} ms, single-layer Grad-CAM "
              f"{t_single * 1e3:.1f} ms, sweep {t_sweep * 1e3:.1f} ms, "
              f"sweep / single = {t_sweep / t_single:.2f}×")

"""One batch → rows as plain functions (``beam_pipeline.explain.explain_batch``): fake explainers and a
fake predictor, no Beam, no model."""
import numpy as np

from beam_pipeline.explain import explain_batch, explainers, layer_sweep
from beam_pipeline.io.records import DecodedExample

SETTINGS = explain_batch.RowSettings(layer="conv", map_size=4, faithfulness=False,
                                     has_masks=False, region_grid=None)
POISON = 666.0


def _example(i, label=1, poisoned=False, mask=None, site=None):
    image = np.full((4, 4, 3), POISON if poisoned else i / 10, np.float32)
    return DecodedExample(example_id=f"ex{i}", source=f"s/{i}.png", image=image, label=label,
                          mask=mask, slices={"site": site or f"s{i % 2}"})


class FakeGradCAM:
    """Maps from the images; a batch holding a poisoned image fails as a real model might."""

    def __init__(self):
        self.calls = []

    def __call__(self, images, targets):
        self.calls.append(len(images))
        if np.any(images == POISON):
            raise ValueError("poisoned input")
        n = len(images)
        probabilities = np.tile(np.array([[0.3, 0.7]], np.float32), (n, 1))
        return {"probabilities": probabilities, "target_class": np.ones(n, np.int32),
                "maps": images[..., 0].copy()}


def test_a_batch_with_one_poisoned_example_gives_n_minus_1_rows_and_one_error_row():
    examples = [_example(i, poisoned=i == 2) for i in range(5)]
    fake = FakeGradCAM()
    rows, outs = explain_batch.explain_batch([(ex, 1) for ex in examples], {"gradcam": fake},
                                             SETTINGS)
    errors = [r for r in rows if r.get("error_type")]
    assert [r["example_id"] for r in rows if not r.get("error_type")] == [
        "ex0", "ex1", "ex3", "ex4"]
    assert len(errors) == 1 and errors[0]["example_id"] == "ex2"
    assert errors[0]["error_type"] == "explain_failed" and errors[0]["stage"] == "explain"
    assert "ValueError: poisoned input" in errors[0]["message"]
    assert fake.calls == [5, 1, 1, 1, 1, 1]  # the batch, then each example alone
    assert outs is None  # the isolated examples' outputs are not a batch's


def test_a_healthy_batch_is_explained_once_with_its_outputs():
    fake = FakeGradCAM()
    rows, outs = explain_batch.explain_batch([(_example(i), 1) for i in range(3)],
                                             {"gradcam": fake}, SETTINGS)
    assert fake.calls == [3] and outs["gradcam"]["maps"].shape == (3, 4, 4)
    assert [r["example_id"] for r in rows] == ["ex0", "ex1", "ex2"]
    assert rows[0]["gradcam_layer"] == "conv" and rows[0]["predicted_class"] == 1


def test_examples_without_a_label_get_an_error_row_under_target_label():
    batch = [_example(0, label=2), _example(1, label=None), _example(2, label=0)]
    ready, errors = explain_batch.split_targets("label", batch)
    assert [(ex.example_id, t) for ex, t in ready] == [("ex0", 2), ("ex2", 0)]
    assert [(e["example_id"], e["error_type"]) for e in errors] == [("ex1", "no_label_for_target")]
    ready, errors = explain_batch.split_targets("predicted", batch)
    assert not errors and [t for _, t in ready] == [explainers.PREDICTED] * 3


def test_faithfulness_sample_is_seeded_by_id_not_by_position():
    examples = [_example(i) for i in range(40)]
    picked = {examples[i].example_id for i in explain_batch.sampled_indices(examples, 0, 0.5)}
    assert 8 < len(picked) < 32
    shuffled = examples[::-1]  # another batching of the same examples: the same ids
    assert {shuffled[i].example_id for i in explain_batch.sampled_indices(shuffled, 0, 0.5)} == picked
    other_seed = {examples[i].example_id for i in explain_batch.sampled_indices(examples, 1, 0.5)}
    assert other_seed != picked
    assert explain_batch.sampled_indices(examples, 0, 0.0) == []
    assert len(explain_batch.sampled_indices(examples, 0, 1.0)) == 40


def test_faithfulness_aucs_land_on_the_sampled_rows_only():
    examples = [_example(i) for i in range(6)]
    settings = explain_batch.RowSettings("conv", 4, True, False, None)

    def predictor(images):  # the target class's probability grows with the image's mean
        mean = images.reshape(len(images), -1).mean(1)
        return np.stack([1 - mean, mean], 1).astype(np.float32)

    sampled = explain_batch.sampled_indices(examples, 0, 0.5)
    assert 0 < len(sampled) < 6

    def faithfulness(exs, images, outs):
        return explain_batch.faithfulness_aucs(predictor, exs, images, outs, sampled, 0, 4)

    rows, outs = explain_batch.explain_batch([(ex, 1) for ex in examples],
                                             {"gradcam": FakeGradCAM()}, settings, faithfulness)
    with_auc = [i for i, r in enumerate(rows) if r["gradcam_deletion_auc"] is not None]
    with_reference = [i for i, r in enumerate(rows) if r["random_deletion_auc"] is not None]
    assert with_auc == with_reference == sampled
    assert all(r["gradcam_insertion_auc"] is None for i, r in enumerate(rows) if i not in sampled)
    assert set(outs["gradcam"]["deletion_auc"]) == set(sampled)


def test_sweep_counters_per_slice_add_up_to_overall():
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    examples = [_example(i, mask=mask, site="a" if i < 3 else "b") for i in range(5)]
    rng = np.random.default_rng(0)
    sweep_maps = {"l1": rng.random((5, 2, 2)), "l2": rng.random((5, 4, 4))}
    found = dict(explain_batch.sweep_counters(examples, sweep_maps, ["site"]))
    assert set(found) == {(g, layer) for g in ("overall", "site=a", "site=b")
                          for layer in ("l1", "l2")}
    for layer in ("l1", "l2"):
        overall = found[("overall", layer)]
        assert overall == layer_sweep.localization_by_layer(
            {layer: sweep_maps[layer]}, [mask] * 5)[layer]
        for key, value in overall.items():
            parts = found[("site=a", layer)][key] + found[("site=b", layer)][key]
            assert np.isclose(parts, value), key
        assert found[("site=a", layer)]["masked_n"] == 3


def test_sweep_maps_are_written_for_the_sampled_examples_at_every_layer():
    examples = [_example(i) for i in range(3)]
    sweep_maps = {"l1": np.ones((3, 2, 2)), "l2": np.zeros((3, 3, 3))}
    rows = explain_batch.sweep_map_rows(examples, sweep_maps, [0, 2])
    assert [(r["example_id"], r["layer"]) for r in rows] == [
        ("ex0", "l1"), ("ex0", "l2"), ("ex2", "l1"), ("ex2", "l2")]
    assert rows[1]["shape"] == [3, 3] and len(rows[1]["map"]) == 9


def test_sanity_rows_flag_a_method_whose_maps_survive_randomization():
    by_method = {"gradcam": [{"step": 0, "spearman_mean": 0.9}, {"step": 1, "spearman_mean": 0.1}],
                 "saliency": [{"step": 0, "spearman_mean": 0.9}, {"step": 1, "spearman_mean": 0.95}]}
    rows = explain_batch.sanity_rows(by_method)
    assert [(r["method"], r["flagged"]) for r in rows] == [
        ("gradcam", False), ("gradcam", False), ("saliency", True), ("saliency", True)]

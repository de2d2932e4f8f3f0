"""Row building as plain functions over arrays (``beam_pipeline.explain.rows``): hand-made explainer
outputs in, rows out; no model, no Beam."""
import numpy as np

from beam_pipeline.explain import explainers, rows
from beam_pipeline.io.records import DecodedExample


def _example(i, label=1, mask=None):
    return DecodedExample(example_id=f"ex{i}", source=f"s/{i}.png", image=np.zeros((4, 4, 3)),
                          label=label, mask=mask, slices={"site": f"s{i % 2}"})


def _outs(n, maps_side=8, gap=None):
    probabilities = np.tile(np.array([[0.2, 0.8]], np.float32), (n, 1))
    maps = np.arange(n * maps_side * maps_side, dtype=np.float32).reshape(n, maps_side, maps_side)
    out = {"gradcam": {"probabilities": probabilities, "target_class": np.ones(n, np.int32),
                       "maps": maps[:, :2, :2].copy()},
           "integrated_gradients": {"probabilities": probabilities,
                                    "target_class": np.ones(n, np.int32), "maps": maps,
                                    "completeness_gap": np.array(gap, np.float32)}}
    return out


def _rows(examples, outs, faithfulness=False, has_masks=False, reference=None, map_size=4):
    masks = [ex.mask for ex in examples]
    per_method = [rows.method_columns(name, out, masks, layer="conv", map_size=map_size,
                                      faithfulness=faithfulness, has_masks=has_masks)
                  for name, out in outs.items()]
    return rows.attribution_rows(examples, outs, per_method, faithfulness, reference)


def test_targets_follow_the_target_option():
    labels = [2, None, 0]
    assert rows.explain_targets("predicted", labels) == [explainers.PREDICTED] * 3
    assert rows.explain_targets("label", labels) == [2, None, 0]
    assert rows.explain_targets(1, labels) == [1, 1, 1]


def test_rows_carry_every_registered_column_and_pool_input_maps():
    examples = [_example(0), _example(1)]
    out = _rows(examples, _outs(2, gap=[0.5, np.nan]))
    first, second = out
    assert first["gradcam_layer"] == "conv" and first["gradcam_shape"] == [2, 2]
    assert "integrated_gradients_layer" not in first
    assert first["integrated_gradients_shape"] == [4, 4]  # 8×8 input map pooled to map_size
    assert first["integrated_gradients"][0] == np.mean([0, 1, 8, 9])  # area average
    assert first["ig_completeness_gap"] == 0.5 and second["ig_completeness_gap"] is None
    assert first["predicted_class"] == 1 and first["target_class"] == 1
    assert first["site"] == "s0" and second["site"] == "s1"
    assert "random_deletion_auc" not in first and "gradcam_mask_energy" not in first


def test_a_non_finite_map_is_an_error_row_and_the_rest_of_the_batch_is_kept():
    outs = _outs(3, gap=[0.1, 0.1, 0.1])
    outs["integrated_gradients"]["maps"][1, 0, 0] = np.nan
    out = _rows([_example(i) for i in range(3)], outs)
    assert [r.get("error_type") for r in out] == [None, "non_finite_output", None]
    assert out[1]["stage"] == "predict" and out[1]["example_id"] == "ex1"


def test_faithfulness_columns_are_filled_on_sampled_examples_only():
    outs = _outs(2, gap=[0.1, 0.1])
    for out in outs.values():
        out["deletion_auc"], out["insertion_auc"] = {1: 0.25}, {1: 0.75}
    out = _rows([_example(0), _example(1)], outs, faithfulness=True, reference={1: (0.4, 0.6)})
    assert out[0]["gradcam_deletion_auc"] is None and out[0]["random_deletion_auc"] is None
    assert out[1]["gradcam_deletion_auc"] == 0.25 and out[1]["gradcam_insertion_auc"] == 0.75
    assert (out[1]["random_deletion_auc"], out[1]["random_insertion_auc"]) == (0.4, 0.6)


def test_mask_agreement_is_computed_where_there_is_a_mask():
    mask = np.zeros((8, 8), bool)
    mask[4:, 4:] = True  # where the maps (increasing arange) are largest
    examples = [_example(0, mask=mask), _example(1)]
    out = _rows(examples, _outs(2, gap=[0.1, 0.1]), has_masks=True)
    assert out[0]["integrated_gradients_pointing_hit"] is True
    assert out[0]["mask_area"] == 0.25 and out[1]["mask_area"] is None
    assert out[1]["gradcam_mask_energy"] is None

"""The cost model: image passes per stage are a pure function of the plan, the sanity check's
step count matches what cascading_randomization measures, and the log lines state each stage."""
from types import SimpleNamespace

import pytest

from beam_pipeline.job import cost
from beam_pipeline.measures import quality

OPTIONS = {"smoothgrad_samples": 16, "ig_steps": 64}


def test_default_audit_on_100000_images():
    stages = cost.estimate(100_000, None, ["gradcam"], OPTIONS,
                           faithfulness_sample=cost.DEFAULT_FAITHFULNESS_SAMPLE,
                           sanity_sample=cost.DEFAULT_SANITY_SAMPLE, importance_sample=2000, importance_features=16,
                           importance_repeats=3, parameterized_layers=107)
    assert stages["explain"] == {"examples": 100_000, "forward": 100_000, "backward": 100_000,
                                 "per_1000_examples": False}
    # Importance on the sample only: 1 baseline + 16 features × 3 repeats per example.
    assert stages["importance"] == {"examples": 2000, "forward": 2000 * 49, "backward": 0}
    # Grad-CAM's map and the random reference map, 2 × 8 perturbed images each, 32 examples:
    # 1,024 passes (issue 14: 16,384 before, 256 examples × 16 steps).
    assert stages["faithfulness"] == {"examples": 32, "forward": 32 * 2 * 2 * 8, "backward": 0}
    assert stages["sanity"]["examples"] == 32
    assert stages["sanity"]["forward"] == 32 * cost.sanity_steps(107)
    lines = cost.estimate_lines(stages)
    assert lines[0] == ("Cost estimate, explain: 100,000 forward and 100,000 backward image "
                        "passes on 100,000 examples.")
    assert lines[1].startswith("Cost estimate, importance: 98,000 forward and 0 backward")
    assert lines[-1].startswith("Cost estimate, total:")


def test_small_data_all_samples_and_unknown_size():
    stages = cost.estimate(40, None, ["gradcam", "smoothgrad", "cam"], OPTIONS, 256, 0, None,
                           4, 2, 5)
    assert stages["explain"]["forward"] == 40 * (1 + 16 + 1)
    assert stages["explain"]["backward"] == 40 * (1 + 16)
    assert stages["importance"] == {"examples": 40, "forward": 40 * 9, "backward": 0}
    assert stages["faithfulness"]["examples"] == 40 and "sanity" not in stages
    unknown = cost.estimate(None, None, ["gradcam"], OPTIONS, 0, 0, 2000, 0, 3, 5)
    assert set(unknown) == {"explain"} and unknown["explain"]["per_1000_examples"]
    assert "per 1,000 examples" in cost.estimate_lines(unknown)[0]


@pytest.mark.parametrize("layers", [1, 2, 5, 6, 7, 13, 53, 107])
def test_sanity_steps_match_the_randomization_checkpoints(layers):
    top_down = [(f"l{i}", SimpleNamespace(name=f"l{i}")) for i in range(layers)][::-1]
    checkpoints = cost.sanity_checkpoints([f"l{i}" for i in range(layers)])
    measured = quality._checkpoints(top_down, checkpoints)  # rows after the original maps
    assert cost.sanity_steps(layers) == 1 + len(measured)

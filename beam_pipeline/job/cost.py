"""The cost model: how many model passes each stage of a planned audit needs.

Work that describes one example (prediction, the requested maps, TFMA rows, mask measures) runs on
every example; work that estimates a dataset-level figure (permutation importance, faithfulness,
sanity) runs on a seeded sample. ``estimate`` turns a plan into image passes per stage (one
forward pass of one image = 1; a backward pass is counted apart, as it costs about two forward
passes); ``estimate_lines`` is what the launcher logs before the pipeline starts. Pure Python:
no TensorFlow, no Beam.
"""
from typing import Dict, List, Optional

# The quality checks' defaults, here because their cost is what sets them (issue 14: the default
# faithfulness + sanity cost fits in about a minute on a ResNet50 on 2 CPU cores). 8 steps move
# the demo model's mean AUCs by < 0.01 against 16 (bench/bench_faithfulness_steps.py), and the
# report states each mean's 95% interval over the sample.
FAITHFULNESS_STEPS = 8  # quality.deletion_insertion's default: 2 × steps images per map
DEFAULT_FAITHFULNESS_SAMPLE = 32  # 1,024 passes: ~42 s of ResNet50 CPU over 2 cores
DEFAULT_SANITY_SAMPLE = 32
SANITY_CHECKPOINTS = 6  # maps are recomputed at this many depths (plus the fully random model)
STAGES = ("explain", "importance", "faithfulness", "sanity")


def method_passes(method: str, options: dict) -> Dict[str, int]:
    """Forward and backward passes one example costs under ``method`` (its own forward pass:
    every method runs the model itself)."""
    if method == "cam":
        return {"forward": 1, "backward": 0}
    copies = {"smoothgrad": options.get("smoothgrad_samples", 16),
              "integrated_gradients": options.get("ig_steps", 64)}.get(method, 1)
    return {"forward": copies, "backward": copies}


def sanity_checkpoints(layer_names: List[str]) -> List[str]:
    """The parameterized layers (input to output) after whose randomization the sanity check
    recomputes the maps: every ``step``-th, about ``SANITY_CHECKPOINTS`` of them
    (``quality.cascading_randomization`` adds the input-most one, the fully random model)."""
    step = max(1, len(layer_names) // SANITY_CHECKPOINTS)
    return list(layer_names[step - 1::step])


def sanity_steps(parameterized_layers: int) -> int:
    """Maps per example the sanity check computes: the original one, then one per checkpoint."""
    if parameterized_layers < 1:
        return 0
    names = list(range(parameterized_layers))
    return 1 + len(set(sanity_checkpoints(names)) | {names[0]})


def estimate(examples: Optional[int], labeled: Optional[int], methods: List[str],
             options: dict, faithfulness_sample: int, sanity_sample: int,
             importance_sample: Optional[int], importance_features: int,
             importance_repeats: int, parameterized_layers: int) -> Dict[str, dict]:
    """{stage: {"examples", "forward", "backward"}} for a run over ``examples`` examples
    (``labeled`` of them with a label; None when not known before the run: the per-example figure
    is then per 1,000 examples, the sampled stages assume the sample is full).

    ``importance_sample`` None means every labeled example; 0 features means no importance.
    """
    per_example = [method_passes(m, options) for m in methods]
    explain_n = 1000 if examples is None else examples
    stages = {"explain": _passes(explain_n, sum(p["forward"] for p in per_example),
                                 sum(p["backward"] for p in per_example))}
    stages["explain"]["per_1000_examples"] = examples is None
    if importance_features:
        pool = labeled if labeled is not None else examples
        n = _sampled(pool, importance_sample)
        stages["importance"] = _passes(n, 1 + importance_features * importance_repeats, 0)
    if faithfulness_sample:
        # Every method's map and a seeded random map (the reference), 2 × steps images each.
        n = _sampled(examples, faithfulness_sample)
        stages["faithfulness"] = _passes(n, 2 * FAITHFULNESS_STEPS * (len(methods) + 1), 0)
    if sanity_sample:
        n = _sampled(examples, sanity_sample)
        maps = sanity_steps(parameterized_layers)
        stages["sanity"] = _passes(n, maps * sum(p["forward"] for p in per_example),
                                   maps * sum(p["backward"] for p in per_example))
    return stages


def _sampled(population: Optional[int], sample: Optional[int]) -> Optional[int]:
    """The sample's size: ``sample`` (None: all) of ``population`` (None: unknown)."""
    if sample is None:
        return population
    return sample if population is None else min(population, sample)


def _passes(n: Optional[int], forward_each: int, backward_each: int) -> dict:
    known = n if n is not None else 0
    return {"examples": n, "forward": known * forward_each, "backward": known * backward_each}


def estimate_lines(stages: Dict[str, dict]) -> List[str]:
    """One log line per stage, then the total, in image passes."""
    lines = []
    for stage in STAGES:
        if stage not in stages:
            continue
        s = stages[stage]
        scope = ("per 1,000 examples (the number of examples is known only once the data is "
                 "read)" if s.get("per_1000_examples") else
                 f"on {s['examples']:,} examples" if s["examples"] is not None
                 else "on the whole labeled data (its size is known only once it is read)")
        lines.append(f"Cost estimate, {stage}: {s['forward']:,} forward and {s['backward']:,} "
                     f"backward image passes {scope}.")
    total_f = sum(s["forward"] for s in stages.values())
    total_b = sum(s["backward"] for s in stages.values())
    lines.append(f"Cost estimate, total: {total_f:,} forward and {total_b:,} backward image "
                 "passes (a backward pass costs about two forward passes).")
    return lines

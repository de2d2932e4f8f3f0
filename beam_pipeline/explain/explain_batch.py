"""One batch of decoded examples → attribution rows and error rows: plain functions over arrays.

The explain DoFn (``beam.stages.ExplainBatches``) only tags what these return, counts and logs;
tests call them with fake explainers (any ``(images, targets) → {"probabilities",
"target_class", "maps", ...}`` callable) and a fake predictor, in milliseconds.

* ``split_targets``: examples with the class to explain, and error rows for those without;
* ``explain_batch``: every method on the batch; a batch that fails is retried example by example,
  so one poisoned example costs one ``explain_failed`` row, not the batch;
* ``sampled_indices`` / ``faithfulness_aucs``: the seeded faithfulness sample and its
  deletion / insertion AUCs (every method, and a seeded random map as the reference);
* ``sweep_counters`` / ``sweep_map_rows``: the layer sweep's localization counters per slice
  value and layer, and the sampled examples' maps at every layer;
* ``sanity_rows``: the randomization test's rows of each method, flagged or not.
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import layer_sweep
from ..measures import quality
from . import rows as rows_
from ..io.records import DecodedExample, error_row

Item = Tuple[DecodedExample, int]  # an example and the class its maps explain
Outputs = Dict[str, Dict[str, Any]]  # per method, what its explainer returned


@dataclass(frozen=True)
class RowSettings:
    """What the row builder needs of the run's config (``of(AuditConfig)``)."""

    layer: Optional[str]
    map_size: int
    faithfulness: bool
    has_masks: bool
    region_grid: Optional[Sequence[int]]

    @classmethod
    def of(cls, cfg) -> "RowSettings":
        return cls(cfg.layer, cfg.map_size, bool(cfg.faithfulness_sample),
                   cfg.source.has_masks, cfg.region_grid)


def split_targets(target: Any, batch: Sequence[DecodedExample]) -> Tuple[List[Item], List[dict]]:
    """(examples with their target class, error rows of those that have none: ``--target
    label`` on an unlabeled example)."""
    ready, errors = [], []
    for example, cls in zip(batch, rows_.explain_targets(target, [ex.label for ex in batch])):
        if cls is None:
            errors.append(error_row(
                example.example_id, example.source, "explain", "no_label_for_target",
                "--target label needs a label, and this example has none."))
        else:
            ready.append((example, cls))
    return ready, errors


def explain_batch(items: List[Item], methods: Dict[str, Callable], settings: RowSettings,
                  faithfulness: Optional[Callable] = None) -> Tuple[List[dict], Optional[Outputs]]:
    """(one row per example, the methods' outputs). ``faithfulness(examples, images, outs)``
    adds the sampled examples' AUCs to ``outs`` and returns the random reference {index:
    (deletion, insertion)}. On a failing batch each example is explained alone, so the others
    are still audited; then no outputs are returned (the sweep's maps are of whole batches)."""
    if not items:
        return [], None
    examples = [ex for ex, _ in items]
    images = np.stack([ex.image for ex in examples])
    targets = np.array([t for _, t in items], np.int32)
    try:
        outs = {name: method(images, targets) for name, method in methods.items()}
        reference = faithfulness(examples, images, outs) if faithfulness else {}
    except Exception as exc:
        if len(items) == 1:
            return [error_row(examples[0].example_id, examples[0].source, "explain",
                              "explain_failed", f"{type(exc).__name__}: {exc}")], None
        return [row for item in items
                for row in explain_batch([item], methods, settings, faithfulness)[0]], None
    return batch_rows(examples, outs, settings, reference), outs


def batch_rows(examples: List[DecodedExample], outs: Outputs, settings: RowSettings,
               reference: Optional[Dict[int, tuple]] = None) -> List[dict]:
    """Attribution rows (or ``non_finite_output`` error rows) of an explained batch."""
    masks = [ex.mask for ex in examples]
    per_method = [rows_.method_columns(name, out, masks, layer=settings.layer,
                                       map_size=settings.map_size,
                                       faithfulness=settings.faithfulness,
                                       has_masks=settings.has_masks)
                  for name, out in outs.items()]
    return rows_.attribution_rows(examples, outs, per_method, settings.faithfulness, reference,
                                  settings.region_grid)


def in_sample(example_id: str, seed: int, rate: float) -> bool:
    """Whether an example is in the seeded sample of about ``rate`` of the examples."""
    return quality.sample_key(example_id, seed) < rate


def sampled_indices(examples: Sequence[DecodedExample], seed: int, rate: float) -> List[int]:
    return [i for i, ex in enumerate(examples) if in_sample(ex.example_id, seed, rate)]


def faithfulness_aucs(predictor: Callable, examples: Sequence[DecodedExample],
                      images: np.ndarray, outs: Outputs, sampled: List[int], seed: int,
                      batch_size: int) -> Dict[int, tuple]:
    """Deletion / insertion AUCs of every method for the ``sampled`` examples, added to ``outs``
    as {index: AUC}; returns {index: (deletion, insertion)} of a seeded random map on the same
    examples and targets (the reference a reviewer compares the methods with)."""
    first = next(iter(outs.values()))
    height, width = images.shape[1:3]
    random_maps = np.stack([quality.random_map(examples[i].example_id, seed, height, width)
                            for i in sampled])
    reference: Dict[int, tuple] = {}
    for targets, members in _by_targets(outs, first, random_maps, sampled):
        aucs = quality.deletion_insertion_of_maps(
            predictor, images[sampled],
            [out["maps"] if name is None else out["maps"][sampled] for name, out in members],
            targets, batch_size=batch_size)
        for (name, out), (deletion, insertion) in zip(members, aucs):
            if name is None:
                reference = {i: (float(d), float(v))
                             for i, d, v in zip(sampled, deletion, insertion)}
            else:
                out["deletion_auc"] = {i: float(d) for i, d in zip(sampled, deletion)}
                out["insertion_auc"] = {i: float(v) for i, v in zip(sampled, insertion)}
    return reference


def _by_targets(outs: Outputs, first: dict, random_maps: np.ndarray, sampled: List[int]):
    """Every map set explaining the same classes goes through the model in one batched pass
    (methods' targets agree unless a near-tie resolves differently: then a pass of its own);
    the random reference (name None) explains the first method's classes."""
    groups: Dict[bytes, list] = {}
    for name, out in [*outs.items(), (None, {"maps": random_maps, "target_class": None})]:
        targets = (first if name is None else out)["target_class"][sampled]
        groups.setdefault(targets.tobytes(), [targets, []])[1].append((name, out))
    return list(groups.values())


def sweep_counters(examples: Sequence[DecodedExample], sweep_maps: Dict[str, np.ndarray],
                   slice_types: Sequence[str]) -> List[tuple]:
    """((group, layer), localization counters) per layer, overall and per slice value (examples
    with masks only: the caller asks when the data has masks)."""
    groups = {"overall": list(range(len(examples)))}
    for column in slice_types:
        for i, ex in enumerate(examples):
            groups.setdefault(f"{column}={ex.slices.get(column)}", []).append(i)
    found = []
    for group, idx in groups.items():
        counters = layer_sweep.localization_by_layer(
            {layer: maps[idx] for layer, maps in sweep_maps.items()},
            [examples[i].mask for i in idx])
        found.extend(((group, layer), values) for layer, values in counters.items())
    return found


def sweep_map_rows(examples: Sequence[DecodedExample], sweep_maps: Dict[str, np.ndarray],
                   sampled: Sequence[int]) -> List[dict]:
    """Every layer's map of the sampled examples (rows of layer_sweep_maps)."""
    return [{"example_id": examples[i].example_id, "layer": layer,
             "map": maps[i].astype(np.float32).ravel().tolist(), "shape": list(maps[i].shape)}
            for i in sampled for layer, maps in sweep_maps.items()]


def sanity_rows(by_method: Dict[str, List[dict]]) -> List[dict]:
    """The randomization test's rows, each with its method and whether the method is flagged."""
    found = []
    for name, rows in by_method.items():
        flagged = quality.flag_insensitive(rows)
        found.extend({"method": name, **row, "flagged": flagged} for row in rows)
    return found

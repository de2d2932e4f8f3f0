"""What the workers are told: ``AuditConfig`` (paths and settings, never a model) and the names
the Beam stages share (output tags, the metrics namespace, stage names of the progress lines,
the counters run.json reads back).

Plain data, no transforms: ``explain_batch`` (plain functions) and the DoFns both read it.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..measures import attention, importance
from ..io import decode, sources
from ..explain import precision

ERRORS = "errors"
SWEEP, SWEEP_MAPS = "sweep", "sweep_maps"
NAMESPACE = "xai_audit"
EXPLAIN_STAGE, FAITHFULNESS_STAGE, IMPORTANCE_STAGE, SANITY_STAGE = (
    "Explain", "Faithfulness", "Permutation importance", "Sanity check")
# Beam counters run.json reads back: labeled refs, and those in the importance sample.
IMPORTANCE_LABELED, IMPORTANCE_SAMPLED = "importance_labeled_refs", "importance_sampled_refs"


@dataclass
class AuditConfig:
    """Everything the workers need; small and picklable (paths, not models)."""

    model_path: str
    output: str
    source: sources.SourceSpec
    image_spec: decode.ImageSpec
    class_names: List[str]
    head: str
    layer: str  # qualified layer name, resolved on the launcher
    target: Any = "predicted"  # "predicted" | "label" | int
    batch_size: int = 32
    unsafe_deserialization: bool = False
    progress_every_s: float = 10.0
    # Worker processes sharing the stages (--direct_num_workers in multi_processing mode); each
    # logs its share's progress. 0: unknown (Dataflow), progress is logged without a total.
    progress_workers: int = 1
    eval_config: Any = None  # a completed TFMA EvalConfig, or None to skip TFMA
    methods: List[str] = field(default_factory=lambda: ["gradcam"])
    method_options: Dict[str, Any] = field(default_factory=dict)  # see make_method
    map_size: int = 56  # input-resolution maps are pooled to at most this size
    sweep: bool = False  # --layer all: Grad-CAM at every 4-D layer, one backward pass per batch
    sweep_layer_names: List[str] = field(default_factory=list)
    faithfulness_sample: int = 0  # about this many examples get deletion/insertion AUCs
    sanity_sample: int = 0  # examples for the model-parameter randomization test
    permutation_features: List[Any] = field(default_factory=list)  # importance.Feature
    permutation_repeats: int = 3
    # Labeled examples permutation importance runs on (a seeded sample); None: every one.
    importance_sample: Optional[int] = importance.DEFAULT_SAMPLE
    shard_size: int = 256
    seed: int = 0
    precision: str = precision.DEFAULT  # the model's compute, as planned (precision.plan)
    region_grid: tuple = attention.DEFAULT_GRID  # rows x cols of attention_region's cells

    @property
    def labeled(self) -> bool:
        return self.source.labeled

    @property
    def input_shape(self) -> tuple:
        spec = self.image_spec
        return (spec.height, spec.width, spec.channels)

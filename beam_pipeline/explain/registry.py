"""One record per attribution method: the only list of methods in the package.

A ``Method`` says everything the rest of the code needs to know about one ``--methods`` name:

* ``factory``: "module:Class" of its ``explainers.Attribution`` subclass, imported only when an
  explainer is built, so this module (and the report, which reads names and notes) never imports
  TensorFlow;
* ``resolution``: ``layer`` (the ``--layer`` feature map; the row gets a ``{name}_layer``
  column), ``feature`` (a feature map the method picks itself, e.g. CAM's), or ``input`` (input
  resolution; pooled to ``--map-size`` before it is written);
* ``options``: constructor argument → option key (an ``OPTIONS`` entry, or ``seed``);
* ``extra_columns``: per-example outputs written beside the map (``ExtraColumn``);
* ``display_name`` and ``note`` for the report.

Readers: ``attribution_methods.make_method`` (the factory), ``schemas.attribution_schema`` and
``beam.stages.ExplainBatches`` (the columns), ``report.summary``/``report.text`` (names,
notes), ``cli`` (help, flags, defaults), ``job.plan`` (defaults, planning-time validation).

To add a method: write its class (an ``explainers.Attribution`` subclass: ``_explain(images,
targets)`` → probabilities, target_class, maps), add a ``Method`` to ``METHODS`` and, if it has
options, ``MethodOption``s to ``OPTIONS``. ``tests/test_method_contract.py`` checks it.
"""
import importlib
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

from ..errors import OptionError

RESOLUTIONS = ("layer", "feature", "input")


@dataclass(frozen=True)
class MethodOption:
    """One method option: ``key`` is the AuditRequest field and run.json options key; the flag
    is ``--`` + key with dashes."""

    key: str
    default: Any
    help: str
    type: type = int
    choices: Tuple[str, ...] = ()
    minimum: Optional[float] = None  # inclusive
    exclusive_minimum: Optional[float] = None

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    def check(self, value) -> None:
        """Raises OptionError naming the flag when ``value`` cannot be honoured."""
        if self.choices and value not in self.choices:
            raise OptionError(f"{self.flag} {value!r} is not one of {', '.join(self.choices)}.")
        if self.type is int and (isinstance(value, bool) or int(value) != value):
            raise OptionError(f"{self.flag} must be a whole number, not {value!r}.")
        if self.minimum is not None and not value >= self.minimum:
            raise OptionError(f"{self.flag} must be at least {self.minimum}, not {value!r}.")
        if self.exclusive_minimum is not None and not value > self.exclusive_minimum:
            raise OptionError(f"{self.flag} must be more than {self.exclusive_minimum}, "
                              f"not {value!r}.")


@dataclass(frozen=True)
class ExtraColumn:
    """A per-example number a method returns beside its maps: ``output`` key → ``column``."""

    column: str
    output: str
    arrow_type: str = "float32"  # a pyarrow type name (schemas turns it into the type)


@dataclass(frozen=True)
class Method:
    name: str
    display_name: str
    factory: str  # "module:Class" inside beam_pipeline
    resolution: str
    note: str
    options: Dict[str, str] = field(default_factory=dict)  # constructor arg → option key
    extra_columns: Tuple[ExtraColumn, ...] = ()
    any_model: bool = True  # needs nothing of the architecture but differentiability

    def load(self):
        """The method's class (imports its module, hence TensorFlow)."""
        module, _, attribute = self.factory.partition(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), attribute)


# Options shared by several methods are defined once; ``seed`` is the run's --seed.
OPTIONS: Dict[str, MethodOption] = {o.key: o for o in (
    MethodOption("gradcam_activation", "relu", "Grad-CAM's final activation: relu, or abs for "
                 "magnitude (also in the --layer sweep)", str, choices=("relu", "abs")),
    MethodOption("smoothgrad_samples", 16, "SmoothGrad copies", int, minimum=1),
    MethodOption("smoothgrad_sigma", 0.15, "SmoothGrad noise, as a fraction of the image's range",
                 float, minimum=0.0),
    MethodOption("ig_steps", 64, "Integrated Gradients steps", int, minimum=1),
    MethodOption("ig_baseline", "black", "Integrated Gradients baseline", str,
                 choices=("black", "uniform", "blur")),
)}
SHARED_DEFAULTS = {"seed": 0}

METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("gradcam", "Grad-CAM", "explainers:GradCAM", "layer",
           "Grad-CAM shows where, at one convolutional layer, a small change would most raise "
           "the explained class's score: sensitivity-based localization at the layer's coarse "
           "resolution, not a causal account of the decision.",
           options={"activation": "gradcam_activation"}),
    Method("gradcam_plus_plus", "Grad-CAM++", "explainers:GradCAMPlusPlus", "layer",
           "Grad-CAM++ weighs every location where raising the feature would raise the score, "
           "not their mean, so several objects of the class in one image all show; like "
           "Grad-CAM it is coarse and shows association, not cause.",
           options={"activation": "gradcam_activation"}),
    Method("cam", "CAM", "attribution_methods:CAM", "feature",
           "CAM weighs the last feature maps by the classifier's weights: exact for a global "
           "average pooling head, coarse, and like Grad-CAM it shows association, not cause.",
           any_model=False),
    Method("saliency", "Saliency", "attribution_methods:Saliency", "input",
           "Saliency is the gradient at the input: noisy, and sensitive to small "
           "perturbations; it says where the score is locally sensitive."),
    Method("smoothgrad", "SmoothGrad", "attribution_methods:SmoothGrad", "input",
           "SmoothGrad averages gradients over noisy copies: less noisy than saliency, but its "
           "picture depends on the noise level chosen.",
           options={"samples": "smoothgrad_samples", "sigma": "smoothgrad_sigma",
                    "seed": "seed"}),
    Method("integrated_gradients", "Integrated Gradients",
           "attribution_methods:IntegratedGradients", "input",
           "Integrated Gradients attributes the score difference to a baseline image; the "
           "result depends on that baseline (ig_completeness_gap measures how well it adds up).",
           options={"steps": "ig_steps", "baseline": "ig_baseline", "seed": "seed"},
           extra_columns=(ExtraColumn("ig_completeness_gap", "completeness_gap"),)),
)}

NAMES: Tuple[str, ...] = tuple(METHODS)


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise OptionError(f"--methods {name}: not one of {', '.join(NAMES)}.") from None


def names_with(resolution: str) -> Tuple[str, ...]:
    return tuple(m.name for m in METHODS.values() if m.resolution == resolution)


def display_names() -> Dict[str, str]:
    return {m.name: m.display_name for m in METHODS.values()}


def notes() -> Dict[str, str]:
    return {m.name: m.note for m in METHODS.values()}


def default(key: str):
    """The default of one method option (or ``seed``): the one place it is written."""
    return OPTIONS[key].default if key in OPTIONS else SHARED_DEFAULTS[key]


def constructor_args(name: str, options: Dict[str, Any]) -> Dict[str, Any]:
    """The keyword arguments of ``name``'s class from the run's options (defaults filled in)."""
    return {arg: options.get(key, default(key)) for arg, key in get(name).options.items()}


def check_options(methods: Sequence[str], values: Dict[str, Any]) -> None:
    """Validate, at planning, the options of the chosen ``methods`` (others are ignored, as they
    are never used). Raises OptionError naming the flag."""
    for key in sorted({k for m in methods for k in get(m).options.values() if k in OPTIONS}):
        OPTIONS[key].check(values.get(key, default(key)))


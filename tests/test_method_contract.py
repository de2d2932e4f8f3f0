"""Every method in ``method_registry`` against one contract, on a tiny model: built by
``make_method`` from its record, batch in → maps out with the shapes, dtypes and extra outputs the
record promises, deterministic, independent of batching, one trace, targets honoured; and the
record's columns are the schema's. A new method gets all of this by being registered."""
import numpy as np
import pyarrow as pa
import pytest

from beam_pipeline.explain import attribution_methods as am
from beam_pipeline import cli
from beam_pipeline.explain import explainers, layer_sweep, registry as method_registry, model_io
from beam_pipeline.io import schemas
from beam_pipeline.errors import OptionError

from conftest import IMAGE_SIZE, gap_model

BATCH = 5
FEATURE_SIZE = IMAGE_SIZE - 2  # gap_model's 3×3 valid conv
SMALL = {"smoothgrad_samples": 3, "ig_steps": 4, "seed": 7}  # small, for speed


def _build(name, model, options=SMALL):
    info = model_io.prepare_classifier(model)
    classifier = explainers.Classifier(model, info.head)
    layer = model_io.find_layer(model, "auto")
    return am.make_method(name, classifier, tuple(model.inputs[0].shape[1:]), layer, options)


def _images(n, seed=0):
    return np.random.default_rng(seed).random((n, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("float32")


@pytest.mark.parametrize("name", method_registry.NAMES)
def test_the_record_is_complete(name):
    record = method_registry.get(name)
    assert record.name == name and record.display_name and len(record.note) > 40
    assert record.resolution in method_registry.RESOLUTIONS
    cls = record.load()
    assert issubclass(cls, explainers.Attribution) and cls.name == name
    assert set(record.options.values()) <= set(method_registry.OPTIONS) | {"seed"}


@pytest.mark.parametrize("name", method_registry.NAMES)
@pytest.mark.parametrize("classes,activation", [(3, "softmax"), (1, "sigmoid")])
def test_every_method_keeps_the_contract(name, classes, activation):
    record = method_registry.get(name)
    method = _build(name, gap_model(classes, activation, seed=3))
    images = _images(BATCH)
    predicted = np.full(BATCH, explainers.PREDICTED, np.int32)
    out = method(images, predicted)

    k = max(classes, 2)
    side = IMAGE_SIZE if record.resolution == "input" else FEATURE_SIZE
    assert out["probabilities"].shape == (BATCH, k)
    np.testing.assert_array_equal(out["target_class"], out["probabilities"].argmax(axis=1))
    assert out["maps"].shape == (BATCH, side, side) and out["maps"].dtype == np.float32
    assert np.isfinite(out["maps"]).all()
    for extra in record.extra_columns:
        assert out[extra.output].shape == (BATCH,)

    # Deterministic, and an example's map does not depend on its batch; one trace for both.
    again = method(images, predicted)
    np.testing.assert_array_equal(again["maps"], out["maps"])
    part = method(images[:2], predicted[:2])
    np.testing.assert_allclose(part["maps"], out["maps"][:2], rtol=1e-4, atol=1e-6)
    assert method.tracing_count() == 1

    # An explicit target is explained whatever the prediction.
    other = (out["target_class"] + 1) % k
    explicit = method(images, other.astype(np.int32))
    np.testing.assert_array_equal(explicit["target_class"], other)
    np.testing.assert_array_equal(explicit["probabilities"], out["probabilities"])
    if classes > 1:  # one sigmoid unit: class 0's score is -z, and |maps| may not change
        assert not np.array_equal(explicit["maps"], out["maps"])


@pytest.mark.parametrize("name", method_registry.NAMES)
def test_the_schema_has_the_columns_the_record_promises(name):
    record = method_registry.get(name)
    schema = schemas.attribution_schema({}, has_masks=False, methods=[name])
    assert (f"{name}_layer" in schema.names) == (record.resolution == "layer")
    for extra in record.extra_columns:
        assert schema.field(extra.column).type == pa.type_for_alias(extra.arrow_type)


def test_every_option_is_checked_at_planning_by_its_flag():
    method_registry.check_options(method_registry.NAMES, {})  # the defaults are valid
    bad = {"gradcam_activation": "square", "smoothgrad_samples": 0, "smoothgrad_sigma": -0.1,
           "ig_steps": 0, "ig_baseline": "white"}
    assert set(bad) == set(method_registry.OPTIONS)
    for key, value in bad.items():
        with pytest.raises(OptionError, match=method_registry.OPTIONS[key].flag):
            method_registry.check_options(method_registry.NAMES, {key: value})
    # Options of methods not chosen are never used, so not checked.
    method_registry.check_options(["saliency"], {"ig_steps": 0})


def test_an_unknown_method_is_an_option_error():
    with pytest.raises(OptionError, match="not one of gradcam, "):
        method_registry.get("lime")


def test_a_bad_method_option_stops_the_run_before_anything_is_staged(tmp_path, capsys,
                                                                    folder_dataset, saved_model):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as usage:
        cli.main(["run", "--model", str(saved_model), "--data", str(folder_dataset),
                  "--output", str(out), "--methods", "integrated_gradients", "--ig-steps", "0"])
    err = " ".join(capsys.readouterr().err.split())
    # On the command line the bound is argparse's: a usage error (exit 2), nothing staged.
    assert usage.value.code == 2 and "--ig-steps" in err and "Traceback" not in err
    assert not out.exists()
    # A caller building the request directly meets the same bound when the job is planned.
    from beam_pipeline.job import run as job
    from beam_pipeline.errors import OptionError

    request = job.AuditRequest(model=str(saved_model), data=str(folder_dataset), output=str(out),
                               methods=("integrated_gradients",), ig_steps=0)
    with pytest.raises(OptionError, match="--ig-steps must be at least 1"):
        job.plan_audit(request)
    assert not out.exists()


def test_the_layer_sweep_is_gradcam_at_each_layer_and_honours_abs():
    model = gap_model(3, seed=5)
    classifier = explainers.Classifier(model, model_io.prepare_classifier(model).head)
    shape = tuple(model.inputs[0].shape[1:])
    layers = layer_sweep.sweep_layers(model)
    images, targets = _images(4, seed=2), np.array([0, 1, 2, 0], np.int32)
    for activation in ("relu", "abs"):
        swept = layer_sweep.GradCAMSweep(classifier, layers, shape, activation)(images, targets)
        for name, layer in layers:
            single = explainers.GradCAM(classifier, layer, name, shape, activation)
            np.testing.assert_allclose(swept["maps"][name], single(images, targets)["maps"],
                                       rtol=1e-5, atol=1e-7)
    relu = layer_sweep.GradCAMSweep(classifier, layers, shape)(images, targets)["maps"]
    assert any((swept["maps"][n] > relu[n]).any() for n, _ in layers)  # negative evidence kept

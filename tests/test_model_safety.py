"""Model loading under hostile or careless input: code inside a model never runs without
--unsafe-deserialization (checked before anything is deserialized, in every format), files that
are not models say what they are, and single-unit heads without a sigmoid are caveated or refused."""
import os
import pickle
import subprocess
import sys
import textwrap

import keras
import pytest

from beam_pipeline.explain import model_io
from beam_pipeline.errors import ModelLoadError
from conftest import IMAGE_SIZE

# A Keras 2 (tf_keras) model whose Lambda touches a marker file when it runs. Saved in a
# subprocess so the test process never executes the Lambda itself.
_MAKE_TF_KERAS_LAMBDA = textwrap.dedent("""
    import os, sys
    import tf_keras
    marker, target = sys.argv[1], sys.argv[2]
    inputs = tf_keras.Input((8, 8, 3))
    x = tf_keras.layers.Conv2D(2, 3, name="conv")(inputs)
    # The marker path is a literal inside the lambda's code: it must run on its own when loaded.
    code = eval(f"lambda t: (__import__('pathlib').Path({marker!r}).touch(), t)[1]")
    x = tf_keras.layers.Lambda(code, name="evil")(x)
    x = tf_keras.layers.GlobalAveragePooling2D()(x)
    model = tf_keras.Model(inputs, tf_keras.layers.Dense(3, activation="softmax")(x))
    model.save(target)
    os.remove(marker)  # building the model ran the Lambda once
""")


@pytest.fixture(scope="module")
def tf_keras_lambda_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lambda")
    marker = root / "CODE_RAN"
    for target in ("saved_model", "model.h5"):
        subprocess.run([sys.executable, "-c", _MAKE_TF_KERAS_LAMBDA, str(marker),
                        str(root / target)], check=True, capture_output=True,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert not marker.exists()
    return root, marker


@pytest.mark.parametrize("target", ["saved_model", "model.h5"])
def test_a_lambda_is_refused_before_its_code_runs_and_loads_with_the_flag(
        tf_keras_lambda_models, target):
    root, marker = tf_keras_lambda_models
    path = str(root / target)
    with pytest.raises(ModelLoadError) as info:
        model_io.load_model(path)
    assert "evil" in str(info.value) and "--unsafe-deserialization" in str(info.value)
    assert not marker.exists(), "the Lambda's code ran although the model was refused"
    model = model_io.load_model(path, unsafe_deserialization=True)
    assert model.get_layer("evil") is not None
    assert marker.exists()  # the opt-in really loads it (and so runs its code)
    marker.unlink()


def test_code_layers_finds_keras_3_and_keras_2_lambdas_nested():
    keras3 = {"class_name": "Functional", "config": {"layers": [
        {"class_name": "Conv2D", "config": {"name": "c"}},
        {"class_name": "Functional", "config": {"layers": [
            {"class_name": "Lambda", "config": {"name": "inner", "function": {
                "class_name": "__lambda__", "config": {"code": "..."}}}}]}}]}}
    keras2 = {"class_name": "Custom", "config": {"name": "mine", "function": "4wEA",
                                                 "function_type": "lambda"}}
    assert model_io.code_layers(keras3) == ["inner"]
    assert model_io.code_layers(keras2) == ["mine"]
    assert model_io.code_layers({"class_name": "TFOpLambda",
                                 "config": {"name": "add", "function": "math.add"}}) == []


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04trunc", pickle.dumps({"weights": 1})])
def test_a_keras_file_that_is_not_an_archive_says_so_not_file_not_found(tmp_path, content):
    path = tmp_path / "model.keras"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError) as info:
        model_io.load_model(str(path))
    text = str(info.value)
    assert "not found" not in text.lower() and "not a .keras file" in text
    assert ("is empty" in text) == (content == b"")


def _single_unit(activation):
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = keras.layers.Conv2D(2, 3, name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(1, activation=activation, name="out")(x))


def test_a_linear_single_unit_is_audited_as_a_logit_with_a_caveat():
    info = model_io.prepare_classifier(_single_unit(None))
    assert info.head == "sigmoid" and info.num_classes == 2
    assert len(info.caveats) == 1 and "from_logits" in info.caveats[0]
    assert model_io.prepare_classifier(_single_unit("sigmoid")).caveats == []


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_a_single_unit_with_another_activation_is_refused(activation):
    with pytest.raises(ModelLoadError) as info:
        model_io.prepare_classifier(_single_unit(activation))
    assert activation in str(info.value) and "sigmoid" in str(info.value)

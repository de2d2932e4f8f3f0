"""Loading a Keras image classifier safely and finding what the explainers need inside it.

* ``load_model``: ``.keras`` in Keras safe mode, ``.h5``, or a SavedModel directory written by
  Keras 2 / TFX (loaded with tf_keras, which keeps its layers). Remote paths are copied locally.
  Before anything is deserialized, the stored layer configs of every format are scanned for
  Python code (``code_layers``: Lambda layers, marshalled functions); such a model is refused
  unless ``--unsafe-deserialization`` (tf_keras has no safe mode for SavedModels: without this
  scan a SavedModel's Lambda would run its code while loading).
* ``prepare_classifier``: finds the output head (softmax / sigmoid / none) and switches it to
  emit pre-activation logits, so Grad-CAM differentiates the logit, not the probability.
* ``find_layer``: ``auto`` (last layer with a 4-D output, searching inside nested models) or a
  name, returning the layer object wherever it sits in the nesting.
"""
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from apache_beam.io.filesystems import FileSystems

from ..errors import ModelLoadError, OptionError

_SOFTMAX_NAMES = ("softmax",)
_SIGMOID_NAMES = ("sigmoid",)


@dataclass
class ClassifierInfo:
    """What the launcher needs to know about the model (no TF objects: it is pickled)."""

    height: Optional[int]
    width: Optional[int]
    channels: int
    num_classes: int  # 2 for a single-sigmoid head
    head: str  # "softmax" | "sigmoid"
    head_source: str  # how the logit was found, for run.json
    layer_names: List[str]
    # What the audit had to assume about the model, for the log, run.json and the report.
    caveats: List[str] = field(default_factory=list)


# --------------------------------------------------------------------------- loading


def _localize(path: str) -> str:
    """A local copy of a remote model (gs://...), since Keras reads local files."""
    if "://" not in path:
        return path
    local_root = tempfile.mkdtemp(prefix="xai-audit-model-")
    matches = FileSystems.match([path.rstrip("/") + "/**"])[0].metadata_list
    if not matches:  # a single file
        local = os.path.join(local_root, os.path.basename(path))
        with FileSystems.open(path) as src, open(local, "wb") as dst:
            dst.write(src.read())
        return local
    local_dir = os.path.join(local_root, os.path.basename(path.rstrip("/")))
    for meta in matches:
        rel = meta.path[len(path.rstrip("/")) + 1 :]
        target = os.path.join(local_dir, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with FileSystems.open(meta.path) as src, open(target, "wb") as dst:
            dst.write(src.read())
    return local_dir


def _drop_local_copy(path: str, local: str) -> None:
    """Remove the temporary copy ``_localize`` made of a remote model (nothing for local ones)."""
    if local != path:
        shutil.rmtree(os.path.dirname(local.rstrip(os.sep)), ignore_errors=True)


def model_sha256(path: str) -> str:
    """SHA-256 of the model file, or of the sorted (relative path, file hash) list of a directory."""
    local = _localize(path)
    try:
        return _local_sha256(local)
    finally:
        _drop_local_copy(path, local)


def _local_sha256(local: str) -> str:
    if os.path.isdir(local):
        digest = hashlib.sha256()
        for root, _, files in sorted(os.walk(local)):
            for name in sorted(files):
                full = os.path.join(root, name)
                digest.update(os.path.relpath(full, local).encode() + b"\0")
                digest.update(_file_sha256(full).encode() + b"\n")
        return digest.hexdigest()
    return _file_sha256(local)


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_model(path: str, unsafe_deserialization: bool = False):
    """Load a Keras classifier without compiling it; raises ModelLoadError with advice."""
    if "://" not in path and not os.path.exists(path):
        raise ModelLoadError(f"The model {path} does not exist.")
    try:
        local = _localize(path)
    except Exception as exc:
        raise ModelLoadError(f"The model {path} could not be read ({exc}).") from None
    if os.path.isdir(local):
        # the copy stays: a SavedModel may read assets later
        return _load_saved_model(path, local, unsafe_deserialization)
    try:
        return _load_model_file(path, local, unsafe_deserialization)
    finally:  # the whole file has been read into the model
        _drop_local_copy(path, local)


# --------------------------------------------------------------------------- code in a model

# Config markers of deserialized Python code: Keras 2's marshalled functions carry a
# ``function_type``; Keras 3 stores a lambda's bytecode as class ``__lambda__``.
_CODE_CLASSES = ("Lambda", "__lambda__")
_CODE_KEYS = ("function_type",)


def code_layers(config) -> List[str]:
    """Names of the layers (or objects) in a parsed model config that hold Python code."""
    found: List[str] = []
    _find_code(config, found)
    return found


def _find_code(value, found: List[str]) -> None:
    if isinstance(value, list):
        for item in value:
            _find_code(item, found)
        return
    if not isinstance(value, dict):
        return
    if value.get("class_name") in _CODE_CLASSES or any(k in value for k in _CODE_KEYS):
        inner = value.get("config") if isinstance(value.get("config"), dict) else value
        name = str(inner.get("name") or value.get("class_name") or "?")
        if name not in found:
            found.append(name)
        return  # its function is part of it, not another finding
    for item in value.values():
        _find_code(item, found)


def _refuse_code(path: str, names: List[str], unsafe_deserialization: bool) -> None:
    if names and not unsafe_deserialization:
        raise ModelLoadError(
            f"The model {path} contains Python code (Lambda layer {', '.join(names[:5])}), which "
            "would run while the model is loaded, so it was not loaded. If you trust the file, "
            "pass --unsafe-deserialization to load it anyway."
        )


def _keras_zip_config(path: str, local: str) -> dict:
    """config.json of a .keras archive; a file that is not one is named as such."""
    if not zipfile.is_zipfile(local):
        size = os.path.getsize(local)
        what = "is empty" if size == 0 else f"is not a zip archive ({size} bytes)"
        raise ModelLoadError(
            f"The model {path} could not be loaded: it {what}, so it is not a .keras file (Keras saves .keras models as "
            "zip archives with config.json). It may be truncated or another format (a pickle, an "
            ".h5 renamed): save the model again with model.save('model.keras')."
        )
    try:
        with zipfile.ZipFile(local) as archive:
            return json.loads(archive.read("config.json"))
    except (KeyError, ValueError, zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(
            f"The model {path} is a damaged .keras archive ({type(exc).__name__}: "
            f"{_first_line(str(exc))}); save the model again with model.save('model.keras')."
        ) from None


def _h5_config(path: str, local: str) -> dict:
    import h5py

    try:
        with h5py.File(local, "r") as handle:
            text = handle.attrs.get("model_config")
    except OSError as exc:
        raise ModelLoadError(
            f"The model {path} is not a readable HDF5 file ({_first_line(str(exc))}); it may be "
            "truncated or another format."
        ) from None
    if text is None:
        raise ModelLoadError(
            f"The model {path} holds weights only (no model config); save the whole model with "
            "model.save()."
        )
    return json.loads(text.decode() if isinstance(text, bytes) else text)


def _saved_model_config(path: str, local: str) -> List[dict]:
    """Every node's metadata of a Keras 2 SavedModel's keras_metadata.pb (layer configs)."""
    from tf_keras.protobuf import saved_metadata_pb2

    metadata = saved_metadata_pb2.SavedMetadata()
    try:
        with open(os.path.join(local, "keras_metadata.pb"), "rb") as handle:
            metadata.ParseFromString(handle.read())
        return [json.loads(node.metadata) for node in metadata.nodes if node.metadata]
    except Exception as exc:  # a damaged protobuf or JSON: nothing can be checked, so refuse
        raise ModelLoadError(
            f"The SavedModel {path} has an unreadable keras_metadata.pb ({type(exc).__name__}); "
            "it cannot be checked for code, so it is not loaded."
        ) from None


# --------------------------------------------------------------------------- formats


def _load_model_file(path: str, local: str, unsafe_deserialization: bool):
    lower = local.lower()
    if not lower.endswith((".keras", ".h5", ".hdf5")):
        raise ModelLoadError(
            f"The model {path} is not a .keras file, an .h5 file or a SavedModel directory."
        )
    is_zip = lower.endswith(".keras")
    config = _keras_zip_config(path, local) if is_zip else _h5_config(path, local)
    _refuse_code(path, code_layers(config), unsafe_deserialization)
    import keras

    try:
        # safe_mode for .h5 too: Keras' legacy loader refuses Lambdas unless it is off.
        return keras.models.load_model(
            local, compile=False, safe_mode=not unsafe_deserialization)
    except Exception as exc:
        raise ModelLoadError(
            f"The model {path} could not be loaded ({type(exc).__name__}: "
            f"{_first_line(str(exc))}). Check that it is a Keras model saved with model.save()."
        ) from None


def _load_saved_model(path: str, local: str, unsafe_deserialization: bool):
    if not os.path.exists(os.path.join(local, "saved_model.pb")):
        raise ModelLoadError(
            f"The folder {path} is not a SavedModel (no saved_model.pb). Give a .keras or .h5 "
            "file or a SavedModel directory."
        )
    if not os.path.exists(os.path.join(local, "keras_metadata.pb")):
        raise ModelLoadError(
            f"The SavedModel {path} has no Keras metadata (it was written by tf.saved_model.save "
            "or model.export()), so its layers cannot be reached for Grad-CAM. Give the .keras "
            "file, or a SavedModel written by Keras 2 / TFX's Trainer (model.save(dir))."
        )
    _refuse_code(path, code_layers(_saved_model_config(path, local)), unsafe_deserialization)
    import tf_keras

    try:
        return tf_keras.models.load_model(local, compile=False)
    except Exception as exc:
        raise ModelLoadError(
            f"The SavedModel {path} could not be loaded with tf_keras ({type(exc).__name__}: "
            f"{_first_line(str(exc))})."
        ) from None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def load_classifier(path: str, unsafe_deserialization: bool = False):
    """(model, ClassifierInfo): the model loaded and prepared.

    Not cached here: ``model_holder.load_classifier`` loads once per process (the launcher's
    validation load is reused by in-process workers, as RunInference shares its model handle).
    """
    model = load_model(path, unsafe_deserialization)
    try:
        info = prepare_classifier(model)
    except ModelLoadError as exc:  # name the file: the user may be trying several
        raise ModelLoadError(f"{path}: {exc}") from None
    return model, info


# --------------------------------------------------------------------------- structure


def _is_model(layer) -> bool:
    return hasattr(layer, "layers") and hasattr(layer, "inputs")


def iter_layers(model, prefix: str = "") -> List[Tuple[str, object]]:
    """(qualified name, layer) for every layer, depth first, nested models expanded in place."""
    found = []
    for layer in model.layers:
        name = f"{prefix}{layer.name}"
        if _is_model(layer):
            found.extend(iter_layers(layer, prefix=f"{name}/"))
        elif type(layer).__name__ != "InputLayer":
            found.append((name, layer))
    return found


def _output_rank(layer) -> Optional[int]:
    try:
        return len(layer.output.shape)
    except Exception:  # a layer used more than once has no single output
        return None


def find_layer(model, spec: str):
    """(qualified name, layer) for ``--layer`` ``auto`` or a name (plain or qualified)."""
    layers = iter_layers(model)
    if spec == "auto":
        spatial = [(n, l) for n, l in layers if _output_rank(l) == 4]
        if not spatial:
            raise OptionError(
                "--layer auto found no layer with a 4-D (batch, height, width, channels) output in "
                "the model: Grad-CAM needs a convolutional feature map."
            )
        return spatial[-1]
    matches = [(n, l) for n, l in layers if n == spec or l.name == spec]
    if not matches:
        names = ", ".join(n for n, l in layers if _output_rank(l) == 4) or "none"
        raise OptionError(
            f"--layer {spec}: the model has no layer of that name. Layers with 4-D outputs: {names}."
        )
    if len(matches) > 1:
        raise OptionError(
            f"--layer {spec} is ambiguous; use one of the qualified names "
            f"{', '.join(n for n, _ in matches)}."
        )
    name, layer = matches[0]
    if _output_rank(layer) != 4:
        raise OptionError(
            f"--layer {spec} has a {_output_rank(layer)}-D output; Grad-CAM needs a layer with a "
            "4-D (batch, height, width, channels) output."
        )
    return name, layer


def _activation_name(layer) -> Optional[str]:
    if type(layer).__name__ == "Softmax":
        return "softmax"
    act = getattr(layer, "activation", None)
    return getattr(act, "__name__", None) if act is not None else None


def _linear(x):
    return x


def prepare_classifier(model) -> ClassifierInfo:
    """Check the model is a single-input image classifier and switch its head to logits."""
    if len(model.inputs) != 1:
        raise ModelLoadError(
            f"The model has {len(model.inputs)} inputs; xai-audit audits single-input image "
            "classifiers."
        )
    if len(model.outputs) != 1:
        raise ModelLoadError(
            f"The model has {len(model.outputs)} outputs; xai-audit audits single-output "
            "classifiers."
        )
    in_shape = tuple(model.inputs[0].shape)
    out_shape = tuple(model.outputs[0].shape)
    if len(in_shape) != 4:
        raise ModelLoadError(
            f"The model's input has shape {in_shape}; an image classifier takes "
            "(batch, height, width, channels)."
        )
    if len(out_shape) != 2 or not out_shape[-1]:
        raise ModelLoadError(
            f"The model's output has shape {out_shape}; a classifier outputs (batch, classes)."
        )
    units = int(out_shape[-1])
    last = model
    while _is_model(last):
        last = last.layers[-1]
    activation = _activation_name(last)
    if activation in _SOFTMAX_NAMES + _SIGMOID_NAMES:
        if type(last).__name__ == "Softmax":
            last.call = lambda inputs, *args, **kwargs: inputs
        else:
            last.activation = _linear
        head = "sigmoid" if activation in _SIGMOID_NAMES else "softmax"
        source = f"pre-activation of layer {last.name!r} ({activation} removed)"
    else:
        head = "sigmoid" if units == 1 else "softmax"
        source = f"output of layer {last.name!r} taken as logits (no softmax/sigmoid at the end)"
    caveats = _single_unit_caveats(units, activation, last.name) if activation not in (
        _SOFTMAX_NAMES + _SIGMOID_NAMES) else []
    if head == "softmax" and units == 1:
        raise ModelLoadError("The model ends in a softmax over a single unit, which is constant.")
    if head == "sigmoid" and units != 1:
        raise ModelLoadError(
            f"The model ends in a sigmoid over {units} units (multi-label); xai-audit audits "
            "single-label classifiers (softmax, or one sigmoid unit)."
        )
    return ClassifierInfo(
        height=in_shape[1],
        width=in_shape[2],
        channels=int(in_shape[3]),
        num_classes=2 if head == "sigmoid" else units,
        head=head,
        head_source=source,
        layer_names=[n for n, _ in iter_layers(model)],
        caveats=caveats,
    )


_LINEAR_NAMES = (None, "linear")


def _single_unit_caveats(units: int, activation: Optional[str], layer: str) -> List[str]:
    """A single output unit without a sigmoid: a linear unit is audited as the logit of class 1
    (right for a binary classifier trained with from_logits=True, wrong for a regressor: hence
    the caveat); any other activation (ReLU, tanh...) is refused, as no sigmoid of it is a
    class probability (a ReLU output is never negative, so class 0 could never be predicted)."""
    if units != 1:
        return []
    if activation not in _LINEAR_NAMES:
        raise ModelLoadError(
            f"The model ends in a single unit with a {activation} activation (layer {layer!r}); "
            "that is neither a class probability (sigmoid) nor a logit, so it cannot be audited "
            "as a binary classifier. End the model in Dense(1, activation='sigmoid') or "
            "Dense(2, activation='softmax')."
        )
    return [
        f"The model's single output unit (layer {layer!r}) has no sigmoid: its output is read as "
        "the logit of class 1 (probability = sigmoid(output)). That holds only for a binary "
        "classifier trained on logits (from_logits=True); for a regression or score output every "
        "probability, metric and verdict of this audit is meaningless."
    ]

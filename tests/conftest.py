"""Shared fixtures: tiny hand-built models whose Grad-CAM is known in closed form, and tiny
datasets in each input form (class folders, CSV manifest, TFRecords)."""
import io
import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image

IMAGE_SIZE = 16


def gap_model(num_classes=3, activation="softmax", channels=3, filters=4, seed=0, name=None):
    """conv → global average pooling → dense, with fixed random weights.

    For this model Grad-CAM of class c at the conv layer is ReLU(Σ_k W[k, c] A^k) / (h·w).
    """
    rng = np.random.default_rng(seed)
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, channels))
    conv = keras.layers.Conv2D(filters, 3, activation="relu", name="conv")
    x = conv(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    dense = keras.layers.Dense(num_classes, activation=activation, name="head")
    outputs = dense(x)
    model = keras.Model(inputs, outputs, name=name or "gap_model")
    conv.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in conv.get_weights()])
    dense.set_weights([rng.normal(0, 1.0, w.shape).astype("float32") for w in dense.get_weights()])
    return model


def conv_activations(model, images, layer_name="conv"):
    """The conv layer's activations, computed through a separate Keras sub-model."""
    sub = keras.Model(model.inputs, model.get_layer(layer_name).output)
    return sub(images, training=False).numpy()


def write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def random_image(rng, size=(20, 24), channels=3):
    shape = size + ((channels,) if channels > 1 else ())
    return rng.integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def saved_model(tmp_path):
    """A 3-class softmax GAP model saved as .keras."""
    path = tmp_path / "model.keras"
    gap_model(num_classes=3).save(path)
    return str(path)


@pytest.fixture
def binary_model(tmp_path):
    path = tmp_path / "binary.keras"
    gap_model(num_classes=2).save(path)
    return str(path)


@pytest.fixture
def folder_dataset(tmp_path, rng):
    """data/<class>/<n>.png for classes a, b, c; 4 images each."""
    root = tmp_path / "folders"
    for cls in ("a", "b", "c"):
        for i in range(4):
            write_png(str(root / cls / f"{i}.png"), random_image(rng))
    return str(root)


def make_manifest(root, rng, n=12, num_classes=3, masks=True, extra_rows=()):
    """A CSV manifest with relative image/mask paths, a site column and integer labels."""
    rows = []
    for i in range(n):
        image = f"img/{i:03d}.png"
        write_png(os.path.join(root, image), random_image(rng))
        row = {"id": f"ex{i:03d}", "image": image, "label": i % num_classes, "site": f"s{i % 2}"}
        if masks:
            mask = np.zeros((20, 24), np.uint8)
            mask[5:12, 6:14] = 255
            row["mask"] = f"mask/{i:03d}.png"
            write_png(os.path.join(root, row["mask"]), mask)
        rows.append(row)
    rows.extend(extra_rows)
    path = os.path.join(root, "manifest.csv")
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture
def manifest_dataset(tmp_path, rng):
    return make_manifest(str(tmp_path / "manifest"), rng)


def png_bytes(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class LogLines(logging.Handler):
    """Collects the messages of the records it handles (attach it to a logger in a test)."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())

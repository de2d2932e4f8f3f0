"""The demo: a synthetic scan dataset with a planted shortcut, and a small CNN trained on it.

The story a reviewer should find with the audit:

* 64x64 grayscale "scans" from three sites (``site_a``, ``site_b``, ``site_c``) that differ in
  brightness, contrast and noise. Class ``lesion`` has a bright round blob; ``healthy`` has none.
* At ``site_c`` the lesion is faint, and a small white square sits in the top-left corner of most
  lesion scans (and a few healthy ones). The marker is in no manifest column, so the model's
  reliance on it has to be discovered from its attributions (they land in the corner, not on the
  lesion mask) and from the ``site`` slice.

Layout written by ``make_demo_dataset(root)``::

    root/manifest.csv      id, image, label, mask, site  (paths relative to root)
    root/images/<id>.png   8-bit grayscale (mode L) scans
    root/masks/<id>.png    lesion masks, 255 on the lesion; only lesion rows have one (the mask
                           cell of a healthy row is empty: there is nothing to localise)

Everything comes from ``seed``: the same seed writes byte-identical files and trains identical
weights.
"""
import csv
import os
import time
from typing import Dict, List, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

IMAGE_SIZE = 64
CLASS_NAMES = ("healthy", "lesion")  # sorted, so index 0 = healthy, 1 = lesion (as the audit sorts)

# Site look: background level, texture amplitude, pixel noise, lesion brightness (0..1 scale).
# site_c's lesion is barely above its texture, which is what makes its marker the easier cue.
SITE_LOOKS = {
    "site_a": dict(level=0.35, texture=0.12, noise=0.03, lesion=0.35),
    "site_b": dict(level=0.45, texture=0.16, noise=0.05, lesion=0.30),
    "site_c": dict(level=0.30, texture=0.10, noise=0.06, lesion=0.06),
}
SHORTCUT_SITE = "site_c"
MARKER_RATE = {"lesion": 0.90, "healthy": 0.05}  # P(marker | label) at the shortcut site only
MARKER_BOX = (slice(2, 7), slice(2, 7))  # 5x5 px near the top-left corner
LESION_RADIUS = (5.0, 9.0)
LESION_CENTRE_MARGIN = 14  # keeps blobs clear of the corners (and of the marker)
MANIFEST_COLUMNS = ["id", "image", "label", "mask", "site"]


# --------------------------------------------------------------------------- dataset


def _background(rng: np.random.Generator, look: dict) -> np.ndarray:
    """Smooth random texture (an upsampled coarse noise field) plus per-pixel noise."""
    coarse = rng.normal(0.0, 1.0, (8, 8)).astype(np.float32)
    # Upsample in float ("F" mode) so the texture is smooth before it is quantised to 8 bits.
    smooth = np.asarray(Image.fromarray(coarse, mode="F").resize((IMAGE_SIZE,) * 2, Image.BICUBIC))
    smooth = smooth / (np.abs(smooth).max() + 1e-6)
    noise = rng.normal(0.0, look["noise"], (IMAGE_SIZE, IMAGE_SIZE))
    return look["level"] + look["texture"] * smooth + noise


def _lesion(rng: np.random.Generator, look: dict) -> Tuple[np.ndarray, np.ndarray]:
    """A soft-edged bright disc (additive brightness) and its ground-truth mask."""
    radius = rng.uniform(*LESION_RADIUS)
    cy, cx = rng.uniform(LESION_CENTRE_MARGIN, IMAGE_SIZE - LESION_CENTRE_MARGIN, 2)
    yy, xx = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    distance = np.hypot(yy - cy, xx - cx)
    profile = 1.0 / (1.0 + np.exp(distance - radius))  # ~1 inside, fades over ~2 px at the rim
    brightness = look["lesion"] * rng.uniform(0.8, 1.2)
    return brightness * profile, distance <= radius


def paint_marker(pixels: np.ndarray) -> np.ndarray:
    """A copy of ``pixels`` (uint8 or 0..1 float, H x W [x C]) with the corner marker stamped on."""
    out = pixels.copy()
    out[MARKER_BOX] = 255 if out.dtype == np.uint8 else 1.0
    return out


def erase_marker(pixels: np.ndarray) -> np.ndarray:
    """A copy with the marker box filled by the mean of the 1-px frame around it.

    The texture is smooth at that scale, so this is a fair stand-in for the hidden background.
    """
    out = pixels.copy()
    rows, cols = MARKER_BOX
    frame = pixels[rows.start - 1 : rows.stop + 1, cols.start - 1 : cols.stop + 1]
    frame = frame.astype(np.float64)
    border = np.ones(frame.shape[:2], bool)
    border[1:-1, 1:-1] = False
    fill = frame[border].mean(axis=0)
    out[MARKER_BOX] = np.round(fill) if out.dtype == np.uint8 else fill
    return out


def render_demo_image(
    rng: np.random.Generator, site: str, label: str
) -> Tuple[np.ndarray, np.ndarray, bool]:
    """One scan as uint8 [64, 64], its bool lesion mask, and whether the corner marker is on it."""
    look = SITE_LOOKS[site]
    image = _background(rng, look)
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
    if label == "lesion":
        blob, mask = _lesion(rng, look)
        image = image + blob
    # Draw unconditionally so every example consumes the same random numbers whatever its site.
    marker = rng.random() < MARKER_RATE[label] and site == SHORTCUT_SITE
    # Capping scans below white leaves pure white to the marker, so it can be told from pixels.
    pixels = np.round(np.clip(image, 0.0, 0.95) * 255).astype(np.uint8)
    return (paint_marker(pixels) if marker else pixels), mask, marker


def _assignments(rng: np.random.Generator, n_examples: int) -> List[Tuple[str, str]]:
    """(site, label) per example: each of the six combinations equally often, in shuffled order."""
    combos = [(site, label) for site in SITE_LOOKS for label in CLASS_NAMES]
    cycled = [combos[i % len(combos)] for i in range(n_examples)]
    return [cycled[i] for i in rng.permutation(n_examples)]


def make_demo_dataset(root: str, n_examples: int = 480, seed: int = 0) -> str:
    """Writes a deterministic synthetic dataset under `root` and returns the path of its manifest
    CSV (``root/manifest.csv``). Local paths only."""
    rng = np.random.default_rng(seed)
    for folder in ("images", "masks"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    rows = []
    for index, (site, label) in enumerate(_assignments(rng, n_examples)):
        example_id = f"scan_{index:05d}"
        pixels, mask, _ = render_demo_image(rng, site, label)
        image_rel = f"images/{example_id}.png"
        Image.fromarray(pixels, mode="L").save(os.path.join(root, image_rel))
        mask_rel = ""
        if label == "lesion":
            mask_rel = f"masks/{example_id}.png"
            mask_png = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
            mask_png.save(os.path.join(root, mask_rel))
        rows.append(
            {"id": example_id, "image": image_rel, "label": label, "mask": mask_rel, "site": site}
        )
    manifest_path = os.path.join(root, "manifest.csv")
    with open(manifest_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return manifest_path


# --------------------------------------------------------------------------- model


def load_demo_arrays(manifest_path: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels float32 [N, 64, 64, 3] in 0..1 (gray replicated, as the audit decodes them with
    ``--preprocess unit``), class indices [N] and site names [N]."""
    base = os.path.dirname(manifest_path)
    with open(manifest_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    images = [np.asarray(Image.open(os.path.join(base, r["image"])).convert("RGB")) for r in rows]
    pixels = np.stack(images).astype(np.float32) / 255.0
    labels = np.array([CLASS_NAMES.index(r["label"]) for r in rows], np.int64)
    return pixels, labels, np.array([r["site"] for r in rows])


DEMO_POOLINGS = ("max", "average")
EPOCHS = {"max": 20, "average": 40}  # the average-pooling net needs ~35 epochs to leave chance


def build_demo_model(pooling: str = "max") -> keras.Model:
    """Small CNN with named layers.

    ``max`` (the default): conv1..conv3 (16x16) → global max pooling → dense; ``conv3`` is the
    last conv layer (Grad-CAM's usual target). ``average``: one more pooling and ``conv4`` (8x8)
    → global average pooling → dense, the head original CAM needs.
    """
    if pooling not in DEMO_POOLINGS:
        raise ValueError(f"demo pooling {pooling!r} is not one of {DEMO_POOLINGS}")
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), name="scan")
    x = keras.layers.Conv2D(16, 3, activation="relu", padding="same", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(32, 3, activation="relu", padding="same", name="conv2")(x)
    x = keras.layers.MaxPooling2D(name="pool2")(x)
    x = keras.layers.Conv2D(32, 3, activation="relu", padding="same", name="conv3")(x)
    if pooling == "max":
        # "Is there a blob anywhere?" With global average pooling over this 16x16 map the net
        # stayed near chance for 50 epochs, as a lesion is a few percent of the scan.
        x = keras.layers.GlobalMaxPooling2D(name="global_max")(x)
    else:
        # Over an 8x8 map the lesion is a large enough share for average pooling to learn.
        x = keras.layers.MaxPooling2D(name="pool3")(x)
        x = keras.layers.Conv2D(64, 3, activation="relu", padding="same", name="conv4")(x)
        x = keras.layers.GlobalAveragePooling2D(name="global_average")(x)
    outputs = keras.layers.Dense(len(CLASS_NAMES), activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="demo_cnn")


def _has_marker(pixels: np.ndarray) -> np.ndarray:
    """Per image: is the marker box pure white? (Scans are clipped below white, so only it is.)"""
    return np.all(pixels[:, MARKER_BOX[0], MARKER_BOX[1], :] >= 1.0, axis=(1, 2, 3))


def _lesion_probability(model: keras.Model, pixels: np.ndarray) -> np.ndarray:
    if len(pixels) == 0:  # tiny datasets can lack a group; predict() refuses empty input
        return np.zeros(0, np.float32)
    return model.predict(pixels, batch_size=64, verbose=0)[:, CLASS_NAMES.index("lesion")]


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _marker_reliance(
    model: keras.Model, pixels: np.ndarray, labels: np.ndarray, sites: np.ndarray
) -> Dict[str, float]:
    """Counterfactuals at the shortcut site: lesion scans with the marker erased, healthy scans
    with it painted on. Large shifts mean the model reads the marker, not the lesion."""
    at_site = sites == SHORTCUT_SITE
    marked_lesions = pixels[at_site & (labels == 1) & _has_marker(pixels)]
    clean_healthy = pixels[at_site & (labels == 0) & ~_has_marker(pixels)]
    p_as_is = _lesion_probability(model, marked_lesions)
    p_erased = _lesion_probability(model, np.array([erase_marker(p) for p in marked_lesions]))
    p_healthy = _lesion_probability(model, clean_healthy)
    p_painted = _lesion_probability(model, np.array([paint_marker(p) for p in clean_healthy]))
    return {
        "lesion_with_marker_count": int(len(marked_lesions)),
        "lesion_recall_marker_present": _mean(p_as_is >= 0.5),
        "lesion_recall_marker_erased": _mean(p_erased >= 0.5),
        "lesion_mean_probability_marker_present": _mean(p_as_is),
        "lesion_mean_probability_marker_erased": _mean(p_erased),
        "healthy_without_marker_count": int(len(clean_healthy)),
        "healthy_false_positive_rate_as_is": _mean(p_healthy >= 0.5),
        "healthy_false_positive_rate_marker_painted": _mean(p_painted >= 0.5),
    }


def train_demo_model(manifest_path: str, model_path: str, seed: int = 0,
                     pooling: str = "max", epochs: Optional[int] = None) -> dict:
    """Trains a small CNN deterministically on the dataset, saves it as .keras to model_path,
    returns a dict of training figures: train accuracy, seconds, per-site accuracy, and marker
    reliance at site_c (see ``_marker_reliance``). Training takes ~15 s for 480 scans on 2 CPUs
    with max pooling (20 epochs), ~30 s with average pooling (40 epochs).

    Side effects on the calling process: seeds Python/NumPy/TF global RNGs and turns on TF op
    determinism (both are process-wide; that is how Keras makes training repeatable).
    """
    pixels, labels, sites = load_demo_arrays(manifest_path)
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    epochs = epochs or EPOCHS[pooling]
    model = build_demo_model(pooling)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy"
    )
    started = time.perf_counter()
    history = model.fit(pixels, labels, batch_size=32, epochs=epochs, shuffle=True, verbose=0)
    seconds = time.perf_counter() - started
    model.save(model_path)
    correct = (_lesion_probability(model, pixels) >= 0.5) == (labels == 1)
    return {
        "examples": int(len(labels)),
        "epochs": epochs,
        "pooling": pooling,
        "train_seconds": round(seconds, 2),
        "final_loss": float(history.history["loss"][-1]),
        "train_accuracy": float(correct.mean()),
        "site_accuracy": {s: _mean(correct[sites == s]) for s in SITE_LOOKS},
        "site_c_marker_reliance": _marker_reliance(model, pixels, labels, sites),
        "model_path": model_path,
    }

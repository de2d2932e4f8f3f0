"""A real-data example: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, audited
whole (``make example-fashion``; ``python -m beam_pipeline.demo.fashion --help``).

The package ships the 70,000 images as IDX files (60,000 train, 10,000 test; 28x28 grey, 10
classes). Their background is exactly zero, so ``pixels > 0`` is an exact object mask: real data
with masks for free. This module writes them as PNGs with a manifest (id, image, label, mask,
split), trains a small seeded CNN on the train split, audits every image with the default
settings (``split`` as the slice column), and prints the summary and the report's path.
"""
import argparse
import csv
import gzip
import json
import logging
import os
import sys
import time
from typing import List, Optional, Tuple

import numpy as np

DATA_DIR = "/usr/share/datasets/fashion-mnist"
SPLITS = {"train": "train", "test": "t10k"}
CLASS_NAMES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
               "sneaker", "bag", "ankle boot"]  # index order of the labels
LOG = logging.getLogger("xai_audit")


def read_idx(path: str) -> np.ndarray:
    """An IDX file (gzip): unsigned bytes with big-endian dimension sizes in the header."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_split(split: str, data_dir: str = DATA_DIR) -> Tuple[np.ndarray, np.ndarray]:
    prefix = os.path.join(data_dir, SPLITS[split])
    return (read_idx(f"{prefix}-images-idx3-ubyte.gz"), read_idx(f"{prefix}-labels-idx1-ubyte.gz"))


def check_installed(data_dir: str = DATA_DIR) -> None:
    if not os.path.exists(os.path.join(data_dir, "t10k-labels-idx1-ubyte.gz")):
        from ..errors import OptionError

        raise OptionError(
            f"Fashion-MNIST is not in {data_dir}: install Debian's package "
            "(apt-get install dataset-fashion-mnist, or `make example-fashion`).")


def write_manifest(root: str, per_split: Optional[int] = None, data_dir: str = DATA_DIR) -> str:
    """PNG images and masks (pixels > 0) under ``root`` and its manifest.csv; ``per_split``
    keeps the first N images of each split (all when None)."""
    from PIL import Image

    for folder in ("images", "masks"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    rows: List[dict] = []
    for split in SPLITS:
        images, labels = load_split(split, data_dir)
        for index in range(len(images) if per_split is None else min(per_split, len(images))):
            example_id = f"{split}_{index:05d}"
            Image.fromarray(images[index]).save(os.path.join(root, "images", f"{example_id}.png"))
            Image.fromarray(((images[index] > 0) * 255).astype(np.uint8)).save(
                os.path.join(root, "masks", f"{example_id}.png"))
            rows.append({"id": example_id, "image": f"images/{example_id}.png",
                         "label": int(labels[index]), "mask": f"masks/{example_id}.png",
                         "split": split})
    path = os.path.join(root, "manifest.csv")
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "image", "label", "mask", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def train_model(path: str, seed: int = 0, train_images: Optional[int] = None, epochs: int = 2,
                data_dir: str = DATA_DIR) -> dict:
    """A small seeded CNN on the train split (its first ``train_images``), saved to path."""
    import keras

    keras.utils.set_random_seed(seed)
    images, labels = load_split("train", data_dir)
    if train_images is not None:
        images, labels = images[:train_images], labels[:train_images]
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.GlobalMaxPooling2D(name="pool")(x)
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax", name="head")(x))
    model.compile(optimizer=keras.optimizers.Adam(2e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    start = time.perf_counter()
    history = model.fit(images[..., None].astype(np.float32) / 255.0, labels, epochs=epochs,
                        batch_size=128, shuffle=True, verbose=0)
    model.save(path)
    return {"train_seconds": time.perf_counter() - start,
            "train_accuracy": float(history.history["accuracy"][-1])}


def run_example(output: str, per_split: Optional[int] = None, seed: int = 0, epochs: int = 2,
                beam_args=(), data_dir: str = DATA_DIR, train_images: Optional[int] = None) -> int:
    """Manifest, model, audit with the default settings; prints the summary. Returns the audit's
    exit code."""
    from ..job import run as job

    check_installed(data_dir)
    start = time.perf_counter()
    manifest = write_manifest(os.path.join(output, "fashion_data"), per_split, data_dir)
    LOG.info("Fashion-MNIST manifest in %.0f s: %s", time.perf_counter() - start, manifest)
    model_path = os.path.join(output, "fashion_model.keras")
    figures = train_model(model_path, seed, train_images, epochs, data_dir)
    LOG.info("Model trained in %.0f s (train accuracy %.3f)", figures["train_seconds"],
             figures["train_accuracy"])
    audit_dir = os.path.join(output, "audit")
    request = job.AuditRequest(model=model_path, data=manifest, output=audit_dir, seed=seed,
                               class_names=CLASS_NAMES, overwrite=True)
    audit_start = time.perf_counter()
    code = job.run_audit(request, list(beam_args))
    audit_seconds = time.perf_counter() - audit_start
    print(summary_text(audit_dir, audit_seconds))
    return code


def summary_text(audit_dir: str, audit_seconds: float) -> str:
    with open(os.path.join(audit_dir, "run.json")) as handle:
        run = json.load(handle)
    with open(os.path.join(audit_dir, "report", "summary.json")) as handle:
        summary = json.load(handle)
    counts = run["counts"]
    lines = [f"Audited {counts['examples_ok']:,} of {counts['examples_in']:,} images in "
             f"{audit_seconds:.0f} s ({counts['examples_ok'] / audit_seconds:.1f} images/s); "
             f"audit exit code {run['exit_code']}.",
             "Accuracy per split: " + ", ".join(
                 f"{name} {stats['accuracy']:.3f}" for name, stats in summary["slices"].items()
                 if name == "overall" or name.startswith("split="))]
    lines += [f"- {finding}" for finding in summary["findings"]]
    report = os.path.abspath(os.path.join(audit_dir, "report", "index.html"))
    lines.append(f"Compliance report: {report}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="fashion_output")
    parser.add_argument("--per-split", type=int, default=None,
                        help="the first N images of each split (default: all 70,000)")
    parser.add_argument("--train-images", type=int, default=None,
                        help="train on the first N train images (default: all 60,000)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args, beam_args = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from ..errors import AuditError

    try:
        return run_example(args.output, args.per_split, args.seed, args.epochs, beam_args,
                           train_images=args.train_images)
    except AuditError as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())

"""Per-method images/s next to the batched Grad-CAM limit, in one run on one model.

Targets (issue 5): Integrated Gradients ≤ 1.15 × steps × Grad-CAM's time; the layer sweep ≤ 2 ×
a single-layer Grad-CAM. Random weights, random images; nothing is downloaded.

    .venv/bin/python bench/bench_methods.py                       # ResNet50, 224x224, 16 images
    .venv/bin/python bench/bench_methods.py --model small --examples 256
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def _model(kind: str):
    import keras

    if kind == "resnet50":
        return keras.applications.ResNet50(weights=None, classes=2, input_shape=(224, 224, 3)), 224
    inputs = keras.Input((64, 64, 3))
    x = inputs
    for i, filters in enumerate((16, 32, 32)):
        x = keras.layers.Conv2D(filters, 3, activation="relu", padding="same", name=f"conv{i}")(x)
        if i < 2:
            x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x)), 64


def _time(method, images, targets, batch_size: int, rounds: int) -> float:
    """Median seconds over ``rounds`` passes over all images, after one warm-up (the trace)."""
    method(images[:batch_size], targets[:batch_size])
    runs = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(0, len(images), batch_size):
            method(images[i:i + batch_size], targets[i:i + batch_size])
        runs.append(time.perf_counter() - start)
    return float(np.median(runs))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("resnet50", "small"), default="resnet50")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ig-steps", type=int, default=16)
    parser.add_argument("--smoothgrad-samples", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    from beam_pipeline.explain import attribution_methods as am
    from beam_pipeline.explain import explainers, layer_sweep, model_io

    model, size = _model(args.model)
    info = model_io.prepare_classifier(model)
    classifier = explainers.Classifier(model, info.head)
    shape = (size, size, 3)
    layer = model_io.find_layer(model, "auto")
    options = {"ig_steps": args.ig_steps, "smoothgrad_samples": args.smoothgrad_samples}
    methods = {name: am.make_method(name, classifier, shape, layer, options)
               for name in am.ALL_METHODS}
    swept = layer_sweep.sweep_layers(model)
    methods["layer_sweep"] = layer_sweep.GradCAMSweep(classifier, swept, shape)
    rng = np.random.default_rng(0)
    images = rng.random((args.examples, *shape), dtype=np.float32)
    targets = np.full(args.examples, explainers.PREDICTED, np.int32)

    seconds = {name: _time(m, images, targets, args.batch_size, args.rounds)
               for name, m in methods.items()}
    limit = seconds["gradcam"]
    print(f"{args.model}, {args.examples} images, batch {args.batch_size}, "
          f"{len(swept)} layers in the sweep")
    for name, s in seconds.items():
        print(f"  {name:22s} {args.examples / s:8.2f} images/s   {s / limit:6.2f} x Grad-CAM")
    ig_ratio = seconds["integrated_gradients"] / (args.ig_steps * limit)
    sweep_ratio = seconds["layer_sweep"] / limit
    # IG's step is one input gradient: its own limit is saliency's cost, not Grad-CAM's, whose
    # backward pass stops at the last conv layer.
    ig_vs_saliency = seconds["integrated_gradients"] / (args.ig_steps * seconds["saliency"])
    print(f"IG: {ig_vs_saliency:.3f} x steps x saliency (the batched input-gradient limit)")
    print(f"IG: {ig_ratio:.3f} x steps x Grad-CAM (target <= 1.15: "
          f"{'met' if ig_ratio <= 1.15 else 'NOT met'})")
    print(f"sweep: {sweep_ratio:.2f} x Grad-CAM (target <= 2: "
          f"{'met' if sweep_ratio <= 2 else 'NOT met'})")
    print(json.dumps({"model": args.model, "images_per_s": {
        k: round(args.examples / v, 3) for k, v in seconds.items()},
        "ig_per_step_ratio": round(ig_ratio, 3), "sweep_ratio": round(sweep_ratio, 3),
        "ig_per_step_vs_saliency": round(ig_vs_saliency, 3),
        "layers": len(swept)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

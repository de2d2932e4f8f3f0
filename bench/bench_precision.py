"""Grad-CAM path float32 against bfloat16 (``--precision``), back to back in one process.

For each model: the job's own float32 classifier and its ``precision.bfloat16_classifier`` copy,
one ``explainers.GradCAM`` each at the ``auto`` layer, one warm-up call each (the trace), then
``--rounds`` rounds that time float32 and bfloat16 one after the other on the same images, so a
neighbour's load hits both alike. Printed: images/s of each, the ratio per round and its median,
the map agreement (mean Spearman over the images, as the planning check computes it) and the
largest probability difference, and the load average before and after. Random weights, random
images; nothing is downloaded; nothing is timed in a test.

    .venv/bin/python bench/bench_precision.py                       # resnet50 and mobilenetv2
    .venv/bin/python bench/bench_precision.py --models resnet50 --examples 32 --rounds 5
"""
import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

SIZE = 224


def _model(kind: str):
    import keras

    build = {"resnet50": keras.applications.ResNet50,
             "mobilenetv2": keras.applications.MobileNetV2}[kind]
    return build(weights=None, classes=2, input_shape=(SIZE, SIZE, 3))


def _loadavg() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def _seconds(method, images, targets, batch_size: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        method(images[i:i + batch_size], targets[i:i + batch_size])
    return time.perf_counter() - start


def _outputs(method, images, targets, batch_size: int) -> dict:
    parts = [method(images[i:i + batch_size], targets[i:i + batch_size])
             for i in range(0, len(images), batch_size)]
    return {key: np.concatenate([p[key] for p in parts]) for key in ("maps", "probabilities")}


def measure(kind: str, examples: int, batch_size: int, rounds: int) -> dict:
    from beam_pipeline.explain import explainers, model_io, precision

    model = _model(kind)
    info = model_io.prepare_classifier(model)
    low, low_info = precision.bfloat16_classifier(model)
    methods = {}
    pairs = {"float32": (model, info.head), "bfloat16": (low, low_info.head)}
    for name, (m, head) in pairs.items():
        layer_name, layer = model_io.find_layer(m, "auto")
        methods[name] = explainers.GradCAM(explainers.Classifier(m, head), layer, layer_name,
                                           (SIZE, SIZE, 3))
    images = np.random.default_rng(0).uniform(0, 1, (examples, SIZE, SIZE, 3)).astype(np.float32)
    targets = np.full(examples, explainers.PREDICTED, np.int32)
    out = {name: _outputs(method, images, targets, batch_size)  # warm-up: traces both
           for name, method in methods.items()}
    load_before, ratios, seconds = _loadavg(), [], {"float32": [], "bfloat16": []}
    for _ in range(rounds):
        for name, method in methods.items():
            seconds[name].append(_seconds(method, images, targets, batch_size))
        ratios.append(seconds["float32"][-1] / seconds["bfloat16"][-1])
    correlation = precision.map_correlations(
        {"gradcam": out["float32"]}, {"gradcam": out["bfloat16"]})["gradcam"]
    return {
        "model": kind, "examples": examples, "batch_size": batch_size,
        "float32_images_per_s": examples / float(np.median(seconds["float32"])),
        "bfloat16_images_per_s": examples / float(np.median(seconds["bfloat16"])),
        "ratios": [round(r, 3) for r in ratios], "median_ratio": float(np.median(ratios)),
        "map_correlation": correlation,
        "max_probability_diff": float(np.abs(out["float32"]["probabilities"]
                                             - out["bfloat16"]["probabilities"]).max()),
        "loadavg_before": load_before, "loadavg_after": _loadavg(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,mobilenetv2")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"{'model':12} {'f32 img/s':>10} {'bf16 img/s':>11} {'ratio':>6} {'rounds':>20} "
          f"{'map r':>7} {'max dp':>7}  loadavg before / after")
    for kind in args.models.split(","):
        r = measure(kind, args.examples, args.batch_size, args.rounds)
        print(f"{kind:12} {r['float32_images_per_s']:10.1f} {r['bfloat16_images_per_s']:11.1f} "
              f"{r['median_ratio']:6.2f} {str(r['ratios']):>20} {r['map_correlation']:7.4f} "
              f"{r['max_probability_diff']:7.4f}  {r['loadavg_before']} / {r['loadavg_after']}")
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

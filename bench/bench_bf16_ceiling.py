"""What bfloat16 can give on this CPU at all, without xai-audit: a plain Keras ResNet50
(weights=None, classes=2, 224x224) built under float32, ``mixed_bfloat16`` and ``bfloat16``
policies with the same weights, and a minimal Grad-CAM (gradient of the class-1 logit at
``conv5_block3_out``) in one ``tf.function`` each, timed back to back. Compare its ratio with
``bench_precision.py``'s (the job's own bfloat16 path) to see what the job's path costs.

    .venv/bin/python bench/bench_bf16_ceiling.py [--batch-size 16] [--rounds 4]
"""
import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def build(policy: str):
    import keras

    keras.config.set_dtype_policy(policy)
    try:
        return keras.applications.ResNet50(weights=None, classes=2, classifier_activation=None)
    finally:
        keras.config.set_dtype_policy("float32")


def gradcam_fn(model):
    import keras
    import tensorflow as tf

    sub = keras.Model(model.inputs, [model.get_layer("conv5_block3_out").output, model.output])

    @tf.function
    def gradcam(images):
        with tf.GradientTape() as tape:
            act, logits = sub(images)
            tape.watch(act)
            score = tf.reduce_sum(logits[:, 1])
        grads = tape.gradient(score, act)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        return tf.cast(tf.nn.relu(tf.reduce_sum(weights * act, -1)), tf.float32)
    return gradcam


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    import tensorflow as tf

    reference = build("float32")
    models = {"float32": reference}
    for policy in ("mixed_bfloat16", "bfloat16"):
        models[policy] = build(policy)
        models[policy].set_weights(reference.get_weights())
    images = tf.constant(np.random.RandomState(0).rand(args.batch_size, 224, 224, 3), tf.float32)
    fns = {name: gradcam_fn(model) for name, model in models.items()}
    maps = {name: fn(images).numpy() for name, fn in fns.items()}  # warm-up (trace)
    rates = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(images).numpy()
            rates[name].append(args.batch_size / (time.perf_counter() - start))
    with open("/proc/loadavg") as handle:
        load = handle.read().split()[:3]
    base = float(np.median(rates["float32"]))
    for name, values in rates.items():
        r = np.corrcoef(maps["float32"].ravel(), maps[name].ravel())[0, 1]
        print(f"{name:15s} {np.median(values):6.1f} images/s  {np.median(values) / base:4.2f}x "
              f"float32  map r {r:.4f}")
    print("load average after:", " ".join(load))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""The default quality checks' fixed cost on one model, wall clock and CPU time, in-process.

    .venv/bin/python bench/bench_quality_cost.py --model resnet50 --examples 16

Builds the bench model (``bench_job.build_model``: ResNet50(weights=None, classes=2) at 224²,
or the small CNN), then times the job's own quality-check calls on random images:

* faithfulness: ``quality.deletion_insertion_of_maps`` of a Grad-CAM map set and a random map
  set (the default audit's two) at the default steps (``cost.FAITHFULNESS_STEPS``), on
  ``--examples`` images, extrapolated linearly to ``cost.DEFAULT_FAITHFULNESS_SAMPLE`` (the
  passes go through the model in full chunks of ``--batch-size``, so the cost is linear);
* sanity: ``quality.cascading_randomization_of_methods`` with Grad-CAM on
  ``cost.DEFAULT_SANITY_SAMPLE`` images at the job's checkpoints (``cost.sanity_checkpoints``).

For each: model passes, wall seconds, CPU seconds of this process (``time.process_time``, all
threads) and CPU / cores, what the wall clock would be on an idle machine if TensorFlow kept
every core busy. On a shared machine the wall clock is inflated by the neighbours; the CPU time
is much less so. /proc/loadavg is printed before and after.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402

import bench_job  # noqa: E402
from beam_pipeline.job import cost  # noqa: E402
from beam_pipeline.explain import explainers, model_io  # noqa: E402
from beam_pipeline.measures import quality  # noqa: E402


def timed(call):
    wall, cpu = time.perf_counter(), time.process_time()
    out = call()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def loadavg() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("resnet50", "small"), default="resnet50")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    size = bench_job.DEFAULT_SIZE[args.model]
    path = os.path.join(tempfile.mkdtemp(prefix="xai-qcost-"), "model.keras")
    bench_job.build_model(args.model, size, path, 0)
    model = model_io.load_model(path)
    classifier = explainers.Classifier(model, model_io.prepare_classifier(model).head)
    name, layer = model_io.find_layer(model, "auto")
    shape = (size, size, 3)
    images = np.random.default_rng(0).random((max(args.examples, cost.DEFAULT_SANITY_SAMPLE),
                                              *shape), np.float32)
    gradcam = explainers.GradCAM(classifier, layer, name, shape)
    predictor = explainers.Predictor(classifier, shape)
    few = images[: args.examples]
    out = gradcam(few, np.full(len(few), explainers.PREDICTED, np.int32))
    predictor(few[:2])  # trace outside the timing, as the job's worker does in setup
    randoms = np.stack([quality.random_map(i, 0, size, size) for i in range(len(few))])
    print(f"load before: {loadavg()}; {os.cpu_count()} cores", flush=True)
    _, wall, cpu = timed(lambda: quality.deletion_insertion_of_maps(
        predictor, few, [out["maps"], randoms], out["target_class"], batch_size=args.batch_size))
    scale = cost.DEFAULT_FAITHFULNESS_SAMPLE / len(few)
    passes = cost.DEFAULT_FAITHFULNESS_SAMPLE * 2 * 2 * cost.FAITHFULNESS_STEPS
    report("faithfulness", passes, wall * scale, cpu * scale,
           f"measured on {len(few)} examples, x{scale:g}")
    names = [n for n, _ in quality.parameterized_layers(quality.classifier_copy(model)[0])]
    checkpoints = cost.sanity_checkpoints(names)
    sample = images[: cost.DEFAULT_SANITY_SAMPLE]
    _, wall, cpu = timed(lambda: quality.cascading_randomization_of_methods(
        model, {"gradcam": lambda c: explainers.GradCAM(c, *model_io.find_layer(c.model, name)[::-1],
                                                         shape)},
        sample, np.full(len(sample), explainers.PREDICTED, np.int32), 0, layers=checkpoints,
        batch_size=args.batch_size))
    maps = len(sample) * cost.sanity_steps(len(names))
    report("sanity", maps, wall, cpu, f"{len(sample)} examples, {len(names)} layers, clone and "
           "trace included")
    print(f"load after: {loadavg()}")
    return 0


def report(stage: str, passes: int, wall: float, cpu: float, note: str) -> None:
    cores = os.cpu_count() or 1
    print(f"{stage}: {passes:,} passes/maps; wall {wall:.1f} s, CPU {cpu:.1f} s, CPU/{cores} "
          f"cores {cpu / cores:.1f} s ({note})", flush=True)


if __name__ == "__main__":
    sys.exit(main())

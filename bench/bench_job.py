#!/usr/bin/env python
"""Benchmark: the whole audit job against the bare Grad-CAM function, same model, same images.

    .venv/bin/python bench/bench_job.py                      # ResNet50-sized model, 192 images
    .venv/bin/python bench/bench_job.py --model small        # quick run with a small CNN

What is measured (one process; each of --repeats rounds measures both):

* **job**: ``beam_pipeline.job.run.run_audit`` in-process on the local runner, wall-clock around the
  call. This is the whole job: source inspection, model loading (once on the launcher for
  validation and once in the worker's ``DoFn.setup``), tracing of the compiled function, image
  decoding, batching, Grad-CAM, mask agreement, Parquet writing and run.json.
* **bare**: the same model file loaded with ``model_io.load_model`` + ``prepare_classifier`` +
  ``find_layer(model, "auto")``, wrapped in ``explainers.GradCAM``; the same images decoded
  beforehand with ``decode.decode_image`` (outside the timing); one warm-up call (trace); then the
  timed loop over all images in batches of ``--batch-size``.

images/s = examples / seconds. The target is job/bare >= 0.85 on the ResNet50-sized model.
The model has random weights (``weights=None``): nothing is downloaded. The figures are printed
as a table, as one JSON line at the end, and written to ``WORKDIR/bench_result.json``.
Arguments the script does not know are passed to Beam (e.g. ``--direct_num_workers 2``).
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import csv  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

TARGET_RATIO = 0.85
DEFAULT_SIZE = {"resnet50": 224, "small": 64}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Unknown arguments are passed to the Beam pipeline options.",
    )
    parser.add_argument("--examples", type=int, default=960, help="number of images (default 960)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size for both (default 32)")
    parser.add_argument("--model", choices=("resnet50", "small"), default="resnet50",
                        help="resnet50: keras.applications.ResNet50(weights=None, classes=2); "
                             "small: a 3-conv CNN (quick run)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="model input size in pixels (square); default 224 for resnet50, "
                             "64 for small")
    parser.add_argument("--data", choices=("auto", "demo", "synthetic"), default="auto",
                        help="auto: beam_pipeline.demo.data.make_demo_dataset if importable, else "
                             "synthetic PNGs written here")
    parser.add_argument("--source-size", type=int, default=64,
                        help="side of the synthetic PNGs (the job resizes them; default 64)")
    parser.add_argument("--order", choices=("job-first", "bare-first"), default="job-first",
                        help="which measurement runs first in the process (default job-first, so "
                             "the job gets no warm-up from the bare run)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure job and bare this many times each; the round with the "
                             "median ratio is reported (default 1)")
    parser.add_argument("--workdir", default=None,
                        help="where the model, data and outputs go (default: a temp folder, "
                             "deleted afterwards unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workdir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="show the job's INFO log")
    parser.add_argument("--full", action="store_true",
                        help="run the job with its TFMA evaluation, permutation importance, "
                             "faithfulness and sanity checks too")
    args, beam_args = parser.parse_known_args(argv)
    if args.image_size is None:
        args.image_size = DEFAULT_SIZE[args.model]
    if args.examples < 1 or args.batch_size < 1 or args.repeats < 1:
        parser.error("--examples, --batch-size and --repeats must be positive")
    return args, beam_args


def quiet_logs(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("apache_beam", "absl", "tensorflow", "h5py"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("xai_audit").setLevel(logging.INFO if verbose else logging.WARNING)


def import_tensorflow(verbose: bool):
    """Import TF (and Keras) with file descriptor 2 muted unless --verbose.

    TF 2.21 prints its oneDNN / CUDA notices through absl before TF_CPP_MIN_LOG_LEVEL can apply;
    an import error still surfaces (its traceback is printed after stderr is restored).
    """
    if verbose:
        import tensorflow as tf
        return tf
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow as tf
        import keras  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return tf


# --------------------------------------------------------------------------- model and data


def build_model(kind: str, size: int, path: str, seed: int) -> str:
    import keras

    keras.utils.set_random_seed(seed)
    if kind == "resnet50":
        model = keras.applications.ResNet50(
            weights=None, classes=2, input_shape=(size, size, 3), classifier_activation="softmax"
        )
    else:
        inputs = keras.Input((size, size, 3), name="image")
        x = keras.layers.Conv2D(16, 3, activation="relu", padding="same", name="conv1")(inputs)
        x = keras.layers.MaxPooling2D(name="pool1")(x)
        x = keras.layers.Conv2D(32, 3, activation="relu", padding="same", name="conv2")(x)
        x = keras.layers.MaxPooling2D(name="pool2")(x)
        x = keras.layers.Conv2D(64, 3, activation="relu", padding="same", name="conv3")(x)
        x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
        outputs = keras.layers.Dense(2, activation="softmax", name="predictions")(x)
        model = keras.Model(inputs, outputs, name="bench_small_cnn")
    model.save(path)
    params = int(model.count_params())
    del model
    gc.collect()
    return params


def make_synthetic_dataset(root: str, n: int, seed: int, side: int) -> str:
    """RGB PNGs of smooth random texture plus noise; columns id,image,label,site."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rows = []
    for i in range(n):
        coarse = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BILINEAR), np.float32)
        pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
        rel = f"images/img_{i:05d}.png"
        Image.fromarray(pixels).save(os.path.join(root, rel))
        rows.append({"id": f"img_{i:05d}", "image": rel, "label": f"class_{i % 2}",
                     "site": f"site_{'abc'[i % 3]}"})
    manifest = os.path.join(root, "manifest.csv")
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "image", "label", "site"],
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def make_dataset(root: str, n: int, seed: int, which: str, side: int):
    """(manifest path, description)."""
    if which in ("auto", "demo"):
        try:
            from beam_pipeline.demo.data import make_demo_dataset
        except ImportError as exc:
            if which == "demo":
                raise SystemExit(f"--data demo: beam_pipeline.demo.data is not importable ({exc})")
        else:
            return make_demo_dataset(root, n, seed), "beam_pipeline.demo.data (64x64 gray scans + masks)"
    return (make_synthetic_dataset(root, n, seed, side),
            f"synthetic ({side}x{side} RGB PNGs, no masks)")


def manifest_images(manifest: str):
    base = os.path.dirname(manifest)
    with open(manifest, newline="") as handle:
        return [os.path.join(base, row["image"]) for row in csv.DictReader(handle)]


# --------------------------------------------------------------------------- measurements


def measure_job(model_path: str, manifest: str, output: str, batch_size: int, beam_args,
                full: bool = False):
    from beam_pipeline.job.run import AuditRequest, run_audit
    from beam_pipeline.beam.pipeline import clear_shared_models
    from beam_pipeline.io.runinfo import read_json

    # The Grad-CAM job (issue 2's target); --full adds TFMA and permutation importance, which do
    # work the bare function does not.
    extra = {} if full else {"tfma_config": "none", "permutation_features": "none",
                             "faithfulness_sample": 0, "sanity_sample": 0}
    req = AuditRequest(model=model_path, data=manifest, output=output, batch_size=batch_size,
                       overwrite=True, **extra)  # every round replaces the previous one
    clear_shared_models()  # every round pays for its own model load and trace, as a fresh job does
    start = time.perf_counter()
    code = run_audit(req, list(beam_args))
    wall = time.perf_counter() - start
    run = read_json(os.path.join(output, "run.json"))
    if code != 0:
        print(f"warning: run_audit returned exit code {code}", file=sys.stderr)
    return wall, code, run


def measure_bare(model_path: str, images, batch_size: int):
    from beam_pipeline.io import decode
    from beam_pipeline.explain import explainers, model_io

    start = time.perf_counter()
    model = model_io.load_model(model_path)
    info = model_io.prepare_classifier(model)
    layer_name, layer = model_io.find_layer(model, "auto")
    shape = (info.height, info.width, info.channels)
    explainer = explainers.GradCAM(explainers.Classifier(model, info.head), layer, layer_name, shape)
    load_s = time.perf_counter() - start

    # Decoded exactly as the job decodes them (resize to the model input, /255), outside the timing.
    spec = decode.ImageSpec(info.height, info.width, info.channels, "unit")
    start = time.perf_counter()
    pixels = []
    for path in images:
        with open(path, "rb") as handle:
            pixels.append(decode.decode_image(handle.read(), spec))
    pixels = np.stack(pixels)
    decode_s = time.perf_counter() - start

    warm = pixels[:batch_size]
    start = time.perf_counter()
    explainer(warm, np.full(len(warm), explainers.PREDICTED, np.int32))
    warmup_s = time.perf_counter() - start

    n = len(pixels)
    batch_s = []
    start = time.perf_counter()
    for lo in range(0, n, batch_size):
        t0 = time.perf_counter()
        batch = pixels[lo:lo + batch_size]
        out = explainer(batch, np.full(len(batch), explainers.PREDICTED, np.int32))
        batch_s.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "images_per_s": n / seconds,
        "model_load_s": load_s,
        "predecode_s": decode_s,
        "warmup_trace_s": warmup_s,
        "batches": len(batch_s),
        "batch_s_median": float(np.median(batch_s)),
        "tracing_count": explainer.tracing_count(),
        "layer": layer_name,
        "map_shape": list(out["maps"].shape[1:]),
    }


class OtherLoad:
    """CPU time used by *other* processes while measuring (Linux /proc/stat), as a share of the
    machine: a busy neighbour makes the figures noisy, so the report flags it."""

    def __init__(self):
        self.start = self._snapshot()

    @staticmethod
    def _snapshot():
        try:
            with open("/proc/stat") as handle:
                fields = [int(v) for v in handle.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle, iowait
        own = os.times()
        return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.perf_counter()

    def share(self):
        end = self._snapshot()
        if not self.start or not end:
            return None
        wall = end[2] - self.start[2]
        others = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return max(0.0, others / (wall * (os.cpu_count() or 1)))


# --------------------------------------------------------------------------- report


def job_breakdown(wall: float, run: dict) -> dict:
    timings = run.get("timings_s", {})
    counters = run.get("beam_counters", {})
    pipeline_s = timings.get("pipeline_s")
    launcher_s = sum(v for k, v in timings.items() if k != "pipeline_s")
    return {
        "wall_s": wall,
        "pipeline_s": pipeline_s,
        "inspect_data_s": timings.get("inspect_data_s"),
        "inspect_model_s": timings.get("inspect_model_s"),
        "outside_pipeline_s": wall - (pipeline_s or 0.0) - launcher_s,
        "decode_msecs_sum_s": counters.get("decode_usecs_sum", 0) / 1e6,
        "explain_batch_msecs_sum_s": counters.get("explain_batch_msecs_sum", 0) / 1000.0,
        "batches": counters.get("batches"),
        "counts": run.get("counts", {}),
        # The cost model's passes per stage and the busy seconds workers spent in each.
        "cost": run.get("cost", {}),
    }


def print_report(result: dict) -> None:
    job, bare = result["job"], result["bare"]
    rows = [
        ("model", f"{result['model']} ({result['params']:,} params, "
                  f"{result['image_size']}x{result['image_size']} input)"),
        ("data", result["data"]),
        ("examples", result["examples"]),
        ("batch size", result["batch_size"]),
        ("job images/s", f"{job['images_per_s']:.2f}  ({job['wall_s']:.1f} s wall; "
                         f"pipeline_s {job['pipeline_s']:.1f} s -> "
                         f"{job['pipeline_images_per_s']:.2f} images/s)"),
        ("bare images/s", f"{bare['images_per_s']:.2f}  ({bare['seconds']:.1f} s, "
                          f"after a {bare['warmup_trace_s']:.1f} s warm-up/trace)"),
        ("ratio job/bare", f"{result['ratio']:.3f}  (pipeline_s only: "
                           f"{result['ratio_pipeline']:.3f})"),
        ("target", f">= {TARGET_RATIO} on the ResNet50-sized model: "
                   + ("met" if result["target_met"] else "NOT met")
                   + ("" if result["model"] == "resnet50" else " (informative only here)")),
    ]
    if result["repeats"] > 1:
        rows.append(("all rounds", "ratios " + ", ".join(f"{r:.3f}" for r in
                                                          result["ratios_all_rounds"])
                     + " (median round shown)"))
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print()
    print("job time breakdown (s):")
    print(f"  launcher: inspect data {job['inspect_data_s']:.2f}, inspect model (load #1) "
          f"{job['inspect_model_s']:.2f}")
    print(f"  pipeline {job['pipeline_s']:.2f}: decode sum {job['decode_msecs_sum_s']:.2f}, "
          f"explain batches sum {job['explain_batch_msecs_sum_s']:.2f} "
          f"({job['batches']} batches; the first includes the trace), rest (worker model "
          f"load #2 in setup, shuffles, Parquet) "
          f"{job['pipeline_s'] - job['decode_msecs_sum_s'] - job['explain_batch_msecs_sum_s']:.2f}")
    print(f"  after the pipeline (read-back counts, run.json): {job['outside_pipeline_s']:.2f}")
    cost = job.get("cost") or {}
    for stage, passes in (cost.get("estimate") or {}).items():
        busy = (cost.get("stage_busy_s") or {}).get(stage)
        print(f"  stage {stage}: {passes['forward']:,} forward + {passes['backward']:,} backward "
              f"image passes on {passes['examples']} examples; busy "
              + ("n/a" if busy is None else f"{busy:.2f} s"))
    print(f"  bare: model load {bare['model_load_s']:.2f}, warm-up/trace "
          f"{bare['warmup_trace_s']:.2f}, median batch {bare['batch_s_median']:.3f}")
    share = result["machine"]["other_processes_cpu_share"]
    if share is not None and share > 0.05:
        print(f"note: other processes used {100 * share:.0f}% of the machine's CPU while measuring; "
              "the figures are noisy (re-run on a quiet machine, or use --repeats).")
    print()


def main(argv=None) -> int:
    args, beam_args = parse_args(argv)
    quiet_logs(args.verbose)
    tf = import_tensorflow(args.verbose)

    workdir = args.workdir or tempfile.mkdtemp(prefix="xai-audit-bench-")
    os.makedirs(workdir, exist_ok=True)
    try:
        model_path = os.path.join(workdir, f"{args.model}_{args.image_size}.keras")
        t0 = time.perf_counter()
        params = build_model(args.model, args.image_size, model_path, args.seed)
        build_s = time.perf_counter() - t0
        data_root = os.path.join(workdir, "data")
        shutil.rmtree(data_root, ignore_errors=True)
        t0 = time.perf_counter()
        manifest, data_desc = make_dataset(data_root, args.examples, args.seed, args.data,
                                           args.source_size)
        data_s = time.perf_counter() - t0
        images = manifest_images(manifest)
        print(f"model {model_path} built in {build_s:.1f} s; {len(images)} images "
              f"({data_desc}) written in {data_s:.1f} s", flush=True)

        output = os.path.join(workdir, "audit")
        steps = ["job", "bare"] if args.order == "job-first" else ["bare", "job"]
        n = len(images)
        other_load = OtherLoad()
        rounds = []
        for r in range(args.repeats):
            job = bare = None
            for step in steps:
                print(f"round {r + 1}/{args.repeats}: measuring {step} ...", flush=True)
                if step == "job":
                    wall, code, run = measure_job(model_path, manifest, output, args.batch_size,
                                                  beam_args, full=args.full)
                    job = job_breakdown(wall, run)
                    job["exit_code"] = code
                    job["images_per_s"] = n / job["wall_s"]
                    job["pipeline_images_per_s"] = n / job["pipeline_s"]
                else:
                    bare = measure_bare(model_path, images, args.batch_size)
                gc.collect()
            rounds.append({"job": job, "bare": bare,
                           "ratio": job["images_per_s"] / bare["images_per_s"]})
            print(f"round {r + 1}: job {job['images_per_s']:.2f} images/s, bare "
                  f"{bare['images_per_s']:.2f} images/s, ratio {rounds[-1]['ratio']:.3f}",
                  flush=True)
        others_share = other_load.share()

        # Headline: the round with the median ratio (the only round when --repeats 1).
        median = sorted(rounds, key=lambda item: item["ratio"])[(len(rounds) - 1) // 2]
        job, bare, ratio = median["job"], median["bare"], median["ratio"]
        result = {
            "benchmark": "xai-audit job vs bare GradCAM",
            "model": args.model,
            "params": params,
            "image_size": args.image_size,
            "data": data_desc,
            "examples": n,
            "batch_size": args.batch_size,
            "order": args.order,
            "repeats": args.repeats,
            "beam_args": beam_args,
            "job": job,
            "bare": bare,
            "ratio": ratio,
            "ratio_pipeline": job["pipeline_images_per_s"] / bare["images_per_s"],
            "ratios_all_rounds": [item["ratio"] for item in rounds],
            "rounds": rounds,
            "target_ratio": TARGET_RATIO,
            "target_met": ratio >= TARGET_RATIO,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "tensorflow": tf.__version__,
                        "other_processes_cpu_share": others_share},
            "workdir": workdir,
        }
        print_report(result)
        with open(os.path.join(workdir, "bench_result.json"), "w") as handle:
            json.dump(result, handle, indent=2)
        summary = {k: result[k] for k in ("model", "examples", "batch_size")}
        summary.update(job_images_per_s=round(job["images_per_s"], 3),
                       job_pipeline_s=round(job["pipeline_s"], 3),
                       bare_images_per_s=round(bare["images_per_s"], 3),
                       ratio=round(ratio, 4), target=TARGET_RATIO,
                       target_met=result["target_met"])
        print(json.dumps(summary))
        return 0
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif args.workdir is None:
            print(f"workdir kept: {workdir}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Scale benchmark: does the job's memory stay flat as the dataset grows?

    .venv/bin/python bench/bench_scale.py                          # 2,000 and 20,000 images
    .venv/bin/python bench/bench_scale.py --sizes 500,2000 --keep --workdir /tmp/xai-scale

For each size it generates that many small PNGs (``--side`` 32 px, RGB, seeded noise with a
bright square on the "lesion" class) in a CSV manifest with a ``site`` slice column, and runs the
real job as a user would, ``python -m beam_pipeline.cli run --model M --data manifest.csv
--output OUT`` with the default settings (Grad-CAM, TFMA with the default binary config sliced by
site, permutation importance ``patches:4x4`` x 3 repeats, faithfulness sample 64, sanity sample
32), in a subprocess, on the local FnApiRunner in its default in-memory mode (one worker: the
whole job is one process tree, so its RSS is the job's memory). Extra arguments go to the job
(e.g. ``--direct_num_workers 2 --direct_running_mode multi_processing``).

Measured per size:

* **images/s**: examples / wall-clock seconds of the subprocess (start-up, TF import, model
  loads, the pipeline, read-back and run.json included), and examples / ``timings_s.pipeline_s``
  of run.json (the Beam pipeline alone);
* **peak RSS**: the largest sum of resident set sizes over the job's whole process tree, polled
  from ``/proc`` every ``--poll-s`` (0.1 s), and ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` (the
  largest single process; a cross-check that polling did not miss a peak);
* **output bytes per example**: every file under the output folder, divided by examples in.

The verdict compares the peak RSS of the largest size with the smallest: flat means at most
+10% (``--max-growth``). Figures go to stdout as a table and one JSON line, and to
``WORKDIR/scale_result.json``.
"""
import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2000,20000", help="comma list of dataset sizes")
    parser.add_argument("--side", type=int, default=32, help="image side in pixels [32]")
    parser.add_argument("--workdir", default=None, help="default: a temp folder")
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    parser.add_argument("--poll-s", type=float, default=0.1, help="RSS polling period [0.1]")
    parser.add_argument("--max-growth", type=float, default=0.10,
                        help="allowed peak-RSS growth from the smallest to the largest size [0.10]")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_known_args(argv)


# --------------------------------------------------------------------------- data and model


def make_dataset(root: str, n: int, side: int, seed: int) -> str:
    """n PNGs under root/img/NNN/ and root/manifest.csv (id, image, label, site)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = int(i % 2)
        pixels = rng.integers(0, 120, (side, side, 3), dtype=np.uint8)
        if label:
            r, c = rng.integers(0, side // 2, 2)
            pixels[r:r + side // 3, c:c + side // 3] = 230
        rel = f"img/{i // 1000:03d}/{i:06d}.png"
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        Image.fromarray(pixels).save(os.path.join(root, rel), compress_level=1)
        rows.append({"id": f"ex{i:06d}", "image": rel, "label": label, "site": f"site_{i % 3}"})
    path = os.path.join(root, "manifest.csv")
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_model(path: str, side: int, seed: int) -> str:
    """A small CNN (conv-conv-GAP-dense, two classes, softmax) with seeded random weights."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((side, side, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="head")(x)).save(path)
    return path


# --------------------------------------------------------------------------- measurement


def _tree_rss_bytes(root_pid: int) -> int:
    """Sum of VmRSS over root_pid and all its descendants (from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


def run_job(model: str, manifest: str, output: str, job_args, poll_s: float) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-m", "beam_pipeline.cli", "run", "--model", model, "--data", manifest,
           "--output", output, *job_args]
    log_path = output.rstrip("/") + ".log"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        peak, trace, last = 0, [], -1.0
        while proc.poll() is None:
            rss = _tree_rss_bytes(proc.pid)
            peak = max(peak, rss)
            now = time.perf_counter() - start
            if now - last >= 5:  # a coarse RSS-over-time trace, to see where memory goes
                trace.append((round(now, 1), round(rss / 2**20)))
                last = now
            time.sleep(poll_s)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    with open(os.path.join(output, "run.json")) as handle:
        run = json.load(handle)
    counts = run["counts"]
    return {
        "exit_code": proc.returncode,
        "examples_in": counts["examples_in"],
        "examples_ok": counts["examples_ok"],
        "examples_failed": counts["examples_failed"],
        "accounting_ok": counts["accounting_ok"],
        "seconds": seconds,
        "images_per_s": counts["examples_in"] / seconds,
        "pipeline_s": run["timings_s"]["pipeline_s"],
        "pipeline_images_per_s": counts["examples_in"] / run["timings_s"]["pipeline_s"],
        "peak_tree_rss_mb": peak / 2**20,
        # ru_maxrss of RUSAGE_CHILDREN is the largest of the waited-for children (KiB on Linux);
        # it only rises, so it is meaningful when sizes run in increasing order.
        "max_child_rss_mb": max(after, before) / 1024 if after > before else None,
        "output_bytes_per_example": _folder_bytes(output) / counts["examples_in"],
        "log": log_path,
        "rss_trace_s_mb": trace,
        "command": cmd,
    }


def main(argv=None) -> int:
    args, job_args = parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    workdir = args.workdir or tempfile.mkdtemp(prefix="xai-scale-")
    os.makedirs(workdir, exist_ok=True)
    model = make_model(os.path.join(workdir, "model.keras"), args.side, args.seed)
    results = []
    for n in sizes:
        data_root = os.path.join(workdir, f"data_{n}")
        start = time.perf_counter()
        manifest = (os.path.join(data_root, "manifest.csv")
                    if os.path.exists(os.path.join(data_root, "manifest.csv"))
                    else make_dataset(data_root, n, args.side, args.seed))
        generate_s = time.perf_counter() - start
        output = os.path.join(workdir, f"out_{n}")
        shutil.rmtree(output, ignore_errors=True)
        figures = {"examples": n, "generate_s": generate_s,
                   **run_job(model, manifest, output, job_args, args.poll_s)}
        results.append(figures)
        print(f"{n:>7} examples: exit {figures['exit_code']}, {figures['seconds']:.1f} s, "
              f"{figures['images_per_s']:.1f} images/s ({figures['pipeline_images_per_s']:.1f} in "
              f"the pipeline), peak RSS {figures['peak_tree_rss_mb']:.0f} MB, "
              f"{figures['output_bytes_per_example']:.0f} output bytes/example", flush=True)
    smallest, largest = results[0], results[-1]
    growth = largest["peak_tree_rss_mb"] / smallest["peak_tree_rss_mb"] - 1
    verdict = {"rss_growth": growth, "flat": growth <= args.max_growth,
               "max_growth": args.max_growth, "job_args": job_args, "side": args.side}
    print(f"peak RSS growth {smallest['examples']} → {largest['examples']}: {100 * growth:+.1f}% "
          f"({'flat' if verdict['flat'] else 'NOT flat'}, bound {100 * args.max_growth:+.0f}%)")
    payload = {"results": results, **verdict}
    with open(os.path.join(workdir, "scale_result.json"), "w") as handle:
        json.dump(payload, handle, indent=2)
    print(json.dumps(payload))
    if not args.keep and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if verdict["flat"] else 1


if __name__ == "__main__":
    sys.exit(main())

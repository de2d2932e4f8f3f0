#!/usr/bin/env python
"""What the default audit costs: marginal images/s against bare Grad-CAM, fixed cost per stage,
wall time and peak RSS at n, 2n and 4n images.

    .venv/bin/python bench/bench_cost.py --model small                 # 1,000 / 2,000 / 4,000
    .venv/bin/python bench/bench_cost.py --model resnet50 --sizes 32,64,128 --importance-sample 16
    .venv/bin/python bench/bench_cost.py --model small --sizes 2000 --layout  # one process vs two

Each size runs the real command line in a subprocess (``bench_scale.run_job``: wall clock, peak
RSS of the process tree polled from /proc) with the defaults a user gets, except the options
given here (``--importance-sample`` and anything after ``--``, e.g. ``-- --tfma-config none``).
The bare Grad-CAM function (``bench_job.measure_bare``) is then timed in this process on the
largest size's images. Printed:

* per size: wall s, pipeline s, peak RSS, run.json ``cost.stage_busy_s`` per stage;
* marginal images/s of the audit between consecutive sizes, (n2 - n1) / (wall2 - wall1), and its
  ratio to the bare Grad-CAM images/s. Past the importance sample, importance does not grow, so
  the marginal is the per-example path's (a smaller ``--importance-sample`` does not change it);
* fixed cost per stage at the smallest size: launcher (data and model inspection, TFMA planning
  and read-back), the busy seconds of explain, importance, faithfulness, sanity, and the report
  (``xai-audit report`` re-rendered, timed apart);
* ``--quality-off``: one more run at the smallest size with ``--faithfulness-sample 0
  --sanity-sample 0``, the wall-clock cost of the default quality checks;
* ``--layout``: each size again with ``--direct_num_workers 2 --direct_running_mode
  multi_processing`` and one TensorFlow thread per worker (TF_NUM_INTRAOP_THREADS=1,
  TF_NUM_INTEROP_THREADS=1, OMP_NUM_THREADS=1 in the job's environment, inherited by workers).

/proc/loadavg is printed before and after each run: the machine may be shared. Figures are
printed and written to WORKDIR/cost_result.json; nothing here is a test.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_job  # noqa: E402
import bench_scale  # noqa: E402

SIZES = {"small": "1000,2000,4000", "resnet50": "32,64,128"}
ONE_THREAD = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": "1"}
LAYOUT_ARGS = ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("small", "resnet50"), default="small")
    parser.add_argument("--sizes", default=None, help="comma list, ascending [small: "
                        f"{SIZES['small']}; resnet50: {SIZES['resnet50']}]")
    parser.add_argument("--importance-sample", default=None,
                        help="passed to the job (default: the job's own default)")
    parser.add_argument("--quality-off", action="store_true")
    parser.add_argument("--layout", action="store_true")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("job_args", nargs="*", help="after --: more job options")
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in (args.sizes or SIZES[args.model]).split(",")]
    return args


def loadavg() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def subset_manifest(manifest: str, n: int) -> str:
    """The first n rows of the manifest, beside it (same relative image paths)."""
    with open(manifest, newline="") as handle:
        reader = csv.DictReader(handle)
        rows, fields = list(reader)[:n], reader.fieldnames
    path = os.path.join(os.path.dirname(manifest), f"manifest_{n}.csv")
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


def one_run(model: str, manifest: str, output: str, job_args, env=None) -> dict:
    """bench_scale.run_job plus run.json's timings and per-stage busy seconds."""
    before, saved = loadavg(), dict(os.environ)
    os.environ.update(env or {})  # run_job copies os.environ into the job's environment
    try:
        figures = bench_scale.run_job(model, manifest, output, ["--overwrite", *job_args], 0.1)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    with open(os.path.join(output, "run.json")) as handle:
        run = json.load(handle)
    figures.update(load_before=before, load_after=loadavg(), timings_s=run["timings_s"],
                   stage_busy_s=run["cost"]["stage_busy_s"], estimate=run["cost"]["estimate"])
    print(f"  n={figures['examples_in']}: {figures['seconds']:.1f} s wall, pipeline "
          f"{figures['pipeline_s']:.1f} s, peak RSS {figures['peak_tree_rss_mb']:.0f} MB, busy "
          f"{_busy(figures)}; load {before} -> {figures['load_after']}", flush=True)
    return figures


def _busy(figures: dict) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in (figures["stage_busy_s"] or {}).items()
                     if v is not None)


def report_seconds(output: str) -> float:
    """``xai-audit report OUT`` re-rendered in a fresh process (Python start-up included)."""
    env = dict(os.environ, PYTHONPATH=bench_scale.REPO)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "beam_pipeline.cli", "report", output], env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def marginals(runs, bare_ips: float):
    out = []
    for a, b in zip(runs, runs[1:]):
        ips = (b["examples_in"] - a["examples_in"]) / (b["seconds"] - a["seconds"])
        out.append({"from": a["examples_in"], "to": b["examples_in"], "images_per_s": ips,
                    "ratio_to_bare": ips / bare_ips})
    return out


def fixed_costs(run: dict, report_s: float) -> dict:
    timings, busy = run["timings_s"], run["stage_busy_s"] or {}
    launcher = sum(v for k, v in timings.items() if k != "pipeline_s")
    return {"launcher_s (inspect, TFMA plan/read-back)": launcher,
            **{f"{stage}_busy_s": busy.get(stage) for stage in
               ("explain", "importance", "faithfulness", "sanity")},
            "report_s (re-rendered, own process)": report_s,
            "wall_s": run["seconds"]}


def print_table(result: dict) -> None:
    print(f"\nmodel {result['model']}, job options {result['job_args']}, "
          f"bare Grad-CAM {result['bare_images_per_s']:.2f} images/s")
    print(f"{'layout':<10} {'n':>6} {'wall s':>8} {'pipeline s':>10} {'peak RSS MB':>11}")
    for layout, runs in result["runs"].items():
        for r in runs:
            print(f"{layout:<10} {r['examples_in']:>6} {r['seconds']:>8.1f} {r['pipeline_s']:>10.1f}"
                  f" {r['peak_tree_rss_mb']:>11.0f}")
        for m in marginals(runs, result["bare_images_per_s"]):
            print(f"{layout:<10} marginal {m['from']}->{m['to']}: {m['images_per_s']:.2f} images/s"
                  f" = {m['ratio_to_bare']:.2f}x bare Grad-CAM")
    print("fixed cost at the smallest size (s):")
    for key, value in result["fixed"].items():
        print(f"  {key}: " + ("n/a" if value is None else f"{value:.1f}"))
    if result.get("quality_off"):
        q = result["quality_off"]
        print(f"quality checks off at n={q['examples_in']}: {q['seconds']:.1f} s wall -> default "
              f"faithfulness + sanity cost {result['runs']['default'][0]['seconds'] - q['seconds']:.1f} s")


def main(argv=None) -> int:
    args = parse_args(argv)
    tf = bench_job.import_tensorflow(False)
    workdir = args.workdir or tempfile.mkdtemp(prefix="xai-cost-")
    os.makedirs(workdir, exist_ok=True)
    size = bench_job.DEFAULT_SIZE[args.model]
    model = os.path.join(workdir, f"{args.model}_{size}.keras")
    if not os.path.exists(model):
        bench_job.build_model(args.model, size, model, 0)
    full, _ = bench_job.make_dataset(os.path.join(workdir, "data"), max(args.sizes), 0, "auto", 64)
    job_args = [*(["--importance-sample", args.importance_sample] if args.importance_sample else []),
                "--batch-size", str(args.batch_size), *args.job_args]
    layouts = {"default": ([], None), **({"2 workers": (LAYOUT_ARGS, ONE_THREAD)} if args.layout
                                         else {})}
    runs = {}
    for name, (extra, env) in layouts.items():
        print(f"layout {name}:", flush=True)
        runs[name] = [one_run(model, subset_manifest(full, n), os.path.join(workdir, f"out_{n}"),
                              [*job_args, *extra], env) for n in args.sizes]
    report_s = report_seconds(os.path.join(workdir, f"out_{args.sizes[0]}"))
    quality_off = None
    if args.quality_off:
        print("quality checks off:", flush=True)
        quality_off = one_run(model, subset_manifest(full, args.sizes[0]),
                              os.path.join(workdir, "out_quality_off"),
                              [*job_args, "--faithfulness-sample", "0", "--sanity-sample", "0"])
    images = bench_job.manifest_images(full)
    bare = bench_job.measure_bare(model, images, args.batch_size)
    result = {"model": args.model, "job_args": job_args, "tensorflow": tf.__version__,
              "bare_images_per_s": bare["images_per_s"], "runs": runs,
              "fixed": fixed_costs(runs["default"][0], report_s), "quality_off": quality_off,
              "marginals": {k: marginals(v, bare["images_per_s"]) for k, v in runs.items()}}
    print_table(result)
    with open(os.path.join(workdir, "cost_result.json"), "w") as handle:
        json.dump(result, handle, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())

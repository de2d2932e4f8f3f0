#!/usr/bin/env python
"""How many deletion/insertion steps the faithfulness AUCs need, on the demo model and data.

    .venv/bin/python bench/bench_faithfulness_steps.py [--examples 256] [--steps 16,8,4]

Trains the demo CNN (``beam_pipeline.demo.data``, ~15 s), takes Grad-CAM maps and seeded random maps
of ``--examples`` demo scans, and computes the deletion and insertion AUCs
(``quality.deletion_insertion``) at each step count. Printed per (map, measure, steps): the mean
AUC with its 95% interval (``intervals.mean_interval``), the mean difference to the finest step
count and the largest per-example difference. Fewer steps cut the faithfulness passes in
proportion (2 × steps per map and example); the question is whether the means move by more
than their own sampling interval.
"""
import argparse
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from beam_pipeline.demo import data as demo  # noqa: E402
from beam_pipeline.explain import explainers, model_io  # noqa: E402
from beam_pipeline.measures import intervals, quality  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--steps", default="16,8,4")
    args = parser.parse_args(argv)
    steps = sorted((int(s) for s in args.steps.split(",")), reverse=True)
    work = tempfile.mkdtemp(prefix="xai-steps-")
    manifest = demo.make_demo_dataset(os.path.join(work, "data"), args.examples, seed=0)
    demo.train_demo_model(manifest, os.path.join(work, "demo.keras"), seed=0)
    model = model_io.load_model(os.path.join(work, "demo.keras"))
    info = model_io.prepare_classifier(model)
    classifier = explainers.Classifier(model, info.head)
    images, _, _ = demo.load_demo_arrays(manifest)
    name, layer = model_io.find_layer(model, "auto")
    gradcam = explainers.GradCAM(classifier, layer, name, images.shape[1:])
    out = gradcam(images, np.full(len(images), explainers.PREDICTED, np.int32))
    predictor = explainers.Predictor(classifier, images.shape[1:])
    randoms = np.stack([quality.random_map(i, 0, *images.shape[1:3]) for i in range(len(images))])
    print(f"{len(images)} demo scans, Grad-CAM at {name}; 95% intervals of the means")
    print(f"{'map':<8} {'measure':<10} {'steps':>5} {'mean [95% interval]':>26} "
          f"{'mean diff':>10} {'max |diff|':>10}")
    for label, maps in (("gradcam", out["maps"]), ("random", randoms)):
        aucs = {s: quality.deletion_insertion(predictor, images, maps, out["target_class"],
                                              steps=s) for s in steps}
        for m, measure in enumerate(("deletion", "insertion")):
            finest = aucs[steps[0]][m]
            for s in steps:
                mean, low, high = intervals.mean_interval(aucs[s][m])
                diff = aucs[s][m] - finest
                print(f"{label:<8} {measure:<10} {s:>5} {mean:>8.4f} [{low:.4f}, {high:.4f}]"
                      f" {diff.mean():>+10.4f} {np.abs(diff).max():>10.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

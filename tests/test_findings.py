"""Findings that agree with the figures: each sentence names the slice that is worst by the
measure it states, in the table the page shows; the sanity statement and its chart judge the same
step; sample sizes are stated with their reason; faithfulness comes with a random-map reference
(and a real map beats it where it should); the demo's closing sentences come from its results."""
import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matplotlib.collections import LineCollection, PathCollection

from beam_pipeline.demo import run as demo_job
from beam_pipeline.measures import quality
from beam_pipeline.report import (plots as report_plots, summary as report_summary,
    text as report_text)
from beam_pipeline.io.schemas import SANITY_SCHEMA
from conftest import IMAGE_SIZE, write_png
from helpers import read_outputs, run_cli
from test_quality import checker_images, predictor, quadrant_map, region_model


def _loc_row(name, hit, lift=1.0):
    return {"slice": name, "with_mask": 10, "accuracy": 0.9, "mask_area": 0.1,
            "gradcam": {"pointing_hit": hit, "energy_lift": lift, "mask_energy": 0.1 * lift,
                        "iou": 0.1}}


def _summary(hits, metric_worst="site=site_c"):
    """A hand-built summary: the metrics table's worst slice and a localization table."""
    names = sorted(hits)
    gaps = {"auc": {"worst": metric_worst, "worst_value": 0.6, "best": "site=site_a",
                    "best_value": 0.95, "gap": 0.35}}
    return {
        "identity": {"methods": ["gradcam"]},
        "metrics": {"primary": "auc", "by_column": [
            {"column": "site", "derived": False, "gaps": gaps, "slices": []}]},
        "localization": {"methods": ["gradcam"], "rows": [_loc_row("overall", 0.5)] + [
            _loc_row(n, hits[n]) for n in names]},
        "accounting": {"examples_failed": 0, "examples_in": 30, "errors_by_type": {}},
    }


def test_diffuse_maps_single_out_no_slice():
    """Every slice near 0 on the pointing game (the all-methods demo's Grad-CAM at conv4): the
    alphabetically first slice must not be named as the one that misses the mask."""
    found = report_text.findings(_summary({"site=site_a": 0.0, "site=site_b": 0.0,
                                           "site=site_c": 0.02}))
    assert found[0].startswith("site=site_c does worst")
    loc = [f for f in found if "Grad-CAM" in f]
    assert len(loc) == 1 and "do not find the region anywhere" in loc[0]
    assert not any(f.startswith(("On site=site_a", "site=site_a")) for f in found)


def test_the_named_slice_is_the_lowest_by_the_stated_measure():
    hits = {"site=site_a": 0.9, "site=site_b": 0.8, "site=site_c": 0.05}
    summary = _summary(hits)
    found = report_text.findings(summary)
    loc = next(f for f in found if "pointing-game rate" in f)
    named = loc.split(",")[0][len("On "):]
    rows = [r for r in summary["localization"]["rows"] if r["slice"] != "overall"]
    assert named == min(rows, key=lambda r: r["gradcam"]["pointing_hit"])["slice"]
    assert "5.0%" in loc and "90%" in loc and "site=site_a" in loc
    assert any(f.startswith("site=site_c is both where the model does worst") for f in found)
    # The metrics table names another slice as worst: no "both" sentence.
    found = report_text.findings(_summary(hits, metric_worst="site=site_b"))
    assert not any("is both where" in f for f in found)


def test_tied_worst_slices_are_all_named_and_no_shortcut_claimed():
    found = report_text.findings(_summary({"site=site_a": 0.9, "site=site_b": 0.1,
                                           "site=site_c": 0.1}))
    assert any(f.startswith("On site=site_b and site=site_c,") for f in found)
    assert not any("is both where" in f for f in found)


def test_sanity_statement_and_chart_judge_the_same_step(tmp_path, monkeypatch):
    rows = [{"method": "gradcam", "step": s, "randomized_up_to": f"l{s}", "spearman_mean": rho,
             "spearman_std": 0.1, "examples": n, "sampled": 27, "flagged": False}
            for s, rho, n in ((1, 0.77, 27), (2, 0.4, 14), (3, 0.1, 17))]
    pq.write_table(pa.Table.from_pylist(rows, SANITY_SCHEMA), tmp_path / "sanity.parquet")
    sanity = report_summary.sanity(str(tmp_path), {"options": {"sanity_sample": 32}})
    verdict = sanity["verdicts"]["gradcam"]
    assert sanity["judged_step"] == {"gradcam": 3} and verdict["judged_step"] == 3
    statement = verdict["statement"]
    assert "passes" in statement and "at step 3 of 3" in statement and "0.10" in statement
    assert "17 examples of the 27 sampled" in statement and "--sanity-sample 32" in statement
    assert "10 had a constant map" in statement and "27/14/17" in statement
    figures = []
    monkeypatch.setattr(report_plots, "_figure_uri", lambda fig: figures.append(fig) or "x")
    report_plots.sanity_chart(sanity["curves"], sanity["judged_step"], sanity["threshold"])
    ax = figures[0].axes[0]
    marks = [c for c in ax.collections if isinstance(c, PathCollection)]  # the ringed points
    assert [tuple(p) for m in marks for p in m.get_offsets()] == [(3, 0.1)]
    (threshold,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    (segment,) = threshold.get_segments()
    assert segment[0][0] > 2 and segment[1][0] < 4  # drawn at the judged step only
    assert segment[0][1] == segment[1][1] == quality.SANITY_THRESHOLD


def test_sanity_without_any_defined_correlation_is_not_a_pass(tmp_path):
    rows = [{"method": "gradcam", "step": s, "randomized_up_to": f"l{s}", "spearman_mean": rho,
             "spearman_std": 0.1, "examples": n, "sampled": 9, "flagged": False}
            for s, rho, n in ((1, 0.6, 9), (2, float("nan"), 0))]
    pq.write_table(pa.Table.from_pylist(rows, SANITY_SCHEMA), tmp_path / "sanity.parquet")
    verdict = report_summary.sanity(str(tmp_path))["verdicts"]["gradcam"]
    assert not verdict["judged"] and "cannot be judged" in verdict["statement"]
    assert "passes its sanity check" not in verdict["statement"]
    summary = _summary({"site=site_a": 0.9, "site=site_b": 0.8})
    summary["sanity"] = {"verdicts": {"gradcam": verdict}}
    assert verdict["statement"] in report_text.findings(summary)


def test_random_map_is_seeded_and_a_map_on_the_used_region_beats_it():
    first = quality.random_map("ex1", 0, 4, 5)
    assert first.shape == (4, 5) and np.array_equal(first, quality.random_map("ex1", 0, 4, 5))
    assert not np.array_equal(first, quality.random_map("ex2", 0, 4, 5))
    predict = predictor(region_model())
    images, targets = checker_images(4), np.ones(4, np.int32)
    right = quality.deletion_insertion(predict, images, quadrant_map(4, 0, 0), targets)
    randoms = np.stack([quality.random_map(f"ex{i}", 0, IMAGE_SIZE, IMAGE_SIZE)
                        for i in range(4)])
    random = quality.deletion_insertion(predict, images, randoms, targets)
    assert right[0].mean() < random[0].mean() - 0.1
    assert right[1].mean() > random[1].mean() + 0.1


@pytest.fixture(scope="module")
def region_run(tmp_path_factory):
    """The job on a model that looks only at the top-left quadrant's texture, with Saliency:
    a map that should beat the random one."""
    root = tmp_path_factory.mktemp("region")
    images = checker_images(24, seed=5)
    rows = []
    for i, image in enumerate(images):
        write_png(str(root / "img" / f"{i}.png"), (image * 255).astype(np.uint8))
        rows.append({"id": f"ex{i:02d}", "image": f"img/{i}.png", "label": i % 2})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    region_model().save(root / "m.keras")
    out = root / "out"
    code = run_cli("run", "--model", root / "m.keras", "--data", root / "manifest.csv",
                   "--output", out, "--methods", "saliency", "--faithfulness-sample", "12",
                   "--sanity-sample", "0", "--permutation-features", "none",
                   "--tfma-config", "none",
                   # a hand-built model for faithfulness plumbing, not a trained classifier
                   "--baseline-gates", "off")
    assert code == 0
    return out


def test_random_map_reference_in_attributions_and_report(region_run):
    attributions, _, run = read_outputs(region_run)
    sampled = attributions.saliency_deletion_auc.notna()
    assert 0 < sampled.sum() < len(attributions)
    assert (attributions.random_deletion_auc.notna() == sampled).all()
    assert (attributions.random_insertion_auc.notna() == sampled).all()
    assert run["quality"]["faithfulness_examples"] == sampled.sum()
    assert run["quality"]["faithfulness_sample"] == 12
    with open(os.path.join(region_run, "report", "summary.json")) as handle:
        summary = json.load(handle)
    faith = summary["faithfulness"]
    ref = faith["reference"]
    assert ref["n"] == sampled.sum() == faith["used"] and faith["requested"] == 12
    assert ref["deletion_auc"] == pytest.approx(attributions.random_deletion_auc.mean(), 1e-5)
    saliency = faith["rows"][0]
    assert saliency["deletion_auc"] < ref["deletion_auc"]
    assert saliency["insertion_auc"] > ref["insertion_auc"]
    assert saliency["beats_random"] == "both"
    assert "--faithfulness-sample 12 asked for about 12 of 24" in faith["sample_note"]
    assert any("Saliency beats a random map on both" in f for f in summary["findings"])
    with open(os.path.join(region_run, "report", "index.html")) as handle:
        html = handle.read()
    assert "random map (reference)" in html


def test_a_method_that_does_not_beat_the_random_map_is_a_finding():
    faith = {"rows": [{"method": "saliency", "deletion_auc": 0.930, "insertion_auc": 0.931,
                       "n": 20, "beats_random": "neither"}],
             "reference": {"deletion_auc": 0.925, "insertion_auc": 0.94, "n": 20}}
    (line,) = report_text._faithfulness_findings(faith)
    assert line.startswith("Saliency is no more faithful than a random map on either measure")
    assert "0.930 against 0.925" in line and "0.931 against 0.940" in line


def _site_table(acc, auc, hits):
    sites = ["site_a", "site_b", "site_c"]
    return pd.DataFrame({"examples": [10, 10, 10], "accuracy": acc, "auc": auc,
                         "attention_on_lesion": [0.3, 0.3, 0.3], "pointing_hit_rate": hits},
                        index=pd.Index(sites, name="site"))


def test_demo_closing_sentence_is_computed_from_the_table():
    shortcut = demo_job.site_story(
        _site_table([0.95, 0.93, 0.7], [0.99, 0.98, 0.75], [0.97, 1.0, 0.025]), "gradcam")
    assert shortcut.startswith("site_c has the lowest accuracy, 0.700 against 0.930-0.950")
    assert "only 2% of its lesion scans" in shortcut
    other = demo_job.site_story(
        _site_table([0.6, 0.93, 0.95], [0.7, 0.98, 0.99], [0.9, 0.95, 1.0]), "gradcam")
    assert other.startswith("site_a has the lowest accuracy") and "site_c" not in other
    diffuse = demo_job.site_story(
        _site_table([0.95, 0.93, 0.7], [0.99, 0.98, 0.75], [0.0, 0.02, 0.0]), "gradcam")
    assert "localize nowhere" in diffuse
    tied = demo_job.site_story(  # the 24-scan demo: every site perfect, site_c's maps elsewhere
        _site_table([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]), "gradcam")
    assert tied.startswith("Every site has accuracy 1.000; at site_c")
    assert "only 0% of its lesion scans" in tied and "lowest accuracy" not in tied

"""The demo end to end through the console script: data, training, the real job, outputs as in
DESIGN.md, and the story (the shortcut site's attention misses the lesion)."""
import json
import os
import subprocess
import sys

import pandas as pd

from helpers import BASE_COLUMNS, MASK_COLUMNS, assert_accounting


def test_demo_end_to_end_through_the_cli(tmp_path):
    out = tmp_path / "demo"
    script = os.path.join(os.path.dirname(sys.executable), "xai-audit")
    proc = subprocess.run([script, "demo", "--output", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "attributions" in proc.stdout and "site_c" in proc.stdout
    report_path = out / "report" / "index.html"
    assert proc.stdout.strip().splitlines()[-1].endswith(str(report_path))

    attributions = pd.read_parquet(out / "attributions")
    errors = pd.read_parquet(out / "errors")
    run = json.loads((out / "run.json").read_text())
    manifest = pd.read_csv(out / "demo_data" / "manifest.csv", dtype=str)
    assert set(attributions.columns) == BASE_COLUMNS | MASK_COLUMNS | {"site"}
    assert_accounting(attributions, errors, manifest.id)
    assert list(errors.error_type) == ["corrupt_image"] and errors.stage[0] == "decode"
    assert run["counts"]["examples_in"] == 481 and run["counts"]["accounting_ok"]
    assert run["model"]["gradcam_layer"] == "conv3"
    # The planted shortcut fails the demo's slice-gap gate: the audit exits 3, the demo 0.
    assert run["exit_code"] == 3
    failed = [g for g in run["gates"] if not g["passed"]]
    assert failed and all(g["gate"] == "max_slice_gap" for g in failed)
    # The demo's model works: it passes the default baseline gates.
    assert {g["gate"] for g in run["gates"] if g["passed"]} >= {"better_than_chance",
                                                                 "not_degenerate"}
    assert all(g["slice"].startswith("site=site_c vs ") for g in failed)
    metrics = run["tfma"]["metrics"]
    assert metrics["site=site_c"]["auc"] < metrics["site=site_a"]["auc"]
    assert {"attention_on_mask=high", "prediction_correct=false"} <= set(metrics)
    assert (out / "tfma").is_dir()

    # Permutation importance: the lesion's central region and the marker's corner stand out.
    summary = pd.read_parquet(out / "importance_summary.parquet")
    raw = pd.read_parquet(out / "importance")
    assert set(raw.metric) == {"accuracy", "log_loss", "auc"} and raw.n.sum() > 0
    accuracy = summary[summary.metric == "accuracy"].set_index("feature").importance
    centre = ["patch_r1_c1", "patch_r1_c2", "patch_r2_c1", "patch_r2_c2"]
    border = [f for f in accuracy.index if f not in centre and f != "patch_r0_c0"]
    assert accuracy[centre].min() > accuracy[border].median()
    assert accuracy["patch_r0_c0"] > accuracy[border].max()
    assert "Permutation importance" in proc.stdout

    lesions = attributions[attributions.gradcam_mask_energy.notna()]
    hit_rate = lesions.groupby("site").gradcam_pointing_hit.mean()
    assert hit_rate["site_a"] > 0.8 and hit_rate["site_b"] > 0.8
    assert hit_rate["site_c"] < 0.3  # the shortcut: attention on the corner marker
    accuracy = (attributions.label == attributions.predicted_class).mean()
    assert accuracy > 0.9

    # The report names the shortcut site as the problem, in words and pictures.
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["verdict"]["status"] == "failed"
    assert summary["findings"][0].startswith("site=site_c does worst")
    assert any(f.startswith("site=site_c is both where the model does worst")
               for f in summary["findings"])
    assert summary["galleries"][0]["slice"] == "site=site_c"
    html = report_path.read_text()
    assert html.count('<figure class="thumb">') >= 30 and "map only" not in html


def test_demo_without_masks_still_points_at_site_c_corner(tmp_path):
    """With the mask column dropped, the attention regions, the mean maps per site and the
    per-site permutation importance each name site_c's top-left corner (issue 15)."""
    out = tmp_path / "demo"
    script = os.path.join(os.path.dirname(sys.executable), "xai-audit")
    proc = subprocess.run([script, "demo", "--output", str(out), "--no-masks"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    attributions = pd.read_parquet(out / "attributions")
    run = json.loads((out / "run.json").read_text())
    assert not run["data"]["has_masks"] and not (set(attributions.columns) & MASK_COLUMNS)
    assert "attention_on_mask=high" not in run["tfma"]["metrics"]
    assert "attention_region=r0_c0" in run["tfma"]["metrics"]  # a TFMA slice without masks

    summary = json.loads((out / "report" / "summary.json").read_text())
    # 1. The mean map of predicted lesions peaks top left at site_c, elsewhere not.
    lesion = [m for m in summary["attention"]["maps"] if m["class_name"] == "lesion"]
    peaks = {m["slice"]: m["peak_region"] for m in lesion}
    assert peaks["site=site_c"] == "r0_c0"
    assert peaks["site=site_a"] != "r0_c0" and peaks["site=site_b"] != "r0_c0"
    # 2. The region finding names site_c and r0_c0.
    found = summary["attention"]["region_findings"]
    assert [(f["slice"], f["region"]) for f in found] == [("site=site_c", "r0_c0")]
    assert any(f.startswith("At site=site_c, ") and "peak in r0_c0 (top left)" in f
               for f in summary["findings"])
    # 3. Per-site importance: the corner ranks first at site_c only.
    by_slice = pd.read_parquet(out / "importance_by_slice.parquet")
    accuracy = by_slice[(by_slice.metric == "accuracy") & by_slice.feature.str.startswith("patch_")]
    tops = accuracy.sort_values("importance").groupby("slice").feature.last()
    assert tops["site=site_c"] == "patch_r0_c0"
    assert tops["site=site_a"] != "patch_r0_c0" and tops["site=site_b"] != "patch_r0_c0"
    assert any(f.startswith("At site=site_c, shuffling patch_r0_c0 (top left) costs the most")
               for f in summary["findings"])
    html = (out / "report" / "index.html").read_text()
    assert 'alt="patch importance heatmap at site=site_c"' in html
    assert "Attention by slice" in html
    assert "site=site_c" in proc.stdout and "patch_r0_c0" in proc.stdout

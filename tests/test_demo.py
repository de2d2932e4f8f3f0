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

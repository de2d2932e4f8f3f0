"""The compliance report from synthetic output folders (Parquet written with the job's schemas,
no job run): figures, one-class AUCs as n/a, verdict reasons, omitted sections, escaping of user
data, streaming (map columns are read only for the gallery examples), and the size of a
10k-example report. The browser test and the job wiring are in test_report_browser.py."""
import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from beam_pipeline import cli
from beam_pipeline.report import (render as report, gallery as report_gallery,
    glossary as report_glossary, summary as report_summary, text as report_text)
from beam_pipeline.io import runinfo
from beam_pipeline.io.schemas import (ERROR_SCHEMA, IMPORTANCE_SUMMARY_SCHEMA, SANITY_SCHEMA,
                                   attribution_schema)

MAP_SIDE = 8
IMAGE_SIDE = 64


def _gates(slice_gap_failed=True):
    gates = [{"gate": "max_error_rate", "passed": True, "slice": "overall",
              "metric": "error_rate", "value": 0.001, "bound": 0.01}]
    if slice_gap_failed:
        gates.append({"gate": "max_slice_gap", "passed": False, "slice": "site=b vs site=a",
                      "metric": "auc", "value": 0.2, "bound": 0.05,
                      "message": "auc is 0.7000 at site=b and 0.9000 at site=a: a gap of 0.2000"})
    return gates


def write_output(root, n, sites=("a", "b"), class_names=("neg", "pos"), images=True,
                 one_class_site=None, tfma=True, importance=True, sanity=True, errors=1):
    """A finished run's folder: run.json, attributions (n rows, masks, two files), errors,
    importance_summary, sanity; a manifest of real PNGs when ``images``."""
    rng = np.random.default_rng(0)
    os.makedirs(root / "attributions")
    os.makedirs(root / "errors")
    data_dir = root / "data"
    ids = [f"ex{i:05d}" for i in range(n)]
    site = [sites[i % len(sites)] for i in range(n)]
    labels = [1 if s == one_class_site else i % 2 for i, s in enumerate(site)]
    p1 = np.clip(rng.normal(0.5, 0.3, n) + 0.2 * (np.array(labels) - 0.5), 0.01, 0.99)
    if images:
        os.makedirs(data_dir / "img")
        for example_id in ids:
            pixels = rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
            Image.fromarray(pixels).save(data_dir / "img" / f"{example_id}.png")
        with open(data_dir / "manifest.csv", "w") as handle:
            handle.write("id,image,label,site\n")
            for example_id, label, s in zip(ids, labels, site):
                handle.write(f"{example_id},img/{example_id}.png,{label},\"{s}\"\n")
    rows = []
    for i, example_id in enumerate(ids):
        energy = float(rng.uniform(0, 0.2))
        rows.append({
            "example_id": example_id, "label": labels[i], "predicted_class": int(p1[i] > 0.5),
            "probabilities": [float(1 - p1[i]), float(p1[i])], "target_class": int(p1[i] > 0.5),
            "gradcam": rng.random(MAP_SIDE * MAP_SIDE).astype(np.float32).tolist(),
            "gradcam_shape": [MAP_SIDE, MAP_SIDE], "gradcam_layer": "conv",
            "gradcam_deletion_auc": 0.3 if i % 10 == 0 else None,
            "gradcam_insertion_auc": 0.8 if i % 10 == 0 else None,
            "gradcam_mask_energy": energy, "gradcam_pointing_hit": bool(i % 3),
            "gradcam_iou": 0.2, "mask_area": 0.05, "site": site[i],
        })
    schema = attribution_schema({"site": "string"}, True, ["gradcam"], True)
    half = n // 2
    for part, chunk in (("part-0.parquet", rows[:half]), ("part-1.parquet", rows[half:])):
        pq.write_table(pa.Table.from_pylist(chunk, schema), root / "attributions" / part)
    error_rows = [{"example_id": f"bad{i}", "source": f"bad{i}.png", "stage": "decode",
                   "error_type": "corrupt_image", "message": "truncated"} for i in range(errors)]
    pq.write_table(pa.Table.from_pylist(error_rows, ERROR_SCHEMA), root / "errors" / "part-0.parquet")
    if importance:
        features = [f"patch_r{r}_c{c}" for r in range(2) for c in range(2)]
        pq.write_table(pa.Table.from_pylist(
            [{"feature": f, "metric": "accuracy", "importance": 0.1 * (k + 1), "std": 0.01,
              "ci_low": 0.1 * (k + 1) - 0.02, "ci_high": 0.1 * (k + 1) + 0.02, "n": n}
             for k, f in enumerate(features)], IMPORTANCE_SUMMARY_SCHEMA),
            root / "importance_summary.parquet")
    if sanity:
        pq.write_table(pa.Table.from_pylist(
            [{"method": "gradcam", "step": s, "randomized_up_to": f"layer{s}",
              "spearman_mean": 0.9, "spearman_std": 0.05, "examples": 8, "flagged": True}
             for s in (1, 2)], SANITY_SCHEMA), root / "sanity.parquet")
    metrics = {"overall": {"example_count": float(n), "auc": 0.8, "binary_accuracy": 0.75}}
    for s in sites:
        metrics[f"site={s}"] = {
            "example_count": float(site.count(s)),
            "auc": 0.0 if s == one_class_site else {"a": 0.9}.get(s, 0.7),
            "binary_accuracy": {"a": 0.9}.get(s, 0.6),
            "mean_label": 1.0 if s == one_class_site else 0.5}
    run = {
        "tool_version": "0.1.0", "command_line": ["xai-audit", "run"],
        "started_at": "2026-01-01T00:00:00+00:00", "finished_at": "2026-01-01T00:01:00+00:00",
        "status": "failed", "exit_code": 3,
        "model": {"path": "model.keras", "sha256": "ab" * 32, "input_shape": [IMAGE_SIDE, IMAGE_SIDE, 1],
                  "num_classes": len(class_names), "class_names": list(class_names),
                  "gradcam_layer": "conv", "methods": ["gradcam"]},
        "data": {"uri": str(data_dir / "manifest.csv"), "kind": "manifest",
                 "fingerprint": "sha256:00", "labeled": True, "has_masks": True,
                 "slice_columns": {"site": "string"}},
        "runner": {"name": "FnApiRunner (local)"}, "seed": 0,
        "options": {"image_column": "image", "label_column": "label", "mask_column": "mask",
                    "id_column": "id", "faithfulness_sample": 256},
        "libraries": {"python": "3.11"},
        "counts": {"examples_in": n + errors, "examples_ok": n, "examples_failed": errors,
                   "error_rate": errors / (n + errors), "errors_by_type": {"corrupt_image": errors},
                   "accounting_ok": True},
        "tfma": {"metrics": metrics} if tfma else {"skipped_because": "--tfma-config none"},
        "importance": ({"sample": {"requested": 2000, "examples": 2000, "labeled_examples": 50000,
                                   "seed": 0}} if importance
                       else {"skipped_because": "--permutation-features none"}),
        "gates": _gates(),
    }
    (root / "run.json").write_text(json.dumps(run))
    return root


@pytest.fixture
def small_output(tmp_path):
    return write_output(tmp_path / "out", 60, one_class_site="c", sites=("a", "b", "c"))


def test_summary_figures_verdict_and_one_class_auc(small_output):
    path = report.write_report(str(small_output))
    summary = json.loads((small_output / "report" / "summary.json").read_text())
    assert path.endswith("report/index.html") and os.path.exists(path)
    # Verdict: failed, with the gate's reason; the error-rate gate listed as passed.
    verdict = summary["verdict"]
    assert verdict["status"] == "failed" and verdict["exit_code"] == 3
    assert any("Slice gap on auc failed" in r and "site=b" in r for r in verdict["failed"])
    assert any(r.startswith("Error rate passed: 1 of 61") for r in verdict["passed"])
    # site=c holds one class: its AUC is undefined (TFMA's 0 is not shown), and gaps skip it.
    by_site = summary["metrics"]["by_column"][0]
    rows = {r["slice"]: r for r in by_site["slices"]}
    assert rows["site=c"]["metrics"]["auc"] is None and rows["site=c"]["not_applicable"] == ["auc"]
    assert [r["slice"] for r in by_site["slices"]] == ["site=b", "site=a", "site=c"]  # worst first
    assert by_site["gaps"]["auc"] == pytest.approx(
        {"worst": "site=b", "worst_value": 0.7, "best": "site=a", "best_value": 0.9, "gap": 0.2})
    # Accounting and per-slice figures come from the files.
    assert summary["accounting"]["identity_holds"]
    assert summary["accounting"]["errors_by_stage_and_type"] == {"decode / corrupt_image": 1}
    assert summary["slices"]["site=a"]["n"] == 20
    assert summary["localization"]["rows"][0]["slice"] == "overall"
    assert summary["faithfulness"]["rows"][0]["n"] == 6
    np.testing.assert_allclose(summary["importance"]["patch_grid"], [[0.1, 0.2], [0.3, 0.4]])
    assert summary["sanity"]["verdicts"]["gradcam"]["flagged"]
    assert any("fails its sanity check" in f for f in summary["findings"])
    # Galleries: per site, capped, with the images re-read (not map-only).
    assert {g["slice"] for g in summary["galleries"]} == {"site=a", "site=b", "site=c"}
    assert all(len(g["items"]) <= report_gallery.PER_GALLERY for g in summary["galleries"])
    # Both classes of the two-class data get galleries on a slice.
    assert {g["class"] for g in summary["galleries"] if g["slice"] == "site=a"} == {0, 1}
    html = open(path).read()
    assert "Verdict: FAILED" in html and "map only" not in html
    assert "Estimated on 2,000 of 50,000 labeled examples, seeded (--seed 0" in html
    assert re.search(r"<td class=\"text\">site=c</td><td>20</td><td><span class=\"na\">n/a</span>",
                     html)
    assert "No layer sweep" in html  # omitted with a one-line note
    assert "<script" not in html and "http://" not in html and "https://" not in html


def test_importance_sample_sentence():
    sentence = report_text.importance_sample_sentence(
        {"requested": 2000, "examples": 1990, "labeled_examples": 100_000, "seed": 7})
    assert sentence.startswith("Estimated on 1,990 of 100,000 labeled examples, seeded (--seed 7")
    assert report_text.importance_sample_sentence(
        {"requested": "all", "examples": 40, "labeled_examples": 40, "seed": 0}
    ) == "Estimated on every labeled example (40 of 40)."
    # A runner without metrics: the population is unknown.
    assert "on 2,000 labeled" in report_text.importance_sample_sentence(
        {"requested": 2000, "examples": 2000, "labeled_examples": None, "seed": 0})
    assert report_text.importance_sample_sentence(None) is None


def test_sections_without_input_are_omitted_with_a_note(tmp_path):
    out = write_output(tmp_path / "out", 12, tfma=False, importance=False, sanity=False,
                       images=False)
    html = open(report.write_report(str(out))).read()
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["metrics"] is None and summary["importance"] is None
    assert "Sliced metrics were not computed: --tfma-config none." in html
    assert "Permutation importance was not computed: --permutation-features none." in html
    assert "The sanity check was not run" in html
    # The data folder does not exist: thumbnails show the map alone, and the page says why.
    assert "map only" in html and "could not be re-read" in html


def test_user_data_is_escaped(tmp_path):
    evil_site, evil_class = "<script>alert(1)</script>", "<b onmouseover=x>pos</b>"
    out = write_output(tmp_path / "out", 12, sites=(evil_site, "ok"),
                       class_names=("neg", evil_class))
    # The model path also goes into the printed footer, a CSS string inside <style>.
    run = json.loads((out / "run.json").read_text())
    run["model"]["path"] = 'm"}</style><script>alert(2)</script>.keras'
    (out / "run.json").write_text(json.dumps(run))
    html = open(report.write_report(str(out))).read()
    assert html.count("</style>") == 1
    assert '"xai-audit run n/a · model m\\22 }\\3c /style\\3e \\3c script\\3e alert(2)' in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;b onmouseover=x&gt;pos&lt;/b&gt;" in html
    assert "<script" not in html.lower() and "<b onmouseover" not in html
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert f"site={evil_site}" in summary["slices"]  # the JSON keeps the value as it is


def test_maps_are_read_only_for_gallery_examples(small_output, monkeypatch):
    calls = []
    real = runinfo.iter_rows

    def recording(paths, columns, *args):
        calls.append(list(columns))
        return real(paths, columns, *args)

    monkeypatch.setattr(runinfo, "iter_rows", recording)
    picker = report_gallery.GalleryPicker(per_gallery=2)
    run = json.loads((small_output / "run.json").read_text())
    paths = runinfo.parquet_files(str(small_output / "attributions"))
    report_summary.scan_attributions(paths, run, picker)
    assert "gradcam" not in calls[-1]  # the scan reads no map
    wanted = report_gallery.chosen_ids(picker.galleries(["site=a"]))
    maps = report_gallery.read_maps(paths, "gradcam", wanted)
    # Two per gallery, four galleries per class, two classes.
    assert set(maps) == wanted and 0 < len(wanted) <= 2 * 4 * 2
    assert all(m.shape == (MAP_SIDE, MAP_SIDE) for m in maps.values())


def _picked(rows, per_gallery=2):
    """Galleries of one slice "s" from (id, label, prediction, confidence, lift) rows."""
    picker = report_gallery.GalleryPicker(per_gallery=per_gallery)
    for example_id, label, pred, confidence, lift in rows:
        p1 = confidence if pred == 1 else 1 - confidence
        picker.add("s", {"example_id": example_id, "label": label, "predicted_class": pred,
                         "probabilities": [1 - p1, p1], "lift": lift})
    return picker.galleries(["s"])


def test_galleries_per_class_without_repeats_and_the_lift_rule():
    galleries = _picked([
        # class 0: two correct, both with lift >= 1, and one wrong (accuracy 2/3)
        ("a2", 0, 0, 0.6, 1.5), ("a6", 0, 0, 0.9, 1.2), ("a4", 0, 1, 0.7, 3.0),
        # class 1: accuracy 5/6
        ("b0", 1, 1, 0.9, 2.0), ("b1", 1, 1, 0.99, 0.1), ("b5", 1, 1, 0.95, 0.8),
        ("b3", 1, 0, 0.8, 0.3), ("b7", 1, 1, 0.7, 1.1), ("b9", 1, 1, 0.5, 1.05)])
    picked = {(g["class"], g["kind"]): [i["example_id"] for i in g["items"]] for g in galleries}
    assert [g["class"] for g in galleries] == [0] * 4 + [1] * 4  # lowest accuracy first
    assert picked == {
        (0, "most_confident_correct"): ["a6", "a2"], (0, "most_confident_wrong"): ["a4"],
        (0, "least_on_mask"): [], (0, "correct_least_on_mask"): [],
        # the narrowest gallery takes b1 and b5; the others show the next candidates
        (1, "correct_least_on_mask"): ["b1", "b5"], (1, "most_confident_wrong"): ["b3"],
        (1, "most_confident_correct"): ["b0", "b7"], (1, "least_on_mask"): ["b9"]}
    shown = [i for ids in picked.values() for i in ids]
    assert len(shown) == len(set(shown)), "an example repeated on the slice"
    notes = {(g["class"], g["kind"]): g["note"] for g in galleries}
    assert notes[(0, "correct_least_on_mask")] == report_gallery.NONE_NOTES["correct_least_on_mask"]
    assert notes[(0, "least_on_mask")] == report_gallery.ALREADY_SHOWN
    assert notes[(1, "least_on_mask")] is None
    for g in galleries:
        if g["kind"] == "correct_least_on_mask":
            assert all(i["label"] == i["predicted_class"] and i["lift"] < 1 for i in g["items"])
    # Unlabeled: one gallery per predicted class, most confident first.
    unlabeled = _picked([("u0", None, 0, 0.7, None), ("u1", None, 1, 0.9, None),
                         ("u2", None, 1, 0.6, None)])
    assert {(g["class"], g["kind"]): [i["example_id"] for i in g["items"]] for g in unlabeled} \
        == {(1, "most_confident"): ["u1", "u2"], (0, "most_confident"): ["u0"]}


def test_glossary_calibration_finding_and_page_title(tmp_path):
    out = write_output(tmp_path / "out", 40)
    run = json.loads((out / "run.json").read_text())
    calibration = {"overall": 1.1, "site=a": 1.02, "site=b": 1.97}
    for name, value in calibration.items():
        run["tfma"]["metrics"][name].update({"calibration": value, "auc_precision_recall": 0.7})
    (out / "run.json").write_text(json.dumps(run))
    html = open(report.write_report(str(out))).read()
    summary = json.loads((out / "report" / "summary.json").read_text())
    # Calibration outside [0.8, 1.25] is a finding: site=b only.
    found = [f for f in summary["findings"] if f.startswith("Calibration")]
    assert len(found) == 1 and "1.97 on site=b" in found[0] and "site=a" not in found[0]
    # Every metric shown (table headers, localization, faithfulness, sanity, importance) is
    # explained in the glossary, each with its own sentence, none with the unknown fallback.
    glossary = dict(re.findall(r"<dt>([^<]+)</dt><dd>([^<]+)</dd>", html))
    headers = set(re.findall(r'<th title="[^"]+">([^<]+)</th>', html))
    assert {"auc", "binary_accuracy", "calibration", "auc_precision_recall"} <= headers
    expected = headers | {"mask energy", "lift", "pointing game", "IoU", "deletion AUC",
                          "insertion AUC", "permutation importance", "confidence", "examples"}
    assert expected <= set(glossary), expected - set(glossary)
    assert all(text != report_glossary.UNKNOWN for text in glossary.values())
    # The title names the model and the run's date, not the verdict.
    title = re.search(r"<title>(.*)</title>", html).group(1)
    assert title == "model.keras, 2026-01-01: xai-audit report"


def test_calibration_finding_only_outside_the_range():
    def metrics(value):
        cell = {"value": value, "ci_low": None, "ci_high": None}
        return {"overall": {"slice": "overall", "metrics": {"calibration": cell}}, "by_column": []}

    assert report_text.calibration_findings(metrics(0.8)) == []
    assert report_text.calibration_findings(metrics(1.25)) == []
    assert "0.79 on overall" in report_text.calibration_findings(metrics(0.79))[0]
    assert report_text.calibration_findings(None) == []


def test_report_of_ten_thousand_examples_stays_under_5_mb(tmp_path):
    # 40 sites: per-slice tables are capped too (worst first), not only the galleries.
    out = write_output(tmp_path / "out", 10_000, sites=tuple(f"site{k:02d}" for k in range(40)))
    path = report.write_report(str(out))
    size = os.path.getsize(path)
    summary = json.loads((out / "report" / "summary.json").read_text())
    thumbnails = sum(len(g["items"]) for g in summary["galleries"])
    assert size < 5 * 1024 * 1024, f"{size} bytes"
    assert len({g["slice"] for g in summary["galleries"]}) == report_gallery.MAX_SLICES
    by_site = summary["metrics"]["by_column"][0]
    assert len(by_site["slices"]) == report_summary.MAX_SLICE_ROWS
    assert by_site["slices_not_shown"] == 40 - report_summary.MAX_SLICE_ROWS
    assert len(summary["localization"]["rows"]) == 1 + report_summary.MAX_SLICE_ROWS
    assert thumbnails <= (report_gallery.MAX_SLICES * report_gallery.MAX_CLASSES * 4
                          * report_gallery.PER_GALLERY)
    html = open(path).read()
    assert html.count('<figure class="thumb">') == thumbnails and "map only" not in html


def test_cli_report_rerenders_and_refuses_a_folder_without_run_json(small_output, tmp_path,
                                                                    capsys):
    assert cli.main(["report", str(small_output)]) == 0
    assert capsys.readouterr().out.strip().endswith("report/index.html")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["report", str(empty)]) == 1
    err = capsys.readouterr().err
    assert "has no run.json" in err and "Traceback" not in err


def test_small_slices_are_marked_and_left_out_of_gaps(tmp_path):
    out = write_output(tmp_path / "out", 60, sites=("a", "b", "c"), images=False)
    run = json.loads((out / "run.json").read_text())
    run["options"]["min_slice_size"] = 25  # every site has 20 examples
    run["verdict_scope"] = {"statement": "No performance threshold was set: only the default "
                                         "baseline gates and the error rate were checked."}
    (out / "run.json").write_text(json.dumps(run))
    html = open(report.write_report(str(out))).read()
    summary = json.loads((out / "report" / "summary.json").read_text())
    by_site = summary["metrics"]["by_column"][0]
    assert all(r["small"] for r in by_site["slices"]) and by_site["gaps"] == {}
    assert summary["metrics"]["overall"]["small"] is False
    assert 'site=a <span class="na">small</span>' in html
    assert summary["verdict"]["scope"].startswith("No performance threshold was set")
    assert "What this verdict certifies" in html

"""What a person sees on the terminal and where the outputs say things are: the end-of-run
summary (pure, from run.json), progress lines with a total and an ETA, absolute paths in run.json,
a report that re-renders with its thumbnails from any working directory (also for a manifest of
absolute paths run with --allow-paths-outside-data), and the demo at a small size."""
import json
import logging
import os
import re
import subprocess
import sys

import pandas as pd

from beam_pipeline import cli
from beam_pipeline.beam import progress, worker_logs
from beam_pipeline.report import terminal as terminal_summary
from conftest import LogLines, make_manifest


def _run(exit_code=0, gates=None, tfma=None, errors=None):
    return {
        "exit_code": exit_code, "status": "passed" if exit_code == 0 else "failed",
        "counts": {"examples_in": 101, "examples_ok": 100, "examples_failed": 1,
                   "error_rate": 1 / 101, "errors_by_type": errors or {"corrupt_image": 1},
                   "accounting_ok": True},
        "data": {"slice_columns": {"site": "string", "scanner": "string"}},
        "gates": gates or [{"gate": "max_error_rate", "passed": True, "slice": "overall",
                            "metric": "error_rate", "value": 1 / 101, "bound": 0.02}],
        "tfma": tfma or {"metrics": {
            "overall": {"example_count": 100.0, "auc": 0.91, "binary_accuracy": 0.88},
            "site=a": {"example_count": 50.0, "auc": 0.95, "binary_accuracy": 0.9,
                       "mean_label": 0.5},
            "site=b": {"example_count": 50.0, "auc": 0.81, "binary_accuracy": 0.86,
                       "mean_label": 0.5},
            # One class only: TFMA's AUC of 0 is undefined there, not the worst slice.
            "scanner=x": {"example_count": 10.0, "auc": 0.0, "binary_accuracy": 1.0,
                          "mean_label": 1.0},
            "scanner=y": {"example_count": 60.0, "auc": 0.9, "binary_accuracy": 0.87,
                          "mean_label": 0.4},
            "scanner=z": {"example_count": 30.0, "auc": 0.93, "binary_accuracy": 0.9,
                          "mean_label": 0.6},
        }},
    }


def test_summary_of_a_passing_run():
    lines = terminal_summary.summary_lines(_run(), "/abs/out/report/index.html", "/abs/out")
    assert lines[0] == ("Verdict: PASSED (exit 0: every gate passed); 101 examples in, "
                        "100 audited, 1 failed.")
    assert lines[-1] == "Report: /abs/out/report/index.html"
    assert not any("FAILED" in line for line in lines)
    assert "Overall: example_count 100, auc 0.910, binary_accuracy 0.880." in lines
    assert "  site: site=b (auc 0.810, n=50)" in lines
    assert "  scanner: scanner=y (auc 0.900, n=60)" in lines  # not the one-class scanner=x
    assert "Errors by type: corrupt_image 1 (rows in errors/)." in lines
    assert len(lines) <= 20
    equal = _run()
    equal["tfma"]["metrics"]["site=b"]["auc"] = 0.95
    assert "  site: every slice at auc 0.950" in terminal_summary.summary_lines(equal, "r")
    quiet = terminal_summary.summary_lines(_run(), "/abs/out/report/index.html", quiet=True)
    assert quiet == [lines[0], lines[-1]]


def test_summary_of_a_failing_run_names_every_failed_gate():
    gates = [
        {"gate": "max_error_rate", "passed": False, "slice": "overall", "metric": "error_rate",
         "value": 0.2, "bound": 0.01},
        {"gate": "max_slice_gap", "passed": False, "slice": "site=b vs site=a", "metric": "auc",
         "value": 0.14, "bound": 0.05,
         "message": "The auc gap between site=b and site=a is 0.14, above 0.05."},
        {"gate": "tfma_threshold", "passed": True, "slice": "overall", "metric": "auc",
         "value": 0.91, "bound": 0.7},
    ]
    run = _run(exit_code=4, gates=gates, errors={"corrupt_image": 12, "file_not_found": 8,
                                                 "image_too_large": 1})
    lines = terminal_summary.summary_lines(run, None, "/abs/out")
    assert lines[0].startswith("Verdict: FAILED (exit 4: 2 of 3 gates failed)")
    failed = [line for line in lines if line.startswith("  FAILED: ")]
    assert failed == [
        "  FAILED: Error rate failed: 1 of 101 examples could not be audited (20.00%; "
        "allowed 1.00%).",
        "  FAILED: The auc gap between site=b and site=a is 0.14, above 0.05.",
    ]
    assert "Errors by type: corrupt_image 12, file_not_found 8, image_too_large 1 " \
           "(rows in errors/)." in lines
    assert lines[-1] == ("Report: not written (see the log above); re-render it with "
                         "`xai-audit report /abs/out`.")
    broken = _run(exit_code=1, tfma={"error": "TFMA ran but computed no metrics."})
    lines = terminal_summary.summary_lines(broken, "r")
    assert lines[0].startswith("Verdict: FAILED (exit 1: the run could not be completed)")
    assert "  FAILED: the sliced evaluation failed: TFMA ran but computed no metrics." in lines
    skipped = _run(tfma={"skipped_because": "the data has no labels"})
    assert ("Metrics: none (TFMA skipped: the data has no labels)."
            in terminal_summary.summary_lines(skipped, "r"))


def test_progress_line_has_a_total_and_an_eta():
    assert progress.progress_line("Explain", 160, 480, 10.0) == (
        "Explain: 160 of 480 examples (33%), 16.0 images/s, ETA 20 s")
    assert progress.progress_line("Explain", 160, None, 10.0) == (
        "Explain: 160 examples (total unknown), 16.0 images/s")
    # Two worker processes: each plans with its half.
    assert progress.progress_line("Explain", 60, 480, 60.0, workers=2) == (
        "Explain: 60 of 240 examples on this worker (of 480 over 2 processes) (25%), "
        "1.0 images/s, ETA 3 min 00 s")
    assert progress.format_duration(3725) == "1 h 02 min"


def test_stage_progress_logs_start_progress_and_end():
    logger = logging.getLogger("xai_audit")
    collect = LogLines()
    logger.addHandler(collect)
    logger.setLevel(logging.INFO)
    try:
        stage = progress.StageProgress("Explain", 64, every_s=0.0)
        stage.begin()
        stage.add(32)
        stage.add(32)
        stage.add(1)  # past the total: no second end note
        stage.finish()
        sampled = progress.StageProgress("Faithfulness", 10, every_s=60.0)
        sampled.finish()  # never started: no note
        sampled.add(8)
        sampled.finish()  # its sample came out smaller than expected
    finally:
        logger.removeHandler(collect)
    assert collect.lines[0] == "Explain: started (64 examples to go)."
    assert re.fullmatch(r"Explain: 32 of 64 examples \(50%\), [\d.]+ images/s, ETA \d+ s",
                        collect.lines[1])
    assert re.fullmatch(r"Explain: finished, 64 examples in \d+ s \([\d.]+ images/s\)\.",
                        collect.lines[2])
    assert len([line for line in collect.lines if "Explain: finished" in line]) == 1
    assert collect.lines[3] == "Faithfulness: started (10 examples to go)."
    assert re.fullmatch(r"Faithfulness: finished, 8 examples in \d+ s \([\d.]+ images/s\)\.",
                        collect.lines[4])
    assert len(collect.lines) == 5


def _thumbnails(html):
    return html.count('<figure class="thumb">'), html.count("map only")


def test_run_summary_paths_and_thumbnails_from_any_directory(tmp_path, rng, saved_model,
                                                             monkeypatch, capsys):
    """One run from its own directory with relative --model/--data, on a manifest of absolute
    image paths (--allow-paths-outside-data); then the report re-rendered from elsewhere."""
    data = tmp_path / "work" / "data"
    manifest = make_manifest(str(data), rng, n=12)
    frame = pd.read_csv(manifest)
    for column in ("image", "mask"):
        frame[column] = [str(data / path) for path in frame[column]]
    frame.to_csv(manifest, index=False)
    os.replace(saved_model, tmp_path / "work" / "model.keras")
    monkeypatch.chdir(tmp_path / "work")
    logger = logging.getLogger("xai_audit")
    collect = LogLines()
    logger.addHandler(collect)
    try:
        code = cli.main(["run", "--model", "model.keras", "--data", "data/manifest.csv",
                         "--output", "out", "--allow-paths-outside-data",
                         # a random-weight model: this test is about paths, not the verdict
                         "--baseline-gates", "off"])
    finally:
        logger.removeHandler(collect)
    assert code == 0
    out = tmp_path / "work" / "out"
    index = out / "report" / "index.html"
    stdout = capsys.readouterr().out.strip().splitlines()
    assert stdout[-1] == f"Report: {index}" and os.path.isabs(stdout[-1][len("Report: "):])
    assert any(line.startswith("Verdict: PASSED (exit 0") for line in stdout)
    assert "Explain: started (12 examples to go)." in collect.lines
    assert any(line.startswith("Explain: finished, 12 examples in") for line in collect.lines)
    assert any(line.startswith("Permutation importance: finished, 12 examples")
               for line in collect.lines)

    run = json.loads((out / "run.json").read_text())
    assert run["model"]["path"] == "model.keras"
    assert run["model"]["absolute_path"] == str(tmp_path / "work" / "model.keras")
    assert run["data"]["uri"] == "data/manifest.csv"
    assert run["data"]["absolute_uri"] == str(data / "manifest.csv")
    html = index.read_text()
    shown, map_only = _thumbnails(html)
    assert shown > 0 and map_only == 0
    assert f"Images re-read from {data / 'manifest.csv'}." in html
    identity = json.loads((out / "report" / "summary.json").read_text())["identity"]
    # The archived report names the model absolutely, and as typed.
    assert identity["model_path"] == run["model"]["absolute_path"]
    assert identity["model_path_given"] == "model.keras"
    assert "(given as model.keras)" in html

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert cli.main(["report", os.path.join("..", "work", "out")]) == 0
    assert capsys.readouterr().out.strip() == str(index)  # absolute, whatever was typed
    assert _thumbnails(index.read_text()) == (shown, 0)


def test_demo_at_24_examples_exits_0_quietly(tmp_path):
    out = tmp_path / "demo"
    script = os.path.join(os.path.dirname(sys.executable), "xai-audit")
    proc = subprocess.run([script, "demo", "--output", str(out), "--examples", "24", "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    error_gate = next(g for g in run["gates"] if g["gate"] == "max_error_rate")
    assert error_gate["passed"] and run["counts"]["examples_failed"] == 1
    assert run["options"]["max_error_rate"] == 1 / 25
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("Verdict: ")
    assert lines[1] == f"Report: {out / 'report' / 'index.html'}"
    assert "oneDNN" not in proc.stderr  # TensorFlow's start-up lines stay out by default


def _relayed(level, message, location):
    """A worker's record as Beam's local job service relays it (one LogEntry on one line)."""
    from apache_beam.portability.api import beam_fn_api_pb2

    entry = beam_fn_api_pb2.LogEntry(message=message, log_location=location)
    return logging.LogRecord(worker_logs.RELAY_LOGGER, level, __file__, 1, "Worker: %s",
                             (str(entry).replace("\n", " "),), None)


def test_worker_log_lines_are_unpacked_and_beam_notices_dropped():
    logger = logging.getLogger("xai_audit")
    collect = LogLines()
    logger.addHandler(collect)
    logger.setLevel(logging.INFO)
    quiet = worker_logs.WorkerLogFilter()
    try:
        ours = _relayed(logging.INFO, 'Explain: started (20 examples to go "on" this worker).',
                        "/x/beam_pipeline/beam/progress.py:70")
        notice = _relayed(logging.WARNING, "No semi_persistent_directory found: ...",
                          "/x/apache_beam/runners/worker/sdk_worker_main.py:1")
        chatter = _relayed(logging.INFO, "Creating state cache", "/x/apache_beam/a.py:3")
        problem = _relayed(logging.ERROR, "disk full", "/x/apache_beam/io/filebasedsink.py:9")
        assert [quiet.filter(r) for r in (ours, notice, chatter, problem)] == [False] * 4
        assert worker_logs.WorkerLogFilter(keep_everything=True).filter(notice)
    finally:
        logger.removeHandler(collect)
    assert collect.lines == ['Explain: started (20 examples to go "on" this worker).',
                             "Beam worker: disk full"]

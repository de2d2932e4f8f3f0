"""The report of a small real run, opened in headless Chromium (Debian's ``chromium``; ``make
test`` installs it via ``make browser``): the page loads without errors or network requests, the
verdict is in the rendered DOM and visible on the screenshot. Also the job's wiring: the report is
written at the end of every run, and a report failure keeps run.json and exits 5."""
import json
import logging
import os
import re
import subprocess

import numpy as np
import pytest
from PIL import Image

from beam_pipeline import cli, job, report
from conftest import gap_model, make_manifest

CHROMIUM = "/usr/bin/chromium"
# Flags that keep a headless Chromium from touching the network or a profile of its own.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-extensions",
                  "--disable-default-apps"]
VERDICT_RGB = {"passed": (46, 125, 50), "failed": (198, 40, 40)}  # the verdict box's border
PAGE_ERRORS = re.compile(r"Uncaught|CONSOLE[:(]|net::ERR_|Failed to load resource|"
                         r"Not allowed to load", re.I)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A two-class run on 12 masked examples at two sites, every default stage on. The model
    has random weights: useless, so the default baseline gates fail it (exit 3)."""
    root = tmp_path_factory.mktemp("browser")
    model = root / "model.keras"
    gap_model(num_classes=2).save(model)
    manifest = make_manifest(str(root / "data"), np.random.default_rng(7), n=12, num_classes=2)
    out = root / "out"
    code = cli.main(["run", "--model", str(model), "--data", manifest, "--output", str(out)])
    assert code == 3, code
    return out


def _chromium(tmp_path, *args):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `make browser` (part of `make test`) installs it.")
    profile = tmp_path / "chromium-profile"
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=180)


def test_report_of_a_real_run_in_headless_chromium(small_run, tmp_path):
    run = json.loads((small_run / "run.json").read_text())
    index = small_run / "report" / "index.html"
    assert index.exists(), "run_audit writes the report at the end of every run"
    url = index.resolve().as_uri()
    expected = f"Verdict: {run['status'].upper()}"

    dom = _chromium(tmp_path, "--enable-logging=stderr", "--v=0", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert expected in dom.stdout and "Run identity" in dom.stdout
    # A useless model: the rendered verdict box reads FAILED and names the baseline gate.
    box = re.search(r'<div class="verdict failed">(.*?)</section>', dom.stdout, re.S)
    assert run["status"] == "failed" and box, "the verdict box is not FAILED"
    assert "Verdict: FAILED" in box.group(1)
    assert "Better than chance (default gate) failed" in box.group(1)
    assert "No performance threshold was set" in box.group(1)
    assert dom.stdout.count('<figure class="thumb">') > 0
    errors = [line for line in dom.stderr.splitlines() if PAGE_ERRORS.search(line)]
    assert not errors, errors
    sources = re.findall(r'(?:src|href)="([^"]*)"', dom.stdout)
    assert sources and all(src.startswith("data:") for src in sources), "an external resource"

    shot = tmp_path / "report.png"
    proc = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", url)
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape == (2000, 1200, 3)
    assert pixels.std() > 20, "the screenshot is blank"
    # The verdict box is drawn on the first screen, in its status colour.
    top = pixels[:600]
    border = np.all(np.abs(top - VERDICT_RGB[run["status"]]) <= 12, axis=-1)
    assert border.sum() > 500, "the verdict box is not visible at the top of the page"


def test_report_failure_keeps_run_json_and_exits_5(tmp_path, monkeypatch, caplog):
    root = tmp_path / "data"
    manifest = make_manifest(str(root), np.random.default_rng(3), n=6, num_classes=2, masks=False)
    model = tmp_path / "model.keras"
    gap_model(num_classes=2).save(model)

    def broken(output):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "write_report", broken)
    logging.getLogger("xai_audit").addHandler(caplog.handler)
    out = tmp_path / "out"
    request = job.AuditRequest(model=str(model), data=manifest, output=str(out),
                               tfma_config="none", permutation_features="none",
                               faithfulness_sample=0, sanity_sample=0,
                               baseline_gates=False)  # a random model, about the report wiring
    try:
        code = job.run_audit(request, [])
    finally:
        logging.getLogger("xai_audit").removeHandler(caplog.handler)
    assert code == job.EXIT_REPORT == 5
    run = json.loads((out / "run.json").read_text())
    assert run["exit_code"] == 0 and run["counts"]["examples_ok"] == 6
    assert "compliance report could not be written" in caplog.text
    assert "RuntimeError: disk full" in caplog.text
    assert not (out / "report" / "index.html").exists()

"""The audit through Beam's portable job API, with SDK workers in other processes.

Dataflow Runner v2, Flink and Spark run Python through the same protocol: the pipeline is
serialized to a job service and SDK workers in other processes run the DoFns, with no access to
the launcher's memory. Here Beam's local job service and an SDK worker pool run as two separate
processes (free ports, bounded waits, both stopped at the end, with the worker processes the
pool started), the real audit is submitted with ``--runner PortableRunner --environment_type
EXTERNAL``, and its outputs must equal the default runner's: ids, predictions, maps, errors,
TFMA metrics and permutation importance.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from beam_pipeline import cli
from conftest import gap_model, make_manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = 180  # importing Beam on a busy 2-core machine takes a while
RUN_TIMEOUT_S = 900


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def service_env() -> dict:
    """The venv's bin first on PATH (the pool starts workers with ``python`` from PATH) and this
    checkout first on PYTHONPATH, so the workers import the code under test."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    return env


def wait_for_port(port: int, proc: subprocess.Popen, log_path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"service exited ({proc.returncode}): {open(log_path).read()[-3000:]}")
        try:
            with socket.create_connection(("localhost", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"service not listening on {port} after {START_TIMEOUT_S} s: "
                f"{open(log_path).read()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the service's own process group (it and the workers it started), then
    SIGKILL if it is still there after a bounded wait."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def portable_services(tmp_path):
    """(job endpoint, worker pool address, log paths): a local job service and a worker pool,
    each a separate process in its own process group."""
    job_port, pool_port = free_port(), free_port()
    commands = {
        "job_service": ["-m", "apache_beam.runners.portability.local_job_service_main",
                        "--port", str(job_port)],
        "worker_pool": ["-m", "apache_beam.runners.worker.worker_pool_main",
                        "--service_port", str(pool_port)],
    }
    procs, logs = {}, {}
    try:
        for name, args in commands.items():
            logs[name] = tmp_path / f"{name}.log"
            with open(logs[name], "wb") as log:
                procs[name] = subprocess.Popen([sys.executable, *args], env=service_env(),
                                               stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True)
        wait_for_port(job_port, procs["job_service"], logs["job_service"])
        wait_for_port(pool_port, procs["worker_pool"], logs["worker_pool"])
        yield f"localhost:{job_port}", f"localhost:{pool_port}", logs
    finally:
        for proc in procs.values():
            stop(proc)


def read_run(out):
    attributions = pd.read_parquet(out / "attributions").sort_values("example_id")
    errors = pd.read_parquet(out / "errors").sort_values("example_id")
    importance = pd.read_parquet(out / "importance_summary.parquet").sort_values(
        ["feature", "metric"])
    run = json.loads((out / "run.json").read_text())
    return attributions.reset_index(drop=True), errors.reset_index(drop=True), \
        importance.reset_index(drop=True), run


def test_portable_runner_with_external_workers_equals_the_default_runner(
        tmp_path, portable_services):
    job_endpoint, pool, logs = portable_services
    rng = np.random.default_rng(11)
    bad = {"id": "broken", "image": "img/missing.png", "label": 0, "site": "s0"}
    manifest = make_manifest(str(tmp_path / "data"), rng, n=16, num_classes=2,
                             extra_rows=[bad])
    model = tmp_path / "model.keras"
    gap_model(num_classes=2).save(model)
    common = ["run", "--model", str(model), "--data", manifest, "--baseline-gates", "off",
              "--max-error-rate", "0.2", "--batch-size", "5", "--permutation-features",
              "patches:2x2", "--faithfulness-sample", "8", "--sanity-sample", "4"]

    assert cli.main([*common, "--output", str(tmp_path / "default")]) == 0
    # The launcher in its own process too: nothing of this test's memory reaches the workers.
    script = os.path.join(os.path.dirname(sys.executable), "xai-audit")
    proc = subprocess.run(
        [script, *common, "--output", str(tmp_path / "portable"), "--runner", "PortableRunner",
         "--job_endpoint", job_endpoint, "--environment_type", "EXTERNAL",
         "--environment_config", pool],
        env=service_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The job went through the job service to the worker pool's workers.
    assert f"Requesting worker at {pool}" in logs["job_service"].read_text()

    a, errors_a, importance_a, run_a = read_run(tmp_path / "default")
    b, errors_b, importance_b, run_b = read_run(tmp_path / "portable")
    assert len(a) == 16 and list(errors_a.example_id) == ["broken"]
    assert list(a.example_id) == list(b.example_id)
    assert list(errors_a.example_id) == list(errors_b.example_id)
    assert list(errors_a.error_type) == list(errors_b.error_type)
    assert (a.predicted_class.values == b.predicted_class.values).all()
    np.testing.assert_allclose(np.stack(a.probabilities), np.stack(b.probabilities), atol=1e-5)
    np.testing.assert_allclose(np.stack(a.gradcam), np.stack(b.gradcam), atol=1e-5)
    for column in ("gradcam_mask_energy", "gradcam_deletion_auc", "gradcam_insertion_auc"):
        np.testing.assert_allclose(a[column].astype(float), b[column].astype(float), atol=1e-5,
                                   equal_nan=True)
    assert a.gradcam_deletion_auc.notna().sum() > 0  # the faithfulness sample ran

    assert list(importance_a.feature) == list(importance_b.feature)
    assert list(importance_a.metric) == list(importance_b.metric)
    for column in ("importance", "std", "n"):
        np.testing.assert_allclose(importance_a[column].astype(float),
                                   importance_b[column].astype(float), atol=1e-5, equal_nan=True)

    assert run_a["counts"] == run_b["counts"] and run_b["counts"]["accounting_ok"]
    metrics_a, metrics_b = run_a["tfma"]["metrics"], run_b["tfma"]["metrics"]
    assert metrics_a.keys() == metrics_b.keys() and len(metrics_a) > 1  # overall and slices
    for slice_name, figures in metrics_a.items():
        assert figures.keys() == metrics_b[slice_name].keys(), slice_name
        for name, value in figures.items():
            other = metrics_b[slice_name][name]
            assert (value is None and other is None) or value == pytest.approx(other, abs=1e-5), \
                (slice_name, name, value, other)
    assert run_a["quality"]["sanity"].keys() == run_b["quality"]["sanity"].keys()
    assert run_b["runner"]["name"] == "PortableRunner"
    assert run_a["runner"]["name"] == "FnApiRunner (local)"
    assert run_b["runner"]["options"]["environment_type"] == "EXTERNAL"

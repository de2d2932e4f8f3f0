"""The output folder holds one run's files, complete, or none: an earlier run is refused unless
--overwrite (then replaced, never mixed), a run killed half-way leaves no half-written final file,
and the next run cleans its leftovers and completes."""
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

import testfs
from beam_pipeline import cli
from beam_pipeline.io import outputs
from conftest import gap_model, make_manifest
from helpers import assert_accounting, read_outputs


def tree(folder):
    """Every file under ``folder``, relative, with its bytes."""
    found = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, folder)] = handle.read()
    return found


def test_an_earlier_run_is_refused_unless_overwrite_and_never_mixed(tmp_path, rng, capsys):
    model = tmp_path / "model.keras"
    gap_model(num_classes=3).save(model)
    first = make_manifest(str(tmp_path / "first"), rng, n=12)
    second = make_manifest(str(tmp_path / "second"), rng, n=5, masks=False)
    out = tmp_path / "out"
    assert cli.main(["run", "--model", str(model), "--data", first, "--output", str(out),
                     "--shard-size", "8", "--baseline-gates", "off"]) == 0  # random model
    (out / "notes.txt").write_text("the user's own file")
    before = tree(out)
    assert {"run.json", "tfma/eval_config.json", "importance_summary.parquet"} <= set(before)

    # Refused: exit 1, a message naming the way out, and not one byte changed.
    capsys.readouterr()
    plain = ["run", "--model", str(model), "--data", second, "--output", str(out),
             "--tfma-config", "none", "--permutation-features", "none",
             "--sanity-sample", "0", "--baseline-gates", "off"]
    assert cli.main(plain) == 1
    err = " ".join(capsys.readouterr().err.split())  # the CLI wraps the paragraph
    assert "already holds a previous run" in err and "--overwrite" in err
    assert "Traceback" not in err
    assert tree(out) == before

    # --overwrite: the earlier run's outputs go first, so none of them mixes with the new ones.
    assert cli.main(plain + ["--overwrite"]) == 0
    after = tree(out)
    attributions, errors, run = read_outputs(out)
    assert_accounting(attributions, errors, pd.read_csv(second).id)
    assert len(attributions) == 5
    assert not [n for n in after if n.startswith(("tfma", "importance", "sanity"))], sorted(after)
    assert not [n for n in after if n.startswith(".")]  # no staging folder left
    assert after["notes.txt"] == b"the user's own file"
    assert run["run_id"] != json.loads(before["run.json"])["run_id"]
    assert run["tfma"] == {"skipped_because": "--tfma-config none"}


def _state(root, *files):
    for rel in files:
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(rel)


@pytest.mark.parametrize("scheme", ["local", "testfs"])
@pytest.mark.parametrize("files, refused", [
    ([], False),                                                          # empty folder
    (["notes.txt"], False),                                               # not a run
    (["run.json", "attributions/part-0.parquet"], True),                  # a finished run
    (["attributions/part-0.parquet", "errors/part-0.parquet"], True),     # outputs, no staging
    ([".incomplete-r1/_RUN_IN_PROGRESS", ".incomplete-r1/errors/part-0.parquet"], False),  # killed
    (["attributions/part-0.parquet",                                      # killed while promoting
      ".incomplete-r1/_RUN_IN_PROGRESS", ".incomplete-r1/errors/part-0.parquet"], False),
    (["run.json", ".incomplete-r2/_RUN_IN_PROGRESS"], True),              # finished + a stray
])
def test_which_folders_count_as_a_previous_run(tmp_path, monkeypatch, scheme, files, refused):
    if scheme == "local":
        root = tmp_path / "out"
        root.mkdir()
        output = str(root)
    else:
        monkeypatch.setenv(testfs.ROOT_ENV, str(tmp_path))
        root = tmp_path / "bucket" / "out"
        root.mkdir(parents=True)
        output = "testfs://bucket/out"
    _state(str(root), *files)
    if refused:
        with pytest.raises(outputs.OutputExistsError, match="--overwrite"):
            outputs.prepare_folder(output, overwrite=False)
        assert set(tree(root)) == set(files)
        outputs.prepare_folder(output, overwrite=True)
    else:
        outputs.prepare_folder(output, overwrite=False)
    left = set(tree(root))
    assert left == ({"notes.txt"} & set(files))  # only the user's file survives
    assert outputs.inspect_folder(output).empty


def test_promote_moves_every_file_and_keeps_the_marker_until_finish(tmp_path, monkeypatch):
    monkeypatch.setenv(testfs.ROOT_ENV, str(tmp_path))
    output = "testfs://bucket/out"
    staging = outputs.staging_path(output, "r1")
    outputs.start_staging(staging, "r1", "now")
    _state(str(tmp_path / "bucket" / "out" / ".incomplete-r1"), "attributions/part-0.parquet",
           "tfma/metrics", "importance_summary.parquet")
    assert outputs.promote(staging, output) == 3
    state = outputs.inspect_folder(output)
    assert state.outputs == ["attributions", "importance_summary.parquet", "tfma"]
    assert state.unfinished == [staging] and not state.finished_run  # no run.json yet
    outputs.write_json_atomic(output + "/run.json", {"run_id": "r1"})
    outputs.finish(staging)
    state = outputs.inspect_folder(output)
    assert state.finished_run and not state.unfinished
    assert set(tree(tmp_path / "bucket" / "out")) == {
        "run.json", "attributions/part-0.parquet", "tfma/metrics", "importance_summary.parquet"}


def test_a_run_killed_half_way_leaves_no_final_files_and_the_rerun_completes(tmp_path, rng):
    model = tmp_path / "model.keras"
    gap_model(num_classes=2).save(model)
    manifest = make_manifest(str(tmp_path / "data"), rng, n=150, num_classes=2)
    out = tmp_path / "out"
    argv = ["run", "--model", str(model), "--data", manifest, "--output", str(out),
            "--baseline-gates", "off"]  # a random model: this test is about the output folder
    proc = subprocess.Popen([sys.executable, "-m", "beam_pipeline.cli", *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill it once Beam has finalized some output file: in the old layout that file would
    # already sit under its final name in an unfinished folder.
    finalized = None
    deadline = time.time() + 600
    while finalized is None and proc.poll() is None and time.time() < deadline:
        for rel in tree_names(out):
            if "beam-temp" not in rel and not rel.endswith((outputs.MARKER, outputs.LOCK_NAME)):
                finalized = rel
                break
        else:
            time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job ended before it could be killed"
    assert finalized and finalized.startswith(outputs.STAGING_PREFIX), finalized

    left = tree_names(out)
    assert left and all(rel.startswith(outputs.STAGING_PREFIX) or rel == outputs.LOCK_NAME
                        for rel in left), left
    state = outputs.inspect_folder(str(out))
    assert state.outputs == [] and len(state.unfinished) == 1 and not state.finished_run

    # The killed run's lock is stale: reported (exit 1, nothing touched), never silently taken.
    assert os.path.exists(outputs.lock_path(str(out)))
    assert cli.main(argv) == 1
    assert tree_names(out) == left
    # --overwrite takes the stale lock over; the leftovers are no run anyone can read, and the
    # log says they are removed.
    lines = []
    collect = logging.Handler()
    collect.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("xai_audit").addHandler(collect)
    try:
        assert cli.main(argv + ["--overwrite"]) == 0
    finally:
        logging.getLogger("xai_audit").removeHandler(collect)
    assert any("stale lock" in line for line in lines), lines
    assert any("leftovers of an unfinished run" in line for line in lines), lines
    attributions, errors, run = read_outputs(out)
    assert_accounting(attributions, errors, pd.read_csv(manifest).id)
    assert run["counts"]["examples_in"] == 150 and run["counts"]["accounting_ok"]
    assert not [rel for rel in tree_names(out) if rel.startswith(".")]


def tree_names(folder):
    names = []
    for dirpath, _, files in os.walk(folder):
        names.extend(os.path.relpath(os.path.join(dirpath, f), folder) for f in files)
    return names


def test_the_demo_runs_twice_into_the_same_folder(tmp_path):
    out = tmp_path / "demo"
    # The demo allows its own one planted bad scan at any size (demo_max_error_rate), so both
    # runs pass; a refusal of the second (the folder holds a run) would be 1.
    codes = [cli.main(["demo", "--output", str(out), "--examples", "24"]) for _ in range(2)]
    assert codes == [0, 0]
    attributions, errors, run = read_outputs(out)
    manifest = pd.read_csv(out / "demo_data" / "manifest.csv", dtype=str)
    assert len(manifest) == 25  # one truncated scan added once, not once per demo
    assert_accounting(attributions, errors, manifest.id)
    assert run["counts"]["examples_in"] == 25


# --------------------------------------------------------------------------- one run per folder


def _dead_pid():
    """The pid of a process that has exited (and been reaped): no process has it now."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_held_lock_refuses_a_second_run_and_names_its_holder(tmp_path):
    out = str(tmp_path / "out")
    path = outputs.acquire_lock(out, "run-a", "2026-01-01T00:00:00Z", take_stale=False)
    holder = json.loads(open(path).read())
    assert holder["pid"] == os.getpid() and holder["run_id"] == "run-a" and holder["host"]
    for take_stale in (False, True):  # a live holder is never taken over, not even --overwrite
        with pytest.raises(outputs.OutputLockedError, match="in use by another xai-audit run") \
                as info:
            outputs.acquire_lock(out, "run-b", "now", take_stale=take_stale)
        assert f"pid {os.getpid()}" in str(info.value) and "run-a" in str(info.value)
    outputs.release_lock(out, "run-b")  # not its lock: stays
    assert os.path.exists(path)
    outputs.release_lock(out, "run-a")
    assert not os.path.exists(path)
    outputs.acquire_lock(out, "run-c", "now", take_stale=False)  # free again


def test_a_stale_lock_is_reported_not_stolen_and_overwrite_takes_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = {"host": outputs.socket.gethostname(), "pid": _dead_pid(),
             "started_at": "2026-01-01T00:00:00Z", "run_id": "killed"}
    (out / outputs.LOCK_NAME).write_text(json.dumps(stale))
    with pytest.raises(outputs.OutputLockedError) as info:
        outputs.acquire_lock(str(out), "next", "now", take_stale=False)
    text = str(info.value)
    assert "no longer running" in text and "--overwrite" in text and outputs.LOCK_NAME in text
    assert json.loads((out / outputs.LOCK_NAME).read_text()) == stale
    outputs.acquire_lock(str(out), "next", "now", take_stale=True)
    assert json.loads((out / outputs.LOCK_NAME).read_text())["run_id"] == "next"


def test_a_lock_of_another_host_is_never_judged_stale():
    assert not outputs.holder_is_gone({"host": "elsewhere", "pid": _dead_pid()})
    assert not outputs.holder_is_gone({})
    assert outputs.holder_is_gone({"host": outputs.socket.gethostname(), "pid": _dead_pid()})


def test_a_run_started_while_another_holds_the_folder_is_refused_and_changes_nothing(
        tmp_path, rng, capsys):
    model = tmp_path / "model.keras"
    gap_model(num_classes=3).save(model)
    data = make_manifest(str(tmp_path / "data"), rng, n=4, masks=False)
    out = tmp_path / "out"
    # Run A: planning done, pipeline running (its lock and staging folder are in place).
    outputs.acquire_lock(str(out), "run-a", "now", take_stale=False)
    outputs.start_staging(outputs.staging_path(str(out), "run-a"), "run-a", "now")
    before = tree(out)
    argv = ["run", "--model", str(model), "--data", data, "--output", str(out)]
    for extra in ([], ["--overwrite"]):
        capsys.readouterr()
        assert cli.main(argv + extra) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert "in use by another xai-audit run" in err and "run-a" in err
        assert tree(out) == before  # run A's staging folder survives


# --------------------------------------------------------------------------- --overwrite


def test_overwrite_removes_only_the_files_a_run_writes(tmp_path):
    out = tmp_path / "out"
    run_files = ["run.json", "attributions/part-00000-of-00001.parquet",
                 "errors/part-00000-of-00001.parquet", "tfma/metrics-00000-of-00001.tfrecord",
                 "tfma/eval_config.json", "report/index.html", "report/summary.json",
                 "importance_summary.parquet"]
    users = ["report/notes.txt", "attributions/my_analysis.csv", "tfma/sub/metrics.txt",
             "notes.txt"]
    _state(str(out), *run_files, *users)
    assert sorted(outputs.run_files(str(out))) == sorted(run_files)
    with pytest.raises(outputs.OutputExistsError):
        outputs.prepare_folder(str(out), overwrite=False)
    outputs.prepare_folder(str(out), overwrite=True)
    assert set(tree(out)) == set(users)


def test_user_files_alone_in_output_folders_are_not_a_run(tmp_path):
    out = tmp_path / "out"
    _state(str(out), "report/notes.txt", "errors/why.md")
    state = outputs.inspect_folder(str(out))
    assert state.empty and not state.finished_run

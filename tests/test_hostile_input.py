"""Hostile and careless input, the reading side (issue 17): special files, huge files, symlinks,
hanging file systems, ids rewritten as numbers, column names the job uses itself, audit outputs
inside the data, and bidi controls reaching the report.

Two real job runs (class folders; a manifest with a hanging remote row) hold most faults at once;
the rest are pure-function checks of ``sources``, ``evaluation`` and the report's escaping.
"""
import os
import struct
import threading
import zlib

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystem import BeamIOError

import testfs
from conftest import png_bytes, random_image, write_png
from test_faults import AUDITED, assert_outcomes, err
from test_job import read_outputs, run_cli

from beam_pipeline.evaluation import transform as evaluation
from beam_pipeline.report import text as report_text
from beam_pipeline.io import sources
from beam_pipeline.errors import DataSourceError, ExampleError, OptionError

QUICK = ["--tfma-config", "none", "--permutation-features", "none",
         "--faithfulness-sample", "0", "--sanity-sample", "0"]
RLO = "\u202e"  # RIGHT-TO-LEFT OVERRIDE
EIGHT_GB = 8 * 1024 ** 3


# --------------------------------------------------------------------------- a hanging file system

RELEASE = threading.Event()


class HangingFileSystem(testfs.ObjectStoreFileSystem):
    """``hangfs://``: every read waits (as gs:// does retrying credentials offline) until the
    test releases it, then fails. Found by Beam through its scheme once this module is imported."""

    @classmethod
    def scheme(cls):
        return "hangfs"

    def _hang(self, path):
        RELEASE.wait(300)
        raise BeamIOError("Hanging file system released", {path: TimeoutError(path)})

    def open(self, path, *args, **kwargs):
        self._hang(path)

    def metadata(self, path):
        self._hang(path)

    def exists(self, path):
        self._hang(path)


@pytest.fixture
def release_hangs():
    RELEASE.clear()
    yield
    RELEASE.set()  # let abandoned reader threads finish


# --------------------------------------------------------------------------- fault files


def png_header_only(width=20, height=24):
    """The first 33 bytes of a PNG (signature + IHDR): Pillow would try to read the rest."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + body + struct.pack(
        ">I", zlib.crc32(body))


def sparse_png(path, size=EIGHT_GB):
    """A PNG header padded with `truncate` to ``size`` bytes: a few KB on disk."""
    with open(path, "wb") as handle:
        handle.write(png_header_only())
        handle.truncate(size)


def build_hostile_folders(tmp_path, rng):
    """A class-folder tree with one entry per hostile case; {example id: outcome}."""
    root = tmp_path / "folders"
    expected = {}
    for cls in "abc":
        for i in range(2):
            write_png(str(root / cls / f"plain{i}.png"), random_image(rng))
            expected[f"{cls}/plain{i}.png"] = AUDITED
    spoof = f"x{RLO}gnp.exe"
    (root / "a" / spoof).write_bytes(png_bytes(random_image(rng)))  # shown as "xexe.png"
    expected[f"a/{spoof}"] = AUDITED
    os.mkfifo(root / "a" / "fifo.png")
    expected["a/fifo.png"] = err("unreadable_image")
    os.symlink("/dev/zero", root / "a" / "zero.png")
    expected["a/zero.png"] = err("unreadable_image")
    sparse_png(root / "b" / "huge.png")
    expected["b/huge.png"] = err("file_too_large")
    os.symlink("nowhere.png", root / "b" / "broken.png")
    expected["b/broken.png"] = err("missing_image")
    os.symlink("loop.png", root / "c" / "loop.png")
    expected["c/loop.png"] = err("unreadable_image")
    write_png(str(tmp_path / "elsewhere" / "x.png"), random_image(rng))
    os.symlink(tmp_path / "elsewhere" / "x.png", root / "c" / "outside.png")
    expected["c/outside.png"] = err("path_outside_data")
    os.symlink("/etc/passwd", root / "c" / "passwd.png")
    expected["c/passwd.png"] = err("path_outside_data")
    os.makedirs(root / "c" / "nested")
    expected["c/nested"] = err("unreadable_image")
    # An earlier audit's --output inside the data: not a fourth class.
    os.makedirs(root / "audit-out")
    (root / "audit-out" / "run.json").write_text("{}")
    os.makedirs(root / "b" / "audit-in-class" / ".incomplete-123")  # nor an example of class b
    os.symlink("toplevel-loop", root / "toplevel-loop")  # no class (and no traceback)
    return str(root), expected


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, model3):
    from numpy.random import default_rng

    tmp_path = tmp_path_factory.mktemp("hostile")
    root, expected = build_hostile_folders(tmp_path, default_rng(7))
    out = tmp_path / "out"
    code = run_cli("run", "--model", model3, "--data", root, "--output", out, *QUICK)
    return {"code": code, "out": out, "expected": expected}


@pytest.fixture(scope="module")
def model3(tmp_path_factory):
    from conftest import gap_model

    path = tmp_path_factory.mktemp("model") / "model.keras"
    gap_model(num_classes=3).save(path)
    return str(path)


# --------------------------------------------------------------------------- class folders, one run


def test_every_hostile_folder_entry_has_its_row(folder_run):
    assert folder_run["code"] == 4  # 8 of 15 examples failed: above --max-error-rate
    attributions, errors, run = assert_outcomes(folder_run["out"], folder_run["expected"])
    assert run["model"]["class_names"] == ["a", "b", "c"]  # audit-out/ is no class
    message = dict(zip(errors.example_id, errors.message))
    assert "is a FIFO (named pipe), not a regular file" in message["a/fifo.png"]
    assert "is a character device" in message["a/zero.png"]
    assert "--max-image-bytes" in message["b/huge.png"] and "8,589,934,592" in message["b/huge.png"]
    assert "broken symbolic link" in message["b/broken.png"]
    assert "symbolic link loop" in message["c/loop.png"]
    assert "/etc/passwd" in message["c/passwd.png"]
    assert "--allow-paths-outside-data" in message["c/outside.png"]


def test_bidi_controls_are_shown_not_obeyed_in_the_report(folder_run):
    html = (folder_run["out"] / "report" / "index.html").read_text(encoding="utf-8")
    assert RLO not in html
    assert "[U+202E]" in html


# --------------------------------------------------------------------------- a manifest, one run


def test_manifest_ids_as_written_and_a_hanging_remote_read(tmp_path, rng, model3, release_hangs):
    root = tmp_path / "data"
    rows = []
    for i, example_id in enumerate(["007", "7", "0", "", "NA"]):
        write_png(str(root / f"{i}.png"), random_image(rng))
        rows.append({"id": example_id, "image": f"{i}.png", "label": i % 3})
    rows.append({"id": "remote", "image": "hangfs://bucket/x.png", "label": 0})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    out = tmp_path / "out"
    code = run_cli("run", "--model", model3, "--data", root / "manifest.csv", "--output", out,
                   "--allow-paths-outside-data", "--read-timeout", "2", *QUICK)
    assert code == 4
    _, errors, _ = assert_outcomes(out, {
        "007": AUDITED, "7": AUDITED, "0": AUDITED, "NA": AUDITED,
        "3.png": err("missing_id"),  # the empty id: an error row named by its image path
        "remote": err("read_timeout"),
    })
    assert "--read-timeout" in errors.set_index("example_id").message["remote"]


# --------------------------------------------------------------------------- pure: reading


def test_read_file_refuses_what_is_not_a_bounded_regular_file(tmp_path):
    os.mkfifo(tmp_path / "fifo.png")
    os.symlink("/dev/zero", tmp_path / "zero.png")
    sparse_png(tmp_path / "huge.png")
    (tmp_path / "small.png").write_bytes(b"x" * 100)
    cases = {"fifo.png": "unreadable_image", "zero.png": "unreadable_image",
             "huge.png": "file_too_large", "missing.png": "missing_image"}
    for name, error_type in cases.items():
        with pytest.raises(ExampleError) as caught:
            sources.read_file(str(tmp_path / name), "image", root=str(tmp_path))
        assert caught.value.error_type == error_type, name
    limits = sources.ReadLimits(max_bytes=99)
    with pytest.raises(ExampleError, match="--max-image-bytes"):
        sources.read_file(str(tmp_path / "small.png"), "mask", limits)
    assert len(sources.read_file(str(tmp_path / "small.png"), "mask")) == 100


def test_manifest_symlinks_are_judged_by_where_they_lead(tmp_path, rng):
    root = tmp_path / "data"
    write_png(str(tmp_path / "secret.png"), random_image(rng))
    os.makedirs(root)
    os.symlink(tmp_path / "secret.png", root / "l.png")
    write_png(str(root / "in.png"), random_image(rng))
    os.symlink(root / "in.png", root / "alias.png")
    pd.DataFrame([{"id": "l", "image": "l.png"}, {"id": "alias", "image": "alias.png"}]).to_csv(
        root / "m.csv", index=False)
    spec = sources.inspect_source(str(root / "m.csv"), sources.ColumnNames())
    refs = {r.example_id: r for r in sources.iter_refs(spec)}
    with pytest.raises(ExampleError) as caught:
        sources.read_example_bytes(refs["l"], spec)
    assert caught.value.error_type == "path_outside_data"
    assert sources.read_example_bytes(refs["alias"], spec)[0]  # a link inside the data is fine
    spec.allow_paths_outside_data = True
    assert sources.read_example_bytes(refs["l"], spec)[0]


def test_remote_reads_are_size_bounded_from_metadata(tmp_path, monkeypatch):
    monkeypatch.setenv(testfs.ROOT_ENV, str(tmp_path))
    os.makedirs(tmp_path / "bucket")
    (tmp_path / "bucket" / "x.png").write_bytes(b"x" * 100)
    assert len(sources.read_file("testfs://bucket/x.png", "image")) == 100
    with pytest.raises(ExampleError) as caught:
        sources.read_file("testfs://bucket/x.png", "image", sources.ReadLimits(max_bytes=99))
    assert caught.value.error_type == "file_too_large"
    with pytest.raises(ExampleError) as caught:
        sources.read_file("testfs://bucket/absent.png", "mask")
    assert caught.value.error_type == "missing_mask"


def test_a_hanging_file_system_read_is_abandoned(release_hangs):
    with pytest.raises(ExampleError) as caught:
        sources.read_file("hangfs://bucket/x.png", "image", sources.ReadLimits(timeout_s=0.2))
    assert caught.value.error_type == "read_timeout"


def test_a_file_system_that_keeps_timing_out_is_given_up(tmp_path, monkeypatch, release_hangs):
    monkeypatch.setenv(testfs.ROOT_ENV, str(tmp_path))
    os.makedirs(tmp_path / "bucket")
    (tmp_path / "bucket" / "ok.png").write_bytes(b"x")
    limits = sources.ReadLimits(timeout_s=0.1)
    messages = []
    for i in range(sources.TIMEOUTS_BEFORE_GIVING_UP + 2):
        with pytest.raises(ExampleError) as caught:
            sources.read_file(f"hangfs://bucket/{i}.png", "image", limits)
        assert caught.value.error_type == "read_timeout"
        messages.append(caught.value.message)
    assert all("took longer" in m for m in messages[:sources.TIMEOUTS_BEFORE_GIVING_UP])
    assert all("was not read" in m for m in messages[sources.TIMEOUTS_BEFORE_GIVING_UP:])
    assert sources.read_file("testfs://bucket/ok.png", "image", limits) == b"x"  # other schemes


def test_a_tfrecord_length_header_claiming_a_terabyte_is_not_allocated(tmp_path, rng):
    import tensorflow as tf
    from apache_beam.io.tfrecordio import _TFRecordUtil

    example = tf.train.Example(features=tf.train.Features(feature={"image": tf.train.Feature(
        bytes_list=tf.train.BytesList(value=[png_bytes(random_image(rng))]))}))
    path = str(tmp_path / "d.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        writer.write(example.SerializeToString())
    length = struct.pack("<Q", 2 ** 40)
    with open(path, "ab") as handle:  # a valid header (its CRC checks) for a 1 TB record
        handle.write(length + struct.pack("<I", _TFRecordUtil._masked_crc32c(length)) + b"x" * 64)
    spec = sources.inspect_source(path, sources.ColumnNames())
    rows = list(sources.iter_tfrecord_refs(spec, path, "d.tfrecord"))
    assert isinstance(rows[0], sources.ExampleRef)
    assert rows[1]["error_type"] == "file_too_large" and "--max-image-bytes" in rows[1]["message"]


def test_csv_and_parquet_ids_are_read_as_text(tmp_path):
    pd.DataFrame({"id": ["007", "7", "0", "", "1e3"], "image": ["a.png"] * 5,
                  "site": ["x", "NA", "", "y", "z"]}).to_csv(tmp_path / "m.csv", index=False)
    table = pa.table({"id": pa.array([7, None, 0], pa.int64()), "image": ["a.png"] * 3})
    pq.write_table(table, tmp_path / "m.parquet")
    for name, want in (("m.csv", ["007", "7", "0", None, "1e3"]), ("m.parquet", ["7", None, "0"])):
        spec = sources.inspect_source(str(tmp_path / name), sources.ColumnNames())
        got = [r.example_id if isinstance(r, sources.ExampleRef) else None
               for r in sources.iter_refs(spec)]
        assert got == want, name
        missing = [r for r in sources.iter_refs(spec) if isinstance(r, dict)]
        assert [r["error_type"] for r in missing] == ["missing_id"]
    spec = sources.inspect_source(str(tmp_path / "m.csv"), sources.ColumnNames())
    assert [r.slices["site"] for r in sources.iter_refs(spec) if not isinstance(r, dict)] == [
        "x", None, None, "z"]  # slices keep pandas' missing words


def test_csv_slices_are_typed_only_when_no_value_changes(tmp_path):
    pd.DataFrame({"image": ["a.png", "b.png"], "zip": ["007", "7"], "version": ["1.50", "1.5"],
                  "count": ["3", ""], "ratio": ["0.5", "2"], "flag": ["True", "False"],
                  "big": ["99999999999999999999", "1"]}).to_csv(tmp_path / "m.csv", index=False)
    spec = sources.inspect_source(str(tmp_path / "m.csv"), sources.ColumnNames())
    assert spec.slice_types == {"zip": "string", "version": "string", "count": "int64",
                                "ratio": "float64", "flag": "bool", "big": "float64"}
    first, second = [r.slices for r in sources.iter_refs(spec)]
    assert (first["zip"], second["zip"]) == ("007", "7")
    assert (first["version"], second["version"]) == ("1.50", "1.5")
    assert (first["count"], second["count"]) == (3, None)
    assert (first["ratio"], first["flag"]) == (0.5, True)


def test_data_that_is_no_folder_says_what_it_is(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    os.symlink("loop", tmp_path / "loop")
    os.mkfifo(tmp_path / "pipe.csv")
    with pytest.raises(DataSourceError, match="is a file, not a folder"):
        sources.inspect_source(str(tmp_path / "notes.txt"), sources.ColumnNames())
    with pytest.raises(DataSourceError, match="symbolic link loop"):
        sources.inspect_source(str(tmp_path / "loop"), sources.ColumnNames())
    with pytest.raises(DataSourceError, match="FIFO"):
        sources.inspect_source(str(tmp_path / "pipe.csv"), sources.ColumnNames())
    with pytest.raises(DataSourceError, match="does not exist"):
        sources.inspect_source(str(tmp_path / "absent"), sources.ColumnNames())


# --------------------------------------------------------------------------- pure: names


@pytest.mark.parametrize("column", ["score", "prediction_correct", "attention_on_mask",
                                    "probabilities"])
def test_columns_named_like_the_jobs_own_features_are_refused(column):
    with pytest.raises(OptionError, match=column):
        evaluation.check_slice_columns(["site", column])
    evaluation.check_slice_columns(["site", "scores"])


def test_a_score_column_stops_the_run_with_one_paragraph(tmp_path, rng, model3, capsys):
    root = tmp_path / "data"
    write_png(str(root / "0.png"), random_image(rng))
    pd.DataFrame([{"id": "a", "image": "0.png", "label": 0, "score": 0.9}]).to_csv(
        root / "m.csv", index=False)
    assert run_cli("run", "--model", model3, "--data", root / "m.csv", "--output",
                   tmp_path / "out", *QUICK) == 1
    stderr = capsys.readouterr().err
    assert "score" in stderr and "--slice-columns" in stderr and "Traceback" not in stderr
    assert run_cli("run", "--model", model3, "--data", root / "m.csv", "--output",
                   tmp_path / "out2", "--slice-columns", "", *QUICK) == 0


def test_repeated_class_names_are_refused(tmp_path, folder_dataset, model3, capsys):
    assert run_cli("run", "--model", model3, "--data", folder_dataset, "--output", tmp_path / "o",
                   "--class-names", "a,a,b", *QUICK) == 1
    assert "--class-names names a more than once" in capsys.readouterr().err


@pytest.mark.parametrize("option", [("--read-timeout", "0"), ("--read-timeout", "nan"),
                                    ("--read-timeout", "inf"), ("--max-image-bytes", "0")])
def test_reading_bounds_must_be_sane(tmp_path, folder_dataset, model3, capsys, option):
    assert run_cli("run", "--model", model3, "--data", folder_dataset, "--output", tmp_path / "o",
                   *option) == 1
    assert option[0] in capsys.readouterr().err


def test_visible_controls():
    from markupsafe import Markup

    assert report_text.visible_controls(f"x{RLO}gnp.exe") == "x[U+202E]gnp.exe"
    assert report_text.visible_controls("\u2066a\u2069\u200f") == "[U+2066]a[U+2069][U+200F]"
    shown = report_text.visible_controls(Markup(f"<b>{RLO}</b>"))
    assert isinstance(shown, Markup) and shown == Markup("<b>[U+202E]</b>")
    assert report_text.visible_controls(3) == 3 and report_text.visible_controls("plain") == "plain"

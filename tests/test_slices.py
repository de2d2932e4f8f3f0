"""Which manifest columns become slices: high-cardinality columns (continuous numbers, timestamps)
are carried but not sliced by default and reported as skipped; ``--slice-bins`` bins a numeric
column into named half-open bins."""
import json
import logging
import os

import numpy as np
import pandas as pd
import pytest

from beam_pipeline.io import sources
from beam_pipeline.errors import OptionError
from conftest import LogLines, gap_model, make_manifest
from helpers import read_outputs, run_cli

N = 60  # more than sources.MAX_SLICE_VALUES distinct ages and timestamps


def test_bin_labels_are_half_open_with_out_of_range_and_null():
    edges = [0, 40, 65, 120]
    assert [sources.bin_label(v, edges) for v in (0, 39.9, 40, 119, 120, -1, None, float("nan"))] \
        == ["[0,40)", "[0,40)", "[40,65)", "[65,120)", "out_of_range", "out_of_range", None, None]
    assert sources.parse_slice_bins(["age=0,40,65,120", "bmi=18.5,25"]) == {
        "age": [0, 40, 65, 120], "bmi": [18.5, 25]}
    for bad in (["age=1"], ["age=5,5"], ["age"], ["age=a,b"], ["age=0,1", "age=0,2"]):
        with pytest.raises(OptionError):
            sources.parse_slice_bins(bad)


@pytest.fixture(scope="module")
def sliced_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("slices")
    rng = np.random.default_rng(3)
    manifest = make_manifest(str(root / "data"), rng, n=N, masks=False)
    frame = pd.read_csv(manifest)
    frame["age"] = np.arange(N) + 20  # 60 distinct integers: 20..79
    frame["scanned_at"] = [f"2024-03-01T10:{i:02d}:00" for i in range(N)]
    frame.to_csv(manifest, index=False)
    model = str(root / "m.keras")
    gap_model(num_classes=3).save(model)
    # a random-weight model that tests slice plumbing, not a trained classifier
    quick = ["--permutation-features", "none", "--faithfulness-sample", "0",
             "--sanity-sample", "0", "--baseline-gates", "off"]
    log = LogLines()
    logging.getLogger("xai_audit").addHandler(log)
    try:
        plain = root / "plain"
        assert run_cli("run", "--model", model, "--data", manifest, "--output", plain,
                       *quick) == 0
        binned = root / "binned"
        assert run_cli("run", "--model", model, "--data", manifest, "--output", binned,
                       "--slice-bins", "age=0,40,65", *quick) == 0
    finally:
        logging.getLogger("xai_audit").removeHandler(log)
    return {"plain": plain, "binned": binned, "log": log.lines}


def test_high_cardinality_columns_are_carried_not_sliced(sliced_run):
    attributions, _, run = read_outputs(sliced_run["plain"])
    # Carried unchanged to attributions...
    assert sorted(attributions.age) == list(range(20, 20 + N))
    assert attributions.scanned_at.str.startswith("2024-03-01").all()
    # ...but neither a TFMA slice nor a report slice; site (2 values) still is.
    data = run["data"]
    assert list(data["slice_columns"]) == ["site"]
    assert data["skipped_slice_columns"] == {"age": N, "scanned_at": N}
    metrics = run["tfma"]["metrics"]
    assert not [s for s in metrics if s.startswith(("age=", "scanned_at="))]
    assert "site=s0" in metrics
    # Said in the log, run.json and the report, with the way to include them.
    for text in (" ".join(sliced_run["log"]), data["skipped_slice_columns_note"]):
        assert "age (60 distinct values)" in text and "--slice-bins" in text \
            and "--slice-columns" in text
    with open(os.path.join(sliced_run["plain"], "report", "summary.json")) as handle:
        summary = json.load(handle)
    assert summary["skipped_slice_columns"]["columns"] == {"age": N, "scanned_at": N}
    assert not [k for k in summary["slices"] if k.startswith(("age=", "scanned_at="))]
    with open(os.path.join(sliced_run["plain"], "report", "index.html")) as handle:
        assert "Not slicing on age (60 distinct values)" in handle.read()


def test_slice_bins_make_a_binned_slice(sliced_run):
    attributions, _, run = read_outputs(sliced_run["binned"])
    rows = attributions.set_index("example_id")
    assert rows.loc["ex000", "age"] == 20 and rows.loc["ex000", "age_bin"] == "[0,40)"
    assert rows.loc["ex030", "age_bin"] == "[40,65)"
    assert rows.loc["ex059", "age_bin"] == "out_of_range"  # 79 is above the last edge
    assert attributions.age_bin.value_counts().to_dict() == {
        "[0,40)": 20, "[40,65)": 25, "out_of_range": 15}
    assert run["data"]["slice_columns"] == {"site": "string", "age_bin": "string"}
    assert run["data"]["skipped_slice_columns"] == {"scanned_at": N}
    assert run["tfma"]["metrics"]["age_bin=[40,65)"]["example_count"] == 25


def test_explicit_slice_columns_are_sliced_whatever_their_cardinality(tmp_path, rng):
    manifest = make_manifest(str(tmp_path), rng, n=N, masks=False)
    frame = pd.read_csv(manifest)
    frame["age"] = np.arange(N)
    frame.to_csv(manifest, index=False)
    spec = sources.inspect_source(manifest, sources.ColumnNames(), ["age"])
    assert spec.slice_types == {"age": "int64"} and not spec.skipped_slices
    default = sources.inspect_source(manifest, sources.ColumnNames())
    assert default.slice_types == {"site": "string"}
    assert default.carried_types == {"age": "int64"}
    with pytest.raises(OptionError, match="bins need numbers"):
        sources.inspect_source(manifest, sources.ColumnNames(), None,
                               slice_bins={"site": [0, 1]})


def test_tfrecord_columns_are_counted_on_the_first_records(tmp_path, rng):
    import tensorflow as tf

    from conftest import png_bytes, random_image

    image = png_bytes(random_image(rng))
    path = str(tmp_path / "a.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for i in range(N):
            feature = {
                "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[i % 2])),
                "age": tf.train.Feature(int64_list=tf.train.Int64List(value=[i])),
                "site": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"s%d" % (i % 3)])),
            }
            writer.write(tf.train.Example(
                features=tf.train.Features(feature=feature)).SerializeToString())
    spec = sources.inspect_source(path, sources.ColumnNames(), None,
                                  slice_bins={"age": [0, 30, 60]})
    assert spec.slice_types == {"site": "string", "age_bin": "string"}
    assert spec.carried_types == {"age": "int64"} and not spec.skipped_slices
    plain = sources.inspect_source(path, sources.ColumnNames())
    assert plain.skipped_slices == {"age": N} and plain.slice_types == {"site": "string"}
    refs = list(sources.iter_tfrecord_refs(spec, path, "a.tfrecord"))
    assert [r.slices["age_bin"] for r in refs[29:31]] == ["[0,30)", "[30,60)"]
    assert refs[0].slices == {"age": 0, "site": "s0", "age_bin": "[0,30)"}

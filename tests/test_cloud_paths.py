"""Models, data, masks and outputs addressed as URIs go through Beam's FileSystems.

The job runs for real on ``testfs://`` (tests/testfs.py), a Beam FileSystem with object-store
semantics like ``gs://``: no directories, objects that appear when their writer closes. Any code
that reaches past FileSystems (``open``, ``os.path``, ``tf.io.gfile``, a pyarrow path) fails here.
"""
import io
import json
import os
import shutil
import tempfile

import pandas as pd
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems

import testfs
from beam_pipeline import cli
from conftest import gap_model, make_manifest
from helpers import BASE_COLUMNS, MASK_COLUMNS, assert_accounting


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """An empty testfs:// "bucket" backed by a folder under tmp_path."""
    root = tmp_path / "testfs-root"
    root.mkdir()
    monkeypatch.setenv(testfs.ROOT_ENV, str(root))
    return "testfs://bucket"


def upload(local_folder, uri):
    """Copy a local tree into testfs through FileSystems (as gsutil cp -r would)."""
    for dirpath, _, files in os.walk(local_folder):
        for name in files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, local_folder).replace(os.sep, "/")
            with open(path, "rb") as src, FileSystems.create(FileSystems.join(uri, rel)) as dst:
                dst.write(src.read())


def read_parquet_folder(uri):
    files = sorted(m.path for m in FileSystems.match([uri + "/*.parquet"])[0].metadata_list)
    assert files, f"no Parquet files under {uri}"
    frames = []
    for path in files:
        with FileSystems.open(path) as handle:
            frames.append(pq.read_table(io.BytesIO(handle.read())).to_pandas())
    return pd.concat(frames, ignore_index=True)


def test_model_data_masks_and_output_all_on_an_object_store_scheme(
        tmp_path, rng, bucket, monkeypatch):
    scratch = tmp_path / "scratch"  # the process's temp folder, to see what is left in it
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    local = tmp_path / "local"
    manifest = make_manifest(str(local / "data"), rng, n=12, num_classes=2)
    gap_model(num_classes=2).save(local / "model.keras")
    ids = pd.read_csv(manifest).id
    upload(local, f"{bucket}/in")
    shutil.rmtree(local)  # nothing local is left to fall back on
    output = f"{bucket}/audits/run1"

    code = cli.main(["run", "--model", f"{bucket}/in/model.keras",
                     "--data", f"{bucket}/in/data/manifest.csv", "--output", output,
                     "--batch-size", "5", "--permutation-features", "patches:2x2",
                     "--permutation-repeats", "1", "--baseline-gates", "off"])  # random model
    assert code == 0

    attributions = read_parquet_folder(f"{output}/attributions")
    errors = read_parquet_folder(f"{output}/errors")
    assert set(attributions.columns) == BASE_COLUMNS | MASK_COLUMNS | {"site"}
    assert_accounting(attributions, errors, ids)
    assert len(attributions) == 12 and errors.empty
    # Masks were read from the scheme too: every example has a mask, so a mask share.
    assert attributions.mask_area.notna().all()
    with FileSystems.open(f"{output}/run.json") as handle:
        run = json.loads(handle.read())
    assert run["counts"]["examples_in"] == 12 and run["counts"]["accounting_ok"]
    assert run["model"]["path"] == f"{bucket}/in/model.keras" and len(run["model"]["sha256"]) == 64
    assert run["tfma"]["metrics"]["overall"]["auc"] is not None  # read back from testfs
    assert run["tfma"]["output"] == f"{output}/tfma"
    assert run["importance"]["figures"]
    assert FileSystems.exists(f"{output}/importance_summary.parquet")
    assert FileSystems.match([f"{output}/tfma/**"])[0].metadata_list
    # No staging folder or temp object left behind.
    names = [m.path[len(output) + 1:] for m in FileSystems.match([f"{output}/**"])[0].metadata_list]
    assert not [n for n in names if n.startswith(".") or "beam-temp" in n], names
    # The local copies of the remote model and TFMA results are gone too.
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("xai-audit-")]

    # The folder now holds a run: refused without --overwrite, replaced with it.
    again = ["run", "--model", f"{bucket}/in/model.keras", "--data",
             f"{bucket}/in/data/manifest.csv", "--output", output, "--tfma-config", "none",
             "--permutation-features", "none", "--baseline-gates", "off"]
    assert cli.main(again) == 1
    assert cli.main(again + ["--overwrite"]) == 0
    assert not FileSystems.match([f"{output}/tfma/**"])[0].metadata_list  # the old run's TFMA
    assert not FileSystems.exists(f"{output}/importance_summary.parquet")
    assert len(read_parquet_folder(f"{output}/attributions")) == 12

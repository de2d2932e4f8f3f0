"""Fault injection: the real job on small datasets with one example per fault class.

For each source kind (manifest, class folders, TFRecords) one mixed-fault dataset is built and
audited once, with the default settings (TFMA, permutation importance, faithfulness and sanity
sampling all on), so a fault that breaks any stage shows. Every case then asserts its outcome
(audited, or an error row with a specific error_type) and every dataset the accounting identity:
each input example exactly once in attributions or errors, and run.json agreeing.

Decided outcomes: grayscale, RGBA, 16-bit and 1x1 images are converted/resized and audited;
truncated, random-byte, empty, missing and oversized (decompression bomb) images, unreadable or
wrongly sized masks, and bad labels are error rows (an empty label is not: the example is
audited as unlabeled); of several examples sharing an id one is
audited (the first by source) and the others are ``duplicate_id`` error rows under that id;
manifest paths leading outside the manifest's folder are ``path_outside_data`` error rows unless
``--allow-paths-outside-data`` is given.
"""
import collections
import json
import os
import struct
import zlib

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from conftest import IMAGE_SIZE, gap_model, png_bytes, random_image, write_png
from helpers import read_outputs, run_cli

HTML = "<script>alert(1)</script>"
AUDITED = ("attributions", None)


def err(error_type):
    return ("errors", error_type)


# --------------------------------------------------------------------------- helpers


def assert_accounting(out, input_ids):
    """Every input example exactly once across attributions and errors, and run.json agreeing.

    Ids are compared as multisets: a dataset may list an id twice (both occurrences are then
    accounted for, one audited and one a duplicate_id error); attribution ids stay unique."""
    attributions, errors, run = read_outputs(out)
    ok, failed = list(attributions.example_id), list(errors.example_id)
    assert len(ok) == len(set(ok)), "an example was audited twice"
    assert collections.Counter(ok + failed) == collections.Counter(input_ids), "lost or extra rows"
    counts = run["counts"]
    assert counts["examples_in"] == len(input_ids)
    assert counts["examples_ok"] + counts["examples_failed"] == counts["examples_in"]
    assert counts["examples_ok"] == len(ok) and counts["examples_failed"] == len(failed)
    assert counts["accounting_ok"] is True
    return attributions, errors, run


def outcomes(attributions, errors):
    """{example_id: [(table, error_type), ...]} of a run's outputs."""
    found = collections.defaultdict(list)
    for example_id in attributions.example_id:
        found[example_id].append(AUDITED)
    for example_id, error_type in zip(errors.example_id, errors.error_type):
        found[example_id].append(err(error_type))
    return found


def assert_outcomes(out, expected):
    """``expected``: {example_id: outcome or [outcomes]}; checks accounting, then each case."""
    input_ids = [i for i, o in expected.items() for _ in (o if isinstance(o, list) else [o])]
    attributions, errors, run = assert_accounting(out, input_ids)
    found = outcomes(attributions, errors)
    for example_id, outcome in expected.items():
        want = sorted(outcome if isinstance(outcome, list) else [outcome], key=str)
        assert sorted(found[example_id], key=str) == want, example_id
    assert (errors.message.str.len() > 20).all()  # every error says what is wrong
    return attributions, errors, run


# --------------------------------------------------------------------------- fault bytes


def bomb_png(side=9000):
    """A genuine decompression bomb: a valid 8-bit grayscale PNG of side x side black pixels
    (81 M pixels, above the default 64 M budget) in a file of about 80 KB."""
    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    compressor = zlib.compressobj(9)
    row = b"\0" * (side + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def sixteen_bit_png(rng):
    return png_bytes(rng.integers(0, 65536, (20, 24), dtype=np.uint16))


def fault_images(rng):
    """{name: bytes} of every image fault class, plus a good image."""
    good = png_bytes(random_image(rng))
    return {
        "good": good,
        "truncated": good[: len(good) // 2],
        "random_bytes": rng.bytes(600),
        "empty": b"",
        "tiny_1x1": png_bytes(random_image(rng, size=(1, 1))),
        "grayscale": png_bytes(random_image(rng, channels=1)),
        "rgba": png_bytes(random_image(rng, channels=4)),
        "sixteen_bit": sixteen_bit_png(rng),
        "bomb": bomb_png(),
    }


IMAGE_OUTCOMES = {
    "good": AUDITED,
    "truncated": err("corrupt_image"),
    "random_bytes": err("corrupt_image"),
    "empty": err("empty_image"),
    "tiny_1x1": AUDITED,
    "grayscale": AUDITED,
    "rgba": AUDITED,
    "sixteen_bit": AUDITED,
    "bomb": err("image_too_large"),
}


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


@pytest.fixture(scope="module")
def model3(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.keras"
    gap_model(num_classes=3).save(path)
    return str(path)


# --------------------------------------------------------------------------- manifest


def build_fault_manifest(root, rng):
    """A CSV manifest with one row per fault class; returns (manifest path, expected outcomes)."""
    rows, expected = [], {}
    images = fault_images(rng)
    mask = np.zeros((20, 24), np.uint8)
    mask[4:10, 5:15] = 255

    def add(example_id, outcome, image, label=0, site="s0", mask_rel=None):
        rows.append({"id": example_id, "image": image, "label": label, "site": site,
                     "mask": mask_rel})
        expected.setdefault(example_id, []).append(outcome)

    for name, data in images.items():
        write(os.path.join(root, "img", f"{name}.png"), data)
        add(name, IMAGE_OUTCOMES[name], f"img/{name}.png", label=len(rows) % 3)
    for i in range(4):  # plain examples with masks, so every stage has some work
        write_png(os.path.join(root, "img", f"ok{i}.png"), random_image(rng))
        write_png(os.path.join(root, "mask", f"ok{i}.png"), mask)
        add(f"ok{i}", AUDITED, f"img/ok{i}.png", label=i % 3, site=f"s{i % 2}",
            mask_rel=f"mask/ok{i}.png")
    add("missing", err("missing_image"), "img/nowhere.png")
    write(os.path.join(root, "mask", "unreadable.png"), b"this is no png")
    add("mask_unreadable", err("corrupt_mask"), "img/good.png", mask_rel="mask/unreadable.png")
    write_png(os.path.join(root, "mask", "small.png"), np.full((10, 10), 255, np.uint8))
    add("mask_wrong_size", err("mask_size_mismatch"), "img/good.png", mask_rel="mask/small.png")
    add("mask_missing", err("missing_mask"), "img/good.png", mask_rel="mask/nowhere.png")
    add("label_out_of_range", err("label_out_of_range"), "img/good.png", label=7)
    add("label_empty", AUDITED, "img/good.png", label="")  # unlabeled, not an error
    add("label_text", err("unknown_label"), "img/good.png", label="abc")
    add("html_slice", AUDITED, "img/good.png", site=HTML)
    # Two examples under one id: the first by source path is audited, the other is an error.
    write_png(os.path.join(root, "img", "dup_a.png"), random_image(rng))
    write_png(os.path.join(root, "img", "dup_b.png"), random_image(rng))
    add("dup", err("duplicate_id"), "img/dup_b.png", label=1)
    add("dup", AUDITED, "img/dup_a.png", label=2)
    # Paths leading out of the manifest's folder, to files that do exist.
    outside = os.path.join(os.path.dirname(root), "other")
    write_png(os.path.join(outside, "x.png"), random_image(rng))
    write_png(os.path.join(outside, "m.png"), mask)
    add("outside_relative", err("path_outside_data"), "../other/x.png")
    add("outside_absolute", err("path_outside_data"), os.path.join(outside, "x.png"))
    add("outside_mask", err("path_outside_data"), "img/good.png", mask_rel="../other/m.png")
    add("inside_dotdot", AUDITED, "img/../img/good.png")  # folds to a path inside: fine
    path = os.path.join(root, "manifest.csv")
    pd.DataFrame(rows).to_csv(path, index=False)
    return path, expected


@pytest.fixture(scope="module")
def manifest_run(tmp_path_factory, model3):
    root = tmp_path_factory.mktemp("faults")
    manifest, expected = build_fault_manifest(str(root / "data"), np.random.default_rng(7))
    out = str(root / "out")
    code = run_cli("run", "--model", model3, "--data", manifest, "--output", out)
    return {"code": code, "out": out, "expected": expected, "manifest": manifest,
            "root": root}


def test_manifest_faults_each_have_their_outcome(manifest_run):
    attributions, errors, run = assert_outcomes(manifest_run["out"], manifest_run["expected"])
    assert manifest_run["code"] == 4  # far more than 1% failed; everything is still written
    failures = errors.set_index("example_id")
    assert (failures.loc["bomb", "stage"], failures.loc["missing", "stage"]) == ("decode", "read")
    assert "--allow-paths-outside-data" in failures.loc["outside_relative", "message"]
    assert failures.loc["dup", "source"].endswith("dup_b.png")
    # The audited examples of converted formats have ordinary rows.
    rows = attributions.set_index("example_id")
    for name in ("tiny_1x1", "grayscale", "rgba", "sixteen_bit"):
        assert np.isfinite(rows.loc[name, "probabilities"]).all()
        assert list(rows.loc[name, "gradcam_shape"]) == [IMAGE_SIZE - 2, IMAGE_SIZE - 2]
    assert rows.loc["dup", "label"] == 2  # dup_a's row, not dup_b's
    # An empty label: audited with a null label, counted, and said in the report's verdict.
    assert pd.isna(rows.loc["label_empty", "label"])
    assert np.isfinite(rows.loc["label_empty", "probabilities"]).all()
    assert run["counts"]["examples_unlabeled"] == 1
    assert "missing_label" not in run["counts"]["errors_by_type"]
    with open(os.path.join(manifest_run["out"], "report", "summary.json")) as handle:
        summary = json.load(handle)
    assert summary["accounting"]["examples_unlabeled"] == 1
    assert any("1 have no label" in c for c in summary["verdict"]["caveats"])
    assert run["counts"]["errors_by_type"]["corrupt_image"] == 2


def test_html_in_a_slice_value_is_carried_unchanged(manifest_run):
    attributions, _, run = read_outputs(manifest_run["out"])
    assert attributions.set_index("example_id").loc["html_slice", "site"] == HTML
    assert f"site={HTML}" in run["tfma"]["metrics"]


def test_every_stage_ran_on_the_faulty_data(manifest_run):
    out = manifest_run["out"]
    _, _, run = read_outputs(out)
    summary = pd.read_parquet(os.path.join(out, "importance_summary.parquet"))
    assert summary.importance.notna().any() and (summary.n > 0).all()
    assert set(pd.read_parquet(os.path.join(out, "sanity.parquet")).method) == {"gradcam"}
    assert "overall" in run["tfma"]["metrics"]


def test_paths_outside_the_data_folder_with_the_explicit_flag(tmp_path, rng, model3):
    root = tmp_path / "data"
    write_png(str(tmp_path / "other" / "x.png"), random_image(rng))
    write_png(str(root / "in.png"), random_image(rng))
    manifest = root / "manifest.csv"
    pd.DataFrame([{"id": "rel", "image": "../other/x.png", "label": 0},
                  {"id": "abs", "image": str(tmp_path / "other" / "x.png"), "label": 1},
                  {"id": "in", "image": "in.png", "label": 2}]).to_csv(manifest, index=False)
    out = tmp_path / "out"
    quick = ["--tfma-config", "none", "--permutation-features", "none",
             "--faithfulness-sample", "0", "--sanity-sample", "0", "--baseline-gates", "off"]
    assert run_cli("run", "--model", model3, "--data", manifest, "--output", out,
                   "--allow-paths-outside-data", *quick) == 0
    assert_outcomes(out, {"rel": AUDITED, "abs": AUDITED, "in": AUDITED})


# --------------------------------------------------------------------------- class folders


def test_class_folder_faults(tmp_path, rng, model3):
    root = str(tmp_path / "folders")
    images = fault_images(rng)
    expected = {}
    for i, (name, data) in enumerate(images.items()):
        rel = f"{'abc'[i % 3]}/{name}.png"
        write(os.path.join(root, rel), data)
        expected[rel] = IMAGE_OUTCOMES[name]
    for cls in "abc":
        write_png(os.path.join(root, cls, "plain.png"), random_image(rng))
        expected[f"{cls}/plain.png"] = AUDITED
    write(os.path.join(root, "a", "notes.txt"), b"not an image at all")
    expected["a/notes.txt"] = err("corrupt_image")
    write(os.path.join(root, "a", ".DS_Store"), b"\0\0")  # hidden: not an example
    out = tmp_path / "out"
    assert run_cli("run", "--model", model3, "--data", root, "--output", out) == 4
    assert_outcomes(out, expected)


# --------------------------------------------------------------------------- TFRecords


def _tf_example(image=None, label=0, key=None, site="s0", mask=None):
    def feature(value):
        if isinstance(value, int):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
        return tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[value.encode() if isinstance(value, str) else value]))

    features = {"label": feature(label), "site": feature(site)}
    if image is not None:
        features["image"] = feature(image)
    if key is not None:
        features["key"] = feature(key)
    if mask is not None:
        features["mask"] = feature(mask)
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def test_tfrecord_faults(tmp_path, rng, model3):
    root = tmp_path / "tfr"
    root.mkdir()
    images = fault_images(rng)
    mask = np.zeros((20, 24), np.uint8)
    mask[3:9, 4:12] = 255
    expected = {}
    records_a = []
    for i, (name, data) in enumerate(images.items()):
        records_a.append(_tf_example(data, i % 3, key=name,
                                     mask=png_bytes(mask) if name == "good" else None))
        expected[name] = IMAGE_OUTCOMES[name]
    good = images["good"]
    cases = [
        ("no_image", None, 0, {}, err("missing_image")),
        ("mask_unreadable", good, 0, {"mask": b"junk"}, err("corrupt_mask")),
        ("mask_wrong_size", good, 0, {"mask": png_bytes(mask[:5, :5])}, err("mask_size_mismatch")),
        ("label_out_of_range", good, 9, {}, err("label_out_of_range")),
        ("label_text", good, "abc", {}, err("unknown_label")),
        ("label_empty", good, "", {}, AUDITED),  # unlabeled, not an error
        ("html_slice", good, 1, {"site": HTML}, AUDITED),
    ]
    for key, image, label, extra, outcome in cases:
        records_a.append(_tf_example(image, label, key=key, **extra))
        expected[key] = outcome
    with tf.io.TFRecordWriter(str(root / "a.tfrecord")) as writer:
        for record in records_a:
            writer.write(record)
    # b.tfrecord repeats an id of a.tfrecord: one of the two is audited, by source order.
    with tf.io.TFRecordWriter(str(root / "b.tfrecord")) as writer:
        writer.write(_tf_example(good, 1, key="good"))
        writer.write(_tf_example(png_bytes(random_image(rng)), 2, key="b_plain"))
    expected["good"] = [AUDITED, err("duplicate_id")]
    expected["b_plain"] = AUDITED
    out = tmp_path / "out"
    assert run_cli("run", "--model", model3, "--data", root / "*.tfrecord", "--output", out,
                   "--id-column", "key") == 4
    attributions, errors, run = assert_outcomes(out, expected)
    failures = errors.set_index("example_id")
    assert failures.loc["good", "source"].endswith("b.tfrecord:0")
    assert attributions.set_index("example_id").loc["html_slice", "site"] == HTML


# --------------------------------------------------------------------------- the model


def overflowing_model(path):
    """conv → GAP → dense whose conv weights overflow float32 on bright pixels: a black image
    gives finite outputs, a bright one inf activations and NaN probabilities. Plain layers only,
    so it loads in Keras safe mode."""
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    conv = keras.layers.Conv2D(2, 3, activation="relu", name="conv")
    x = keras.layers.GlobalAveragePooling2D()(conv(inputs))
    dense = keras.layers.Dense(3, activation="softmax", name="head")
    model = keras.Model(inputs, dense(x))
    conv.set_weights([np.full((3, 3, 3, 2), 1e38, np.float32), np.zeros(2, np.float32)])
    dense.set_weights([np.array([[1.0, 2.0, 0.5], [0.5, 1.0, 3.0]], np.float32),
                       np.array([0.1, 0.0, -0.1], np.float32)])
    model.save(path)


def test_nan_and_inf_model_outputs_become_error_rows(tmp_path):
    overflowing_model(tmp_path / "nan.keras")
    root = tmp_path / "data"
    rows, expected = [], {}
    for i in range(6):
        dark = i % 2 == 0
        name = f"{'dark' if dark else 'bright'}{i}"
        write_png(str(root / f"{name}.png"), np.full((20, 24, 3), 0 if dark else 255, np.uint8))
        rows.append({"id": name, "image": f"{name}.png", "label": i % 3, "site": f"s{i % 2}"})
        expected[name] = AUDITED if dark else err("non_finite_output")
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    out = tmp_path / "out"
    code = run_cli("run", "--model", tmp_path / "nan.keras", "--data", root / "manifest.csv",
                   "--output", out, "--tfma-config", "none", "--max-error-rate", "0.6",
                   "--baseline-gates", "off")  # constant outputs on dark images: degenerate
    assert code == 0
    _, errors, _ = assert_outcomes(out, expected)
    assert set(errors.stage) == {"predict"}
    # Importance covers the examples with finite outputs only.
    summary = pd.read_parquet(out / "importance_summary.parquet")
    assert (summary.n == 3).all() and summary.importance.map(np.isfinite).any()


@pytest.mark.parametrize("case", ["text.keras", "zip.keras", "png.h5", "empty_dir", "dense.keras"])
def test_a_model_file_that_is_not_a_model_exits_1_without_traceback(
        tmp_path, capsys, rng, case):
    data = tmp_path / "data"
    write_png(str(data / "a" / "0.png"), random_image(rng))
    model = tmp_path / case
    if case == "text.keras":
        model.write_text("definitely not a model")
    elif case == "zip.keras":
        import zipfile

        with zipfile.ZipFile(model, "w") as archive:
            archive.writestr("readme.txt", "a zip, but no Keras model in it")
    elif case == "png.h5":
        model.write_bytes(png_bytes(random_image(rng)))
    elif case == "empty_dir":
        model.mkdir()
    elif case == "dense.keras":  # a model, but not of images
        inputs = keras.Input((5,))
        keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs)).save(model)
    code = run_cli("run", "--model", model, "--data", data, "--output", tmp_path / "out")
    err_text = capsys.readouterr().err
    assert code == 1
    assert "xai-audit: error:" in err_text and "Traceback" not in err_text
    assert case in err_text  # the message names the file


# --------------------------------------------------------------------------- determinism


def test_a_rerun_with_the_same_seed_gives_identical_outputs(manifest_run, model3):
    """Same data, model and seed: attributions and importance are bitwise identical.

    Bitwise, not allclose: every random choice is seeded from (seed, ids), shards and the
    faithfulness sample are chosen by hashes of ids, a shard's examples are sorted by id, and
    the local runner feeds the model the same batches in the same order; on CPU TensorFlow's
    kernels are deterministic for a given batch."""
    first = manifest_run["out"]
    second = str(manifest_run["root"] / "rerun")
    assert run_cli("run", "--model", model3, "--data", manifest_run["manifest"],
                   "--output", second) == manifest_run["code"]

    def table(out, name, keys):
        frame = pd.read_parquet(os.path.join(out, name))
        return frame.sort_values(keys).reset_index(drop=True)

    for name, keys in (("attributions", ["example_id"]),
                       ("errors", ["example_id", "source"]),
                       ("importance", ["shard", "feature", "repeat", "metric"]),
                       ("importance_summary.parquet", ["feature", "metric"])):
        a, b = table(first, name, keys), table(second, name, keys)
        assert list(a.columns) == list(b.columns)
        for column in a.columns:
            left, right = a[column].tolist(), b[column].tolist()
            assert _bitwise(left) == _bitwise(right), f"{name}.{column} differs"
    # The comparison has teeth: another seed draws other permutations.
    third = str(manifest_run["root"] / "other_seed")
    run_cli("run", "--model", model3, "--data", manifest_run["manifest"], "--output", third,
            "--seed", "1", "--tfma-config", "none", "--faithfulness-sample", "0",
            "--sanity-sample", "0")
    keys = ["shard", "feature", "repeat", "metric"]
    assert (table(first, "importance", keys).permuted.tolist()
            != table(third, "importance", keys).permuted.tolist())


def _bitwise(values):
    """Values with float arrays as raw bytes, so NaN == NaN and -0.0 != 0.0 (bitwise)."""
    out = []
    for value in values:
        if isinstance(value, np.ndarray):
            out.append((value.dtype.str, value.tobytes()) if value.dtype.kind == "f"
                       else tuple(_bitwise(list(value))))
        elif isinstance(value, float):
            out.append(struct.pack("<d", value))
        else:
            out.append(value)
    return out


def test_empty_label_with_target_label_is_no_label_for_target(tmp_path, rng, model3):
    """An unlabeled example is audited by default, but --target label needs its label."""
    root = tmp_path / "data"
    for name in ("a", "b"):
        write_png(str(root / f"{name}.png"), random_image(rng))
    manifest = root / "manifest.csv"
    pd.DataFrame([{"id": "labeled", "image": "a.png", "label": 1},
                  {"id": "unlabeled", "image": "b.png", "label": ""}]).to_csv(manifest,
                                                                               index=False)
    out = tmp_path / "out"
    quick = ["--tfma-config", "none", "--permutation-features", "none",
             "--faithfulness-sample", "0", "--sanity-sample", "0", "--max-error-rate", "0.5"]
    assert run_cli("run", "--model", model3, "--data", manifest, "--output", out,
                   "--target", "label", *quick) == 0
    attributions, errors, run = assert_outcomes(
        out, {"labeled": AUDITED, "unlabeled": err("no_label_for_target")})
    assert errors.set_index("example_id").loc["unlabeled", "stage"] == "explain"


def test_a_record_header_claiming_a_terabyte_ends_the_file_as_truncated(tmp_path):
    from beam_pipeline.io import sources

    length = struct.pack("<Q", 1 << 40)  # 1 TB, with a valid CRC: only the read can tell
    path = tmp_path / "huge.tfrecord"
    path.write_bytes(length + struct.pack("<I", sources._masked_crc32c(length)) + b"a few bytes")
    with open(path, "rb") as handle:  # above --max-image-bytes: refused from the header alone
        with pytest.raises(sources._BrokenFraming, match="above the limit") as refused:
            next(sources._read_records(handle))
    assert refused.value.error_type == "file_too_large"
    with open(path, "rb") as handle:  # a limit above 1 TB: read(1 TB) would allocate it up front
        with pytest.raises(sources._BrokenFraming, match="truncated") as cut:
            next(sources._read_records(handle, max_bytes=1 << 41))
    assert cut.value.error_type == "truncated_file"

"""The real job through the command line: the three input forms, model formats, targets,
runner modes, bad input with the accounting identity, and exit codes."""
import json
import os
import shutil
import struct
import subprocess
import sys

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
import tf_keras

from beam_pipeline import cli
from beam_pipeline.io import decode
from conftest import IMAGE_SIZE, conv_activations, gap_model, make_manifest, png_bytes, random_image
from helpers import BASE_COLUMNS, MASK_COLUMNS, assert_accounting, read_outputs, run_cli  # noqa: F401

# The fixtures' models have random weights: a useless model fails the baseline gates
# (test_verdict.py), so runs that test the job's plumbing turn them off.
RANDOM = ("--baseline-gates", "off")


def test_class_folders_end_to_end_match_closed_form(tmp_path, folder_dataset, saved_model):
    out = tmp_path / "out"
    assert run_cli("run", *RANDOM, "--model", saved_model, "--data", folder_dataset, "--output", out) == 0
    attributions, errors, run = read_outputs(out)
    assert set(attributions.columns) == BASE_COLUMNS
    assert len(attributions) == 12 and errors.empty
    assert sorted(attributions.example_id)[:2] == ["a/0.png", "a/1.png"]
    assert dict(zip(attributions.example_id, attributions.label))["c/3.png"] == 2
    assert run["counts"] == {**run["counts"], "examples_in": 12, "examples_ok": 12,
                             "examples_failed": 0, "accounting_ok": True}
    assert run["model"]["class_names"] == ["a", "b", "c"]
    assert run["model"]["gradcam_layer"] == "conv"
    assert len(run["model"]["sha256"]) == 64 and run["data"]["fingerprint"].startswith("sha256:")
    assert run["gates"][0]["passed"] is True and run["exit_code"] == 0

    # The written map is the closed form for this GAP → dense model on the decoded image.
    row = attributions.set_index("example_id").loc["b/2.png"]
    with open(os.path.join(folder_dataset, "b", "2.png"), "rb") as handle:
        image = decode.decode_image(handle.read(), decode.ImageSpec(IMAGE_SIZE, IMAGE_SIZE, 3))
    model = keras.models.load_model(saved_model)
    acts = conv_activations(model, image[None])[0]
    probs = model(image[None]).numpy()[0]
    target = int(np.argmax(probs))
    w = model.get_layer("head").kernel.numpy()[:, target]
    expected = np.maximum(acts @ w, 0) / (acts.shape[0] * acts.shape[1])
    assert row.target_class == target == row.predicted_class
    assert list(row.gradcam_shape) == [14, 14]
    np.testing.assert_allclose(np.array(row.gradcam).reshape(14, 14), expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(row.probabilities, probs, atol=1e-6)


def test_manifest_with_masks_slices_and_label_target(tmp_path, manifest_dataset, saved_model):
    out = tmp_path / "out"
    code = run_cli("run", *RANDOM, "--model", saved_model, "--data", manifest_dataset, "--output", out,
                   "--target", "label", "--batch-size", "5")
    assert code == 0
    attributions, errors, run = read_outputs(out)
    assert set(attributions.columns) == BASE_COLUMNS | MASK_COLUMNS | {"site"}
    assert errors.empty and len(attributions) == 12
    assert (attributions.target_class == attributions.label).all()
    assert set(attributions.site) == {"s0", "s1"}
    # Null where the map is all zero (nothing to place); otherwise a share in [0, 1].
    energy = attributions.gradcam_mask_energy
    zero_maps = attributions.gradcam.map(lambda m: max(m) == 0)
    assert (energy.isna() == zero_maps).all() and energy.dropna().between(0, 1).all()
    assert (attributions.gradcam_pointing_hit.isna() == zero_maps).all()
    assert run["data"]["slice_columns"] == {"site": "string"}


def test_parquet_manifest_with_class_names_and_fixed_target(tmp_path, rng, saved_model):
    root = tmp_path / "pq"
    csv = make_manifest(str(root), rng, n=6, masks=False)
    frame = pd.read_csv(csv)
    frame["label"] = frame["label"].map({0: "cat", 1: "dog", 2: "eel"})
    frame["age"] = np.arange(6, dtype=np.int64) * 10
    frame.to_parquet(root / "manifest.parquet")
    out = tmp_path / "out"
    code = run_cli("run", *RANDOM, "--model", saved_model, "--data", root / "manifest.parquet",
                   "--output", out, "--target", "2", "--slice-columns", "age",
                   "--class-names", "cat,dog,eel")
    assert code == 0
    attributions, _, run = read_outputs(out)
    assert set(attributions.columns) == BASE_COLUMNS | {"age"}
    assert (attributions.target_class == 2).all()
    assert attributions.set_index("example_id").loc["ex004"].label == 1  # "dog"
    assert attributions.age.dtype == np.int64


def _tf_example(image, label, mask=None, site="s0", ident=None):
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        "site": tf.train.Feature(bytes_list=tf.train.BytesList(value=[site.encode()])),
    }
    if mask is not None:
        feature["mask"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[mask]))
    if ident is not None:
        feature["key"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[ident.encode()]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def test_tfrecords_with_corrupt_and_truncated_records(tmp_path, rng, saved_model):
    root = tmp_path / "tfr"
    root.mkdir()
    mask = np.zeros((20, 24), np.uint8)
    mask[2:9, 3:12] = 255
    with tf.io.TFRecordWriter(str(root / "a.tfrecord")) as writer:
        for i in range(5):
            writer.write(_tf_example(png_bytes(random_image(rng)), i % 3, png_bytes(mask),
                                     site=f"s{i % 2}"))
    with tf.io.TFRecordWriter(str(root / "b.tfrecord")) as writer:
        for i in range(3):
            writer.write(_tf_example(png_bytes(random_image(rng)), 1, png_bytes(mask)))
    # In a.tfrecord, corrupt record 2's data (its CRC no longer matches).
    data = bytearray((root / "a.tfrecord").read_bytes())
    offset = 0
    for _ in range(2):
        offset += 12 + struct.unpack("<Q", data[offset:offset + 8])[0] + 4
    data[offset + 12 + 40] ^= 0xFF
    (root / "a.tfrecord").write_bytes(bytes(data))
    # Cut b.tfrecord in the middle of its last record.
    b = (root / "b.tfrecord").read_bytes()
    (root / "b.tfrecord").write_bytes(b[:-30])

    out = tmp_path / "out"
    code = run_cli("run", *RANDOM, "--model", saved_model, "--data", root / "*.tfrecord", "--output", out,
                   "--max-error-rate", "0.5")
    assert code == 0
    attributions, errors, run = read_outputs(out)
    assert set(attributions.columns) == BASE_COLUMNS | MASK_COLUMNS | {"site"}
    expected = [f"a.tfrecord:{i}" for i in range(5)] + [f"b.tfrecord:{i}" for i in range(3)]
    assert_accounting(attributions, errors, expected)
    failures = dict(zip(errors.example_id, errors.error_type))
    assert failures == {"a.tfrecord:2": "corrupt_record", "b.tfrecord:2": "truncated_file"}
    assert set(errors.stage) == {"read"}
    assert run["counts"]["examples_in"] == 8 and run["counts"]["accounting_ok"]


def test_bad_input_manifest_every_example_accounted(tmp_path, rng, saved_model):
    root = str(tmp_path / "bad")
    good = png_bytes(random_image(rng))
    truncated = good[: len(good) // 2]
    os.makedirs(os.path.join(root, "img"))
    for name, data in {"corrupt.png": b"\x89PNG garbage", "truncated.png": truncated,
                       "empty.png": b"", "ok.png": good, "badmask.png": b"nope"}.items():
        with open(os.path.join(root, "img", name), "wb") as handle:
            handle.write(data)
    extra = [
        {"id": "corrupt", "image": "img/corrupt.png", "label": 0},
        {"id": "truncated", "image": "img/truncated.png", "label": 0},
        {"id": "empty", "image": "img/empty.png", "label": 0},
        {"id": "missing", "image": "img/nowhere.png", "label": 0},
        {"id": "bad_mask", "image": "img/ok.png", "label": 0, "mask": "img/badmask.png"},
        {"id": "missing_mask", "image": "img/ok.png", "label": 0, "mask": "img/nomask.png"},
        {"id": "out_of_range", "image": "img/ok.png", "label": 7},
        {"id": "no_label", "image": "img/ok.png", "label": None},
        {"id": "no_image", "image": None, "label": 1},
    ]
    manifest = make_manifest(root, rng, n=6, extra_rows=extra)
    out = tmp_path / "out"
    code = run_cli("run", "--model", saved_model, "--data", manifest, "--output", out)
    assert code == 4  # 8 of 15 failed, far above the default 1%
    attributions, errors, run = read_outputs(out)
    assert_accounting(attributions, errors, pd.read_csv(manifest).id)
    assert dict(zip(errors.example_id, errors.error_type)) == {
        "corrupt": "corrupt_image", "truncated": "corrupt_image", "empty": "empty_image",
        "missing": "missing_image", "bad_mask": "corrupt_mask", "missing_mask": "missing_mask",
        "out_of_range": "label_out_of_range",
        "no_image": "missing_image",
    }
    assert errors.message.str.len().min() > 10
    assert run["exit_code"] == 4 and run["gates"][0]["passed"] is False
    assert run["counts"]["examples_in"] == 15 and run["counts"]["accounting_ok"]
    # Rows without a mask still get audited, with null mask metrics; an empty label is audited
    # as unlabeled (label null), not an error.
    assert len(attributions) == 7
    assert attributions.set_index("example_id").label.isna().to_dict()["no_label"]
    assert run["counts"]["examples_unlabeled"] == 1
    # The same data passes when the threshold allows it.
    assert run_cli("run", *RANDOM, "--model", saved_model, "--data", manifest, "--output", out,
                   "--max-error-rate", "0.7", "--overwrite") == 0


def test_h5_and_keras2_savedmodel_give_the_same_rows(tmp_path, folder_dataset):
    model = gap_model(num_classes=3, seed=11)
    model.save(tmp_path / "m.keras")
    model.save(tmp_path / "m.h5")
    k2 = tf_keras.Sequential([
        tf_keras.layers.Conv2D(4, 3, activation="relu", input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
                               name="conv"),
        tf_keras.layers.GlobalAveragePooling2D(),
        tf_keras.layers.Dense(3, activation="softmax", name="head"),
    ])
    k2.set_weights(model.get_weights())
    k2.save(str(tmp_path / "saved_model"), save_format="tf")
    probabilities = {}
    for name in ("m.keras", "m.h5", "saved_model"):
        out = tmp_path / f"out_{name}"
        assert run_cli("run", *RANDOM, "--model", tmp_path / name, "--data", folder_dataset,
                       "--output", out) == 0
        frame = pd.read_parquet(out / "attributions").sort_values("example_id")
        probabilities[name] = np.stack(frame.probabilities)
        maps = np.stack(frame.gradcam)
        if name == "m.keras":
            reference_maps = maps
        np.testing.assert_allclose(maps, reference_maps, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(probabilities["m.h5"], probabilities["m.keras"], atol=1e-6)
    np.testing.assert_allclose(probabilities["saved_model"], probabilities["m.keras"], atol=1e-6)


def test_multi_processing_equals_in_memory(tmp_path, manifest_dataset, saved_model):
    frames = {}
    for mode in ("in_memory", "multi_processing"):
        out = tmp_path / mode
        code = run_cli("run", *RANDOM, "--model", saved_model, "--data", manifest_dataset, "--output", out,
                       "--batch-size", "4", "--direct_num_workers", "2",
                       "--direct_running_mode", mode)
        assert code == 0
        frames[mode] = pd.read_parquet(out / "attributions").sort_values("example_id")
    a, b = frames["in_memory"], frames["multi_processing"]
    assert list(a.example_id) == list(b.example_id)
    np.testing.assert_allclose(np.stack(a.probabilities), np.stack(b.probabilities), atol=1e-5)
    np.testing.assert_allclose(np.stack(a.gradcam), np.stack(b.gradcam), rtol=1e-3, atol=1e-6)
    assert (a.predicted_class.values == b.predicted_class.values).all()
    with open(tmp_path / "multi_processing" / "run.json") as handle:
        assert json.load(handle)["runner"]["options"]["direct_running_mode"] == "multi_processing"


def _lambda_model(path):
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    x = keras.layers.Conv2D(2, 3, name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x)).save(path)


@pytest.mark.parametrize(
    "case,expected_code,needle",
    [
        ("missing_model", 1, "does not exist"),
        ("bad_model_file", 1, "could not be loaded"),
        ("missing_data", 1, "does not exist"),
        ("empty_folder", 1, "empty"),
        ("bad_layer", 1, "no layer of that name"),
        ("lambda_model", 1, "--unsafe-deserialization"),
        ("class_count_mismatch", 1, "classes"),
        ("bad_target", 1, "--target"),
    ],
)
def test_run_stopping_problems_exit_1_with_a_message(
    tmp_path, capsys, folder_dataset, saved_model, case, expected_code, needle
):
    model, data, extra = saved_model, folder_dataset, []
    if case == "missing_model":
        model = tmp_path / "nope.keras"
    elif case == "bad_model_file":
        model = tmp_path / "junk.keras"
        model.write_bytes(b"not a zip")
    elif case == "missing_data":
        data = tmp_path / "nowhere"
    elif case == "empty_folder":
        data = tmp_path / "empty"
        data.mkdir()
    elif case == "bad_layer":
        extra = ["--layer", "conv9"]
    elif case == "lambda_model":
        model = tmp_path / "lambda.keras"
        _lambda_model(model)
    elif case == "class_count_mismatch":
        shutil.copytree(folder_dataset, tmp_path / "four")
        shutil.copytree(os.path.join(folder_dataset, "a"), tmp_path / "four" / "d")
        data = tmp_path / "four"
    elif case == "bad_target":
        extra = ["--target", "5"]
    code = run_cli("run", "--model", model, "--data", data, "--output", tmp_path / "out", *extra)
    assert code == expected_code
    err = " ".join(capsys.readouterr().err.split())  # the message is wrapped
    assert needle in err and "Traceback" not in err


def test_unsafe_deserialization_is_an_explicit_opt_in(tmp_path, folder_dataset):
    _lambda_model(tmp_path / "lambda.keras")
    assert run_cli("run", *RANDOM, "--model", tmp_path / "lambda.keras", "--data", folder_dataset,
                   "--output", tmp_path / "out", "--unsafe-deserialization") == 0


def test_malformed_command_line_exits_2(tmp_path, saved_model):
    with pytest.raises(SystemExit) as info:
        run_cli("run", "--model", saved_model, "--data", tmp_path, "--output", tmp_path,
                "--not_a_beam_flag", "1")
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        run_cli("run", "--model", saved_model)
    assert info.value.code == 2


def test_console_script_prints_no_traceback(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "xai-audit")
    proc = subprocess.run([script, "run", "--model", str(tmp_path / "none.keras"), "--data",
                           str(tmp_path), "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "xai-audit: error:" in proc.stderr and "Traceback" not in proc.stderr


def test_every_method_with_layer_sweep_faithfulness_and_sanity(tmp_path, rng, saved_model):
    """The methods, the sweep and the quality measures through the real job, on a model with a
    global-average-pooling head (so CAM applies)."""
    manifest = make_manifest(str(tmp_path / "all"), rng, n=10)
    out = tmp_path / "out"
    code = run_cli("run", *RANDOM, "--model", saved_model, "--data", manifest, "--output", out,
                   "--methods", "gradcam,gradcam_plus_plus,cam,saliency,smoothgrad,"
                   "integrated_gradients", "--layer", "all", "--ig-steps", "16", "--smoothgrad-samples", "4",
                   "--faithfulness-sample", "4", "--sanity-sample", "4", "--map-size", "8",
                   "--tfma-config", "none", "--permutation-features", "none")
    assert code == 0
    attributions, errors, run = read_outputs(out)
    assert errors.empty and len(attributions) == 10
    methods = ("gradcam", "gradcam_plus_plus", "cam", "saliency", "smoothgrad",
               "integrated_gradients")
    for method in methods:
        for suffix in ("", "_shape", "_mask_energy", "_pointing_hit", "_iou", "_deletion_auc",
                       "_insertion_auc"):
            assert f"{method}{suffix}" in attributions.columns
    # Input-resolution maps are pooled to --map-size; conv-resolution maps are kept.
    assert list(attributions.saliency_shape[0]) == [8, 8]
    assert list(attributions.gradcam_shape[0]) == [14, 14]
    assert list(attributions.gradcam_plus_plus_shape[0]) == [14, 14]
    assert set(attributions.gradcam_plus_plus_layer) == set(attributions.gradcam_layer) == {"conv"}
    # CAM is Grad-CAM times h·w on this conv → GAP → dense model.
    cam = np.stack(attributions.cam.map(np.array))
    gradcam = np.stack(attributions.gradcam.map(np.array))
    np.testing.assert_allclose(cam, gradcam * 14 * 14, rtol=1e-3, atol=1e-5)
    assert attributions.ig_completeness_gap.dropna().between(0, 1).all()
    sampled = attributions.gradcam_deletion_auc.notna()
    assert 0 < sampled.sum() < 10
    assert (attributions.cam_insertion_auc.notna() == sampled).all()
    # run.json and the report carry the sample means with their 95% interval.
    figure = run["quality"]["faithfulness"]["gradcam"]["deletion_auc"]
    assert figure["n"] == sampled.sum()
    assert figure["value"] == pytest.approx(attributions.gradcam_deletion_auc.mean())
    assert figure["ci_low"] <= figure["value"] <= figure["ci_high"]
    assert set(run["quality"]["faithfulness"]) == {*methods, "random"}
    faithfulness = json.loads((out / "report" / "summary.json").read_text())["faithfulness"]
    assert faithfulness["rows"][0]["deletion_auc_ci"] == [figure["ci_low"], figure["ci_high"]]

    sweep = pd.read_parquet(out / "layer_sweep.parquet")
    assert set(sweep.layer) == {"conv"} and {"overall", "site=s0", "site=s1"} <= set(sweep.slice)
    overall = sweep[sweep.slice == "overall"].iloc[0]
    assert overall.n + overall.empty == 10
    maps = pd.read_parquet(out / "layer_sweep_maps.parquet")
    assert set(maps.example_id) == set(attributions.example_id[sampled])

    sanity = pd.read_parquet(out / "sanity.parquet")
    assert set(sanity.method) == set(methods)
    assert set(run["quality"]["sanity"]) == set(sanity.method)
    assert run["quality"]["layer_sweep"]["layers"] == 1

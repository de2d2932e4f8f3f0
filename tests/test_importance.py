"""Permutation importance: a model that reads one known patch ranks it first and every other
patch exactly zero; the job's combined figures equal one direct computation over the same
permutations; runner modes agree; shards of size 1 and a final partial shard are handled."""
import json
import logging

import keras
import numpy as np
import pandas as pd
import pytest

from beam_pipeline import cli
from beam_pipeline.job import cost
from beam_pipeline.io import decode
from beam_pipeline.measures import importance, quality
from conftest import LogLines, write_png

SIZE = 16  # a 4x4 grid of 4x4-pixel patches


def one_patch_model(path):
    """P(class 1) rises with the mean brightness of patch_r1_c2 (rows 4:8, cols 8:12) only."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Cropping2D(((4, 8), (8, 4)), name="patch")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(1, name="mean_over_channels")(x)
    head = keras.layers.Dense(2, activation="softmax", name="head")
    model = keras.Model(inputs, head(x))
    model.get_layer("mean_over_channels").set_weights(
        [np.full((3, 1), 1 / 3, np.float32), np.zeros(1, np.float32)])
    head.set_weights([np.array([[-10.0, 10.0]], np.float32), np.array([5.0, -5.0], np.float32)])
    model.save(path)
    return str(path)


@pytest.fixture
def patch_data(tmp_path):
    """40 noisy images; the label is whether patch_r1_c2 is bright (10% of labels flipped)."""
    rng = np.random.default_rng(3)
    rows = []
    for i in range(40):
        image = rng.uniform(0, 1, (SIZE, SIZE, 3))
        bright = i % 2
        image[4:8, 8:12] = rng.uniform(0.6, 0.9) if bright else rng.uniform(0.1, 0.4)
        write_png(str(tmp_path / "d" / "img" / f"{i}.png"), (image * 255).astype(np.uint8))
        label = bright if rng.random() > 0.1 else 1 - bright
        rows.append({"id": f"x{i:02d}", "image": f"img/{i}.png", "label": label})
    pd.DataFrame(rows).to_csv(tmp_path / "d" / "manifest.csv", index=False)
    return str(tmp_path / "d" / "manifest.csv")


def audit(tmp_path, model, data, name, *extra):
    out = tmp_path / name
    code = cli.main(["run", "--model", model, "--data", data, "--output", str(out),
                     "--tfma-config", "none", *map(str, extra)])
    assert code == 0
    return out


def test_the_one_patch_the_model_reads_ranks_first(tmp_path, patch_data):
    model = one_patch_model(tmp_path / "m.keras")
    log = LogLines()
    logging.getLogger("xai_audit").addHandler(log)
    try:
        out = audit(tmp_path, model, patch_data, "out", "--shard-size", "16")
    finally:
        logging.getLogger("xai_audit").removeHandler(log)
    summary = pd.read_parquet(out / "importance_summary.parquet")
    assert len(summary) == 16 * 3 and set(summary.metric) == {"accuracy", "log_loss", "auc"}
    for metric in ("accuracy", "log_loss", "auc"):
        ranked = summary[summary.metric == metric].sort_values("importance", ascending=False)
        assert ranked.feature.iloc[0] == "patch_r1_c2"
        assert ranked.importance.iloc[0] > 0.1
        others = ranked.iloc[1:]
        # The model never reads the other patches: permuting them changes nothing at all.
        assert np.allclose(others.importance, 0.0, atol=1e-7) and np.allclose(others["std"], 0.0)
    top = summary[(summary.feature == "patch_r1_c2") & (summary.metric == "accuracy")].iloc[0]
    assert top.ci_low <= top.importance <= top.ci_high and top.n == 40
    run = json.loads((out / "run.json").read_text())
    assert run["importance"]["repeats"] == 3 and len(run["importance"]["features"]) == 16
    # The up-front estimate: 40 examples (fewer than the default sample), 1 + 16 × 3 passes each.
    estimate = run["cost"]["estimate"]
    assert estimate["importance"] == {"examples": 40, "forward": 40 * 49, "backward": 0}
    assert estimate["explain"]["forward"] == 40
    assert estimate["faithfulness"]["examples"] == min(40, cost.DEFAULT_FAITHFULNESS_SAMPLE)
    assert ("Cost estimate, importance: 1,960 forward and 0 backward image passes on 40 "
            "examples.") in log.lines
    busy = run["cost"]["stage_busy_s"]
    assert all(busy[stage] > 0 for stage in ("explain", "importance", "faithfulness", "sanity"))


def _direct_figures(model_path, manifest, features, repeats, seed, shard_size):
    """One process, no partial sums: every example's permuted prediction, then each metric once
    over the whole dataset, with the job's shards and permutation seeds."""
    model = keras.models.load_model(model_path)
    frame = pd.read_csv(manifest)
    spec = decode.ImageSpec(SIZE, SIZE, 3)
    root = manifest.rsplit("/", 1)[0]
    images = {r.id: decode.decode_image(open(f"{root}/{r.image}", "rb").read(), spec)
              for r in frame.itertuples()}
    labels = dict(zip(frame.id, frame.label))
    buckets = max(1, int(np.ceil(len(frame) / shard_size)))
    shards = []
    for b in range(buckets):
        members = [i for i in frame.id if importance.shard_bucket(i, buckets) == b]
        shards.extend(importance.split_into_shards(b, members, shard_size, key=lambda i: i))

    def metrics(probs, y):
        scores = np.floor(probs[:, 1] * importance.AUC_BUCKETS).clip(max=importance.AUC_BUCKETS - 1)
        pos, neg = scores[y == 1], scores[y == 0]
        auc = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (
            len(pos) * len(neg))
        chosen = np.clip(probs[np.arange(len(y)), y], importance.LOG_LOSS_EPS, 1.0)
        return {"accuracy": (probs.argmax(1) == y).mean(), "log_loss": -np.log(chosen).mean(),
                "auc": auc}

    all_ids = [i for _, members in shards for i in members]
    y = np.array([labels[i] for i in all_ids])
    base = metrics(model.predict(np.stack([images[i] for i in all_ids]), verbose=0), y)
    figures = {}
    for feature in features:
        per_repeat = []
        for repeat in range(repeats):
            permuted = []
            for shard, members in shards:
                block = np.stack([images[i] for i in members])
                rng = np.random.default_rng(importance.permutation_seed(seed, shard, feature.name, repeat))
                permuted.append(feature.permute(block, rng.permutation(len(members))))
            per_repeat.append(metrics(model.predict(np.concatenate(permuted), verbose=0), y))
        for metric in ("accuracy", "log_loss", "auc"):
            drops = [(r[metric] - base[metric]) if metric == "log_loss" else (base[metric] - r[metric])
                     for r in per_repeat]
            figures[(feature.name, metric)] = (np.mean(drops), np.std(drops, ddof=1))
    return figures


def test_combined_figures_equal_a_direct_single_process_computation(tmp_path, patch_data, rng):
    # A model that reads every patch, so every figure is non-trivial.
    from conftest import gap_model

    model = tmp_path / "gap.keras"
    gap_model(num_classes=2, seed=4).save(model)
    # --importance-sample all: every labeled example, shards as before sampling existed.
    out = audit(tmp_path, str(model), patch_data, "out", "--shard-size", "7",
                "--permutation-features", "patches:2x2,channels", "--permutation-repeats", "2",
                "--seed", "11", "--baseline-gates", "off",  # random weights: useless
                "--importance-sample", "all")
    summary = pd.read_parquet(out / "importance_summary.parquet")
    raw = pd.read_parquet(out / "importance")
    shard_sizes = raw.groupby("shard").n.first()
    assert shard_sizes.sum() == 40 and shard_sizes.max() == 7 and shard_sizes.min() < 7
    features = importance.parse_features("patches:2x2,channels", SIZE, SIZE, 3)
    direct = _direct_figures(str(model), patch_data, features, 2, 11, 7)
    for row in summary.itertuples():
        mean, std = direct[(row.feature, row.metric)]
        assert row.importance == pytest.approx(mean, abs=1e-6), (row.feature, row.metric)
        assert row.std == pytest.approx(std, abs=1e-6)


def test_runner_modes_give_identical_seeded_samples(tmp_path, patch_data):
    """--importance-sample 25 of 40: the 25 labeled examples with the smallest seeded keys, the
    same on both runners, and figures equal to a direct computation on exactly those examples."""
    model = one_patch_model(tmp_path / "m.keras")
    tables, runs = {}, {}
    for mode in ("in_memory", "multi_processing"):
        out = audit(tmp_path, model, patch_data, mode, "--shard-size", "9", "--seed", "5",
                    "--importance-sample", "25",
                    "--direct_num_workers", "2", "--direct_running_mode", mode)
        tables[mode] = pd.read_parquet(out / "importance_summary.parquet").sort_values(
            ["feature", "metric"]).reset_index(drop=True)
        runs[mode] = json.loads((out / "run.json").read_text())["importance"]["sample"]
    a, b = tables["in_memory"], tables["multi_processing"]
    assert list(a.feature) == list(b.feature) and (a.n == 25).all() and (b.n == 25).all()
    np.testing.assert_allclose(a.importance, b.importance, atol=1e-9)
    np.testing.assert_allclose(a["std"], b["std"], atol=1e-9)
    assert a.ci_low.notna().all() and (a.ci_low <= a.importance).all()
    for sample in runs.values():
        assert sample == {**sample, "requested": 25, "examples": 25, "labeled_examples": 40,
                          "selected": 25, "seed": 5}
    frame = pd.read_csv(patch_data)
    chosen = quality.seeded_sample(frame.id, 25, 5)
    subset = patch_data.replace("manifest.csv", "sample.csv")
    frame[frame.id.isin(chosen)].to_csv(subset, index=False)
    features = importance.parse_features("patches:4x4", SIZE, SIZE, 3)
    direct = _direct_figures(model, subset, features, 3, 5, 9)
    for row in a.itertuples():
        mean, std = direct[(row.feature, row.metric)]
        assert row.importance == pytest.approx(mean, abs=1e-6), (row.feature, row.metric)


def test_importance_sample_option():
    assert importance.parse_sample("all") is None and importance.parse_sample("ALL") is None
    assert importance.parse_sample("300") == 300 and importance.parse_sample(2000) == 2000
    from beam_pipeline.errors import OptionError
    for bad in ("0", "-3", "many", "2.5"):
        with pytest.raises(OptionError, match="--importance-sample"):
            importance.parse_sample(bad)


def test_shards_of_size_one_and_a_final_partial_shard(tmp_path, patch_data):
    sizes = [len(m) for _, m in importance.split_into_shards(0, list("abcdefg"), 3, key=str)]
    assert sizes == [3, 3, 1]
    model = one_patch_model(tmp_path / "m.keras")
    out = audit(tmp_path, model, patch_data, "ones", "--shard-size", "1")
    raw = pd.read_parquet(out / "importance")
    assert raw.shard.nunique() == 40 and (raw.n == 1).all()
    # Permuting within a single example changes nothing.
    scored = raw[raw.metric != "auc"]  # AUC is undefined on one example (null)
    assert (scored.baseline == scored.permuted).all() and raw[raw.metric == "auc"].baseline.isna().all()
    summary = pd.read_parquet(out / "importance_summary.parquet")
    assert np.allclose(summary.importance, 0.0) and (summary.n == 40).all()
    # Global AUC still exists: the shards' histograms add up to both classes.
    assert summary[summary.metric == "auc"].importance.notna().all()


def test_feature_parsing():
    features = importance.parse_features("patches:2x3,channels", 10, 9, 3)
    names = [f.name for f in features]
    assert names[:6] == ["patch_r0_c0", "patch_r0_c1", "patch_r0_c2", "patch_r1_c0",
                         "patch_r1_c1", "patch_r1_c2"]
    assert names[6:] == ["channel_0", "channel_1", "channel_2"]
    assert features[5].rows == (5, 10) and features[5].cols == (6, 9)
    assert importance.parse_features("none", 10, 10, 3) == []
    from beam_pipeline.errors import OptionError
    with pytest.raises(OptionError):
        importance.parse_features("pixels", 10, 10, 3)
    images = np.arange(2 * 2 * 2 * 3, dtype=np.float32).reshape(2, 2, 2, 3)
    swapped = importance.Feature("channel_1", (0, 2), (0, 2), (1, 2)).permute(images, np.array([1, 0]))
    np.testing.assert_array_equal(swapped[0, ..., 1], images[1, ..., 1])
    np.testing.assert_array_equal(swapped[0, ..., 0], images[0, ..., 0])


def test_patch_grid_lays_patch_features_out_as_the_image_grid():
    names = [f.name for f in importance.parse_features("patches:2x3,channels", 6, 6, 3)]
    values = {name: float(i) for i, name in enumerate(names)}
    assert importance.patch_grid(values) == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert importance.patch_grid({"patch_r1_c0": 0.5}) == [[None], [0.5]]
    assert importance.patch_grid({"channel_0": 1.0}) is None

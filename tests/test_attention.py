"""Where the model looks without masks (issue 15): attention regions, attention by slice, region
findings, per-slice permutation importance; one end-to-end run on a planted per-site shortcut."""
import json

import keras
import numpy as np
import pandas as pd
import pytest

from beam_pipeline.measures import attention, importance
from beam_pipeline import cli
from conftest import write_png

SIZE = 16  # a 4x4 grid of 4x4-pixel patches
SITES = ("site_a", "site_b", "site_c")


# --------------------------------------------------------------------------- regions


def test_the_region_of_a_map_with_a_known_peak():
    grid = (4, 4)
    square = np.zeros((8, 8))
    square[2, 7] = 5.0  # rows 2:4, cols 6:8 are cell r1_c3
    assert attention.attention_region(square, grid) == "r1_c3"
    # A 7x7 map: pixel k's centre decides its cell (pixel 3's centre is on the 2/4 border: r2).
    coarse = np.full((7, 7), 0.5)  # a broad floor with more mass elsewhere than at the peak
    coarse[0, 0] = 1.0
    assert attention.attention_region(coarse, grid) == "r0_c0"
    coarse[3, 4] = 1.1
    assert attention.attention_region(coarse, grid) == "r2_c2"
    coarse[6, 6] = 1.2
    assert attention.attention_region(coarse, grid) == "r3_c3"
    # Ties: the first peak in row-major order.
    assert attention.attention_region(np.ones((4, 4)), grid) == "r0_c0"
    assert attention.attention_region(np.zeros((7, 7)), grid) is None
    assert attention.attention_region(-np.ones((7, 7)), grid) is None
    assert attention.region_words("r0_c0", grid) == "top left"
    assert attention.region_words("r2_c3", grid) == "middle right"


def test_the_region_grid_is_the_permutation_patch_grid():
    assert attention.region_grid(importance.parse_features("patches:2x3", 16, 16, 3)) == (2, 3)
    assert attention.region_grid(importance.parse_features("channels", 16, 16, 3)) == (4, 4)
    assert importance.patch_name(1, 2) == "patch_" + importance.region_name(1, 2)


def test_attention_sums_merge_to_the_mean_of_unit_mass_maps():
    rng = np.random.default_rng(1)
    rows = [{"gradcam": rng.uniform(0, 1, 12).tolist(), "gradcam_shape": [3, 4],
             "predicted_class": i % 2, "site": SITES[i % 3]} for i in range(9)]
    rows.append({**rows[0], "gradcam": [0.0] * 12})  # no mass: left out
    pairs = [p for row in rows for p in attention.attention_groups(row, "gradcam", ["site"])]
    combine = attention.AttentionSum()
    accumulators = {}
    for index, (key, unit) in enumerate(pairs):  # two accumulators per key, as two workers
        accs = accumulators.setdefault(key, [combine.create_accumulator() for _ in range(2)])
        accs[index % 2] = combine.add_input(accs[index % 2], unit)
    out = {key[:2]: attention.attention_row(key, combine.merge_accumulators(accs))
           for key, accs in accumulators.items()}
    for (name, predicted), row in out.items():
        members = [r for r in rows[:9] if r["predicted_class"] == predicted
                   and (name == "overall" or name == f"site={r['site']}")]
        direct = np.mean([np.array(r["gradcam"]) / np.sum(r["gradcam"]) for r in members], 0)
        assert row["n"] == len(members)
        np.testing.assert_allclose(row["map"], direct, rtol=1e-6)
    assert sum(r["n"] for (name, _), r in out.items() if name == "overall") == 9


def test_region_findings_on_a_planted_case_and_none_without_a_shortcut():
    rng = np.random.default_rng(2)
    regions = [f"r{i}_c{j}" for i in range(4) for j in range(4)]
    plain = [{"site": s, "attention_region": regions[5 + rng.integers(0, 6)]}
             for s in SITES for _ in range(40)]
    counts = attention.region_counts(plain, ["site"])
    assert attention.region_findings(counts, (4, 4)) == []
    planted = [dict(r, attention_region="r0_c0") if r["site"] == "site_c" and i % 5 else r
               for i, r in enumerate(plain)]
    found = attention.region_findings(attention.region_counts(planted, ["site"]), (4, 4))
    assert [(f["slice"], f["region"]) for f in found] == [("site=site_c", "r0_c0")]
    sentence = attention.region_sentence(found[0])
    assert sentence.startswith("At site=site_c, 80% of maps peak in r0_c0 (top left) against 0% "
                               "at the other site values")
    # Too few examples at the value: no finding, however different.
    few = [r for r in planted if r["site"] != "site_c"] + planted[80:90]
    assert attention.region_findings(attention.region_counts(few, ["site"]), (4, 4)) == []


# --------------------------------------------------------------------------- importance


def test_per_slice_importance_partials_add_up_to_the_overall_figures():
    rng = np.random.default_rng(4)
    images = rng.uniform(0, 1, (30, 8, 8, 1))
    labels = rng.integers(0, 3, 30)
    weights = rng.normal(size=(64, 3))

    def predict(batch):
        logits = batch.reshape(len(batch), -1) @ weights
        exp = np.exp(logits - logits.max(1, keepdims=True))
        return exp / exp.sum(1, keepdims=True)

    sites = [SITES[i % 3] for i in range(30)]
    groups = [[f"site={s}", f"odd={i % 2}"] for i, s in enumerate(sites)]
    features = importance.parse_features("patches:2x2", 8, 8, 1)
    rows = importance.shard_importance(predict, images, labels, features, 2, 0, "s", 8,
                                       slices=groups)
    for feature in features:
        for repeat in range(2):
            mine = [r for r in rows if r["feature"] == feature.name and r["repeat"] == repeat]
            overall = next(r for r in mine if r["slice"] == "overall")
            for column in ("site", "odd"):
                parts = [r for r in mine if r["slice"].startswith(column + "=")]
                for side in ("baseline", "permuted"):
                    total = parts[0][side]
                    for part in parts[1:]:
                        total = importance.add_partials(total, part[side])
                    assert total["n"] == overall[side]["n"] == 30
                    assert total["correct"] == overall[side]["correct"]
                    assert total["log_loss_sum"] == pytest.approx(overall[side]["log_loss_sum"])
                    assert (total["hist_pos"] == overall[side]["hist_pos"]).all()
                    assert (total["hist_neg"] == overall[side]["hist_neg"]).all()
    # The same sums, combined as the job does (per repeat over slice values), give the overall
    # figures exactly.
    per_repeat = {}
    for row in rows:
        if row["feature"] == "patch_r0_c0" and row["slice"].startswith("site="):
            importance.add_row(per_repeat, row)
    overall = {}
    for row in rows:
        if row["feature"] == "patch_r0_c0" and row["slice"] == "overall":
            importance.add_row(overall, row)
    direct = importance.summary_of("patch_r0_c0", "accuracy", overall)
    assert importance.summary_of("patch_r0_c0", "accuracy", per_repeat) == direct


# --------------------------------------------------------------------------- end to end


def two_patch_model(path):
    """P(class 1) rises with the brightness of the corner patch r0_c0 plus patch r1_c2."""
    inputs = keras.Input((SIZE, SIZE, 3))
    corner = keras.layers.Cropping2D(((0, 12), (0, 12)), name="corner")(inputs)
    patch = keras.layers.Cropping2D(((4, 8), (8, 4)), name="patch")(inputs)
    pooled = keras.layers.Add()([keras.layers.GlobalAveragePooling2D()(corner),
                                 keras.layers.GlobalAveragePooling2D()(patch)])
    x = keras.layers.Dense(1, name="mean_over_channels")(pooled)
    head = keras.layers.Dense(2, activation="softmax", name="head")
    model = keras.Model(inputs, head(x))
    model.get_layer("mean_over_channels").set_weights(
        [np.full((3, 1), 1 / 3, np.float32), np.full(1, -1.0, np.float32)])
    head.set_weights([np.array([[-10.0, 10.0]], np.float32), np.zeros(2, np.float32)])
    model.save(path)
    return str(path)


@pytest.fixture
def site_data(tmp_path):
    """60 noisy images from 3 sites: at site_c the label shows in the corner patch (r1_c2 is a
    constant grey), elsewhere in patch r1_c2 (the corner is constant grey). No masks."""
    rng = np.random.default_rng(5)
    rows = []
    for i in range(60):
        site, label = SITES[i % 3], (i // 3) % 2
        image = rng.uniform(0, 1, (SIZE, SIZE, 3))
        signal = rng.uniform(0.8, 0.95) if label else rng.uniform(0.05, 0.2)
        corner, patch = (signal, 0.5) if site == "site_c" else (0.5, signal)
        image[0:4, 0:4], image[4:8, 8:12] = corner, patch
        write_png(str(tmp_path / "d" / "img" / f"{i}.png"), (image * 255).astype(np.uint8))
        rows.append({"id": f"x{i:02d}", "image": f"img/{i}.png", "label": label, "site": site})
    pd.DataFrame(rows).to_csv(tmp_path / "d" / "manifest.csv", index=False)
    return str(tmp_path / "d" / "manifest.csv")


def test_attention_and_importance_by_slice_end_to_end(tmp_path, site_data):
    model = two_patch_model(tmp_path / "m.keras")
    out = tmp_path / "out"
    code = cli.main(["run", "--model", model, "--data", site_data, "--output", str(out),
                     "--shard-size", "16", "--faithfulness-sample", "0", "--sanity-sample", "0"])
    assert code == 0
    rows = pd.read_parquet(out / "attributions")
    run = json.loads((out / "run.json").read_text())
    assert run["attention"]["region_grid"] == [4, 4]

    # attention_region is the region of the written first-method map.
    for row in rows.itertuples():
        expected = attention.attention_region(
            np.asarray(row.gradcam).reshape(row.gradcam_shape), (4, 4))
        assert row.attention_region == expected
    assert rows.attention_region.notna().any()
    # ... and a TFMA slice like any other.
    metrics = run["tfma"]["metrics"]
    regions = set(rows.attention_region.dropna())
    assert {f"attention_region={r}" for r in regions} <= set(metrics)

    # attention_by_slice: the mean of the maps scaled to unit mass, computed directly.
    table = pd.read_parquet(out / "attention_by_slice.parquet")
    assert set(table.slice) == {"overall", *(f"site={s}" for s in SITES)}
    for entry in table.itertuples():
        members = rows[rows.predicted_class == entry.predicted_class]
        if entry.slice != "overall":
            members = members[members.site == entry.slice.split("=")[1]]
        maps = [np.maximum(np.asarray(m, float), 0) for m in members.gradcam]
        maps = [m / m.sum() for m in maps if m.sum() > 0]
        assert entry.n == len(maps)
        np.testing.assert_allclose(entry.map, np.mean(maps, 0), rtol=1e-5, atol=1e-7)

    # Per-slice importance: the corner ranks first at site_c only; the slices' n add up.
    by_slice = pd.read_parquet(out / "importance_by_slice.parquet")
    summary = pd.read_parquet(out / "importance_summary.parquet")
    accuracy = by_slice[by_slice.metric == "accuracy"]
    for site in SITES:
        ranked = accuracy[accuracy.slice == f"site={site}"].sort_values(
            "importance", ascending=False)
        top = ranked.iloc[0]
        assert top.feature == ("patch_r0_c0" if site == "site_c" else "patch_r1_c2"), site
        assert top.importance > 0.2 and top.ci_low <= top.importance <= top.ci_high
    # Elsewhere the corner is a constant grey: it costs only when a site_c corner is shuffled in.
    corner = accuracy[accuracy.feature == "patch_r0_c0"].set_index("slice").importance
    assert corner["site=site_c"] > 2 * max(corner["site=site_a"], corner["site=site_b"])
    overall_n = summary[summary.metric == "accuracy"].n.iloc[0]
    assert accuracy.groupby("feature").n.sum().eq(overall_n).all()

    # The report: per-slice patch heatmaps and the finding at site_c.
    report = json.loads((out / "report" / "summary.json").read_text())
    section = report["attention"]
    assert [g["slice"] for g in section["maps"]][0] == "overall"
    differing = [g["slice"] for g in report["importance"]["by_slice"]]
    assert "site=site_c" in differing
    assert any(f.startswith("At site=site_c, shuffling patch_r0_c0 (top left) costs the most")
               for f in report["findings"])
    html = (out / "report" / "index.html").read_text()
    assert "Attention by slice" in html and "site=site_c" in html

"""The ``demo`` command: make the synthetic data and model (``demo.data``), audit them with the real
job, and print where the outputs are with a per-site table a reviewer reads in a minute."""
import json
import logging
import os
import time
from typing import Optional, Sequence, Tuple

import pandas as pd

from . import data as demo
from ..measures import importance
from ..job import run as job
from ..io import runinfo
from ..errors import OptionError

LOG = logging.getLogger("xai_audit")
TRUNCATED_ID = "scan_truncated"
# The fairness gate the demo sets: the shortcut site must stand out against it.
DEMO_SLICE_GAPS = "auc=0.02,binary_accuracy=0.05"


def _add_truncated_scan(manifest_path: str) -> None:
    """One scan cut in half, so the demo also shows a bad input landing in errors/."""
    frame = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    first = frame.iloc[0]
    root = os.path.dirname(manifest_path)
    with open(os.path.join(root, first["image"]), "rb") as handle:
        data = handle.read()
    with open(os.path.join(root, "images", f"{TRUNCATED_ID}.png"), "wb") as handle:
        handle.write(data[: len(data) // 2])
    row = {**first.to_dict(), "id": TRUNCATED_ID, "image": f"images/{TRUNCATED_ID}.png"}
    pd.concat([frame, pd.DataFrame([row])]).to_csv(manifest_path, index=False)


def _drop_masks(manifest_path: str) -> None:
    """The manifest without its mask column (``--no-masks``): the audit then has no masks."""
    frame = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    frame.drop(columns=["mask"]).to_csv(manifest_path, index=False)


def site_table(attributions: pd.DataFrame, tfma_metrics: dict, method: str = "gradcam"
               ) -> pd.DataFrame:
    """Per site: examples, accuracy, TFMA's AUC, where ``method`` looks on lesion scans (with
    masks), and the region most of the site's maps of predicted lesions peak in
    (``attention_region``; maps of "healthy", the absence of a lesion, say little)."""
    frame = attributions.assign(correct=attributions.label == attributions.predicted_class)
    for column in (f"{method}_mask_energy", f"{method}_pointing_hit"):
        if column not in frame:  # no masks: no localization figures
            frame[column] = float("nan")
    lesions = frame[frame[f"{method}_mask_energy"].notna()]
    lesion = demo.CLASS_NAMES.index("lesion")
    regions = frame[frame.predicted_class == lesion].dropna(
        subset=["attention_region"]).groupby("site").attention_region
    sites = sorted(frame.site.unique())
    auc = {s: tfma_metrics.get(f"site={s}", {}).get("auc") for s in sites}
    table = pd.DataFrame({
        "examples": frame.groupby("site").size(),
        "accuracy": frame.groupby("site").correct.mean(),
        "auc": pd.Series({s: v.get("value") if isinstance(v, dict) else v for s, v in auc.items()},
                         dtype=float),
        "attention_on_lesion": lesions.groupby("site")[f"{method}_mask_energy"].mean(),
        "pointing_hit_rate": lesions.groupby("site")[f"{method}_pointing_hit"].mean(),
        "lesion_peak_region": regions.agg(lambda r: r.value_counts().idxmax()),
        "lesion_peak_share": regions.agg(lambda r: r.value_counts(normalize=True).max()),
    })
    return table.round(3)


def _span(values: pd.Series) -> str:
    low, high = values.min(), values.max()
    return f"{low:.3f}" if f"{low:.3f}" == f"{high:.3f}" else f"{low:.3f}-{high:.3f}"


def site_story(table: pd.DataFrame, method: str) -> str:
    """The demo's closing sentences, computed from its per-site table: the site with the lowest
    accuracy, how it compares, and whether ``method``'s peak misses the lesion there."""
    if len(table) < 2 or table.accuracy.isna().all():
        return "Too few sites with figures to compare."
    hits = table.pointing_hit_rate
    if table.accuracy.max() - table.accuracy.min() < 1e-9:
        # No site is worst by accuracy: where the maps land is what can tell them apart.
        text = f"Every site has accuracy {table.accuracy.max():.3f}"
        if hits.isna().all():
            return text + "."
        worst = hits.idxmin()
        text += f"; at {worst}"
    else:
        worst = table.accuracy.idxmin()
        others = table.drop(worst)
        text = (f"{worst} has the lowest accuracy, {table.accuracy[worst]:.3f} against "
                f"{_span(others.accuracy)} at the other sites")
        if pd.notna(table.auc[worst]) and others.auc.notna().any():
            text += f" (AUC {table.auc[worst]:.3f} against {_span(others.auc)})"
    others = table.drop(worst)
    if pd.isna(hits[worst]) or others.pointing_hit_rate.isna().all():
        return text + "."
    low, high = others.pointing_hit_rate.min(), others.pointing_hit_rate.max()
    elsewhere = f"{100 * low:.0f}%" if round(100 * low) == round(100 * high) else \
        f"{100 * low:.0f}-{100 * high:.0f}%"
    rates = f"{100 * hits[worst]:.0f}% of its lesion scans against {elsewhere} elsewhere"
    if hits[worst] < 0.5 * others.pointing_hit_rate.min():
        return (f"{text}, and there {method}'s peak lies on the lesion in only {rates}: the model "
                "is right, when it is, for another reason (the galleries show where it looks).")
    if others.pointing_hit_rate.max() < 0.2:
        return (f"{text}; {method}'s peak lies on the lesion in {rates}, so at this layer its maps "
                "localize nowhere and cannot show why.")
    return f"{text}; {method}'s peak lies on the lesion in {rates}."


def importance_grid(summary_path: str, metric: str):
    """The patch importances of ``metric`` laid out as the image grid (rows × columns)."""
    found = runinfo.read_rows(summary_path)
    if not found:
        return None
    summary = pd.DataFrame(found)
    rows = summary[summary.metric == metric]
    grid = importance.patch_grid(dict(zip(rows.feature, rows.importance)))
    if grid is None:
        return None
    table = pd.DataFrame(grid, dtype=float).round(3)
    return table.rename(index=lambda r: f"r{r}", columns=lambda c: f"c{c}")


def demo_max_error_rate(examples: int) -> float:
    """The demo audit's --max-error-rate: the usual default, or the share of its one planted
    unreadable scan among ``examples`` + 1 when that is larger (small demos)."""
    return max(job.AuditRequest.max_error_rate, 1 / (examples + 1))
def importance_by_site(by_slice_path: str, metric: str) -> Optional[pd.Series]:
    """Per site, the patch whose shuffling costs the most ``metric`` (importance_by_slice)."""
    found = runinfo.read_rows(by_slice_path)
    if not found:
        return None
    rows = pd.DataFrame(found)
    rows = rows[(rows.metric == metric) & rows.slice.str.startswith("site=")
                & rows.feature.str.startswith("patch_")]
    if rows.empty:
        return None
    return rows.sort_values(["importance", "feature"], ascending=[False, True]).groupby(
        "slice").first().apply(lambda r: f"{r.feature} ({r.importance:.3f})", axis=1)


def _make_data_and_model(output: str, examples: int, seed: int, pooling: str,
                         masks: bool) -> Tuple[str, str]:
    """The demo's manifest (with its one planted truncated scan) and trained model paths."""
    data_dir = os.path.join(output, "demo_data")
    model_path = os.path.join(output, "demo_model.keras")
    manifest = demo.make_demo_dataset(data_dir, examples, seed)
    figures = demo.train_demo_model(manifest, model_path, seed, pooling)
    LOG.info("Demo model trained in %.1f s (train accuracy %.3f): %s",
             figures["train_seconds"], figures["train_accuracy"], model_path)
    _add_truncated_scan(manifest)  # after training, which reads every scan
    if not masks:
        _drop_masks(manifest)
    LOG.info("Demo data: %d scans from 3 sites in %s", examples + 1, data_dir)
    return manifest, model_path


def _print_outputs(output: str, code: int, seconds: float) -> pd.DataFrame:
    """Where the outputs are and how many rows each holds; returns the attributions."""
    attributions = pd.read_parquet(os.path.join(output, "attributions"))
    errors = pd.read_parquet(os.path.join(output, "errors"))
    print(f"\nxai-audit demo finished in {seconds:.0f} s (audit exit code {code}).")
    print(f"  attributions: {os.path.join(output, 'attributions')}  ({len(attributions)} rows)")
    print(f"  errors:       {os.path.join(output, 'errors')}  ({len(errors)} row(s): "
          f"{', '.join(f'{i} {t}' for i, t in zip(errors.example_id, errors.error_type))})")
    print(f"  run manifest: {os.path.join(output, 'run.json')}")
    return attributions


def _print_story(output: str, run: dict, attributions: pd.DataFrame, method: str) -> None:
    """Per site: metrics, attention and the patches that matter; then what it means."""
    print(f"\nPer site (auc from TFMA; attention_on_lesion: share of {method} mass on the lesion "
          "mask, lesion scans, n/a without masks; lesion_peak_region: the 4x4 cell most of the "
          "site's maps of predicted lesions peak in, lesion_peak_share: how many do):")
    table = site_table(attributions, run.get("tfma", {}).get("metrics", {}), method)
    print(table.to_string())
    print("\n" + site_story(table, method))
    grid = importance_grid(os.path.join(output, "importance_summary.parquet"), "accuracy")
    if grid is not None:
        top = grid.stack().idxmax()
        print("\nPermutation importance (accuracy drop when a patch is shuffled), 4x4 grid (the "
              f"lesion sits in the middle, site_c's marker top left); the largest drop is at "
              f"{top[0]}_{top[1]} ({grid.stack().max():.3f}):")
        print(grid.to_string())
    tops = importance_by_site(os.path.join(output, "importance_by_slice.parquet"), "accuracy")
    if tops is not None:
        print("\nThe patch whose shuffling costs the most accuracy, per site:")
        print(tops.to_string())


def run_demo(output: str, examples: int, seed: int, beam_args: Sequence[str],
             pooling: str = "max", methods: Sequence[str] = ("gradcam",), layer: str = "auto",
             summary: str = "full", masks: bool = True) -> int:
    """Data, model (``pooling``: its global pooling head), and the audit with ``methods`` at
    ``layer`` (``masks`` False: with the mask column dropped); prints the story. Returns 0 when
    the audit ran (its own exit code is in run.json)."""
    if examples < 12:
        raise OptionError("--examples must be at least 12 (four per site and class).")
    if "://" in output:
        raise OptionError("The demo writes its data locally; give a local --output folder.")
    start = time.perf_counter()
    manifest, model_path = _make_data_and_model(output, examples, seed, pooling, masks)
    # The demo owns its folder: a second demo replaces the first one's audit.
    request = job.AuditRequest(model=model_path, data=manifest, output=output, seed=seed,
                               max_slice_gap=DEMO_SLICE_GAPS, methods=tuple(methods), layer=layer,
                               max_error_rate=demo_max_error_rate(examples), overwrite=True)
    LOG.info("The demo's one truncated scan is planted: its audit allows 1 failed example in %d "
             "(--max-error-rate %.4g), so the error-rate gate passes at every size.",
             examples + 1, request.max_error_rate)
    code = audit_code = job.run_audit(request, beam_args, summary="none")
    with open(os.path.join(output, "run.json")) as handle:
        run = json.load(handle)
    report = os.path.join(output, "report", "index.html")
    report_path = os.path.abspath(report) if os.path.exists(report) else None
    if summary == "quiet":
        job.print_summary(run, report_path, output, audit_code, quiet=True)
        return job.EXIT_OK if code == job.EXIT_GATE else code
    attributions = _print_outputs(output, code, time.perf_counter() - start)
    _print_story(output, run, attributions, methods[0])  # methods[0]: attention_region's method
    if code == job.EXIT_GATE:
        failed = sorted({g["slice"] for g in run["gates"] if not g["passed"]})
        print(f"The slice-gap gate ({DEMO_SLICE_GAPS}) fails at {'; '.join(failed)}: the audit "
              "itself exits 3 (run.json exit_code); the demo command exits 0.")
        code = job.EXIT_OK
    # The audit's own summary closes the story; its last line is the report's absolute path.
    job.print_summary(run, report_path, output, audit_code)
    if report_path is None:
        return code or job.EXIT_REPORT
    return code

"""The compliance report: ``DIR/report/index.html`` (self-contained, images inline, no script) and
``DIR/report/summary.json`` (the same figures, machine-readable), made from the files a run left
in DIR without recomputing anything (DESIGN.md, "Output folder").

Three steps:

* ``gather_summary(output)`` (figures in ``summary``, words in ``text``) reads
  run.json, then streams the attribution rows once (only the
  small columns: labels, predictions, slice values, per-method localization and faithfulness
  figures), and reads importance_summary / layer_sweep / sanity / errors; it returns one plain
  dict (written as summary.json). Gallery candidates are chosen during the same pass with bounded
  heaps, so memory does not grow with the run.
* ``render_pictures`` draws the charts and the gallery thumbnails (``plots``,
  ``gallery``): only the chosen examples' maps and images are read.
* ``render_html`` fills ``templates/report.html.j2`` with Jinja2, autoescaping on: slice values,
  class names, ids and paths are user data.

``write_report(output)`` does all three and returns the path of index.html.
"""
import json
import math
from typing import Dict, List, Optional, Sequence

import jinja2
import markupsafe

from ..io import layout, outputs, runinfo
from . import (attention as report_attention, gallery as report_gallery,
    glossary as report_glossary, plots as report_plots, summary as report_summary,
    text as report_text)
from ..errors import ReportError
from .summary import METHOD_NAMES, SliceStats, exists, join

SUMMARY_VERSION = 1


def load_run(output: str) -> dict:
    path = join(output, layout.RUN_JSON)
    if not exists(path):
        raise ReportError(
            f"{output} has no run.json, so it holds no finished audit to report on. Give the "
            "--output folder of an `xai-audit run` (or run the audit first)."
        )
    try:
        run = runinfo.read_json(path)
    except (ValueError, OSError) as exc:
        raise ReportError(f"{path} could not be read as JSON ({exc}).") from None
    if not isinstance(run, dict):
        raise ReportError(
            f"{path} holds a JSON {type(run).__name__}, not the JSON object an `xai-audit run` "
            "writes; it is not a run manifest (restore it, or run the audit again)."
        )
    return run


# --------------------------------------------------------------------------- assembly


def _gallery_slices(stats: Dict[str, SliceStats], run: dict) -> List[str]:
    """Slice values that get galleries: worst accuracy first (largest first when unlabeled)."""
    slice_columns = list(run.get("data", {}).get("slice_columns") or [])
    if not slice_columns:
        return ["overall"] if "overall" in stats else []
    names = report_summary.worst_slices(stats, slice_columns, report_gallery.MAX_SLICES)
    names.sort(key=lambda n: (stats[n].accuracy() if stats[n].labeled else -stats[n].n, n))
    return names[:report_gallery.MAX_SLICES]


def _name_classes(galleries: List[dict], class_names: Sequence[str]) -> None:
    def name(index):
        if index is None:
            return None
        return class_names[index] if 0 <= index < len(class_names) else str(index)

    for gallery in galleries:
        gallery["class_name"] = name(gallery["class"])
        for item in gallery["items"]:
            item["label_name"] = name(item["label"])
            item["predicted_name"] = name(item["predicted_class"])


def gather_summary(output: str, run: Optional[dict] = None) -> dict:
    """Every figure of the report, as one JSON-ready dict (summary.json)."""
    run = run if run is not None else load_run(output)
    figures = report_summary
    picker = report_gallery.GalleryPicker()
    stats = figures.scan_attributions(
        runinfo.parquet_files(join(output, layout.ATTRIBUTIONS)), run, picker)
    data = run.get("data") or {}
    ident = figures.identity(run)
    methods = ident["methods"] or ["gradcam"]
    summary = {
        "summary_version": SUMMARY_VERSION,
        "generated_at": runinfo.now_iso(),
        "output": output,
        "identity": ident,
        "accounting": figures.accounting(run, output),
        "metrics": figures.metrics_summary(run.get("tfma") or {},
                                           list(data.get("slice_columns") or []),
                                           bool(data.get("has_masks")), stats,
                                           int((run.get("options") or {}).get("min_slice_size")
                                               or 0)),
    }
    summary["verdict"] = figures.verdict(run, summary["metrics"])
    summary["skipped_slice_columns"] = {
        "columns": data.get("skipped_slice_columns") or {},
        "note": data.get("skipped_slice_columns_note"),
        "binned": data.get("slice_bins") or {}}
    data_columns = list(data.get("slice_columns") or [])
    shown = report_summary.worst_slices(stats, data_columns, report_summary.MAX_SLICE_ROWS)
    summary["slices"] = {name: s.as_dict(methods) for name, s in sorted(stats.items())
                         if name in shown or name.split("=", 1)[0] not in data_columns}
    galleries = picker.galleries(_gallery_slices(stats, run))
    _name_classes(galleries, ident["class_names"])
    summary.update({
        "galleries": galleries,
        "gallery_method": methods[0],
        "gallery_size": report_gallery.PER_GALLERY,
        "gallery_max_slices": report_gallery.MAX_SLICES,
        "localization": figures.localization(stats, run),
        "layer_sweep": figures.layer_sweep_summary(output),
        "importance": figures.importance_section(output),
        "faithfulness": figures.faithfulness(stats, run),
        "sanity": figures.sanity(output, run),
        "attention": report_attention.attention_section(output, run),
    })
    if summary["importance"]:
        summary["importance"]["sample"] = report_text.importance_sample_sentence(
            (run.get("importance") or {}).get("sample"))
    _importance_by_slice(summary, output, run)
    summary["findings"] = report_text.findings(summary)
    summary["omitted"] = report_text.omitted_notes(run, summary)
    summary["method_notes"] = report_text.method_notes(methods)
    summary["glossary"] = report_glossary.glossary(summary)
    return summary


def _importance_by_slice(summary: dict, output: str, run: dict) -> None:
    """Per-slice patch importances that differ from overall, and a finding where another patch
    ranks first."""
    imp = summary.get("importance")
    if not imp:
        return
    imp["by_slice"] = report_attention.importance_by_slice(output, imp["metric"], imp["features"])
    overall_top = next((r for r in imp["features"] if r["feature"].startswith("patch_")), None)
    grid = tuple((run.get("attention") or {}).get("region_grid") or (4, 4))
    imp["slice_findings"] = [s for s in (report_attention.importance_slice_sentence(
        entry, imp["metric"], overall_top, grid) for entry in imp["by_slice"]) if s]


def render_pictures(summary: dict, run: dict, output: str) -> dict:
    """Chart data URIs by name, and the galleries with a thumbnail per item."""
    pictures = {}
    metrics = summary.get("metrics")
    for group in (metrics or {}).get("by_column", []):
        rows = [{"slice": r["slice"], **(r["metrics"].get(metrics["primary"]) or {})}
                for r in group["slices"]]
        if any(r.get("value") is not None for r in rows):
            pictures[f"metric:{group['column']}"] = report_plots.slice_metric_chart(
                metrics["primary"], rows)
    if summary.get("layer_sweep") and summary["layer_sweep"]["overall"]:
        pictures["layer_sweep"] = report_plots.layer_sweep_chart(summary["layer_sweep"]["overall"])
    imp = summary.get("importance")
    if imp:
        pictures["importance"] = report_plots.importance_chart(imp["metric"], imp["features"])
        if imp["patch_grid"]:
            pictures["patch_heatmap"] = report_plots.patch_heatmap(imp["metric"], imp["patch_grid"])
        for entry in imp.get("by_slice") or []:
            pictures[f"patch_heatmap:{entry['slice']}"] = report_plots.patch_heatmap(
                imp["metric"], entry["patch_grid"])
    if summary.get("attention"):
        pictures["attention_by_slice"] = report_plots.attention_grid(
            summary["attention"]["maps"], summary["attention"]["grid"])
    if summary.get("sanity"):
        pictures["sanity"] = report_plots.sanity_chart(
            summary["sanity"]["curves"], summary["sanity"]["judged_step"],
            summary["sanity"]["threshold"])
    galleries = json.loads(json.dumps(summary["galleries"]))  # thumbnails stay out of summary.json
    wanted = report_gallery.chosen_ids(galleries)
    note = None
    if wanted:
        paths = runinfo.parquet_files(join(output, layout.ATTRIBUTIONS))
        maps = report_gallery.read_maps(paths, summary["gallery_method"], wanted)
        images, note = report_gallery.read_images(run, wanted)
        report_gallery.render_thumbnails(galleries, maps, images)
    return {"charts": pictures, "galleries": galleries,
            "gallery_slices": _gallery_blocks(galleries), "gallery_note": note,
            "colour_bar": report_plots.colour_bar()}


def _gallery_blocks(galleries: List[dict]) -> List[dict]:
    """[{"slice", "classes": [{"class_name", "galleries"}]}] in the galleries' order."""
    blocks: List[dict] = []
    for gallery in galleries:
        if not blocks or blocks[-1]["slice"] != gallery["slice"]:
            blocks.append({"slice": gallery["slice"], "classes": []})
        classes = blocks[-1]["classes"]
        if not classes or classes[-1]["class"] != gallery["class"]:
            classes.append({"class": gallery["class"], "class_name": gallery["class_name"],
                            "galleries": []})
        classes[-1]["galleries"].append(gallery)
    return blocks


def _fmt(value, digits: int = 3) -> str:
    """Numbers for people: n/a for missing (never 0), fixed digits for fractions."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"
    return str(value)


def _css_string(value) -> markupsafe.Markup:
    """A quoted CSS string (for @page margin boxes): backslash escapes, not HTML entities, since
    the browser does not decode entities inside <style>; "<" escaped so nothing closes it."""
    text = "".join(ch if ch.isprintable() and ch not in '\\"<>' else f"\\{ord(ch):x} "
                   for ch in str(value))
    return markupsafe.Markup(f'"{text}"')


def page_title(summary: dict) -> str:
    """The browser tab's and the PDF's title: the model's file name and the run's date."""
    ident = summary["identity"]
    model = (ident.get("model_path") or "model").rstrip("/").rsplit("/", 1)[-1]
    date = (ident.get("started_at") or ident.get("finished_at") or "")[:10] or "undated run"
    return f"{model}, {date}: xai-audit report"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("beam_pipeline.report", "templates"),
        autoescape=True,  # every label, class name, slice value and path is user data
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=report_text.visible_controls,  # no display spoofing by bidi controls
    )
    env.filters["fmt"] = _fmt
    env.filters["pct"] = report_text.pct
    env.filters["css_string"] = _css_string
    env.globals["explain"] = report_glossary.explain
    env.globals["method_name"] = lambda m: METHOD_NAMES.get(m, m)
    env.globals["page_title"] = page_title
    return env


def render_html(summary: dict, pictures: dict) -> str:
    return _environment().get_template("report.html.j2").render(s=summary, p=pictures)


def write_report(output: str) -> str:
    """Render DIR/report/index.html and summary.json from the files in DIR; returns the path of
    index.html. Raises ReportError when DIR holds no run."""
    output = output.rstrip("/")
    run = load_run(output)
    summary = gather_summary(output, run)
    pictures = render_pictures(summary, run, output)
    if pictures["galleries"]:
        summary["images_read_from"] = report_gallery.data_location(run)
    if pictures["gallery_note"]:
        summary["gallery_note"] = (f"Thumbnails show the map alone where the image could not be "
                                   f"re-read: {pictures['gallery_note']}.")
    html = render_html(summary, pictures)
    # Temp name then rename: a run killed while reporting leaves the old report or none, never
    # half a page (re-render with `xai-audit report DIR`).
    outputs.write_json_atomic(join(output, layout.REPORT, layout.REPORT_SUMMARY), summary)
    index = join(output, layout.REPORT, layout.REPORT_INDEX)
    outputs.write_bytes_atomic(index, html.encode("utf-8"), "text/html")
    return index

"""The report's galleries: which examples to show, and their attribution overlays.

Galleries per slice value: the most confident correct predictions, the most confident wrong
ones, the examples whose map puts the least of its mass on the ground-truth mask (relative to
the mask's share of the image), and among correct predictions those least on the mask (right,
perhaps for the wrong reason: a shortcut shows here). Selection streams: ``GalleryPicker`` sees one row at a time (only
the small columns) and keeps a bounded heap per (slice, gallery). Only the chosen examples' maps
are read afterwards (``read_maps``), and only their images and masks are re-read and decoded
from the data source (``read_images``), through the same ``sources`` / ``decode`` code the job
uses. When the data cannot be re-read (moved, no access), thumbnails show the map alone and the
report says so.
"""
import heapq
import logging
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np

from . import decode, report_plots, runinfo, sources

LOG = logging.getLogger("xai_audit")

PER_GALLERY = 6  # thumbnails per gallery per slice value
MAX_SLICES = 8  # slice values that get galleries (worst accuracy first)
CORRECT, WRONG, OFF_MASK, CORRECT_OFF_MASK, CONFIDENT = (
    "most_confident_correct", "most_confident_wrong", "least_on_mask", "correct_least_on_mask",
    "most_confident")
KINDS = (CORRECT, WRONG, OFF_MASK, CORRECT_OFF_MASK, CONFIDENT)
TITLES = {
    CORRECT: "Most confident correct",
    WRONG: "Most confident wrong",
    OFF_MASK: "Least attention on the mask",
    CORRECT_OFF_MASK: "Correct, but least attention on the mask (right for the wrong reason?)",
    CONFIDENT: "Most confident (no labels)",
}


class GalleryPicker:
    """Keeps, per (slice, gallery), the ``per_gallery`` best candidates seen so far.

    ``add(group, row)`` takes a row with example_id, label, predicted_class, probabilities and,
    with masks, ``lift`` (mask energy / mask area of the gallery's method)."""

    def __init__(self, per_gallery: int = PER_GALLERY):
        self.per_gallery = per_gallery
        self.heaps: Dict[Tuple[str, str], list] = {}

    def _push(self, key: Tuple[str, str], score: float, item: dict) -> None:
        heap = self.heaps.setdefault(key, [])
        # Ties go to the smaller example id, so the choice does not depend on the file order.
        entry = (score, _reverse_text(item["example_id"]), item)
        if len(heap) < self.per_gallery:
            heapq.heappush(heap, entry)
        elif entry[:2] > heap[0][:2]:
            heapq.heapreplace(heap, entry)

    def add(self, group: str, row: dict) -> None:
        probabilities = row.get("probabilities") or []
        confidence = float(max(probabilities)) if probabilities else 0.0
        item = {"example_id": row["example_id"], "label": row.get("label"),
                "predicted_class": row.get("predicted_class"), "confidence": confidence,
                "lift": row.get("lift")}
        correct = row.get("label") is not None and row["label"] == row["predicted_class"]
        if row.get("label") is None:
            self._push((group, CONFIDENT), confidence, item)
        else:
            self._push((group, CORRECT if correct else WRONG), confidence, item)
        if row.get("lift") is not None:
            self._push((group, OFF_MASK), -row["lift"], item)
            if correct:
                self._push((group, CORRECT_OFF_MASK), -row["lift"], item)

    def galleries(self, groups: Sequence[str]) -> List[dict]:
        """[{"slice", "kind", "title", "items": [...]}] for ``groups``, best first."""
        out = []
        for group in groups:
            for kind in KINDS:
                heap = self.heaps.get((group, kind))
                if heap:
                    items = [entry[2] for entry in sorted(heap, key=lambda e: e[:2], reverse=True)]
                    out.append({"slice": group, "kind": kind, "title": TITLES[kind],
                                "items": items})
        return out


def _reverse_text(text: str) -> Tuple[int, ...]:
    """A key that orders strings backwards (so a max-heap tie prefers the smaller id)."""
    return tuple(-ord(ch) for ch in text) + (1,)


def chosen_ids(galleries: Iterable[dict]) -> Set[str]:
    return {item["example_id"] for gallery in galleries for item in gallery["items"]}


def read_maps(paths: Sequence[str], method: str, wanted: Set[str]) -> Dict[str, np.ndarray]:
    """The ``method`` maps of the ``wanted`` examples only, read batch by batch."""
    maps: Dict[str, np.ndarray] = {}
    for row in runinfo.iter_rows(paths, ["example_id", method, f"{method}_shape"], 1024):
        if row["example_id"] in wanted and row.get(method) is not None:
            shape = row.get(f"{method}_shape") or [len(row[method])]
            maps[row["example_id"]] = np.asarray(row[method], np.float32).reshape(shape)
    return maps


def _image_spec(run: dict) -> Optional[decode.ImageSpec]:
    height, width, channels = (run.get("model", {}).get("input_shape") or [None] * 3)[:3]
    if not (height and width):
        size = decode.parse_image_size(run.get("options", {}).get("image_size"))
        if not size:
            return None
        height, width = size
    # Pixels for display: no model preprocessing, 0..255.
    return decode.ImageSpec(int(height), int(width), 3 if channels != 1 else 1, "none")


def data_location(run: dict) -> str:
    """Where the report re-reads the data: the absolute path or URI the run recorded, so the
    report renders the same from any working directory (runs before it was recorded: the path
    as given)."""
    data = run.get("data", {})
    return data.get("absolute_uri") or data["uri"]


def _source_spec(run: dict) -> sources.SourceSpec:
    """The data source as the run read it: same columns and the same options (a manifest of
    paths outside its folder is read only when the run allowed it)."""
    options = run.get("options", {})
    columns = sources.ColumnNames(options.get("image_column", "image"),
                                  options.get("label_column", "label"),
                                  options.get("mask_column", "mask"),
                                  options.get("id_column", "id"))
    slice_columns = list(run.get("data", {}).get("slice_columns") or []) or None
    return sources.inspect_source(data_location(run), columns, slice_columns,
                                  bool(options.get("allow_paths_outside_data")))


def _iter_source_refs(spec: sources.SourceSpec):
    """The source's ExampleRefs; rows the job turned into error rows (dicts) are skipped."""
    if spec.kind != "tfrecord":
        for ref in sources.iter_refs(spec):
            if isinstance(ref, sources.ExampleRef):
                yield ref
        return
    for path, file_id in sorted(sources.tfrecord_file_ids(spec.files).items()):
        for ref in sources.iter_tfrecord_refs(spec, path, file_id):
            if isinstance(ref, sources.ExampleRef):
                yield ref


def read_images(run: dict, wanted: Set[str]):
    """({example_id: (pixels [H, W, C] 0..255, mask or None)}, a note when some or all images
    could not be re-read). Enumerates the source once and decodes only the wanted examples."""
    spec = _image_spec(run)
    if spec is None:
        return {}, "the model has no fixed input size and no --image-size was recorded"
    try:
        source = _source_spec(run)
        images = {}
        for ref in _iter_source_refs(source):
            if ref.example_id not in wanted:
                continue
            try:
                image_bytes, mask_bytes = sources.read_example_bytes(ref)
                pixels = decode.decode_image(image_bytes, spec)
                mask = decode.decode_mask(mask_bytes, spec) if mask_bytes else None
                images[ref.example_id] = (pixels, mask)
            except Exception as exc:  # an example that decoded in the job but not now
                LOG.warning("Report: could not re-read %s (%s)", ref.example_id, exc)
    except Exception as exc:
        LOG.warning("Report: the data could not be re-read for thumbnails: %s", exc)
        return {}, f"the data at {data_location(run)} could not be re-read ({exc})"
    missing = len(wanted) - len(images)
    note = f"{missing} of {len(wanted)} images could not be re-read" if missing else None
    return images, note


def render_thumbnails(galleries: List[dict], maps: Dict[str, np.ndarray], images: dict) -> None:
    """Adds a ``thumbnail`` data URI to each gallery item (the map alone without its image)."""
    for gallery in galleries:
        for item in gallery["items"]:
            heatmap = maps.get(item["example_id"])
            pixels, mask = images.get(item["example_id"], (None, None))
            item["image_shown"] = pixels is not None
            item["thumbnail"] = (report_plots.overlay_thumbnail(pixels, heatmap, mask)
                                 if heatmap is not None else None)

"""The report's galleries: which examples to show, and their attribution overlays.

Galleries per slice value and class (true class; predicted when unlabeled; the classes with the
lowest accuracy first): the most confident correct predictions, the most confident wrong ones,
the examples whose map puts the least of its mass on the ground-truth mask (relative to the
mask's share of the image: lift), and correct predictions whose lift is below 1 (right, perhaps
for the wrong reason: a shortcut shows here). No example appears twice on a slice: the
narrowest gallery takes it, the others show the next candidates or a note.

Selection streams: ``GalleryPicker`` sees one row at a time (only the small columns) and keeps a
bounded heap per (slice, class, gallery). Only the chosen examples' maps
are read afterwards (``read_maps``), and only their images and masks are re-read and decoded
from the data source (``read_images``), through the same ``sources`` / ``decode`` code the job
uses. When the data cannot be re-read (moved, no access), thumbnails show the map alone and the
report says so.
"""
import heapq
import logging
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np

from ..io import decode, runinfo, sources
from . import plots as report_plots

LOG = logging.getLogger("xai_audit")

PER_GALLERY = 4  # thumbnails per gallery
MAX_SLICES = 6  # slice values that get galleries (worst accuracy first)
MAX_CLASSES = 3  # classes per slice value that get galleries (worst accuracy first)
# A map whose share on the mask is below the mask's share of the image (lift < 1) looks
# elsewhere more than a map spread evenly would: the "right for the wrong reason?" rule.
SHORTCUT_LIFT = 1.0
CORRECT, WRONG, OFF_MASK, CORRECT_OFF_MASK, CONFIDENT = (
    "most_confident_correct", "most_confident_wrong", "least_on_mask", "correct_least_on_mask",
    "most_confident")
KINDS = (CORRECT, WRONG, OFF_MASK, CORRECT_OFF_MASK, CONFIDENT)  # the order on the page
# Which gallery takes an example first when it qualifies for several on the same slice: the
# narrowest rule first, so the broad "least on the mask" gallery shows the next examples
# instead of repeating the "right for the wrong reason?" ones.
CLAIM_ORDER = (CORRECT_OFF_MASK, WRONG, CORRECT, OFF_MASK, CONFIDENT)
TITLES = {
    CORRECT: "Most confident correct",
    WRONG: "Most confident wrong",
    OFF_MASK: "Least attention on the mask",
    CORRECT_OFF_MASK: "Right for the wrong reason? Correct, with less of the map on the mask "
                      "than the mask's share of the image (lift < 1)",
    CONFIDENT: "Most confident (no labels)",
}
NONE_NOTES = {
    WRONG: "None: every example of this class on this slice is predicted correctly.",
    CORRECT: "None: no example of this class on this slice is predicted correctly.",
    CORRECT_OFF_MASK: "None: every correct prediction of this class here puts at least the "
                      "mask's share of its map on the mask (lift ≥ 1).",
}
ALREADY_SHOWN = "Left out: every candidate is already shown in another gallery of this slice."


class GalleryPicker:
    """Keeps, per (slice, class, gallery), the best candidates seen so far.

    ``add(group, row)`` takes a row with example_id, label, predicted_class, probabilities and,
    with masks, ``lift`` (mask energy / mask area of the gallery's method). The class is the
    true label (the predicted one when unlabeled). Each heap keeps more than one gallery's worth,
    so a gallery can still be filled after the examples other galleries took first."""

    def __init__(self, per_gallery: int = PER_GALLERY):
        self.per_gallery = per_gallery
        self.keep = per_gallery * len(CLAIM_ORDER)
        self.heaps: Dict[Tuple[str, int, str], list] = {}
        # (slice, class) -> [examples, correct, labeled, labeled with a lift]: which classes and
        # galleries to show.
        self.counts: Dict[Tuple[str, int], List[int]] = {}

    def _push(self, key: Tuple[str, int, str], score: float, item: dict) -> None:
        heap = self.heaps.setdefault(key, [])
        # Ties go to the smaller example id, so the choice does not depend on the file order.
        entry = (score, _reverse_text(item["example_id"]), item)
        if len(heap) < self.keep:
            heapq.heappush(heap, entry)
        elif entry[:2] > heap[0][:2]:
            heapq.heapreplace(heap, entry)

    def add(self, group: str, row: dict) -> None:
        probabilities = row.get("probabilities") or []
        confidence = float(max(probabilities)) if probabilities else 0.0
        label, lift = row.get("label"), row.get("lift")
        item = {"example_id": row["example_id"], "label": label,
                "predicted_class": row.get("predicted_class"), "confidence": confidence,
                "lift": lift}
        correct = label is not None and label == row["predicted_class"]
        cls = label if label is not None else row.get("predicted_class")
        count = self.counts.setdefault((group, cls), [0, 0, 0, 0])
        count[0] += 1
        count[1] += correct
        count[2] += label is not None
        count[3] += lift is not None and label is not None
        if label is None:
            self._push((group, cls, CONFIDENT), confidence, item)
        else:
            self._push((group, cls, CORRECT if correct else WRONG), confidence, item)
        if lift is not None and label is not None:
            self._push((group, cls, OFF_MASK), -lift, item)
            if correct and lift < SHORTCUT_LIFT:
                self._push((group, cls, CORRECT_OFF_MASK), -lift, item)

    def _classes(self, group: str) -> List[int]:
        """The slice's classes with galleries: lowest accuracy first (largest when unlabeled)."""
        counts = {cls: c for (g, cls), c in self.counts.items() if g == group}

        def rank(cls):
            n, correct, labeled, _ = counts[cls]
            return (correct / labeled if labeled else -n, str(cls))

        return sorted(counts, key=rank)[:MAX_CLASSES]

    def _kinds(self, group: str, cls) -> List[str]:
        """The galleries a (slice, class) can have, in claim order."""
        n, _, labeled, with_lift = self.counts[(group, cls)]
        wanted = {CORRECT, WRONG} if labeled else set()
        wanted |= {OFF_MASK, CORRECT_OFF_MASK} if labeled and with_lift else set()
        wanted |= {CONFIDENT} if n > labeled else set()  # unlabeled examples of the class
        return [k for k in CLAIM_ORDER if k in wanted]

    def galleries(self, groups: Sequence[str]) -> List[dict]:
        """[{"slice", "class", "kind", "title", "items", "note"}] for ``groups``, per class,
        best first. No example appears twice on a slice; an empty gallery keeps a note."""
        out = []
        for group in groups:
            shown: Set[str] = set()
            for cls in self._classes(group):
                found = {}
                for kind in self._kinds(group, cls):
                    heap = self.heaps.get((group, cls, kind), [])
                    ranked = [e[2] for e in sorted(heap, key=lambda e: e[:2], reverse=True)]
                    items = [i for i in ranked if i["example_id"] not in shown]
                    items = items[:self.per_gallery]
                    shown.update(i["example_id"] for i in items)
                    note = None if items else (ALREADY_SHOWN if ranked else NONE_NOTES.get(kind))
                    found[kind] = {"slice": group, "class": cls, "kind": kind,
                                   "title": TITLES[kind], "items": items, "note": note}
                out += [found[k] for k in KINDS if k in found]
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
    # The run's own reading bounds and outside-the-data rule (older runs: the defaults), from
    # the data's absolute location. Only the images are needed: no slice column (a binned one
    # is not in the data).
    limits = sources.ReadLimits(
        options.get("max_image_bytes") or sources.DEFAULT_MAX_IMAGE_BYTES,
        options.get("read_timeout") or sources.DEFAULT_READ_TIMEOUT_S)
    return sources.inspect_source(data_location(run), columns, [],
                                  bool(options.get("allow_paths_outside_data")), limits=limits)


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
                image_bytes, mask_bytes = sources.read_example_bytes(ref, source)
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

"""Where the examples come from: class-folder trees, CSV/Parquet manifests, TFRecords of tf.Example.

``inspect_source`` runs once on the launcher: it checks the data URI, learns the class names and
the slice columns' types (``choose_slices``: columns with too many distinct values are carried,
not sliced; ``--slice-bins`` adds binned slices), and fingerprints the data. It returns a small, picklable ``SourceSpec``.
The pipeline then enumerates ``ExampleRef``s from that spec on the workers (``iter_refs``,
``iter_tfrecord_refs``), so the example list never travels inside the pipeline graph.

All file access goes through Beam's ``FileSystems``, so ``gs://`` works unchanged. Every example
read is bounded (``ReadLimits``): only regular files, a size checked from metadata before reading,
and a time limit; symlinks are resolved before the outside-the-data check.

What lives where: ``source_spec`` (the spec, columns, limits), ``slice_choice`` (which columns are
slices, --slice-bins), ``source_folders``, ``source_manifest`` and ``source_tfrecord`` (one kind
of data each), ``bounded_read`` (one image or mask file within the limits) and ``paths`` (the
file-system helpers). This module picks the kind and keeps the names the job, the pipeline, the
report and the tests import from ``sources``.
"""
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .bounded_read import TIMEOUTS_BEFORE_GIVING_UP, read_file
from ..errors import DataSourceError, ExampleError
from .paths import is_inside, read_bytes
from .records import ExampleRef, error_row
from .slice_choice import (BIN_SUFFIX, MAX_SLICE_VALUES, OUT_OF_RANGE_BIN, bin_column, bin_label,
    choose_slices, parse_slice_bins, skipped_slices_sentence)
from .source_folders import inspect_folders, iter_folder_refs
from .source_manifest import inspect_manifest, iter_manifest_refs
from .source_spec import (DEFAULT_MAX_IMAGE_BYTES, DEFAULT_READ_TIMEOUT_S, ColumnNames, ReadLimits,
    SourceSpec)
from .source_tfrecord import (TFRECORD_SLICE_SCAN, _BrokenFraming, _masked_crc32c, _read_records,
    inspect_tfrecord, iter_tfrecord_refs, tfrecord_file_ids)

# Names other modules and the tests import from here (the re-exports above).
__all__ = [
    "BIN_SUFFIX", "DEFAULT_MAX_IMAGE_BYTES", "DEFAULT_READ_TIMEOUT_S", "MAX_SLICE_VALUES",
    "OUT_OF_RANGE_BIN", "TFRECORD_SLICE_SCAN", "TIMEOUTS_BEFORE_GIVING_UP", "ColumnNames",
    "ExampleRef", "ReadLimits", "SourceSpec", "bin_column", "bin_label", "choose_slices",
    "error_row", "inspect_source", "is_inside", "iter_refs", "iter_tfrecord_refs",
    "parse_slice_bins", "read_bytes", "read_example_bytes", "read_file",
    "skipped_slices_sentence", "source_kind", "tfrecord_file_ids", "_BrokenFraming",
    "_masked_crc32c", "_read_records",
]


def source_kind(uri: str) -> str:
    lower = uri.lower()
    if lower.endswith(".csv"):
        return "manifest"
    if lower.endswith(".parquet"):
        return "manifest"
    if any(ch in uri for ch in "*?[") or any(
        lower.endswith(ext) for ext in (".tfrecord", ".tfrecords", ".tfr", ".tfrecord.gz")
    ):
        return "tfrecord"
    return "folders"


def inspect_source(
    uri: str, columns: ColumnNames, slice_columns: Optional[Sequence[str]] = None,
    allow_paths_outside_data: bool = False,
    slice_bins: Optional[Dict[str, List[float]]] = None, limits: Optional[ReadLimits] = None,
) -> SourceSpec:
    """Validate the data URI on the launcher and describe it (raises DataSourceError).

    Without ``slice_columns``, columns with more than MAX_SLICE_VALUES distinct values are
    carried but not sliced on (``SourceSpec.skipped_slices``); ``slice_bins`` (parse_slice_bins)
    adds a ``<column>_bin`` slice per binned numeric column."""
    kind = source_kind(uri)
    slice_bins = slice_bins or {}
    if kind == "manifest":
        spec = inspect_manifest(uri, columns, slice_columns, slice_bins)
    elif kind == "tfrecord":
        spec = inspect_tfrecord(uri, columns, slice_columns, slice_bins)
    elif slice_columns or slice_bins:
        raise DataSourceError(
            "--slice-columns and --slice-bins need a manifest or TFRecords: a class-folder tree "
            "has no columns."
        )
    else:
        spec = inspect_folders(uri, columns)
    spec.allow_paths_outside_data = allow_paths_outside_data
    spec.limits = limits or ReadLimits()
    return spec


def iter_refs(spec: SourceSpec) -> Iterator[Union[ExampleRef, dict]]:
    """ExampleRefs of a folder tree or manifest (TFRecords go file by file: iter_tfrecord_refs),
    or error rows for manifest rows that cannot be used."""
    if spec.kind == "folders":
        return iter_folder_refs(spec)
    if spec.kind == "manifest":
        return iter_manifest_refs(spec)
    raise ValueError(f"iter_refs does not read {spec.kind}")


def read_example_bytes(
    ref: ExampleRef, spec: Optional[SourceSpec] = None
) -> Tuple[bytes, Optional[bytes]]:
    """The image and mask bytes of a ref (reading files when needed), or ExampleError.

    Files are read within ``spec.limits`` and, unless ``spec.allow_paths_outside_data``, only
    when they lie in the data's folder once symlinks are resolved (without a spec: the default
    limits and no folder check, for re-reads of a finished run's own data)."""
    limits = spec.limits if spec is not None else ReadLimits()
    root = None if spec is None or spec.allow_paths_outside_data else spec.data_root
    image = ref.image_bytes
    if image is None:
        if not ref.image_path:
            raise ExampleError("read", "missing_image", "The example names no image file.")
        image = read_file(ref.image_path, "image", limits, root)
    mask = ref.mask_bytes
    if mask is None and ref.mask_path:
        mask = read_file(ref.mask_path, "mask", limits, root)
    return image, mask

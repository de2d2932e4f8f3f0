"""Where the examples come from: class-folder trees, CSV/Parquet manifests, TFRecords of tf.Example.

``inspect_source`` runs once on the launcher: it checks the data URI, learns the class names and
the slice columns' types (``choose_slices``: columns with too many distinct values are carried,
not sliced; ``--slice-bins`` adds binned slices), and fingerprints the data. It returns a small, picklable ``SourceSpec``.
The pipeline then enumerates ``ExampleRef``s from that spec on the workers (``iter_refs``,
``iter_tfrecord_refs``), so the example list never travels inside the pipeline graph.

All file access goes through Beam's ``FileSystems``, so ``gs://`` works unchanged. Every example
read is bounded (``ReadLimits``): only regular files, a size checked from metadata before reading,
and a time limit; symlinks are resolved before the outside-the-data check.
"""
import errno
import hashlib
import io
import logging
import os
import posixpath
import stat
import struct
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from .errors import DataSourceError, ExampleError, OptionError
from .outputs import RUN_JSON, STAGING_PREFIX
from .records import ExampleRef, error_row

LOG = logging.getLogger("xai_audit")
HIDDEN_PREFIXES = (".", "_")
# A column with more distinct values than this (a continuous number, a timestamp, an id) is not
# a slice by default: it would make slices of one or two examples whose metric "gaps" mean
# nothing. It is still carried to attributions; --slice-columns or --slice-bins make it a slice.
MAX_SLICE_VALUES = 50
# TFRecords are not read whole on the launcher: distinct values are counted on at most this many
# records of the first file (more than MAX_SLICE_VALUES there means more in the whole data too).
TFRECORD_SLICE_SCAN = 2000
BIN_SUFFIX = "_bin"  # --slice-bins age=... slices on the column age_bin
OUT_OF_RANGE_BIN = "out_of_range"  # a value outside every bin (a missing value stays null)
DEFAULT_MAX_IMAGE_BYTES = 256 * 1024 * 1024  # far above any real image; far below a worker's RAM
DEFAULT_READ_TIMEOUT_S = 60.0  # one image or mask file, retries of the file system included
# After this many reads in a row from one file system time out, the next ones are not tried: a
# thousand gs:// rows of an offline run cost three timeouts, not a thousand.
TIMEOUTS_BEFORE_GIVING_UP = 3


@dataclass
class ReadLimits:
    """Bounds on reading one image or mask file (--max-image-bytes, --read-timeout).

    ``timeouts_in_a_row`` counts, per file system scheme, the reads that timed out since the last
    one that did not; each worker's copy (the spec is pickled to it) counts its own reads."""

    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    timeout_s: float = DEFAULT_READ_TIMEOUT_S
    timeouts_in_a_row: Dict[str, int] = field(default_factory=dict, compare=False, repr=False)


@dataclass
class ColumnNames:
    image: str = "image"
    label: str = "label"
    mask: str = "mask"
    id: str = "id"


@dataclass
class SourceSpec:
    """What the launcher learned about the data; travels to the workers (keep it small)."""

    kind: str  # "folders" | "manifest" | "tfrecord"
    uri: str
    columns: ColumnNames
    labeled: bool
    has_masks: bool
    label_names: Optional[List[str]]  # class names found in the data (folders, text labels)
    slice_types: Dict[str, str] = field(default_factory=dict)  # column -> int64|float64|bool|string
    # Columns carried to attributions but not sliced on (too many distinct values, or the raw
    # values of a binned column), column -> type.
    carried_types: Dict[str, str] = field(default_factory=dict)
    skipped_slices: Dict[str, int] = field(default_factory=dict)  # column -> distinct values
    slice_bins: Dict[str, List[float]] = field(default_factory=dict)  # column -> bin edges
    files: List[str] = field(default_factory=list)  # TFRecord files
    fingerprint: str = ""
    examples_expected: Optional[int] = None  # known up front for folders and manifests
    # Manifest paths that resolve outside the manifest's folder (``../x.png``, an absolute path,
    # another bucket) are error rows unless the user opts in (--allow-paths-outside-data). Local
    # symlinks (manifest paths and class-folder entries) are judged by where they lead.
    allow_paths_outside_data: bool = False
    limits: ReadLimits = field(default_factory=ReadLimits)

    @property
    def data_root(self) -> str:
        """The folder every example file must lie in (unless allow_paths_outside_data)."""
        return self.uri if self.kind == "folders" else _parent(self.uri)

    @property
    def column_types(self) -> Dict[str, str]:
        """Every data column written to attributions: the slices and the carried columns."""
        return {**self.carried_types, **self.slice_types}

    @property
    def read_types(self) -> Dict[str, str]:
        """The columns read from each example (binned slices are computed from them)."""
        binned = {bin_column(c) for c in self.slice_bins}
        return {c: t for c, t in self.column_types.items() if c not in binned}

    def slice_values(self, get) -> Dict[str, Any]:
        """An example's data columns (``get(column)`` gives the raw cell), binned ones added."""
        values = {c: _native(get(c), t) for c, t in self.read_types.items()}
        for column, edges in self.slice_bins.items():
            values[bin_column(column)] = bin_label(values.get(column), edges)
        return values


# --------------------------------------------------------------------------- slice choice and bins


def bin_column(column: str) -> str:
    return column + BIN_SUFFIX


def _edge(value: float) -> str:
    return f"{value:g}"


def bin_label(value: Any, edges: Sequence[float]) -> Optional[str]:
    """``[lo,hi)`` of the bin holding ``value`` (bins are half-open, the last one too),
    ``out_of_range`` outside every bin, None for a missing value."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (isinstance(value, float) and np.isnan(value)):
        return None
    for low, high in zip(edges, edges[1:]):
        if low <= value < high:
            return f"[{_edge(low)},{_edge(high)})"
    return OUT_OF_RANGE_BIN


def parse_slice_bins(items: Optional[Sequence[str]]) -> Dict[str, List[float]]:
    """``--slice-bins age=0,40,65,120`` (repeatable) → {"age": [0, 40, 65, 120]}."""
    bins: Dict[str, List[float]] = {}
    for item in items or []:
        column, _, text = item.partition("=")
        try:
            edges = [float(v) for v in text.split(",")]
        except ValueError:
            edges = []
        if not column.strip() or len(edges) < 2 or any(
                not np.isfinite(e) for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
            raise OptionError(
                f"--slice-bins {item!r}: give COLUMN=EDGES with at least two increasing numbers, "
                "e.g. age=0,40,65,120 (bins [0,40), [40,65), [65,120)).")
        if column.strip() in bins:
            raise OptionError(f"--slice-bins names {column.strip()} twice.")
        bins[column.strip()] = edges
    return bins


def skipped_slices_sentence(skipped: Dict[str, int]) -> str:
    """Why some columns are not slices, and how to make them slices (log, run.json, report)."""
    named = ", ".join(f"{c} ({n} distinct values)" for c, n in skipped.items())
    return (f"Not slicing on {named}: more than {MAX_SLICE_VALUES} distinct values give slices "
            "of one or two examples whose metric gaps mean nothing. They are still written to "
            "attributions. To slice on one, name it in --slice-columns, or bin a numeric one with "
            "--slice-bins COLUMN=EDGES (e.g. --slice-bins age=0,40,65,120).")


def choose_slices(types: Dict[str, str], distinct: Dict[str, int],
                  explicit: Optional[Sequence[str]], bins: Dict[str, List[float]],
                  where: str) -> Dict[str, Any]:
    """Split the data columns into slices, carried-only columns and skipped ones.

    ``types``: every candidate column's type; ``distinct``: distinct values seen per column;
    ``explicit``: --slice-columns (all of them are slices, however many values); ``bins``:
    --slice-bins, whose columns are carried and sliced on as ``<column>_bin``."""
    for column in bins:
        if column not in types:
            raise DataSourceError(f"--slice-bins names {column}, which {where} lacks.")
        if types[column] not in ("int64", "float64"):
            raise OptionError(f"--slice-bins {column}: the column holds {types[column]} values; "
                              "bins need numbers.")
        if bin_column(column) in types:
            raise OptionError(f"--slice-bins {column} would add the slice column "
                              f"{bin_column(column)}, which {where} already has; rename it.")
    if explicit is not None:
        slices = {c: types[c] for c in explicit}
        skipped: Dict[str, int] = {}
    else:
        candidates = [c for c in types if c not in bins]
        skipped = {c: distinct[c] for c in candidates if distinct.get(c, 0) > MAX_SLICE_VALUES}
        slices = {c: types[c] for c in candidates if c not in skipped}
    slices.update({bin_column(c): "string" for c in bins})
    carried = {c: types[c] for c in [*skipped, *bins] if c not in slices}
    return {"slice_types": slices, "carried_types": carried, "skipped_slices": skipped,
            "slice_bins": dict(bins)}


# --------------------------------------------------------------------------- file helpers


def read_bytes(path: str) -> bytes:
    """Whole file through Beam FileSystems (local, gs://, ...)."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return handle.read()


def _is_dir(uri: str) -> bool:
    if "://" not in uri:
        return os.path.isdir(uri)
    return bool(FileSystems.match([uri.rstrip("/") + "/*"], limits=[1])[0].metadata_list)


def _exists(uri: str) -> bool:
    try:
        return FileSystems.exists(uri)
    except Exception:
        return False


def _resolve(base_dir: str, path: str) -> str:
    if "://" in path or os.path.isabs(path):
        return path
    return FileSystems.join(base_dir, path)


def _normalized(path: str) -> str:
    """``path`` with ``.`` and ``..`` segments folded (lexically; symlinks are not followed)."""
    if "://" in path:
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.normpath(rest)}"
    return os.path.normpath(path)


def is_inside(base_dir: str, path: str) -> bool:
    """Whether ``path`` lies in ``base_dir`` or below it, after folding ``..`` segments."""
    base, target = _normalized(base_dir).rstrip("/" + os.sep), _normalized(path)
    sep = "/" if "://" in base else os.sep
    return target.startswith(base + sep)


def _parent(uri: str) -> str:
    return posixpath.dirname(uri) if "://" in uri else os.path.dirname(os.path.abspath(uri))


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


# --------------------------------------------------------------------------- class folders


def _is_audit_output(folder: str) -> bool:
    """A folder holding an xai-audit run (run.json) or an unfinished one (.incomplete-*): an
    --output placed inside the data, never a class."""
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return RUN_JSON in names or any(n.startswith(STAGING_PREFIX) for n in names)


def _entry_size(path: str) -> int:
    """Size for the fingerprint: the target's, or the link's own when it cannot be followed."""
    try:
        return os.stat(path).st_size
    except OSError:
        return os.lstat(path).st_size


def _list_local_class_folders(root: str) -> List[Tuple[str, str, int]]:
    """Every non-hidden entry one level below the class folders, whatever it is: broken
    symlinks, loops, FIFOs and subfolders are listed too, and become error rows when read."""
    found = []
    for cls in sorted(_scandir(root), key=lambda e: e.name):
        if cls.name.startswith(HIDDEN_PREFIXES) or _skip_output(cls.path):
            continue
        if not _is_dir_entry(cls):
            if cls.is_symlink():  # perhaps a class folder elsewhere: say why it is not read
                LOG.warning("xai-audit: %s is %s, not a class folder; it is left out of the "
                            "data.", cls.path, _special_kind(cls.path) or "a link to a file")
            continue
        for entry in _scandir(cls.path):
            if entry.name.startswith(HIDDEN_PREFIXES):
                continue
            if _is_dir_entry(entry) and _skip_output(entry.path):
                continue
            found.append((cls.name, entry.path, _entry_size(entry.path)))
    return found


def _is_dir_entry(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a symlink loop
        return False


def _skip_output(folder: str) -> bool:
    """An --output placed inside the data is neither a class nor an example (logged)."""
    if not _is_audit_output(folder):
        return False
    LOG.warning("xai-audit: %s holds an audit's outputs (run.json or .incomplete-*); it is left "
                "out of the data.", folder)
    return True


def _scandir(folder: str) -> List[os.DirEntry]:
    try:
        return list(os.scandir(folder))
    except OSError as exc:
        raise DataSourceError(
            f"The data folder {folder} cannot be listed ({exc.strerror}); give the audit read "
            "access to it, or move it out of the data.") from None


def _list_class_folders(root: str) -> List[Tuple[str, str, int]]:
    """(class name, file path, size) for every non-hidden file one level below the class folders."""
    if "://" not in root:
        return sorted(_list_local_class_folders(root), key=lambda item: item[1])
    pattern = FileSystems.join(root.rstrip("/"), "*", "*")
    found = []
    for meta in FileSystems.match([pattern])[0].metadata_list:
        rel = meta.path[len(root.rstrip("/")) + 1 :].replace(os.sep, "/")
        parts = rel.split("/")
        if len(parts) != 2 or any(p.startswith(HIDDEN_PREFIXES) for p in parts):
            continue
        found.append((parts[0], meta.path, meta.size_in_bytes))
    return sorted(found, key=lambda item: item[1])


def _not_a_folder_error(uri: str) -> DataSourceError:
    """--data that is no folder: say what it is rather than "does not exist"."""
    advice = ("Give a folder of class subfolders, a manifest .csv/.parquet, or a TFRecord glob "
              "(*.tfrecord).")
    if "://" not in uri and os.path.lexists(uri):
        what = _special_kind(uri)
        if what is None:
            what = "a file, not a folder"
        return DataSourceError(f"--data {uri} is {what}. {advice}")
    return DataSourceError(f"--data {uri} does not exist. {advice}")


def _inspect_folders(uri: str, columns: ColumnNames) -> SourceSpec:
    if not _is_dir(uri):
        raise _not_a_folder_error(uri)
    files = _list_class_folders(uri)
    if not files:
        raise DataSourceError(
            f"--data {uri} is a folder but holds no images in class subfolders "
            "(expected DATA/<class>/<image>). The dataset is empty."
        )
    digest = hashlib.sha256()
    for _, path, size in files:
        digest.update(f"{os.path.relpath(path, uri)}\t{size}\n".encode())
    return SourceSpec(
        kind="folders",
        uri=uri.rstrip("/"),
        columns=columns,
        labeled=True,
        has_masks=False,
        label_names=sorted({name for name, _, _ in files}),
        fingerprint="sha256:" + digest.hexdigest(),
        examples_expected=len(files),
    )


def _iter_folder_refs(spec: SourceSpec) -> Iterator[ExampleRef]:
    for class_name, path, _ in _list_class_folders(spec.uri):
        rel = path[len(spec.uri) + 1 :].replace(os.sep, "/")
        yield ExampleRef(example_id=rel, source=path, image_path=path, raw_label=class_name)


# --------------------------------------------------------------------------- manifests


def _text_columns(columns: ColumnNames) -> Tuple[str, ...]:
    """Columns read as text exactly as written: ids (``007`` is not ``7``, ``0`` not ``0.0``, an
    empty id not ``nan``) and paths (a file named ``1e3`` is not ``1000.0``)."""
    return (columns.id, columns.image, columns.mask)


_BOOL_WORDS = {"True": True, "False": False, "true": True, "false": False, "TRUE": True,
               "FALSE": False}


def _reads_back(text: str) -> Tuple[bool, bool]:
    """(is an integer written as Python writes it, is a number written as Python writes it)."""
    try:
        number = float(text)
    except ValueError:
        return False, False
    try:
        if str(int(text)) == text:
            return abs(int(text)) < 2 ** 63, True  # beyond int64: a float, as pandas makes it
    except ValueError:
        pass
    return False, repr(number) == text


def _typed_slice(values: pd.Series) -> pd.Series:
    """A CSV slice column read as text, made numeric or boolean only when no value changes by it:
    ``007``, ``+7`` or ``1.50`` keep the column text (pandas would make 7 and 1.5), integers with
    gaps stay integers (pandas would make 7.0)."""
    present = values.dropna()
    if present.empty:
        return values.astype("float64")  # all missing: as pandas types it
    if present.isin(list(_BOOL_WORDS)).all() and len(present) == len(values):
        return values.map(_BOOL_WORDS).astype(bool)
    kinds = [_reads_back(v) for v in present]
    if all(is_int for is_int, _ in kinds):
        return pd.to_numeric(values).astype("Int64")
    if all(is_number for _, is_number in kinds):
        return values.astype("float64")
    return values


def _read_csv(data: bytes, columns: ColumnNames) -> pd.DataFrame:
    header = pd.read_csv(io.BytesIO(data), nrows=0).columns
    text = [c for c in header if c in _text_columns(columns)]
    # Pandas' usual missing-value words ("", NA, null, ...) everywhere but the text columns.
    na_values = {c: sorted(pd._libs.parsers.STR_NA_VALUES) for c in header if c not in text}
    # Everything but the label (whose parsing is the label reader's business) is read as text.
    frame = pd.read_csv(io.BytesIO(data), keep_default_na=False, na_values=na_values,
                        dtype={c: str for c in header if c != columns.label})
    for c in header:
        if c not in text and c != columns.label:
            frame[c] = _typed_slice(frame[c])
    return frame


def _read_parquet(data: bytes, columns: ColumnNames) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    for name in _text_columns(columns):
        if name in table.column_names and pa.types.is_integer(table.schema.field(name).type):
            # Integers as their digits: pandas would make a column with a null float (7 → 7.0).
            index = table.column_names.index(name)
            table = table.set_column(index, name, table.column(name).cast(pa.string()))
    return table.to_pandas()


def _read_manifest(uri: str, columns: ColumnNames) -> pd.DataFrame:
    special = _special_kind(uri) if "://" not in uri else None
    if special is not None:
        raise DataSourceError(f"The manifest {uri} is {special}, not a regular file.")
    try:
        data = read_bytes(uri)
    except Exception as exc:
        raise DataSourceError(f"The manifest {uri} could not be read: {exc}") from None
    try:
        if uri.lower().endswith(".parquet"):
            return _read_parquet(data, columns)
        return _read_csv(data, columns)
    except Exception as exc:
        raise DataSourceError(
            f"The manifest {uri} is not a readable {'Parquet' if uri.endswith('.parquet') else 'CSV'}"
            f" file ({type(exc).__name__}: {exc})."
        ) from None


def _column_type(series: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(series):
        return "bool"
    if pd.api.types.is_integer_dtype(series):
        return "int64"
    if pd.api.types.is_float_dtype(series):
        return "float64"
    return "string"


def _native(value: Any, type_name: str) -> Any:
    """A manifest cell as a plain Python value of the column's type (None for missing)."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return None
    if type_name == "int64":
        return int(value)
    if type_name == "float64":
        return float(value)
    if type_name == "bool":
        return bool(value)
    return value.decode() if isinstance(value, bytes) else str(value)


def _text_labels(values: pd.Series) -> Optional[List[str]]:
    """Sorted distinct label strings when labels are names, None when they are class indices."""
    if pd.api.types.is_numeric_dtype(values):
        return None
    present = [v for v in values if not (v is None or (isinstance(v, float) and np.isnan(v)))]
    texts = [str(v).strip() for v in present if str(v).strip()]
    # Mostly class indices with a few stray words is a column of indices with bad values (those
    # examples become unknown_label error rows), not a dataset with a class named "7".
    indices = sum(t.lstrip("-").isdigit() for t in texts)
    if indices * 2 >= len(texts):
        return None
    return sorted(set(texts))


def _inspect_manifest(
    uri: str, columns: ColumnNames, slice_columns: Optional[Sequence[str]],
    slice_bins: Dict[str, List[float]],
) -> SourceSpec:
    if not _exists(uri):
        raise DataSourceError(f"The manifest {uri} does not exist.")
    frame = _read_manifest(uri, columns)
    if columns.image not in frame.columns:
        raise DataSourceError(
            f"The manifest {uri} has no image column {columns.image!r} (columns: "
            f"{', '.join(map(str, frame.columns))}); name it with --image-column."
        )
    if len(frame) == 0:
        raise DataSourceError(f"The manifest {uri} has no rows: the dataset is empty.")
    # Duplicate ids are not refused here: the pipeline's "UniqueIds" grouping step audits one
    # example per id and turns the others into duplicate_id error rows (the same step covers
    # TFRecords, whose ids the launcher never sees).
    reserved = {columns.image, columns.label, columns.mask, columns.id}
    missing = [c for c in slice_columns or [] if c not in frame.columns]
    if missing:
        raise DataSourceError(
            f"--slice-columns names {', '.join(missing)}, which the manifest {uri} lacks."
        )
    candidates = [c for c in frame.columns if c not in reserved]
    wanted = [*candidates] if slice_columns is None else [*slice_columns, *slice_bins]
    chosen = choose_slices(
        {c: _column_type(frame[c]) for c in dict.fromkeys(wanted) if c in frame.columns},
        {c: int(frame[c].nunique(dropna=True)) for c in candidates},
        slice_columns, slice_bins, f"the manifest {uri}")
    labeled = columns.label in frame.columns
    return SourceSpec(
        kind="manifest",
        uri=uri,
        columns=columns,
        labeled=labeled,
        has_masks=columns.mask in frame.columns,
        label_names=_text_labels(frame[columns.label]) if labeled else None,
        fingerprint="sha256:" + hashlib.sha256(read_bytes(uri)).hexdigest(),
        examples_expected=len(frame),
        **chosen,
    )


def _outside_data_error(spec: SourceSpec, example_id: str, what: str, path: str) -> dict:
    return error_row(
        example_id, path, "read", "path_outside_data",
        f"The {what} path {path} lies outside the manifest's folder {_parent(spec.uri)}; "
        "pass --allow-paths-outside-data to read files from anywhere the manifest points.")


def _missing_id_error(spec: SourceSpec, row_number: int, image_text: str, base: str) -> dict:
    source = _resolve(base, image_text) if image_text else ""
    return error_row(
        image_text or f"row {row_number}", source, "read", "missing_id",
        f"Row {row_number} of the manifest {spec.uri} has an empty {spec.columns.id!r}; every "
        "example needs its own id (fill it in, or leave the id column out to use image paths).")


def _iter_manifest_refs(spec: SourceSpec) -> Iterator[Union[ExampleRef, dict]]:
    frame = _read_manifest(spec.uri, spec.columns)
    base = _parent(spec.uri)
    cols = spec.columns
    for number, row in enumerate(frame.to_dict("records"), start=1):
        image = row[cols.image]
        image_text = "" if _native(image, "string") is None else str(image)
        example_id = _native(row[cols.id], "string") if cols.id in row else image_text
        if example_id is None or not example_id.strip():
            yield _missing_id_error(spec, number, image_text, base)
            continue
        mask = _native(row.get(cols.mask), "string") if spec.has_masks else None
        if not spec.allow_paths_outside_data:
            outside = [(what, _resolve(base, p))
                       for what, p in (("image", image_text), ("mask", mask))
                       if p and not is_inside(base, _resolve(base, p))]
            if outside:
                yield _outside_data_error(spec, example_id, *outside[0])
                continue
        yield ExampleRef(
            example_id=example_id,
            source=_resolve(base, image_text) if image_text else "",
            image_path=_resolve(base, image_text) if image_text else None,
            mask_path=_resolve(base, mask) if mask else None,
            raw_label=row.get(cols.label) if spec.labeled else None,
            slices=spec.slice_values(row.get),
        )


# --------------------------------------------------------------------------- TFRecords


def _masked_crc32c(data: bytes) -> int:
    from apache_beam.io.tfrecordio import _TFRecordUtil  # the same CRC Beam's reader checks

    return _TFRecordUtil._masked_crc32c(data)


class _BrokenFraming(Exception):
    """The record's length header is unreadable (or unreadably large): nothing after it in the
    file can be located."""

    def __init__(self, message: str, error_type: str = "truncated_file"):
        super().__init__(message)
        self.error_type = error_type


def _read_records(handle, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
                  ) -> Iterator[Union[bytes, ExampleError]]:
    """Records of a TFRecord file; a record with a bad data CRC yields an ExampleError and the
    reader moves on; a bad or short length header, or a length above ``max_bytes`` (never
    allocated), ends the file with _BrokenFraming."""
    while True:
        header = handle.read(12)
        if not header:
            return
        if len(header) != 12:
            raise _BrokenFraming("the file ends inside a record header (truncated file)")
        length, length_crc = struct.unpack("<QI", header)
        if _masked_crc32c(header[:8]) != length_crc:
            raise _BrokenFraming("a record header fails its CRC (corrupt file)")
        if length > max_bytes:
            raise _BrokenFraming(f"the record is {length:,} bytes, above the limit of "
                                 f"{max_bytes:,} (--max-image-bytes)", "file_too_large")
        body = _read_up_to(handle, length + 4)
        if len(body) != length + 4:
            raise _BrokenFraming("the file ends inside a record (truncated file)")
        data, data_crc = body[:length], struct.unpack("<I", body[length:])[0]
        if _masked_crc32c(data) != data_crc:
            yield ExampleError("read", "corrupt_record", "The record's data fails its CRC check.")
        else:
            yield data


_READ_CHUNK = 16 << 20


def _read_up_to(handle, size: int) -> bytes:
    """At most ``size`` bytes, read in chunks: a header claiming a 1 TB record (with a valid
    CRC) must end in a short read at the end of the file, not one 1 TB allocation."""
    chunks, remaining = [], size
    while remaining > 0:
        chunk = handle.read(min(remaining, _READ_CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _feature_value(feature) -> Tuple[str, List[Any]]:
    kind = feature.WhichOneof("kind")
    if kind == "bytes_list":
        return "string", list(feature.bytes_list.value)
    if kind == "int64_list":
        return "int64", list(feature.int64_list.value)
    if kind == "float_list":
        return "float64", list(feature.float_list.value)
    return "string", []


def _parse_example(data: bytes) -> Dict[str, Tuple[str, List[Any]]]:
    from tensorflow.core.example import example_pb2

    example = example_pb2.Example.FromString(data)
    return {key: _feature_value(f) for key, f in example.features.feature.items()}


def tfrecord_file_ids(files: Sequence[str]) -> Dict[str, str]:
    """Short stable names for files in example ids: base names when unique, else full paths."""
    names = [posixpath.basename(f.replace(os.sep, "/")) for f in files]
    if len(set(names)) == len(names):
        return dict(zip(files, names))
    return {f: f for f in files}


def _inspect_tfrecord(
    uri: str, columns: ColumnNames, slice_columns: Optional[Sequence[str]],
    slice_bins: Dict[str, List[float]],
) -> SourceSpec:
    try:
        metas = FileSystems.match([uri])[0].metadata_list
    except Exception as exc:
        raise DataSourceError(f"The TFRecord glob {uri} could not be listed: {exc}") from None
    files = sorted(m.path for m in metas if m.size_in_bytes > 0)
    if not metas:
        raise DataSourceError(f"The TFRecord glob {uri} matches no files.")
    if not files:
        raise DataSourceError(f"The TFRecord files matching {uri} are all empty.")
    first: Optional[Dict[str, Tuple[str, List[Any]]]] = None
    try:
        with FileSystems.open(files[0]) as handle:
            for record in _read_records(handle):
                if isinstance(record, bytes):
                    first = _parse_example(record)
                    break
    except Exception as exc:
        raise DataSourceError(
            f"{files[0]} is not a TFRecord file of tf.Example ({exc})."
        ) from None
    if first is None:
        raise DataSourceError(f"{files[0]} holds no readable tf.Example record.")
    if columns.image not in first:
        raise DataSourceError(
            f"The tf.Example records of {uri} have no image feature {columns.image!r} (features: "
            f"{', '.join(sorted(first))}); name it with --image-column."
        )
    reserved = {columns.image, columns.label, columns.mask, columns.id}
    missing = [c for c in slice_columns or [] if c not in first]
    if missing:
        raise DataSourceError(
            f"--slice-columns names {', '.join(missing)}, which the first tf.Example of {uri} lacks."
        )
    candidates = [k for k, (_, v) in sorted(first.items()) if k not in reserved and len(v) == 1]
    wanted = candidates if slice_columns is None else [*slice_columns, *slice_bins]
    chosen = choose_slices(
        {c: first[c][0] for c in dict.fromkeys(wanted) if c in first},
        _tfrecord_distinct(files[0], candidates) if slice_columns is None else {},
        slice_columns, slice_bins, f"the first tf.Example of {uri}")
    labeled = columns.label in first
    label_names = None
    if labeled and first[columns.label][0] == "string":
        label_names = []  # text labels: names come from --class-names (we do not scan all records)
    digest = hashlib.sha256()
    sizes = {m.path: m.size_in_bytes for m in metas}
    for path in files:
        digest.update(f"{path}\t{sizes[path]}\n".encode())
    return SourceSpec(
        kind="tfrecord",
        uri=uri,
        columns=columns,
        labeled=labeled,
        has_masks=columns.mask in first,
        label_names=label_names,
        files=files,
        fingerprint="sha256:" + digest.hexdigest(),
        **chosen,
    )


def _tfrecord_distinct(path: str, columns: Sequence[str]) -> Dict[str, int]:
    """Distinct values per column in the first ``TFRECORD_SLICE_SCAN`` records of ``path``: a
    lower bound of the whole data's, enough to tell that a column has too many to slice on."""
    seen: Dict[str, set] = {c: set() for c in columns}
    try:
        with FileSystems.open(path) as handle:
            for index, record in enumerate(_read_records(handle)):
                if index >= TFRECORD_SLICE_SCAN:
                    break
                if not isinstance(record, bytes):
                    continue
                features = _parse_example(record)
                for column in columns:
                    values = features.get(column, ("string", []))[1]
                    if values:
                        seen[column].add(values[0])
    except Exception:  # a broken file is reported per record by the job; count what was read
        pass
    return {c: len(v) for c, v in seen.items()}


def iter_tfrecord_refs(
    spec: SourceSpec, path: str, file_id: str
) -> Iterator[Union[ExampleRef, dict]]:
    """ExampleRefs of one TFRecord file, or error rows for records that cannot be used.

    ``file_id`` names the file in example ids (``tfrecord_file_ids``)."""
    cols = spec.columns
    index = -1

    def scalar(features, key, type_name):
        values = features.get(key, ("string", []))[1]
        return _native(values[0], type_name) if values else None

    try:
        with FileSystems.open(path) as handle:
            for index, record in enumerate(_read_records(handle, spec.limits.max_bytes)):
                position = f"{file_id}:{index}"
                if isinstance(record, ExampleError):
                    yield error_row(position, f"{path}:{index}", record.stage, record.error_type,
                                    record.message)
                    continue
                try:
                    features = _parse_example(record)
                except Exception as exc:
                    yield error_row(position, f"{path}:{index}", "read", "corrupt_record",
                                    f"The record is not a tf.Example ({exc}).")
                    continue
                image = features.get(cols.image, ("string", []))[1]
                mask = features.get(cols.mask, ("string", []))[1]
                label_values = features.get(cols.label, ("string", []))[1]
                example_id = str(scalar(features, cols.id, "string") or position)
                if not image:
                    yield error_row(example_id, f"{path}:{index}", "read", "missing_image",
                                    f"The record has no {cols.image!r} feature (no image).")
                    continue
                yield ExampleRef(
                    example_id=example_id,
                    source=f"{path}:{index}",
                    image_bytes=image[0],
                    mask_bytes=mask[0] if mask else None,
                    raw_label=label_values[0] if label_values else None,
                    slices=spec.slice_values(
                        lambda c: (features.get(c, ("string", []))[1] or [None])[0]),
                )
    except _BrokenFraming as exc:
        position = f"{file_id}:{index + 1}"
        yield error_row(position, f"{path}:{index + 1}", "read", exc.error_type,
                        f"Reading stopped at record {index + 1}: {exc}. Records after it, if any, "
                        "cannot be located.")


# --------------------------------------------------------------------------- entry points


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
        spec = _inspect_manifest(uri, columns, slice_columns, slice_bins)
    elif kind == "tfrecord":
        spec = _inspect_tfrecord(uri, columns, slice_columns, slice_bins)
    elif slice_columns or slice_bins:
        raise DataSourceError(
            "--slice-columns and --slice-bins need a manifest or TFRecords: a class-folder tree "
            "has no columns."
        )
    else:
        spec = _inspect_folders(uri, columns)
    spec.allow_paths_outside_data = allow_paths_outside_data
    spec.limits = limits or ReadLimits()
    return spec


def iter_refs(spec: SourceSpec) -> Iterator[Union[ExampleRef, dict]]:
    """ExampleRefs of a folder tree or manifest (TFRecords go file by file: iter_tfrecord_refs),
    or error rows for manifest rows that cannot be used."""
    if spec.kind == "folders":
        return _iter_folder_refs(spec)
    if spec.kind == "manifest":
        return _iter_manifest_refs(spec)
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


# --------------------------------------------------------------------------- bounded reads

_SPECIAL_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _special_kind(path: str) -> Optional[str]:
    """What a local path is when it is not a readable regular file (None when it is one)."""
    try:
        mode = os.stat(path).st_mode  # follows symlinks; never opens (a FIFO would block)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link loop"
        if os.path.islink(path):
            return f"a broken symbolic link (to {os.readlink(path)}, which does not exist)"
        return None
    for test, name in _SPECIAL_KINDS:
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "not a regular file"


def _too_large(path: str, what: str, size: str, limits: ReadLimits) -> ExampleError:
    return ExampleError(
        "read", "file_too_large",
        f"The {what} file {path} is {size} bytes, above the limit of {limits.max_bytes:,} "
        "(--max-image-bytes); it was not read. Raise --max-image-bytes if the file is genuine.")


def _read_local(path: str, what: str, limits: ReadLimits, root: Optional[str]) -> bytes:
    if not os.path.lexists(path):
        raise ExampleError("read", f"missing_{what}", f"The {what} file {path} does not exist.")
    special = _special_kind(path)
    if special is not None:
        error_type = f"missing_{what}" if special.startswith("a broken") else f"unreadable_{what}"
        raise ExampleError("read", error_type,
                           f"The {what} file {path} is {special}, not a regular file.")
    real = os.path.realpath(path)
    if root is not None and "://" not in root and not is_inside(os.path.realpath(root), real):
        raise ExampleError(
            "read", "path_outside_data",
            f"The {what} file {path} resolves (through symbolic links) to {real}, outside the "
            f"data folder {root}; pass --allow-paths-outside-data to read files the data links to.")
    size = os.stat(path).st_size
    if size > limits.max_bytes:
        raise _too_large(path, what, f"{size:,}", limits)
    try:
        with open(path, "rb") as handle:
            data = handle.read(limits.max_bytes + 1)  # a file growing since the stat stops here
    except OSError as exc:
        raise ExampleError("read", f"unreadable_{what}",
                           f"The {what} file {path} could not be read ({exc.strerror}).") from None
    if len(data) > limits.max_bytes:
        raise _too_large(path, what, "more than that", limits)
    return data


def _read_remote(path: str, what: str, limits: ReadLimits) -> bytes:
    try:
        size = FileSystems.get_filesystem(path).metadata(path).size_in_bytes
        if size > limits.max_bytes:
            raise _too_large(path, what, f"{size:,}", limits)
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            data = handle.read(limits.max_bytes + 1)
    except ExampleError:
        raise
    except Exception as exc:
        exists = _exists(path)
        error_type = f"unreadable_{what}" if exists else f"missing_{what}"
        detail = "could not be read" if exists else "does not exist"
        raise ExampleError("read", error_type,
                           f"The {what} file {path} {detail} ({type(exc).__name__}).") from None
    if len(data) > limits.max_bytes:
        raise _too_large(path, what, "more than that", limits)
    return data


def _within(timeout_s: float, call, path: str, what: str) -> bytes:
    """``call()`` on a daemon thread, abandoned after ``timeout_s``: a file system that hangs or
    retries for minutes (gs:// without credentials, a dead NFS mount) costs one error row, not the
    run. An abandoned thread cannot be killed; being a daemon, it never holds the process open."""
    box: Dict[str, Any] = {}

    def run():
        try:
            box["data"] = call()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=run, name="xai-audit-read", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise ExampleError(
            "read", "read_timeout",
            f"Reading the {what} file {path} took longer than {timeout_s:g} s (--read-timeout) "
            "and was abandoned. Check that its file system is reachable and authorized, or "
            "raise --read-timeout.")
    if "error" in box:
        raise box["error"]
    return box["data"]


def _scheme(path: str) -> str:
    return path.split("://", 1)[0] + "://" if "://" in path else "local files"


def read_file(path: str, what: str, limits: Optional[ReadLimits] = None,
              root: Optional[str] = None) -> bytes:
    """One image or mask file, bounded by ``limits``; only a regular file is read, and with
    ``root`` (a local data folder) only when it lies in it once symlinks are resolved.
    Raises ExampleError (stage read) naming what is wrong."""
    limits = limits or ReadLimits()
    scheme = _scheme(path)
    if limits.timeouts_in_a_row.get(scheme, 0) >= TIMEOUTS_BEFORE_GIVING_UP:
        raise ExampleError(
            "read", "read_timeout",
            f"The {what} file {path} was not read: the last {TIMEOUTS_BEFORE_GIVING_UP} reads "
            f"from {scheme} on this worker each took longer than {limits.timeout_s:g} s "
            "(--read-timeout). Check that the file system is reachable and authorized.")
    if "://" in path:
        call = lambda: _read_remote(path, what, limits)  # noqa: E731
    else:
        call = lambda: _read_local(path, what, limits, root)  # noqa: E731
    try:
        data = _within(limits.timeout_s, call, path, what)
    except ExampleError as exc:
        if exc.error_type == "read_timeout":
            limits.timeouts_in_a_row[scheme] = limits.timeouts_in_a_row.get(scheme, 0) + 1
        raise
    limits.timeouts_in_a_row[scheme] = 0
    return data

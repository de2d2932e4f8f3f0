"""TFRecords of tf.Example: the record framing (CRC-checked, lengths bounded before any
allocation), feature parsing, describing the files on the launcher from the first example, and
enumerating one file's examples on a worker (a bad record is an error row; a broken length
header ends the file with one error row saying so).
"""
import hashlib
import os
import posixpath
import struct
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from apache_beam.io.filesystems import FileSystems

from ..errors import DataSourceError, ExampleError
from .records import ExampleRef, error_row
from .slice_choice import choose_slices
from .source_spec import DEFAULT_MAX_IMAGE_BYTES, ColumnNames, SourceSpec, native

# TFRecords are not read whole on the launcher: distinct values are counted on at most this many
# records of the first file (more than MAX_SLICE_VALUES there means more in the whole data too).
TFRECORD_SLICE_SCAN = 2000


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


Features = Dict[str, Tuple[str, List[Any]]]  # feature name -> (column type, values)


def _list_files(uri: str) -> Tuple[List[str], Dict[str, int]]:
    """The non-empty files a TFRecord glob matches (sorted), and every match's size."""
    try:
        metas = FileSystems.match([uri])[0].metadata_list
    except Exception as exc:
        raise DataSourceError(f"The TFRecord glob {uri} could not be listed: {exc}") from None
    files = sorted(m.path for m in metas if m.size_in_bytes > 0)
    if not metas:
        raise DataSourceError(f"The TFRecord glob {uri} matches no files.")
    if not files:
        raise DataSourceError(f"The TFRecord files matching {uri} are all empty.")
    return files, {m.path: m.size_in_bytes for m in metas}


def _first_example(path: str) -> Features:
    """The features of the first readable tf.Example of ``path`` (the launcher reads no more)."""
    first: Optional[Features] = None
    try:
        with FileSystems.open(path) as handle:
            for record in _read_records(handle):
                if isinstance(record, bytes):
                    first = _parse_example(record)
                    break
    except Exception as exc:
        raise DataSourceError(
            f"{path} is not a TFRecord file of tf.Example ({exc})."
        ) from None
    if first is None:
        raise DataSourceError(f"{path} holds no readable tf.Example record.")
    return first


def _choose_tfrecord_slices(uri: str, first: Features, columns: ColumnNames, first_file: str,
                            slice_columns: Optional[Sequence[str]],
                            slice_bins: Dict[str, List[float]]) -> Dict[str, Any]:
    """choose_slices on the first example's single-valued features (the reserved ones apart)."""
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
    return choose_slices(
        {c: first[c][0] for c in dict.fromkeys(wanted) if c in first},
        _tfrecord_distinct(first_file, candidates) if slice_columns is None else {},
        slice_columns, slice_bins, f"the first tf.Example of {uri}")


def inspect_tfrecord(
    uri: str, columns: ColumnNames, slice_columns: Optional[Sequence[str]],
    slice_bins: Dict[str, List[float]],
) -> SourceSpec:
    files, sizes = _list_files(uri)
    first = _first_example(files[0])
    chosen = _choose_tfrecord_slices(uri, first, columns, files[0], slice_columns, slice_bins)
    labeled = columns.label in first
    label_names = None
    if labeled and first[columns.label][0] == "string":
        label_names = []  # text labels: names come from --class-names (we do not scan all records)
    digest = hashlib.sha256()
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
        return native(values[0], type_name) if values else None

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

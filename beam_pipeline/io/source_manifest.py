"""CSV and Parquet manifests: reading them with every cell typed as written (``007`` stays text),
describing them on the launcher, and enumerating their rows as examples on the workers (a row
that cannot be used becomes an error row; paths outside the manifest's folder are refused
unless --allow-paths-outside-data).
"""
import hashlib
import io
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from ..errors import DataSourceError
from .paths import exists, is_inside, is_remote, parent, read_bytes, resolve, special_kind
from .records import ExampleRef, error_row
from .slice_choice import choose_slices
from .source_spec import ColumnNames, SourceSpec, native


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
    special = special_kind(uri) if not is_remote(uri) else None
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


def inspect_manifest(
    uri: str, columns: ColumnNames, slice_columns: Optional[Sequence[str]],
    slice_bins: Dict[str, List[float]],
) -> SourceSpec:
    if not exists(uri):
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
        f"The {what} path {path} lies outside the manifest's folder {parent(spec.uri)}; "
        "pass --allow-paths-outside-data to read files from anywhere the manifest points.")


def _missing_id_error(spec: SourceSpec, row_number: int, image_text: str, base: str) -> dict:
    source = resolve(base, image_text) if image_text else ""
    return error_row(
        image_text or f"row {row_number}", source, "read", "missing_id",
        f"Row {row_number} of the manifest {spec.uri} has an empty {spec.columns.id!r}; every "
        "example needs its own id (fill it in, or leave the id column out to use image paths).")


def iter_manifest_refs(spec: SourceSpec) -> Iterator[Union[ExampleRef, dict]]:
    frame = _read_manifest(spec.uri, spec.columns)
    base = parent(spec.uri)
    cols = spec.columns
    for number, row in enumerate(frame.to_dict("records"), start=1):
        image = row[cols.image]
        image_text = "" if native(image, "string") is None else str(image)
        example_id = native(row[cols.id], "string") if cols.id in row else image_text
        if example_id is None or not example_id.strip():
            yield _missing_id_error(spec, number, image_text, base)
            continue
        mask = native(row.get(cols.mask), "string") if spec.has_masks else None
        if not spec.allow_paths_outside_data:
            outside = [(what, resolve(base, p))
                       for what, p in (("image", image_text), ("mask", mask))
                       if p and not is_inside(base, resolve(base, p))]
            if outside:
                yield _outside_data_error(spec, example_id, *outside[0])
                continue
        yield ExampleRef(
            example_id=example_id,
            source=resolve(base, image_text) if image_text else "",
            image_path=resolve(base, image_text) if image_text else None,
            mask_path=resolve(base, mask) if mask else None,
            raw_label=row.get(cols.label) if spec.labeled else None,
            slices=spec.slice_values(row.get),
        )

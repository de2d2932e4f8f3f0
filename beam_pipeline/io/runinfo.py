"""run.json: what was run, on what, with which libraries, how it went (DESIGN.md, run.json).

Also reads the written outputs back to count examples: the counts come from the files a reader
will see, not from what the job believes it wrote.
"""
import datetime
import io
import json
import os
import platform
import sys
from importlib import metadata
from typing import Dict, Iterator, List, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from .. import __version__
from .paths import exists, join

LIBRARIES = (
    "tensorflow", "keras", "tf-keras", "apache-beam", "tensorflow-model-analysis", "tfx-bsl",
    "pyarrow", "pandas", "numpy", "pillow", "protobuf",
)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def library_versions() -> Dict[str, Optional[str]]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def parquet_files(folder: str) -> List[str]:
    pattern = join(folder, "*.parquet")
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def read_column(folder: str, column: str) -> pa.ChunkedArray:
    """One column of every Parquet file in ``folder`` (local or remote), as Arrow: a million
    ids take tens of MB as Arrow strings, several times that as Python objects."""
    chunks: List = []
    for path in parquet_files(folder):
        with FileSystems.open(path) as handle:
            table = pq.read_table(io.BytesIO(handle.read()), columns=[column])
        chunks.extend(table.column(column).chunks)
    return pa.chunked_array(chunks, type=chunks[0].type if chunks else pa.string())


def distinct_count(values: pa.ChunkedArray) -> int:
    return pc.count_distinct(values).as_py() if len(values) else 0


def value_counts(values: pa.ChunkedArray) -> Dict[str, int]:
    if not len(values):
        return {}
    counts = pc.value_counts(values).to_pylist()
    return {row["values"]: row["counts"] for row in counts}


def read_rows(path: str, columns: Optional[Sequence[str]] = None) -> Optional[List[dict]]:
    """All rows of one small Parquet output (sanity, layer sweep, importance summary) as dicts,
    or None when the file is absent: the one reader of the single-file tables."""
    if not exists(path):  # an unreachable store reads as absent, as the report's other checks do
        return None
    with FileSystems.open(path) as handle:
        return pq.ParquetFile(handle).read(columns=columns).to_pylist()


def iter_rows(paths: Sequence[str], columns: Sequence[str],
              batch_size: int = 4096) -> Iterator[dict]:
    """Rows of Parquet files as dicts, a batch at a time, reading only ``columns`` (those the
    files have): memory stays bounded by the batch, not by the files."""
    for path in paths:
        with FileSystems.open(path) as handle:
            parquet = pq.ParquetFile(handle)
            present = [c for c in columns if c in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=batch_size, columns=present):
                yield from batch.to_pylist()


def beam_counters(result) -> Dict[str, float]:
    """The job's user counters and distributions (committed where the runner has them)."""
    figures: Dict[str, float] = {}
    try:
        metrics = result.metrics().query()
    except Exception:  # some runners have no metrics API
        return figures
    for counter in metrics.get("counters", []):
        value = counter.committed if counter.committed is not None else counter.attempted
        name = counter.key.metric.name
        figures[name] = figures.get(name, 0) + value
    for dist in metrics.get("distributions", []):
        value = dist.committed if dist.committed is not None else dist.attempted
        name = dist.key.metric.name
        figures[f"{name}_sum"] = figures.get(f"{name}_sum", 0) + value.sum
        figures[f"{name}_count"] = figures.get(f"{name}_count", 0) + value.count
    return figures


def read_json(path: str) -> dict:
    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode())


def command_line() -> List[str]:
    return [sys.argv[0].rsplit("/", 1)[-1], *sys.argv[1:]]


def tool_version() -> str:
    return __version__


def unlabeled_sentence(counts: dict) -> str:
    """What the metrics cover when some audited examples have no label (log, report, verdict)."""
    ok, unlabeled = counts.get("examples_ok", 0), counts.get("examples_unlabeled", 0)
    return (f"Metrics cover {ok - unlabeled:,} of {ok:,} audited examples; {unlabeled:,} have no "
            "label (they have maps and predictions, but are left out of TFMA metrics, gates and "
            "permutation importance).")


def absolute_uri(path: str) -> str:
    """A URI (``gs://...``) as it is; a local path made absolute, so that run.json and the report
    still name the file after the folder is moved or read from another working directory."""
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))

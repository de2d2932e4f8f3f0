"""What the launcher learns about the data (``SourceSpec``), the column names it reads
(``ColumnNames``), the bounds on reading one file (``ReadLimits``) and ``native``, the one
conversion of a data cell to a plain Python value of its column's type.

The spec is pickled to every worker: keep it small.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import pandas as pd

from .paths import parent
from .slice_choice import bin_column, bin_label

DEFAULT_MAX_IMAGE_BYTES = 256 * 1024 * 1024  # far above any real image; far below a worker's RAM
DEFAULT_READ_TIMEOUT_S = 60.0  # one image or mask file, retries of the file system included


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
        return self.uri if self.kind == "folders" else parent(self.uri)

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
        values = {c: native(get(c), t) for c, t in self.read_types.items()}
        for column, edges in self.slice_bins.items():
            values[bin_column(column)] = bin_label(values.get(column), edges)
        return values



def native(value: Any, type_name: str) -> Any:
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

"""Where every output of a run lives under DIR (DESIGN.md, "Output folder"): the one list of
names, the one ``join``, and the prefixes Beam's Parquet writers are given.

Folders of ``part-*.parquet`` shards: ``attributions``, ``errors``, ``importance``. Single files:
``run.json`` (written last: a finished run), ``importance_summary.parquet``,
``layer_sweep.parquet``, ``layer_sweep_maps.parquet``, ``sanity.parquet``. TFMA's own folder
``tfma`` and the report's ``report/index.html`` and ``report/summary.json``.

No TensorFlow: the report and the output-folder safety checks import it.
"""
from .paths import join  # noqa: F401 (the one join: a path under DIR, local or gs://)

PARQUET = ".parquet"

RUN_JSON = "run.json"
ATTRIBUTIONS = "attributions"
ERRORS = "errors"
IMPORTANCE = "importance"
IMPORTANCE_SUMMARY = "importance_summary.parquet"
TFMA = "tfma"
LAYER_SWEEP = "layer_sweep.parquet"
LAYER_SWEEP_MAPS = "layer_sweep_maps.parquet"
SANITY = "sanity.parquet"
ATTENTION_BY_SLICE = "attention_by_slice.parquet"
IMPORTANCE_BY_SLICE = "importance_by_slice.parquet"
REPORT = "report"
REPORT_INDEX = "index.html"  # under REPORT
REPORT_SUMMARY = "summary.json"  # under REPORT

SHARDED = (ATTRIBUTIONS, ERRORS, IMPORTANCE)
# Every name the audit writes at the top of DIR: a folder holding any of them holds a run.
OUTPUT_NAMES = (
    RUN_JSON, ATTRIBUTIONS, ERRORS, IMPORTANCE, IMPORTANCE_SUMMARY, TFMA,
    LAYER_SWEEP, LAYER_SWEEP_MAPS, SANITY, REPORT, ATTENTION_BY_SLICE, IMPORTANCE_BY_SLICE,
)


def writer_prefix(output: str, name: str) -> str:
    """What Beam's ``WriteToParquet`` is given for output ``name`` (with suffix ``PARQUET``):
    ``DIR/name/part`` for the sharded folders, ``DIR/stem`` for the single files."""
    if name in SHARDED:
        return join(output, name, "part")
    if not name.endswith(PARQUET):
        raise ValueError(f"{name} is not a Parquet output of the layout.")
    return join(output, name[:-len(PARQUET)])

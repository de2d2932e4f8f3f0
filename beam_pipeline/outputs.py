"""The output folder's life cycle: one run's files, complete or absent, never two runs mixed.

* ``inspect_folder`` / ``prepare_folder`` (on the launcher, before anything is written): a
  folder that holds an earlier run (``run.json`` or any output name below) is refused with
  ``OutputExistsError`` (exit 1) unless ``--overwrite`` is given; then that run's outputs are
  removed first. Other files in the folder (the demo's data, a user's notes) are never touched.
  *Leftovers of an unfinished run* (a ``.incomplete-<run id>/`` folder: the run was killed or
  crashed before it wrote run.json) are removed without asking: they are no run anyone can read.
* The job writes every output into ``DIR/.incomplete-<run id>/`` (``staging_path``).
  ``promote`` moves each file to its final name once the pipeline has finished; run.json is
  written last, atomically (``write_json_atomic``: a temp name, then a rename); ``finish``
  removes the staging folder (its marker file) only after run.json exists.

So a run killed at any point leaves either no final file, or final files next to a staging folder
(killed while promoting); both read as "unfinished" and the next run cleans them up. A folder with
run.json is a finished run. Everything goes through Beam's ``FileSystems``: local paths, ``gs://``
and any other registered scheme behave alike (object stores have no directories, so "a folder
exists" means "some object has that prefix").
"""
import contextlib
import datetime
import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import List

from apache_beam.io.filesystems import FileSystems

from . import layout
from .errors import OutputExistsError

LOG = logging.getLogger("xai_audit")

RUN_JSON, OUTPUT_NAMES = layout.RUN_JSON, layout.OUTPUT_NAMES  # the names live in ``layout``
STAGING_PREFIX = ".incomplete-"
# Written first into the staging folder and removed last, so the folder is recognisable as an
# unfinished run even on object stores, where an empty "folder" does not exist.
MARKER = "_RUN_IN_PROGRESS"


@dataclass
class FolderState:
    """What an output folder holds before a run."""

    output: str
    outputs: List[str] = field(default_factory=list)  # output names present (OUTPUT_NAMES)
    unfinished: List[str] = field(default_factory=list)  # staging folders of unfinished runs

    @property
    def finished_run(self) -> bool:
        """A run.json, or outputs without a staging folder next to them: a previous run."""
        return RUN_JSON in self.outputs or (bool(self.outputs) and not self.unfinished)

    @property
    def empty(self) -> bool:
        return not self.outputs and not self.unfinished


def new_run_id() -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{uuid.uuid4().hex[:8]}"


join = layout.join


def staging_path(output: str, run_id: str) -> str:
    return join(output, STAGING_PREFIX + run_id)


def _match(pattern: str, limit=None) -> List[str]:
    return [m.path for m in FileSystems.match([pattern], limits=[limit])[0].metadata_list]


def _exists(uri: str) -> bool:
    """A file, a (local) directory, or a prefix with objects under it."""
    return FileSystems.exists(uri) or bool(_match(join(uri, "**"), limit=1))


def _remove(uri: str) -> None:
    """A file, a directory tree, or every object under a prefix."""
    if FileSystems.exists(uri):
        FileSystems.delete([uri])  # local directories go recursively
    rest = _match(join(uri, "**"))  # object stores: the objects under the prefix
    if rest:
        FileSystems.delete(rest)


def _staging_folders(output: str) -> List[str]:
    root = output.rstrip("/")
    folders = set()
    for path in _match(join(output, STAGING_PREFIX + "*", "**")):
        rel = path[len(root) + 1:].replace("\\", "/")
        folders.add(join(output, rel.split("/", 1)[0]))
    return sorted(folders)


def inspect_folder(output: str) -> FolderState:
    """What ``output`` holds; reads only."""
    return FolderState(
        output=output,
        outputs=[name for name in OUTPUT_NAMES if _exists(join(output, name))],
        unfinished=_staging_folders(output),
    )


def _names(state: FolderState) -> str:
    return ", ".join(n if "." in n else f"{n}/" for n in state.outputs)


def refusal_message(state: FolderState) -> str:
    return (
        f"The output folder {state.output} already holds a previous run ({_names(state)}). "
        "Pass --overwrite to replace it (that run's outputs are removed first; other files in "
        "the folder stay), or choose another --output. Two runs' files are never mixed."
    )


def refuse_earlier_run(output: str) -> None:
    """OutputExistsError when ``output`` holds a previous run (reads only)."""
    state = inspect_folder(output)
    if state.finished_run:
        raise OutputExistsError(refusal_message(state))


def prepare_folder(output: str, overwrite: bool) -> FolderState:
    """Make ``output`` ready for a new run, or raise OutputExistsError (see the module doc)."""
    state = inspect_folder(output)
    if state.empty:
        return state
    if state.finished_run and not overwrite:
        raise OutputExistsError(refusal_message(state))
    if state.finished_run:
        LOG.info("--overwrite: removing the earlier run's outputs in %s (%s)", output,
                 _names(state))
    else:
        LOG.warning(
            "%s holds the leftovers of an unfinished run (%s; killed or crashed before it wrote "
            "run.json): removing them.", output,
            ", ".join([*(f"{n}" for n in state.outputs), *state.unfinished]))
    for name in state.outputs:
        _remove(join(output, name))
    for folder in state.unfinished:
        _remove(folder)
    return state


def start_staging(staging: str, run_id: str, started_at: str) -> None:
    with FileSystems.create(join(staging, MARKER)) as handle:
        handle.write(json.dumps({"run_id": run_id, "started_at": started_at}).encode())


def promote(staging: str, output: str) -> int:
    """Move every file of ``staging`` (but its marker) to the same name under ``output``."""
    root = staging.rstrip("/")
    sources, destinations = [], []
    for path in sorted(_match(join(staging, "**"))):
        rel = path[len(root) + 1:].replace("\\", "/")
        if rel == MARKER:
            continue
        sources.append(path)
        destinations.append(join(output, *rel.split("/")))
    parents = sorted({FileSystems.split(d)[0] for d in destinations})
    for parent in parents:  # local renames need the folder; object stores ignore mkdirs
        if not FileSystems.exists(parent):
            try:
                FileSystems.mkdirs(parent)
            except IOError:
                pass  # made meanwhile
    if sources:
        FileSystems.rename(sources, destinations)
    return len(sources)


def finish(staging: str) -> None:
    """Remove the (now empty but for its marker) staging folder; run.json exists by now."""
    _remove(staging)


def abandon(staging: str) -> None:
    """Best-effort removal of a failed run's staging folder (a kill leaves it to the next run)."""
    try:
        _remove(staging)
    except Exception as exc:  # pylint: disable=broad-except
        LOG.warning("Could not remove %s (%s); the next run into this folder removes it.",
                    staging, exc)


def write_bytes_atomic(path: str, data: bytes, mime_type: str = "application/octet-stream"
                       ) -> None:
    """Write to a temp name beside ``path``, then rename: readers see all of it or nothing."""
    folder, name = FileSystems.split(path)
    temp = FileSystems.join(folder, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    with FileSystems.create(temp, mime_type=mime_type) as handle:
        handle.write(data)
    FileSystems.rename([temp], [path])


def write_json_atomic(path: str, payload: dict) -> None:
    write_bytes_atomic(path, json.dumps(payload, indent=2, sort_keys=False, default=str).encode(),
                       "application/json")


@contextlib.contextmanager
def local_folder(uri: str):
    """``uri`` itself when local, else a temporary local copy of every file under it: for readers
    that bypass Beam's FileSystems (TFMA's loaders use tf.io.gfile, which knows only some
    schemes)."""
    if "://" not in uri:
        yield uri
        return
    root = uri.rstrip("/")
    local = tempfile.mkdtemp(prefix="xai-audit-")
    try:
        for path in _match(join(uri, "**")):
            target = os.path.join(local, *path[len(root) + 1:].split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with FileSystems.open(path) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)

"""The output folder's life cycle: one run's files, complete or absent, never two runs mixed.

* ``acquire_lock`` / ``release_lock``: one run per folder. A run creates ``DIR/.xai-audit.lock``
  atomically (holder host, pid, start time and run id inside) before it plans, and removes it at
  the end, also on failure. A second run is refused while the lock is held (``OutputLockedError``,
  exit 1, naming the holder). A lock whose holder is gone (same host, pid no longer alive) is
  reported as stale and never silently taken: ``--overwrite`` takes it over, or the user deletes
  it. On object stores (``gs://``) the create is check-then-write, not atomic (Beam's FileSystems
  has no create-if-absent): two runs started within the same moment can both pass.
* ``inspect_folder`` / ``prepare_folder`` (on the launcher, before anything is written): a
  folder that holds an earlier run (``run.json`` or any file a run writes, ``OWNED_FILES``) is
  refused with ``OutputExistsError`` (exit 1) unless ``--overwrite`` is given; then that run's
  files are removed first, and only those: files a run never writes (the demo's data, a user's
  ``report/notes.txt``) are never touched, even inside the run's folders.
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
import socket
import tempfile
import uuid
from fnmatch import fnmatchcase
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from apache_beam.io.filesystems import FileSystems

from . import layout
from ..errors import AuditError, OutputExistsError

LOG = logging.getLogger("xai_audit")

RUN_JSON, OUTPUT_NAMES = layout.RUN_JSON, layout.OUTPUT_NAMES  # the names live in ``layout``
# The files a run writes under each folder of OUTPUT_NAMES (patterns relative to DIR, no deeper
# than written): only these are a run's, so only these are removed. Top-level names are files.
OWNED_FILES: Dict[str, Tuple[str, ...]] = {
    "attributions": ("attributions/part-*.parquet",),
    "errors": ("errors/part-*.parquet",),
    "importance": ("importance/part-*.parquet",),
    "tfma": ("tfma/metrics*", "tfma/plots*", "tfma/attributions*", "tfma/validations*",
             "tfma/eval_config.json"),
    "report": ("report/index.html", "report/summary.json", "report/.index.html.tmp-*",
               "report/.summary.json.tmp-*"),
}
LOCK_NAME = ".xai-audit.lock"
STAGING_PREFIX = ".incomplete-"
# Written first into the staging folder and removed last, so the folder is recognisable as an
# unfinished run even on object stores, where an empty "folder" does not exist.
MARKER = "_RUN_IN_PROGRESS"


class OutputLockedError(AuditError):
    """Another run holds the output folder's lock (or a killed run left it behind)."""


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


def _owned(rel: str, name: str) -> bool:
    patterns = OWNED_FILES.get(name, (name,))
    return any(rel.count("/") == p.count("/") and fnmatchcase(rel, p) for p in patterns)


def owned_files(output: str, name: str) -> List[str]:
    """The files under output name ``name`` that a run writes (never a user's own files)."""
    root = output.rstrip("/")
    if name not in OWNED_FILES:  # a top-level file
        path = join(output, name)
        return [path] if FileSystems.exists(path) and not os.path.isdir(path) else []
    found = []
    for path in _match(join(output, name, "**")):
        if _owned(path[len(root) + 1:].replace("\\", "/"), name):
            found.append(path)
    return sorted(found)


def run_files(output: str) -> List[str]:
    """Every file of a run in ``output``, relative to it (for run.json)."""
    root = output.rstrip("/")
    return [path[len(root) + 1:].replace("\\", "/")
            for name in OUTPUT_NAMES for path in owned_files(output, name)]


def inspect_folder(output: str) -> FolderState:
    """What ``output`` holds; reads only."""
    return FolderState(
        output=output,
        outputs=[name for name in OUTPUT_NAMES if owned_files(output, name)],
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
        _remove_owned(output, name)
    for folder in state.unfinished:
        _remove(folder)
    return state


def _remove_owned(output: str, name: str) -> None:
    """Delete a run's files under ``name``; the folder goes too if nothing else is in it."""
    files = owned_files(output, name)
    if files:
        FileSystems.delete(files)
    folder = join(output, name)
    if name in OWNED_FILES and "://" not in folder and os.path.isdir(folder):
        kept = _match(join(output, name, "**"))
        if kept:
            LOG.info("Kept %d file(s) in %s that no run writes (e.g. %s).", len(kept), folder,
                     kept[0])
        else:
            shutil.rmtree(folder, ignore_errors=True)  # empty sub-folders only


# --------------------------------------------------------------------------- the lock


def lock_path(output: str) -> str:
    return join(output, LOCK_NAME)


def _holder(run_id: str, started_at: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started_at": started_at,
            "run_id": run_id}


def _create_exclusive(path: str, data: bytes) -> bool:
    """Create ``path`` with ``data`` unless it exists; False when it exists."""
    if "://" not in path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        return True
    if FileSystems.exists(path):  # object stores: check then write (see the module doc)
        return False
    with FileSystems.create(path, mime_type="application/json") as handle:
        handle.write(data)
    return True


def read_lock(output: str) -> Optional[dict]:
    """The lock's holder, {} when the lock is unreadable, None when there is no lock."""
    path = lock_path(output)
    try:
        with FileSystems.open(path) as handle:
            holder = json.loads(handle.read().decode("utf-8"))
        return holder if isinstance(holder, dict) else {}
    except Exception:  # pylint: disable=broad-except
        return {} if FileSystems.exists(path) else None


def holder_is_gone(holder: dict) -> bool:
    """True when the holder ran on this host and its process no longer exists."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False  # another machine, or unreadable: it cannot be checked from here
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False  # exists (another user's), or not a pid this system has
    return False


def _describe(holder: dict) -> str:
    if not holder:
        return "an unreadable lock"
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, started "
            f"{holder.get('started_at')}, run id {holder.get('run_id')}")


def acquire_lock(output: str, run_id: str, started_at: str, take_stale: bool) -> str:
    """Take ``output``'s lock for this run or raise OutputLockedError; returns the lock path."""
    path = lock_path(output)
    data = json.dumps(_holder(run_id, started_at)).encode()
    if _create_exclusive(path, data):
        return path
    holder = read_lock(output) or {}
    if holder_is_gone(holder):
        if take_stale:
            LOG.warning("--overwrite: taking over the stale lock of a run that is no longer "
                        "running (%s).", _describe(holder))
            _remove(path)
            if _create_exclusive(path, data):
                return path
            holder = read_lock(output) or {}  # another run took it meanwhile
        else:
            raise OutputLockedError(
                f"The output folder {output} is locked by a run that is no longer running "
                f"({_describe(holder)}): it was killed or crashed. Pass --overwrite to take the "
                f"lock over (that run's outputs are then replaced), or delete {path} once you "
                "are sure no run uses the folder."
            )
    raise OutputLockedError(
        f"The output folder {output} is in use by another xai-audit run ({_describe(holder)}). "
        "Wait for it to finish or choose another --output: two runs never share a folder. If "
        f"that run is gone (e.g. it ran on another machine and was killed), delete {path}."
    )


def release_lock(output: str, run_id: str) -> None:
    """Remove the lock if it is still this run's (never another run's)."""
    holder = read_lock(output)
    if holder and holder.get("run_id") == run_id:
        try:
            _remove(lock_path(output))
        except Exception as exc:  # pylint: disable=broad-except
            LOG.warning("Could not remove the lock %s (%s); delete it by hand.",
                        lock_path(output), exc)


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
    """Strict JSON: NaN and ±Infinity are written as null (``metric_rules.json_safe``)."""
    from ..evaluation.metric_rules import json_safe

    text = json.dumps(json_safe(payload), indent=2, sort_keys=False, default=str, allow_nan=False)
    write_bytes_atomic(path, text.encode(), "application/json")


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

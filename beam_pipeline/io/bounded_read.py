"""Reading one image or mask file within ``ReadLimits``: only a regular file, a size checked
from metadata before reading, a time limit (a hanging file system costs one error row, not the
run), and, for local data, symlinks resolved before the outside-the-data check.
"""
import os
import threading
from typing import Any, Dict, Optional

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from ..errors import ExampleError
from .paths import exists, is_inside, is_remote, scheme, special_kind
from .source_spec import ReadLimits

# After this many reads in a row from one file system time out, the next ones are not tried: a
# thousand gs:// rows of an offline run cost three timeouts, not a thousand.
TIMEOUTS_BEFORE_GIVING_UP = 3


def _too_large(path: str, what: str, size: str, limits: ReadLimits) -> ExampleError:
    return ExampleError(
        "read", "file_too_large",
        f"The {what} file {path} is {size} bytes, above the limit of {limits.max_bytes:,} "
        "(--max-image-bytes); it was not read. Raise --max-image-bytes if the file is genuine.")


def _read_local(path: str, what: str, limits: ReadLimits, root: Optional[str]) -> bytes:
    if not os.path.lexists(path):
        raise ExampleError("read", f"missing_{what}", f"The {what} file {path} does not exist.")
    special = special_kind(path)
    if special is not None:
        error_type = f"missing_{what}" if special.startswith("a broken") else f"unreadable_{what}"
        raise ExampleError("read", error_type,
                           f"The {what} file {path} is {special}, not a regular file.")
    real = os.path.realpath(path)
    if root is not None and not is_remote(root) and not is_inside(os.path.realpath(root), real):
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
        present = exists(path)
        error_type = f"unreadable_{what}" if present else f"missing_{what}"
        detail = "could not be read" if present else "does not exist"
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


def read_file(path: str, what: str, limits: Optional[ReadLimits] = None,
              root: Optional[str] = None) -> bytes:
    """One image or mask file, bounded by ``limits``; only a regular file is read, and with
    ``root`` (a local data folder) only when it lies in it once symlinks are resolved.
    Raises ExampleError (stage read) naming what is wrong."""
    limits = limits or ReadLimits()
    fs_name = scheme(path)
    if limits.timeouts_in_a_row.get(fs_name, 0) >= TIMEOUTS_BEFORE_GIVING_UP:
        raise ExampleError(
            "read", "read_timeout",
            f"The {what} file {path} was not read: the last {TIMEOUTS_BEFORE_GIVING_UP} reads "
            f"from {fs_name} on this worker each took longer than {limits.timeout_s:g} s "
            "(--read-timeout). Check that the file system is reachable and authorized.")
    if is_remote(path):
        call = lambda: _read_remote(path, what, limits)  # noqa: E731
    else:
        call = lambda: _read_local(path, what, limits, root)  # noqa: E731
    try:
        data = _within(limits.timeout_s, call, path, what)
    except ExampleError as exc:
        if exc.error_type == "read_timeout":
            limits.timeouts_in_a_row[fs_name] = limits.timeouts_in_a_row.get(fs_name, 0) + 1
        raise
    limits.timeouts_in_a_row[fs_name] = 0
    return data
"""The one file-system helper module: paths that may be local or on any Beam file system
(``gs://``...), and what a local path is when it is not a regular file.

Two kinds of existence check live elsewhere on purpose: ``exists`` here never raises (an
unreachable store reads as absent: the data checks and the report want a yes or no), while the
output-folder safety checks (``outputs``) call ``FileSystems.exists`` directly so that an
unreachable store stops the run instead of passing for an empty folder.

No TensorFlow: the report imports this.
"""
import errno
import os
import posixpath
import stat
from typing import Optional

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems


def is_remote(path: str) -> bool:
    """A URI of a Beam file system (``gs://``...) rather than a local path."""
    return "://" in path


def join(base: str, *parts: str) -> str:
    """A path under ``base`` (local or any Beam file system)."""
    return FileSystems.join(base.rstrip("/"), *parts)


def read_bytes(path: str) -> bytes:
    """Whole file through Beam FileSystems (local, gs://, ...)."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return handle.read()


def is_dir(uri: str) -> bool:
    if not is_remote(uri):
        return os.path.isdir(uri)
    return bool(FileSystems.match([uri.rstrip("/") + "/*"], limits=[1])[0].metadata_list)


def exists(uri: str) -> bool:
    """Whether ``uri`` exists; False when its file system cannot be asked (never raises)."""
    try:
        return FileSystems.exists(uri)
    except Exception:
        return False


def resolve(base_dir: str, path: str) -> str:
    """``path`` as written in a manifest: relative ones are under ``base_dir``."""
    if is_remote(path) or os.path.isabs(path):
        return path
    # Not ``join``: a manifest in / has base_dir "/", which join's rstrip would empty.
    return FileSystems.join(base_dir, path)


def normalized(path: str) -> str:
    """``path`` with ``.`` and ``..`` segments folded (lexically; symlinks are not followed)."""
    if is_remote(path):
        prefix, rest = path.split("://", 1)
        return f"{prefix}://{posixpath.normpath(rest)}"
    return os.path.normpath(path)


def is_inside(base_dir: str, path: str) -> bool:
    """Whether ``path`` lies in ``base_dir`` or below it, after folding ``..`` segments."""
    base, target = normalized(base_dir).rstrip("/" + os.sep), normalized(path)
    sep = "/" if is_remote(base) else os.sep
    return target.startswith(base + sep)


def parent(uri: str) -> str:
    """The folder holding ``uri`` (local paths made absolute first)."""
    return posixpath.dirname(uri) if is_remote(uri) else os.path.dirname(os.path.abspath(uri))


_SPECIAL_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def special_kind(path: str) -> Optional[str]:
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


def scheme(path: str) -> str:
    """``gs://`` for a URI, ``local files`` for a local path (names a file system in messages)."""
    return path.split("://", 1)[0] + "://" if is_remote(path) else "local files"

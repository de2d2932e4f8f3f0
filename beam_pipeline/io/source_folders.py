"""Class-folder trees (``DATA/<class>/<image>``): listing them (local or any Beam file system),
describing them on the launcher and enumerating their examples on the workers.

Every non-hidden entry one level below a class folder is listed, whatever it is: broken symlinks,
loops, FIFOs and subfolders become error rows when read, so no example is silently lost.
"""
import hashlib
import logging
import os
from typing import Iterator, List, Tuple

from apache_beam.io.filesystems import FileSystems

from ..errors import DataSourceError
from .outputs import RUN_JSON, STAGING_PREFIX
from .paths import is_dir, is_remote, join, special_kind
from .records import ExampleRef
from .source_spec import ColumnNames, SourceSpec

LOG = logging.getLogger("xai_audit")
HIDDEN_PREFIXES = (".", "_")


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
                            "data.", cls.path, special_kind(cls.path) or "a link to a file")
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
    if not is_remote(root):
        return sorted(_list_local_class_folders(root), key=lambda item: item[1])
    pattern = join(root, "*", "*")
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
    if not is_remote(uri) and os.path.lexists(uri):
        what = special_kind(uri)
        if what is None:
            what = "a file, not a folder"
        return DataSourceError(f"--data {uri} is {what}. {advice}")
    return DataSourceError(f"--data {uri} does not exist. {advice}")


def inspect_folders(uri: str, columns: ColumnNames) -> SourceSpec:
    if not is_dir(uri):
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


def iter_folder_refs(spec: SourceSpec) -> Iterator[ExampleRef]:
    for class_name, path, _ in _list_class_folders(spec.uri):
        rel = path[len(spec.uri) + 1 :].replace(os.sep, "/")
        yield ExampleRef(example_id=rel, source=path, image_path=path, raw_label=class_name)

"""A real Beam FileSystem for the ``testfs://`` scheme, with object-store semantics like GCS.

``testfs://bucket/a/b.png`` is stored as ``$XAI_TESTFS_ROOT/bucket/a/b.png``, but the file system
behaves like ``gs://``: there are no directories (``has_dirs`` is False, ``exists`` is true only
for objects, a "folder" is a prefix that disappears with its last object), an object appears only
when its writer closes, and rename/copy/delete work object by object. Code that reaches past
Beam's ``FileSystems`` (``open``, ``os.path``, ``tf.io.gfile``, pyarrow paths) fails on it.

Beam finds FileSystem subclasses by ``scheme()``; importing this module registers it for the
process (the local FnApiRunner runs the workers in the same process).
"""
import os
import shutil
import tempfile
import uuid

from apache_beam.io.filesystem import (BeamIOError, CompressedFile, CompressionTypes, FileMetadata,
                                       FileSystem)

SCHEME = "testfs"
PREFIX = SCHEME + "://"
ROOT_ENV = "XAI_TESTFS_ROOT"


def root() -> str:
    path = os.environ.get(ROOT_ENV)
    if not path:
        raise RuntimeError(f"set {ROOT_ENV} to the local folder that backs testfs://")
    return path


def local_path(uri: str) -> str:
    if not uri.startswith(PREFIX):
        raise ValueError(f"{uri!r} is not a {PREFIX} path")
    return os.path.join(root(), uri[len(PREFIX):])


def uri_of(local: str) -> str:
    return PREFIX + os.path.relpath(local, root()).replace(os.sep, "/")


class _ObjectWriter:
    """Writes to a hidden temp file and publishes the object on close, as GCS does."""

    def __init__(self, final: str):
        os.makedirs(os.path.dirname(final), exist_ok=True)
        self.final = final
        self.temp = os.path.join(os.path.dirname(final), f".~testfs-{uuid.uuid4().hex}")
        self.handle = open(self.temp, "wb")
        self.closed = False

    def write(self, data):
        return self.handle.write(data)

    def flush(self):
        self.handle.flush()

    def tell(self):
        return self.handle.tell()

    def seekable(self):
        return False

    def writable(self):
        return True

    def readable(self):
        return False

    def close(self):
        if not self.closed:
            self.handle.close()
            os.replace(self.temp, self.final)
            self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ObjectStoreFileSystem(FileSystem):
    """``testfs://``: objects in a local folder, GCS semantics (see the module docstring)."""

    CHUNK_SIZE = 100

    @classmethod
    def scheme(cls):
        return SCHEME

    def join(self, basepath, *paths):
        if not basepath.startswith(PREFIX):
            raise ValueError(f"Basepath {basepath!r} must be a {PREFIX} path.")
        path = basepath
        for part in paths:
            path = path.rstrip("/") + "/" + part.lstrip("/")
        return path

    def split(self, path):
        path = path.strip()
        if not path.startswith(PREFIX):
            raise ValueError(f"Path {path!r} must be a {PREFIX} path.")
        rest = path[len(PREFIX):]
        last = rest.rfind("/")
        if last < 0:
            return PREFIX + rest, ""
        return PREFIX + rest[:last], rest[last + 1:]

    def mkdirs(self, path):
        pass  # no directories in an object store

    def has_dirs(self):
        return False

    def _objects(self):
        for dirpath, _, files in os.walk(root()):
            for name in files:
                if not name.startswith(".~testfs-"):
                    yield os.path.join(dirpath, name)

    def _list(self, dir_or_prefix):
        try:
            for local in self._objects():
                uri = uri_of(local)
                if uri.startswith(dir_or_prefix):
                    yield FileMetadata(uri, os.path.getsize(local), os.path.getmtime(local))
        except Exception as exc:  # pylint: disable=broad-except
            raise BeamIOError("List operation failed", {dir_or_prefix: exc})

    def create(self, path, mime_type="application/octet-stream",
               compression_type=CompressionTypes.AUTO):
        raw = _ObjectWriter(local_path(path))
        compression_type = CompressionTypes.detect_compression_type(path) \
            if compression_type == CompressionTypes.AUTO else compression_type
        if compression_type == CompressionTypes.UNCOMPRESSED:
            return raw
        return CompressedFile(raw, compression_type=compression_type)

    def open(self, path, mime_type="application/octet-stream",
             compression_type=CompressionTypes.AUTO):
        local = local_path(path)
        if not os.path.isfile(local):
            raise BeamIOError("Open operation failed", {path: FileNotFoundError(path)})
        raw = open(local, "rb")
        compression_type = CompressionTypes.detect_compression_type(path) \
            if compression_type == CompressionTypes.AUTO else compression_type
        if compression_type == CompressionTypes.UNCOMPRESSED:
            return raw
        return CompressedFile(raw, compression_type=compression_type)

    def _each_object(self, sources, destinations, action, name):
        assert len(sources) == len(destinations)
        errors = {}
        for src, dst in zip(sources, destinations):
            try:
                if not os.path.isfile(local_path(src)):
                    raise FileNotFoundError(src)
                os.makedirs(os.path.dirname(local_path(dst)), exist_ok=True)
                action(local_path(src), local_path(dst))
            except Exception as exc:  # pylint: disable=broad-except
                errors[(src, dst)] = exc
        if errors:
            raise BeamIOError(f"{name} operation failed", errors)

    def copy(self, source_file_names, destination_file_names):
        self._each_object(source_file_names, destination_file_names, shutil.copyfile, "Copy")

    def rename(self, source_file_names, destination_file_names):
        self._each_object(source_file_names, destination_file_names, os.replace, "Rename")

    def exists(self, path):
        return os.path.isfile(local_path(path))

    def size(self, path):
        return os.path.getsize(local_path(path))

    def last_updated(self, path):
        return os.path.getmtime(local_path(path))

    def checksum(self, path):
        return str(os.path.getsize(local_path(path)))

    def metadata(self, path):
        local = local_path(path)
        if not os.path.isfile(local):
            raise BeamIOError("Metadata operation failed", {path: FileNotFoundError(path)})
        return FileMetadata(path, os.path.getsize(local), os.path.getmtime(local))

    def delete(self, paths):
        errors = {}
        for path in paths:
            try:
                if path.endswith("/"):  # a prefix: every object under it, as GCS does
                    for meta in list(self._list(path)):
                        os.remove(local_path(meta.path))
                    continue
                matches = self.match([path])[0].metadata_list
                if not matches:
                    raise FileNotFoundError(path)
                for meta in matches:
                    os.remove(local_path(meta.path))
            except Exception as exc:  # pylint: disable=broad-except
                errors[path] = exc
        if errors:
            raise BeamIOError("Delete operation failed", errors)


def make_root() -> str:
    """A fresh backing folder, set as the process's testfs root."""
    folder = tempfile.mkdtemp(prefix="testfs-")
    os.environ[ROOT_ENV] = folder
    return folder

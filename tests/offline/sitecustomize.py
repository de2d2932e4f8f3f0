"""Imported at start-up by any Python process with this folder on PYTHONPATH (tests only).

An audit hook makes the process offline: every internet socket connection and host-name lookup
fails at once with OSError, as on a machine without network, and is appended to the file
``XAI_TEST_OFFLINE_LOG`` names; so is every opening of a file under the paths
``XAI_TEST_CREDENTIAL_PATHS`` lists (credential files a Google client would read). Unix sockets
and other files are untouched. tests/test_dry_run_offline.py reads the log.
"""
import os
import socket
import sys

_LOG = os.environ.get("XAI_TEST_OFFLINE_LOG")
_CREDENTIALS = tuple(p for p in os.environ.get("XAI_TEST_CREDENTIAL_PATHS", "").split(os.pathsep)
                     if p)
_LOOKUPS = ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr")


def _record(line):
    if _LOG:
        with open(_LOG, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


def _hook(event, args):
    if event == "socket.connect":
        sock, address = args
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            _record(f"connect {address!r}")
            raise OSError(101, f"Network is unreachable (offline test): {address!r}")
    elif event in _LOOKUPS:
        _record(f"{event} {args[0]!r}")
        raise socket.gaierror(socket.EAI_NONAME, f"offline test: no lookup of {args[0]!r}")
    elif event == "open" and _CREDENTIALS and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if path != _LOG and path.startswith(_CREDENTIALS):
            _record(f"credential read {path}")


if _LOG:
    sys.addaudithook(_hook)

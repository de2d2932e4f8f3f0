"""Log lines from Beam's worker processes (``--direct_running_mode multi_processing``).

Beam relays every worker log record to the launcher through one logger
(``local_job_service``), as a whole LogEntry protobuf printed on one line. Without help the
user sees Beam's own start-up warnings in that form, and none of the job's progress lines (they
are INFO, under Beam's WARNING level). ``WorkerLogFilter`` unpacks each entry: the job's own
lines go to the ``xai_audit`` logger as if logged in-process, other workers' warnings and errors
follow as "Beam worker: <message>", and Beam's known start-up notices are dropped (all of them
are kept with ``--log-level debug``).

``import_tensorflow_quietly`` keeps TensorFlow's C++ start-up lines out of the launcher's default
output. Worker processes still print theirs: they import TensorFlow while unpickling TFMA's
transforms, before any code of ours runs there.
"""
import logging
import os
import sys

LOG = logging.getLogger("xai_audit")
RELAY_LOGGER = "apache_beam.runners.portability.local_job_service"
# Beam worker start-up notices with nothing for the user to do.
KNOWN_NOTICES = ("No semi_persistent_directory found",)
PACKAGE_MARKER = "beam_pipeline"  # in the log location (file path) of the job's own lines


def parse_entry(text: str):
    """The LogEntry of a relayed record's text, or None when it is not one."""
    from apache_beam.portability.api import beam_fn_api_pb2
    from google.protobuf import text_format

    entry = beam_fn_api_pb2.LogEntry()
    try:
        text_format.Parse(text, entry)
    except text_format.ParseError:
        return None
    return entry


class WorkerLogFilter(logging.Filter):
    """Installed on the relay logger: re-logs what a person should read, drops the rest."""

    def __init__(self, keep_everything: bool = False):
        super().__init__()
        self.keep_everything = keep_everything

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.args, tuple) and len(record.args) == 1
                and str(record.msg).startswith("Worker:")):
            return True  # the relay's own messages
        entry = parse_entry(str(record.args[0]))
        if entry is None:
            return True
        if PACKAGE_MARKER in entry.log_location:
            LOG.log(record.levelno, "%s", entry.message)
            return False
        if self.keep_everything:
            return True
        if record.levelno >= logging.WARNING and not any(
                notice in entry.message for notice in KNOWN_NOTICES):
            LOG.log(record.levelno, "Beam worker: %s", entry.message)
        return False


def install(level: str) -> None:
    """Route worker records through ``WorkerLogFilter`` (idempotent)."""
    relay = logging.getLogger(RELAY_LOGGER)
    relay.setLevel(logging.DEBUG if level == "debug" else logging.INFO)
    for old in [f for f in relay.filters if isinstance(f, WorkerLogFilter)]:
        relay.removeFilter(old)
    relay.addFilter(WorkerLogFilter(keep_everything=level == "debug"))


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with the process's stderr closed for the import only.

    TF 2.21 writes its start-up lines (oneDNN notice, "Could not find cuda drivers") from C++
    before absl logging is initialized, ignoring TF_CPP_MIN_LOG_LEVEL, once per native library
    loaded; only the file descriptor can hold them back. An import error still raises (and is
    reported) after stderr is restored. --log-level debug keeps them.
    """
    if "tensorflow" in sys.modules:
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (embedded, captured): nothing to hide
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)

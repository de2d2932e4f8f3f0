"""Exception types, one per failure class.

Two families:

* ``AuditError`` and its subclasses stop the whole run: the CLI prints the message as one
  paragraph (no traceback) and exits with ``exit_code``.
* ``ExampleError`` is one example that could not be audited. It never stops the job: it becomes a
  row of ``DIR/errors/`` with its ``stage`` and stable ``error_type``.
"""


class AuditError(Exception):
    """The run cannot be done as asked. The message tells the user what to do."""

    exit_code = 1


class ModelLoadError(AuditError):
    """The model file is missing, unreadable, unsafe to load, or not an image classifier."""


class DataSourceError(AuditError):
    """The data URI does not exist, cannot be read, or holds no examples."""


class OptionError(AuditError):
    """An option value that cannot be honoured (e.g. a layer the model lacks)."""


class UsageError(AuditError):
    """A malformed command line found only once the options are read together (e.g. a gate on a
    metric the TFMA config does not compute): exit 2, like argparse's own usage errors."""

    exit_code = 2
class OutputExistsError(AuditError):
    """The output folder already holds a run, and --overwrite was not given."""


class EvaluationError(AuditError):
    """TFMA ran but produced nothing usable (e.g. no metrics at all)."""


class ReportError(AuditError):
    """The report cannot be made from DIR (e.g. there is no run.json)."""


class ExampleError(Exception):
    """One example failed at ``stage`` (read, decode, label, predict, explain) for ``error_type``."""

    def __init__(self, stage: str, error_type: str, message: str):
        super().__init__(message)
        self.stage = stage
        self.error_type = error_type
        self.message = message

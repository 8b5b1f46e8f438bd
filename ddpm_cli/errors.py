"""The project's own exceptions. The engine raises these; the CLI turns each into one line and an exit code.

Every message should say what is wrong and how to fix it."""


class DdpmError(Exception):
    """Base class: an expected failure with a message meant for the user."""

    exit_code = 1


class UsageError(DdpmError):
    """A command-line option is out of range or contradicts another (exit 2, like click's own usage errors)."""

    exit_code = 2


class ConfigError(DdpmError):
    """The run config is missing, unreadable or invalid. `problems` lists every field-level problem."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or []


class DataError(DdpmError):
    """The dataset cannot be found, read or used with this model."""


class CheckpointError(DdpmError):
    """A checkpoint is missing, truncated, not ours, or does not fit the model."""


class RunLocked(DdpmError):
    """Another process is training in the run directory (it holds the run's lock)."""


class DeviceError(DdpmError):
    """The requested device is not available."""


class TrainingAborted(DdpmError):
    """Training stopped on purpose (non-finite losses, a signal); a checkpoint may have been written."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class DdpmWarning(UserWarning):
    """Something the user should know that the run survives (a damaged cache entry, say), raised by engine code
    that has no callback to report through; the CLI prints each as one `warning: ...` line."""

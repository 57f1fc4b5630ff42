"""What ends a command short of success. The CLI prints each as one line, no traceback, and
exits with its code (docs/reliability.md has the table)."""

from pathlib import Path


class UsageError(ValueError):
    """Bad input from the user: the message names the problem and the fix (exit code 2)."""


class DataError(UsageError):
    """A problem with the image data on disk (missing dir, no images, corrupt file, ...)."""


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM/SIGUSR1 after saving a checkpoint (exit code
    128 + the signal)."""

    def __init__(self, signum: int, path: Path):
        super().__init__(f"stopped by signal {signum}; checkpoint saved to {path}")
        self.signum, self.path = signum, path


EXIT_REQUEUE = 75  # EX_TEMPFAIL of sysexits.h: "temporary failure, the user is invited to retry"


class EnvironmentFault(RuntimeError):
    """A fault of the machine (disk, memory, network), not of the run: its message says what
    happened, what is kept and how to continue; the run exits with exit_code (75: requeue
    with --resume). engine/faults.py says which exceptions are such faults."""

    exit_code = EXIT_REQUEUE

    def __init__(self, message: str, exit_code: int = EXIT_REQUEUE):
        super().__init__(message)
        self.exit_code = exit_code

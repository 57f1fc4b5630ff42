"""Errors a user can fix. The CLI prints their message and exits non-zero, no traceback."""


class UsageError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""


class DataError(UsageError):
    """A problem with the image data on disk (missing dir, no images, corrupt file, ...)."""

"""Errors a user can act on. Each message names the input and what is wrong with it."""


class ClipforgeError(Exception):
    """Base class: caught by the command line and printed without a traceback."""

    exit_code = 1


class ConfigError(ClipforgeError):
    """A flag, config file or input value is invalid. Raised before any expensive work."""

    exit_code = 2


class DataError(ClipforgeError):
    """Input data is missing, empty or malformed."""

    exit_code = 3


class StorageError(ClipforgeError):
    """Object storage failed permanently, or kept failing after retries."""

    exit_code = 4

"""Errors the CLI turns into one-line messages and exit codes (never a traceback)."""


class VlmforgeError(Exception):
    exit_code = 1


class ConfigError(VlmforgeError):
    """Bad usage or config: exit 2. The message names the file, the key path, what was expected."""

    exit_code = 2


class OutputError(VlmforgeError):
    """A file could not be written (disk full, read-only mount, permissions): exit 1.
    The message is one line: ``<path>: cannot write (<reason>)``."""

    exit_code = 1

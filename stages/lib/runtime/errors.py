"""The runtime's failures, each a one-line message and the exit code the CLI gives it.

* :class:`PackageError` (exit 1): the package is damaged or unsafe -- an archive member that
  would land outside the package, a file whose digest or size differs from the manifest, a
  file the manifest does not list, a malformed manifest.
* :class:`IncompatibleError` (exit 2): the package is fine but this device cannot run it -- an
  engine for another SM or builder version, a backend whose bindings or GPU are missing, a
  package format this runtime does not read.
* :class:`UsageError` (exit 2): bad arguments (no such file, a prompt the template rejects).

A gate missed by ``check`` is not an exception: it is a result with ``exit_code`` 1.
"""

from __future__ import annotations

from pipeline.errors import VlmforgeError


class RuntimeFailure(VlmforgeError):
    """One hierarchy with the build's errors: `vlmforge` prints any of them as one line."""

    exit_code = 1

    def __init__(self, message: str):
        # one line: the CLI prints exactly this, and build farms grep it
        super().__init__(" ".join(str(message).split()))


class PackageError(RuntimeFailure):
    exit_code = 1


class IncompatibleError(RuntimeFailure):
    exit_code = 2


class UsageError(RuntimeFailure):
    exit_code = 2

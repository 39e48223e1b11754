"""The exception hierarchy and the exit codes the CLI maps it to.

Every error fedimg raises on purpose is a :class:`FedimgError`. ``exit_code`` is what the CLI
returns for it: 2 for bad input or configuration (nothing was attempted that could have succeeded),
1 for a failure while doing the work.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class FedimgError(Exception):
    """Base of every error fedimg raises deliberately; its message is one line for the user."""

    exit_code = EXIT_FAILED


class ConfigError(FedimgError):
    """The configuration is invalid. The message names the file, the key and, where known, the line."""

    exit_code = EXIT_BAD_INPUT


class InputError(FedimgError):
    """The image source (path, URL, checksum, format) is unusable."""

    exit_code = EXIT_BAD_INPUT


class Interrupted(FedimgError):
    """The run was stopped by SIGINT or SIGTERM after cleaning up."""

    exit_code = EXIT_INTERRUPTED

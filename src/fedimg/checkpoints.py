"""Crash checkpoints, for the crash harness that proves resumption.

With ``FEDIMG_CRASH_AT=<name>`` in the environment, the process kills itself with SIGKILL (no
cleanup, no handlers: a power cut) when it reaches the checkpoint of that name. Without the
variable a checkpoint does nothing. Names: ``mid-upload``, ``after-upload``, ``after-register``,
``after-test``, ``after-replicate``, ``after-publish``.
"""

from __future__ import annotations

import os
import signal

ENV = "FEDIMG_CRASH_AT"


def checkpoint(name: str) -> None:
    """Die here if the crash harness asked for it."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)

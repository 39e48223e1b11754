"""The test step: a test-runner interface and the ``command`` runner.

A runner takes a registered AMI and the configured test script, runs the script against it and says
whether it passed (exit status 0). Runners: ``command`` (here: the script runs on this machine
with the AMI's coordinates in its environment), ``ssh`` (a test instance, :mod:`testing_ssh`) and
``qemu`` (the image booted locally) come from their own modules.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from fedimg.errors import ConfigError
from fedimg.services.ec2.register import RegisteredAmi
from fedimg.services.ec2.resources import Tracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TestTarget:
    """What is tested: the AMI, and where its image came from.

    ``ami`` is None when the source image itself is tested before anything is uploaded (the
    ``qemu`` runner's ``--before-upload`` gate); runners that need an AMI refuse that target.
    ``job_id``, ``tags`` and ``tracker`` are for runners that create AWS resources (a test
    instance): its name and ClientToken derive from the job, it carries the tags, and it goes
    into the tracker (the job's ledger) the moment it exists.
    """

    ami: RegisteredAmi | None
    image_name: str
    image_url: str
    image_path: str | None
    arch: str
    endpoint_url: str | None
    job_id: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    tracker: Tracker | None = None

    @property
    def subject(self) -> str:
        """What is booted, for messages: the AMI id, or the source image's name."""
        return self.ami.ami_id if self.ami is not None else f"source image {self.image_name}"

    def environment(self, *, local: bool) -> dict[str, str]:
        """The ``FEDIMG_*`` variables a test script gets.

        ``FEDIMG_TEST_STAGE`` is ``ami`` or ``source`` (before upload; then the AMI variables
        are absent). ``local`` adds what only makes sense on this machine: the image's path
        and the AWS endpoint.
        """
        env = {
            "FEDIMG_TEST_STAGE": "ami" if self.ami is not None else "source",
            "FEDIMG_IMAGE_NAME": self.image_name,
            "FEDIMG_IMAGE_URL": self.image_url,
            "FEDIMG_ARCH": self.arch,
        }
        if self.ami is not None:
            env |= {
                "FEDIMG_AMI_ID": self.ami.ami_id,
                "FEDIMG_AMI_NAME": self.ami.name,
                "FEDIMG_REGION": self.ami.region,
                "FEDIMG_FLAVOUR": self.ami.flavour.name,
                "FEDIMG_SNAPSHOT_ID": self.ami.snapshot_id,
            }
        if local:
            env["FEDIMG_IMAGE_PATH"] = self.image_path or ""
            env["FEDIMG_ENDPOINT_URL"] = self.endpoint_url or ""
        return env


@dataclass(frozen=True)
class TestOutcome:
    """The result of one test run; ``output`` is stdout and stderr interleaved."""

    passed: bool
    exit_code: int | None
    output: str
    seconds: float
    reason: str


class TestRunner(Protocol):
    """Runs the test script against a target. Never raises for a failing test: it returns."""

    name: str

    def run(self, *, target: TestTarget, script: str, timeout: float) -> TestOutcome:
        """Run ``script`` against ``target`` within ``timeout`` seconds."""


def script_argv(script: str) -> list[str]:
    """The argv of a configured test script (a path or a command line)."""
    argv = shlex.split(script)
    if not argv:
        raise ConfigError("[aws] test: the test script is empty")
    return argv


class CommandRunner:
    """Runs the test script on this machine.

    The environment carries :meth:`TestTarget.environment` (``FEDIMG_AMI_ID``,
    ``FEDIMG_REGION``, ``FEDIMG_FLAVOUR``, ``FEDIMG_AMI_NAME``, ``FEDIMG_SNAPSHOT_ID``,
    ``FEDIMG_IMAGE_NAME``, ``FEDIMG_IMAGE_URL``, ``FEDIMG_IMAGE_PATH`` (local images),
    ``FEDIMG_ARCH`` and ``FEDIMG_ENDPOINT_URL`` (non-AWS targets)), so the script can inspect the
    AMI. A script that runs past ``timeout`` is killed (its whole process group) and fails.
    """

    name = "command"

    def run(self, *, target: TestTarget, script: str, timeout: float) -> TestOutcome:
        """Run the script; exit 0 = pass."""
        argv = script_argv(script)
        env = {
            **os.environ,
            # fedimg's own interpreter first: test scripts may use boto3 and the fedimg CLI.
            "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
            **target.environment(local=True),
        }
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            return TestOutcome(
                passed=False,
                exit_code=None,
                output="",
                seconds=0.0,
                reason=f"cannot run test script {argv[0]!r}: {exc.strerror}",
            )
        try:
            raw, _ = proc.communicate(timeout=timeout)
        except KeyboardInterrupt:
            # Interrupted (SIGINT/SIGTERM): the script must not outlive fedimg.
            _kill_group(proc)
            proc.wait()
            raise
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raw, _ = proc.communicate()
            output = raw.decode(errors="replace")
            return TestOutcome(
                passed=False,
                exit_code=None,
                output=output,
                seconds=round(time.monotonic() - started, 3),
                reason=f"test script timed out after {timeout:.0f}s",
            )
        output = raw.decode(errors="replace")
        seconds = round(time.monotonic() - started, 3)
        if proc.returncode == 0:
            return TestOutcome(
                passed=True, exit_code=0, output=output, seconds=seconds, reason="exit 0"
            )
        return TestOutcome(
            passed=False,
            exit_code=proc.returncode,
            output=output,
            seconds=seconds,
            reason=f"test script exited {proc.returncode}",
        )


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)

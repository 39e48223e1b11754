"""The ``ssh`` test runner: the test script runs on an instance booted from the new AMI.

    temporary key pair + security group (access)
    → RunInstances from the AMI (ClientToken from the job and the AMI, tagged, in the ledger)
    → wait running → host keys from the console → SSH answers      (each wait bounded by config)
    → SFTP the script → run it under its time limit → exit 0 = pass
    → finally: terminate and wait until terminated; delete the group and the key pair

The script is the first word of ``[aws] test``: a local file is copied over and run with the rest
of the words as arguments; anything else is run as a command line on the instance. Its
environment carries ``FEDIMG_AMI_ID``, ``FEDIMG_REGION``, ``FEDIMG_FLAVOUR``, ``FEDIMG_AMI_NAME``,
``FEDIMG_IMAGE_NAME`` and ``FEDIMG_ARCH``.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import shlex
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fedimg.aws import ClientFactory
from fedimg.config import AwsSettings
from fedimg.errors import ConfigError, FedimgError
from fedimg.services.ec2.access import (
    Access,
    AccessRequest,
    close_access,
    open_access,
    resolve_ssh_cidr,
)
from fedimg.services.ec2.errors import AWSError, aws_call
from fedimg.services.ec2.instances import (
    LaunchRequest,
    client_token,
    discard_instance,
    launch_instance,
    open_instance_ssh,
    wait_instance,
)
from fedimg.services.ec2.resources import TAG_JOB, TAG_ROLE, LocalTracker, Tracker
from fedimg.services.ec2.ssh import InstanceSeam, SSHError, SshSession, default_seam
from fedimg.services.ec2.testing import TestOutcome, TestTarget, script_argv

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

log = logging.getLogger(__name__)


class SshTestRunner:
    """Runs the test script on a test instance over SSH. Never raises for a failed test.

    Anything that keeps the test from passing (the instance never runs, SSH never answers, a host
    key the policy rejects, the script fails or runs past its limit) is a failed
    :class:`TestOutcome` whose ``reason`` says which. Only a configuration error, or temporary
    resources that could not be removed after a passing test, raise.
    """

    name = "ssh"

    def __init__(
        self,
        *,
        clients: ClientFactory,
        settings: AwsSettings,
        seam: InstanceSeam | None = None,
        poll_interval: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.clients = clients
        self.settings = settings
        self.seam = seam or default_seam(settings)
        self.poll_interval = poll_interval
        self.sleep = sleep

    def run(self, *, target: TestTarget, script: str, timeout: float) -> TestOutcome:
        """Boot the AMI, run the script on it within ``timeout`` seconds, always terminate."""
        argv = script_argv(script)
        payload = script_payload(argv)
        started = time.monotonic()
        ami = target.ami
        if ami is None:
            raise ConfigError(
                "the ssh test runner tests a registered AMI; the source image can only be "
                "tested before upload by the qemu runner"
            )
        region = ami.region
        ec2 = self.clients.ec2(region)
        tracker: Tracker = target.tracker or LocalTracker()
        job = target.job_id or str(uuid.uuid4())
        tags = {**target.tags, TAG_JOB: job, "Name": f"fedimg test of {ami.ami_id}"}
        access: Access | None = None
        instance_id: str | None = None
        outcome: TestOutcome | None = None
        try:
            cidr = resolve_ssh_cidr(
                self.settings.ssh_cidr,
                target=self.settings.target,
                endpoint_url=target.endpoint_url,
                proxy_jump=self.settings.ssh_proxy_jump,
            )
            access = open_access(
                request=AccessRequest(
                    region=region,
                    name=f"fedimg-{job}-test-{ami.ami_id}",
                    tags=tags,
                    ssh_cidr=cidr,
                    ssh_port=self.settings.ssh_port,
                    keyname=self.settings.keyname,
                    keypath=self.settings.keypath,
                ),
                ec2=ec2,
                tracker=tracker,
            )
            root_device = self._root_device(ec2, region, ami.ami_id)
            instance_id = launch_instance(
                request=LaunchRequest(
                    region=region,
                    image_id=ami.ami_id,
                    instance_type=self.settings.test_instance_type,
                    access=access,
                    client_token=client_token(job, ami.ami_id, "test-instance"),
                    tags={**tags, TAG_ROLE: "test-instance"},
                    iam_profile=self.settings.iam_profile,
                    root_device_name=root_device,
                    root_volume_gib=self.settings.test_volume_size,
                    shutdown_behavior="terminate",
                ),
                ec2=ec2,
                tracker=tracker,
            )
            instance = wait_instance(
                ec2,
                region=region,
                instance_id=instance_id,
                state="running",
                timeout=self.settings.instance_running_timeout,
                delay=self.poll_interval,
                sleep=self.sleep,
            )
            with open_instance_ssh(
                ec2=ec2,
                region=region,
                instance=instance,
                access=access,
                username=self.settings.test_username,
                settings=self.settings,
                seam=self.seam,
                label=f"test instance {instance_id}",
                delay=self.poll_interval,
                sleep=self.sleep,
            ) as session:
                outcome = run_test_script(
                    session,
                    target=target,
                    argv=argv,
                    payload=payload,
                    timeout=timeout,
                    where=instance_id,
                    started=started,
                )
        except ConfigError:
            raise
        except FedimgError as exc:
            log.error("test of %s in %s: %s", ami.ami_id, region, exc)
            outcome = TestOutcome(
                passed=False,
                exit_code=None,
                output="",
                seconds=round(time.monotonic() - started, 3),
                reason=str(exc),
            )
        finally:
            leftovers = self._clean_up(ec2, region, instance_id, access, tracker)
        if leftovers and outcome is not None and outcome.passed:
            raise AWSError(
                operation="cleanup",
                region=region,
                resource_ids=leftovers,
                code="CleanupFailed",
                detail="the test passed, but its temporary resources could not all be removed",
            )
        assert outcome is not None
        return outcome

    def _root_device(self, ec2: EC2Client, region: str, ami_id: str) -> str | None:
        if not self.settings.test_volume_size:
            return None
        with aws_call("DescribeImages", region, ami_id):
            images = ec2.describe_images(ImageIds=[ami_id])["Images"]
        return images[0].get("RootDeviceName") if images else None

    def _clean_up(
        self,
        client: EC2Client,
        region: str,
        instance_id: str | None,
        access: Access | None,
        tracker: Tracker,
    ) -> list[str]:
        """Terminate (and wait), then drop the group and key; the ids left behind. Never raises."""
        leftovers: list[str] = []
        if instance_id is not None:
            leftovers += discard_instance(
                client,
                region=region,
                instance_id=instance_id,
                tracker=tracker,
                timeout=self.settings.instance_stop_timeout,
                label="test instance",
                delay=self.poll_interval,
                sleep=self.sleep,
            )
        if access is not None:
            leftovers += close_access(
                access=access,
                ec2=client,
                tracker=tracker,
                timeout=self.settings.instance_stop_timeout,
                sleep=self.sleep,
            )
        return leftovers


def script_payload(argv: list[str]) -> bytes | None:
    """The test script's bytes when its first word is a local file (it is copied over), else None."""
    local = Path(argv[0])
    return local.read_bytes() if local.is_file() else None


def run_test_script(
    session: SshSession,
    *,
    target: TestTarget,
    argv: list[str],
    payload: bytes | None,
    timeout: float,
    where: str,
    started: float,
) -> TestOutcome:
    """Run the test script over ``session`` within ``timeout`` seconds; exit 0 = pass.

    With a ``payload`` (:func:`script_payload`) the script is copied into a fresh ``/tmp``
    directory, run with the rest of ``argv`` and removed; otherwise ``argv`` runs as a command
    line. ``where`` names the machine in the reason; ``started`` (``time.monotonic()``) is when
    the test began. Raises :class:`SSHError` if the connection fails.
    """
    env = shlex.join(
        ["env", *(f"{key}={value}" for key, value in target.environment(local=False).items())]
    )
    log.info("running the test on %s: %s", where, shlex.join(argv))
    if payload is None:
        result = session.run(f"{env} {shlex.join(argv)}", timeout=timeout)
    else:
        remote_dir = f"/tmp/fedimg-test-{secrets.token_hex(8)}"
        remote = f"{remote_dir}/{Path(argv[0]).name}"
        # The SFTP session stays open while the script runs: see SshSession.files.
        with session.files() as files:
            files.mkdir(remote_dir)
            try:
                files.put(payload, remote, mode=0o700)
                result = session.run(f"{env} {shlex.join([remote, *argv[1:]])}", timeout=timeout)
            finally:
                # Also after a script killed at its limit; a lost connection leaves it to /tmp.
                with contextlib.suppress(SSHError):
                    files.remove_tree(remote_dir)
    seconds = round(time.monotonic() - started, 3)
    if result.timed_out:
        return TestOutcome(
            passed=False,
            exit_code=None,
            output=result.output,
            seconds=seconds,
            reason=f"test script timed out after {timeout:.0f}s on {where}",
        )
    if result.exit_code == 0:
        return TestOutcome(
            passed=True, exit_code=0, output=result.output, seconds=seconds, reason="exit 0"
        )
    return TestOutcome(
        passed=False,
        exit_code=result.exit_code,
        output=result.output,
        seconds=seconds,
        reason=f"test script exited {result.exit_code} on {where}",
    )


__all__ = ["SshTestRunner", "run_test_script", "script_payload"]

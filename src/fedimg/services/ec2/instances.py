"""fedimg's temporary instances: launch (idempotent, tagged, in the ledger), bounded waits, SSH.

Shared by the utility upload and the ``ssh`` test runner. Every wait has a deadline and stops at
once on a state it can no longer leave for the one wanted (a terminated instance never runs).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from fedimg.config import AwsSettings
from fedimg.services.ec2.access import Access
from fedimg.services.ec2.errors import AWSError, EC2ServiceException, aws_call
from fedimg.services.ec2.resources import Tracker, tag_specification
from fedimg.services.ec2.ssh import (
    InstanceSeam,
    SshOptions,
    SshSession,
    connect,
    wait_console_host_keys,
)

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

log = logging.getLogger(__name__)

InstanceState = Literal["running", "stopped", "terminated"]

#: States from which an instance can no longer reach the wanted one.
_DEAD_ENDS: dict[str, set[str]] = {
    "running": {"shutting-down", "terminated", "stopping", "stopped"},
    "stopped": {"shutting-down", "terminated"},
    "terminated": set(),
}


def client_token(*parts: str) -> str:
    """A ClientToken (64 hex characters, within AWS's limit) derived from ``parts``."""
    return hashlib.sha256(":".join(parts).encode()).hexdigest()


@dataclass(frozen=True)
class LaunchRequest:
    """One instance to start. ``client_token`` makes RunInstances idempotent."""

    region: str
    image_id: str
    instance_type: str
    access: Access
    client_token: str
    tags: dict[str, str]
    kernel_id: str | None = None
    iam_profile: str | None = None
    root_device_name: str | None = None
    root_volume_gib: int | None = None
    shutdown_behavior: Literal["stop", "terminate"] = "stop"


def launch_instance(*, request: LaunchRequest, ec2: EC2Client, tracker: Tracker) -> str:
    """RunInstances; the instance is in ``tracker`` as soon as the call returns. Its id."""
    params: dict[str, Any] = {
        "ImageId": request.image_id,
        "InstanceType": request.instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        "ClientToken": request.client_token,
        "KeyName": request.access.key_name,
        "SecurityGroupIds": [request.access.security_group_id],
        "InstanceInitiatedShutdownBehavior": request.shutdown_behavior,
        "TagSpecifications": [
            *tag_specification("instance", request.tags),
            *tag_specification("volume", request.tags),
        ],
    }
    if request.kernel_id:
        params["KernelId"] = request.kernel_id
    if request.iam_profile:
        params["IamInstanceProfile"] = {"Name": request.iam_profile}
    if request.root_volume_gib and request.root_device_name:
        params["BlockDeviceMappings"] = [
            {
                "DeviceName": request.root_device_name,
                "Ebs": {"VolumeSize": request.root_volume_gib, "DeleteOnTermination": True},
            }
        ]
    with aws_call("RunInstances", request.region, request.image_id):
        response = ec2.run_instances(**params)
    instance_id = response["Instances"][0]["InstanceId"]
    tracker.record(region=request.region, kind="instance", resource_id=instance_id)
    log.info(
        "started %s %s from %s in %s",
        request.instance_type,
        instance_id,
        request.image_id,
        request.region,
    )
    return instance_id


def describe_instance(ec2: EC2Client, *, region: str, instance_id: str) -> dict[str, Any] | None:
    """The instance's DescribeInstances entry; None if EC2 does not know it (yet, or any more)."""
    try:
        with aws_call("DescribeInstances", region, instance_id):
            reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    except AWSError as exc:
        if exc.code == "InvalidInstanceID.NotFound":
            return None
        raise
    for reservation in reservations:
        for instance in reservation["Instances"]:
            if instance["InstanceId"] == instance_id:
                return dict(instance)
    return None


def wait_instance(
    ec2: EC2Client,
    *,
    region: str,
    instance_id: str,
    state: InstanceState,
    timeout: float,
    delay: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Wait until the instance is in ``state``; its description.

    Raises :class:`AWSError` (code ``Timeout``) after ``timeout`` seconds, or at once (code
    ``UnexpectedState``) when the instance reaches a state it cannot leave for ``state``.
    """
    deadline = clock() + timeout
    current = "unknown"
    while True:
        instance = describe_instance(ec2, region=region, instance_id=instance_id)
        if instance is None:
            # Just launched: not visible yet. Long gone: as terminated as it gets.
            if state == "terminated":
                return {"InstanceId": instance_id, "State": {"Name": "terminated"}}
        else:
            current = instance["State"]["Name"]
            if current == state:
                return instance
            if current in _DEAD_ENDS[state]:
                reason = instance.get("StateReason", {}).get("Message", "")
                raise AWSError(
                    operation="DescribeInstances",
                    region=region,
                    resource_ids=[instance_id],
                    code="UnexpectedState",
                    detail=f"instance is {current}, not {state}"
                    + (f" ({reason})" if reason else ""),
                )
        remaining = deadline - clock()
        if remaining <= 0:
            raise AWSError(
                operation="DescribeInstances",
                region=region,
                resource_ids=[instance_id],
                code="Timeout",
                detail=f"instance still {current} after {timeout:.0f}s (waiting for {state})",
            )
        sleep(min(delay, remaining))


def stop_instance(
    ec2: EC2Client,
    *,
    region: str,
    instance_id: str,
    timeout: float,
    delay: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """StopInstances, then wait until stopped (bounded by ``timeout``)."""
    with aws_call("StopInstances", region, instance_id):
        ec2.stop_instances(InstanceIds=[instance_id])
    wait_instance(
        ec2,
        region=region,
        instance_id=instance_id,
        state="stopped",
        timeout=timeout,
        delay=delay,
        sleep=sleep,
    )


def terminate_instance(
    ec2: EC2Client,
    *,
    region: str,
    instance_id: str,
    tracker: Tracker,
    timeout: float,
    delay: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """TerminateInstances, wait until terminated, release it from ``tracker``. Idempotent."""
    try:
        with aws_call("TerminateInstances", region, instance_id):
            ec2.terminate_instances(InstanceIds=[instance_id])
    except AWSError as exc:
        if exc.code != "InvalidInstanceID.NotFound":
            raise
    wait_instance(
        ec2,
        region=region,
        instance_id=instance_id,
        state="terminated",
        timeout=timeout,
        delay=delay,
        sleep=sleep,
    )
    tracker.release(instance_id)
    log.info("terminated %s in %s", instance_id, region)


def discard_instance(
    ec2: EC2Client,
    *,
    region: str,
    instance_id: str,
    tracker: Tracker,
    timeout: float,
    label: str,
    delay: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
) -> list[str]:
    """:func:`terminate_instance` for cleanups: never raises; ``[instance_id]`` if it is left."""
    try:
        terminate_instance(
            ec2,
            region=region,
            instance_id=instance_id,
            tracker=tracker,
            timeout=timeout,
            delay=delay,
            sleep=sleep,
        )
    except EC2ServiceException as exc:
        log.error("could not terminate %s %s: %s", label, instance_id, exc)
        return [instance_id]
    return []


def open_instance_ssh(
    *,
    ec2: EC2Client,
    region: str,
    instance: dict[str, Any],
    access: Access,
    username: str,
    settings: AwsSettings,
    seam: InstanceSeam,
    label: str,
    delay: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> SshSession:
    """Log in to a running instance, verifying its host key by ``settings.host_key_policy``.

    Bounded by ``console_timeout`` (host keys on the console) and ``ssh_timeout`` (SSH answers).
    """
    instance_id = instance["InstanceId"]
    host_keys = None
    if settings.host_key_policy == "console":
        host_keys = wait_console_host_keys(
            seam=seam,
            ec2=ec2,
            region=region,
            instance_id=instance_id,
            timeout=settings.console_timeout,
            delay=max(delay, 1.0),
            sleep=sleep,
            clock=clock,
        )
    address = seam.address(instance)
    log.info("connecting to %s (%s) as %s", label, address, username)
    return connect(
        address=address,
        options=SshOptions(
            username=username,
            pkey=access.pkey,
            host_keys=host_keys,
            connect_timeout=settings.ssh_connect_timeout,
            proxy_jump=settings.ssh_proxy_jump,
        ),
        timeout=settings.ssh_timeout,
        label=label,
        retry_delay=delay,
        sleep=sleep,
        clock=clock,
    )


__all__ = [
    "LaunchRequest",
    "client_token",
    "describe_instance",
    "discard_instance",
    "launch_instance",
    "open_instance_ssh",
    "stop_instance",
    "terminate_instance",
    "wait_instance",
]

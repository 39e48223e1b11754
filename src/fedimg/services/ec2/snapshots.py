"""Snapshot state shared by the stages that make snapshots (direct upload, utility instance,
cross-region copies): the bounded wait until one is ``completed``."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from fedimg.services.ec2.errors import AWSError, aws_call

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client


def wait_snapshot_completed(
    ec2: EC2Client,
    *,
    region: str,
    snapshot_id: str,
    timeout: float,
    delay: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Wait until the snapshot is ``completed``; stop at once on ``error``; bounded by ``timeout``."""
    deadline = clock() + timeout
    while True:
        with aws_call("DescribeSnapshots", region, snapshot_id):
            snapshots = ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"]
        state = snapshots[0]["State"] if snapshots else "missing"
        if state == "completed":
            return
        if state in ("error", "missing"):
            raise AWSError(
                operation="DescribeSnapshots",
                region=region,
                resource_ids=[snapshot_id],
                code=f"Snapshot{state.capitalize()}",
                detail=f"snapshot is {state}",
            )
        if clock() >= deadline:
            raise AWSError(
                operation="DescribeSnapshots",
                region=region,
                resource_ids=[snapshot_id],
                code="Timeout",
                detail=f"snapshot still {state} after {timeout:.0f}s",
            )
        sleep(delay)


__all__ = ["wait_snapshot_completed"]

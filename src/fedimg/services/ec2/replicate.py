"""Replication and publicity: one snapshot copy per region, every flavour registered from it.

fedimg 2.x copied every AMI separately (flavours × regions data copies). Here the base snapshot is
copied once to each region, and each region's flavours are registered from that copy, so data
crosses regions ``regions - 1`` times whatever the number of flavours.

CopySnapshot has no ClientToken: a copy is found by its tags (image checksum, role, source
snapshot) before a new one is made, so a re-run never copies twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from fedimg.errors import Interrupted
from fedimg.services.ec2.errors import AWSError, aws_call
from fedimg.services.ec2.resources import TAG_ROLE, TAG_SHA256, tag_specification
from fedimg.services.ec2.snapshots import wait_snapshot_completed

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

log = logging.getLogger(__name__)

TAG_SOURCE_SNAPSHOT = "fedimg:source-snapshot"
T = TypeVar("T")


@dataclass(frozen=True)
class CopyRequest:
    """Copy ``snapshot_id`` from ``source_region`` to ``region``."""

    source_region: str
    snapshot_id: str
    region: str
    image_sha256: str
    description: str
    tags: dict[str, str]
    encrypted: bool = False
    kms_key_id: str | None = None
    wait_seconds: float = 3600.0

    @property
    def role(self) -> str:
        """The ``fedimg:role`` tag of the copy (plain and encrypted copies are told apart)."""
        return "encrypted-copy" if self.encrypted else "copy"


def find_copy(
    ec2: EC2Client, *, region: str, source_snapshot_id: str, role: str = "copy"
) -> str | None:
    """The id of an existing copy (of ``role``) of ``source_snapshot_id`` in ``region``, or None."""
    with aws_call("DescribeSnapshots", region, source_snapshot_id):
        snapshots = ec2.describe_snapshots(
            OwnerIds=["self"],
            Filters=[
                {"Name": f"tag:{TAG_SOURCE_SNAPSHOT}", "Values": [source_snapshot_id]},
                {"Name": f"tag:{TAG_ROLE}", "Values": [role]},
            ],
        )["Snapshots"]
    live = [s for s in snapshots if s.get("State") != "error"]
    return live[0]["SnapshotId"] if live else None


def copy_snapshot(
    *,
    request: CopyRequest,
    ec2: EC2Client,
    on_created: Callable[[str], None] = lambda _sid: None,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[str, bool]:
    """Copy the snapshot into ``request.region`` (or find the copy made before) and wait for it.

    Returns (snapshot id, copied now). ``on_created`` is called with a new copy's id at once.
    """
    existing = find_copy(
        ec2, region=request.region, source_snapshot_id=request.snapshot_id, role=request.role
    )
    if existing is not None:
        log.info("reusing snapshot copy %s in %s", existing, request.region)
        snapshot_id, copied = existing, False
    else:
        tags = {
            **request.tags,
            TAG_SHA256: request.image_sha256,
            TAG_ROLE: request.role,
            TAG_SOURCE_SNAPSHOT: request.snapshot_id,
        }
        params: dict[str, object] = {
            "SourceRegion": request.source_region,
            "SourceSnapshotId": request.snapshot_id,
            "Description": request.description,
            "TagSpecifications": tag_specification("snapshot", tags),
        }
        if request.encrypted:
            params["Encrypted"] = True
            if request.kms_key_id:
                params["KmsKeyId"] = request.kms_key_id
        with aws_call("CopySnapshot", request.region, request.snapshot_id):
            snapshot_id = ec2.copy_snapshot(**params)["SnapshotId"]  # type: ignore[arg-type]
        on_created(snapshot_id)
        copied = True
        log.info("copying %s to %s as %s", request.snapshot_id, request.region, snapshot_id)
    wait_snapshot_completed(
        ec2,
        region=request.region,
        snapshot_id=snapshot_id,
        timeout=request.wait_seconds,
        sleep=sleep,
    )
    return snapshot_id, copied


def make_public(ec2: EC2Client, *, region: str, ami_id: str, snapshot_id: str | None) -> None:
    """Launch permission for everyone on the AMI, create-volume permission on its snapshot
    (instance-store AMIs have none)."""
    with aws_call("ModifyImageAttribute", region, ami_id):
        ec2.modify_image_attribute(ImageId=ami_id, LaunchPermission={"Add": [{"Group": "all"}]})
    if snapshot_id is None:
        return
    with aws_call("ModifySnapshotAttribute", region, snapshot_id):
        ec2.modify_snapshot_attribute(
            SnapshotId=snapshot_id,
            Attribute="createVolumePermission",
            OperationType="add",
            GroupNames=["all"],
        )


def share(
    ec2: EC2Client, *, region: str, ami_id: str, snapshot_id: str, accounts: list[str]
) -> None:
    """Share an AMI and its snapshot with ``accounts`` only (encrypted AMIs can't be public)."""
    if not accounts:
        return
    with aws_call("ModifyImageAttribute", region, ami_id):
        ec2.modify_image_attribute(
            ImageId=ami_id, LaunchPermission={"Add": [{"UserId": a} for a in accounts]}
        )
    with aws_call("ModifySnapshotAttribute", region, snapshot_id):
        ec2.modify_snapshot_attribute(
            SnapshotId=snapshot_id,
            Attribute="createVolumePermission",
            OperationType="add",
            UserIds=accounts,
        )


@dataclass(frozen=True)
class RegionOutcome(Generic[T]):
    """What happened in one region: a value, or the error that stopped it."""

    region: str
    value: T | None
    error: BaseException | None

    @property
    def ok(self) -> bool:
        """True when the region succeeded."""
        return self.error is None


def fan_out(
    regions: list[str],
    work: Callable[[str], T],
    *,
    parallelism: int,
    stop: threading.Event | None = None,
) -> list[RegionOutcome[T]]:
    """Run ``work(region)`` for every region on a bounded pool; one outcome per region, in order.

    Never raises: each region's exception is kept in its outcome (the caller decides which
    failures fail the job). Once ``stop`` is set, regions not yet started are not started (their
    outcome says so).
    """

    def guarded(region: str) -> RegionOutcome[T]:
        if stop is not None and stop.is_set():
            return RegionOutcome(region=region, value=None, error=Interrupted("not started"))
        try:
            return RegionOutcome(region=region, value=work(region), error=None)
        except Exception as exc:
            log.error("%s: %s", region, exc)
            return RegionOutcome(region=region, value=None, error=exc)

    if not regions:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(parallelism, len(regions)))) as pool:
        return list(pool.map(guarded, regions))


def failed_regions_error(
    outcomes: list[RegionOutcome[T]], *, best_effort: set[str]
) -> AWSError | None:
    """One error naming every required region that failed, or None."""
    failed = [o for o in outcomes if not o.ok and o.region not in best_effort]
    if not failed:
        return None
    details = "; ".join(f"{o.region}: {o.error}" for o in failed)
    return AWSError(
        operation="Replicate",
        region=",".join(o.region for o in failed),
        code="RegionsFailed",
        detail=f"{len(failed)} region(s) failed: {details}",
    )

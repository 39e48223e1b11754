"""The resource ledger: every temporary AWS resource a job creates, so that none is ever leaked.

A stage records a resource the moment its create call returns (before anything else can fail), and
releases it when it is deleted or becomes a kept result (a registered AMI's snapshot). On failure,
:meth:`ResourceLedger.cleanup` deletes what is still active, newest first. The ledger lives in the
catalog, so a later process (``fedimg gc``, ``fedimg resume``) sees what a killed one left.

Tags: every resource fedimg creates carries ``fedimg:job``, ``fedimg:image-sha256`` and
``fedimg:role``, so that ``fedimg gc`` can find orphans the ledger lost.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from fedimg.aws import ClientFactory
from fedimg.catalog import Catalog
from fedimg.services.ec2.errors import error_code

if TYPE_CHECKING:
    from mypy_boto3_ec2.type_defs import TagTypeDef

log = logging.getLogger(__name__)

ResourceKind = Literal[
    "snapshot",
    "volume",
    "instance",
    "key-pair",
    "security-group",
    "image",
    "s3-object",
]

#: Resources that exist only while a job runs; snapshots, AMIs and bundle objects are its products.
TEMPORARY_KINDS: frozenset[str] = frozenset({"instance", "volume", "key-pair", "security-group"})

TAG_JOB = "fedimg:job"
TAG_SHA256 = "fedimg:image-sha256"
TAG_ROLE = "fedimg:role"
TAG_FLAVOUR = "fedimg:flavour"
TAG_COMPOSE = "fedimg:compose"

#: Error codes meaning "already gone": deleting twice is success.
_GONE = {
    "InvalidSnapshot.NotFound",
    "InvalidVolume.NotFound",
    "InvalidInstanceID.NotFound",
    "InvalidKeyPair.NotFound",
    "InvalidGroup.NotFound",
    "InvalidAMIID.NotFound",
    "InvalidAMIID.Unavailable",
    "NoSuchKey",
    "NoSuchBucket",
    "ResourceNotFoundException",
}


def tag_list(tags: dict[str, str]) -> list[TagTypeDef]:
    """``{"k": "v"}`` → ``[{"Key": "k", "Value": "v"}]`` (AWS's tag shape)."""
    return [{"Key": key, "Value": value} for key, value in tags.items()]


def tag_specification(resource_type: str, tags: dict[str, str]) -> list[dict[str, Any]]:
    """A ``TagSpecifications`` value tagging the resource at creation."""
    return [{"ResourceType": resource_type, "Tags": tag_list(tags)}]


class Tracker(Protocol):
    """What a stage needs of the ledger: record a resource that now exists, release it when gone.

    :class:`ResourceLedger` is one; stages that run without a job use :class:`LocalTracker`.
    """

    def record(self, *, region: str, kind: ResourceKind, resource_id: str) -> None:
        """Track a resource that now exists."""

    def release(self, resource_id: str, *, state: str = "deleted") -> None:
        """Stop tracking a resource."""


class LocalTracker:
    """An in-memory :class:`Tracker` (no catalog): for stages run outside a job."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.active: dict[str, tuple[str, ResourceKind]] = {}

    def record(self, *, region: str, kind: ResourceKind, resource_id: str) -> None:
        """Track a resource that now exists."""
        with self._lock:
            self.active[resource_id] = (region, kind)

    def release(self, resource_id: str, *, state: str = "deleted") -> None:
        """Stop tracking a resource."""
        with self._lock:
            self.active.pop(resource_id, None)


@dataclass(frozen=True)
class LedgerEntry:
    """A resource the ledger tracks."""

    region: str
    kind: ResourceKind
    resource_id: str


class ResourceLedger:
    """Temporary resources of one job; thread-safe; persisted in the catalog."""

    def __init__(self, *, catalog: Catalog, job_id: str, clients: ClientFactory) -> None:
        self.catalog = catalog
        self.job_id = job_id
        self.clients = clients
        self._lock = threading.Lock()
        self._active: list[LedgerEntry] = []

    def record(self, *, region: str, kind: ResourceKind, resource_id: str) -> None:
        """Track a resource that now exists."""
        entry = LedgerEntry(region=region, kind=kind, resource_id=resource_id)
        with self._lock:
            if entry in self._active:
                return
            self._active.append(entry)
        self.catalog.record_resource(
            job_id=self.job_id, region=region, kind=kind, resource_id=resource_id
        )

    def release(self, resource_id: str, *, state: str = "deleted") -> None:
        """Stop tracking a resource: deleted, or ``kept`` as a result of the job."""
        with self._lock:
            self._active = [e for e in self._active if e.resource_id != resource_id]
        self.catalog.release_resource(resource_id=resource_id, state=state)

    def adopt_previous(self) -> list[str]:
        """Take over the ledger entries an earlier process of this job left active.

        Temporary resources among them (instances, volumes, key pairs, security groups) and
        snapshots that never completed are deleted; the rest (products) are tracked again.
        Returns the ids that could not be deleted.
        """
        leftovers: list[LedgerEntry] = []
        for record in reversed(self.catalog.active_resources(self.job_id)):
            entry = LedgerEntry(
                region=record.region,
                kind=record.kind,  # type: ignore[arg-type]  # written from ResourceKind
                resource_id=record.resource_id,
            )
            with self._lock:
                if entry not in self._active:
                    self._active.append(entry)
            if entry.kind in TEMPORARY_KINDS or (
                entry.kind == "snapshot"
                and not snapshot_completed(self.clients, entry.region, entry.resource_id)
            ):
                leftovers.append(entry)
        leftovers.sort(key=lambda e: e.kind != "instance")
        failed: list[str] = []
        for entry in leftovers:
            try:
                delete_resource(self.clients, entry)
            except (ClientError, BotoCoreError) as exc:
                if error_code(exc) not in _GONE:
                    failed.append(entry.resource_id)
                    continue
            log.info("removed %s %s left by an earlier run", entry.kind, entry.resource_id)
            self.release(entry.resource_id)
        return failed

    @property
    def active(self) -> list[LedgerEntry]:
        """Resources still tracked, oldest first."""
        with self._lock:
            return list(self._active)

    def cleanup(self, kinds: frozenset[str] | None = None) -> list[str]:
        """Delete every tracked resource (of ``kinds``, or all), newest first; returns the ids
        that could not be deleted.

        Never raises: a failure to delete one resource is logged and the rest are still tried.
        """
        failed: list[str] = []
        newest_first = [e for e in reversed(self.active) if kinds is None or e.kind in kinds]
        # Instances go first: their volumes, security groups and key pairs cannot go before them.
        ordered = [e for e in newest_first if e.kind == "instance"] + [
            e for e in newest_first if e.kind != "instance"
        ]
        for entry in ordered:
            try:
                delete_resource(self.clients, entry)
            except (ClientError, BotoCoreError) as exc:
                if error_code(exc) in _GONE:
                    self.release(entry.resource_id)
                    continue
                log.error(
                    "could not delete %s %s in %s: %s",
                    entry.kind,
                    entry.resource_id,
                    entry.region,
                    exc,
                )
                failed.append(entry.resource_id)
                continue
            log.info("deleted %s %s in %s", entry.kind, entry.resource_id, entry.region)
            self.release(entry.resource_id)
        return failed


def delete_resource(clients: ClientFactory, entry: LedgerEntry) -> None:
    """Delete one resource (waiting for an instance to terminate before its dependants go)."""
    ec2 = clients.ec2(entry.region)
    deleters: dict[str, Callable[[], Any]] = {
        "snapshot": lambda: ec2.delete_snapshot(SnapshotId=entry.resource_id),
        "volume": lambda: ec2.delete_volume(VolumeId=entry.resource_id),
        "instance": lambda: _terminate(clients, entry),
        "key-pair": lambda: ec2.delete_key_pair(KeyPairId=entry.resource_id),
        "security-group": lambda: ec2.delete_security_group(GroupId=entry.resource_id),
        "image": lambda: ec2.deregister_image(ImageId=entry.resource_id),
        "s3-object": lambda: _delete_object(clients, entry),
    }
    deleters[entry.kind]()


def snapshot_completed(clients: ClientFactory, region: str, snapshot_id: str) -> bool:
    """True if the snapshot exists and is complete (False too if AWS cannot say)."""
    try:
        found = clients.ec2(region).describe_snapshots(SnapshotIds=[snapshot_id])
    except (ClientError, BotoCoreError):
        return False
    snapshots = found.get("Snapshots", [])
    return bool(snapshots) and snapshots[0].get("State") == "completed"


def _terminate(clients: ClientFactory, entry: LedgerEntry) -> None:
    ec2 = clients.ec2(entry.region)
    ec2.terminate_instances(InstanceIds=[entry.resource_id])
    ec2.get_waiter("instance_terminated").wait(
        InstanceIds=[entry.resource_id], WaiterConfig={"Delay": 5, "MaxAttempts": 120}
    )


def _delete_object(clients: ClientFactory, entry: LedgerEntry) -> None:
    bucket, _, key = entry.resource_id.partition("/")
    clients.s3(entry.region).delete_object(Bucket=bucket, Key=key)

"""``fedimg gc``: find and remove what killed processes left behind, in every region.

An orphan is a fedimg-tagged resource (``fedimg:job``) older than the threshold whose job is not
live (a ``running`` job touched recently is live), of these kinds:

- instances (not terminated), volumes, key pairs and security groups: temporary by nature;
- snapshots that no AMI uses, unless their job can still be resumed (they are its work).

AMIs are never collected: they are products (``fedimg resume`` or a human decides their fate).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from fedimg.aws import ClientFactory
from fedimg.catalog import Catalog
from fedimg.services.ec2.errors import aws_call, error_code
from fedimg.services.ec2.replicate import fan_out
from fedimg.services.ec2.resources import TAG_JOB, LedgerEntry, ResourceKind, delete_resource

if TYPE_CHECKING:
    from mypy_boto3_ec2.type_defs import FilterTypeDef

log = logging.getLogger(__name__)

LIVE_WINDOW = dt.timedelta(minutes=10)


@dataclass(frozen=True)
class Orphan:
    """A resource ``fedimg gc`` would remove, and why."""

    region: str
    kind: ResourceKind
    resource_id: str
    job_id: str | None
    age_seconds: int
    reason: str


def _tags(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def _age(created: Any, now: dt.datetime) -> int:
    if not isinstance(created, dt.datetime):
        return 0
    if created.tzinfo is None:
        created = created.replace(tzinfo=dt.UTC)
    return max(0, int((now - created).total_seconds()))


@dataclass(frozen=True)
class JobView:
    """What gc needs to know of the catalog's jobs."""

    live: frozenset[str]
    resumable: frozenset[str]


def job_view(catalog: Catalog, now: dt.datetime) -> JobView:
    """Live jobs (running and recently updated) and resumable ones."""
    live: set[str] = set()
    resumable: set[str] = set()
    for job in catalog.jobs(limit=10_000):
        updated = job.updated_at if job.updated_at.tzinfo else job.updated_at.replace(tzinfo=dt.UTC)
        if job.status == "running" and now - updated < LIVE_WINDOW:
            live.add(job.id)
        if job.status in ("interrupted", "running") or (
            job.status in ("failed", "partial") and job.state.get("resumable")
        ):
            resumable.add(job.id)
    return JobView(live=frozenset(live), resumable=frozenset(resumable))


def find_in_region(
    *,
    clients: ClientFactory,
    region: str,
    jobs: JobView,
    older_than: dt.timedelta,
    now: dt.datetime,
) -> list[Orphan]:
    """The orphans of one region."""
    ec2 = clients.ec2(region)
    found: list[Orphan] = []
    threshold = int(older_than.total_seconds())

    def consider(
        kind: ResourceKind, resource_id: str, tags: dict[str, str], created: Any, reason: str
    ) -> None:
        job = tags.get(TAG_JOB)
        if job is None or job in jobs.live:
            return
        age = _age(created, now)
        if age >= threshold:
            found.append(Orphan(region, kind, resource_id, job, age, reason))

    tag_filter: list[FilterTypeDef] = [{"Name": "tag-key", "Values": [TAG_JOB]}]
    with aws_call("DescribeInstances", region):
        reservations = ec2.describe_instances(Filters=tag_filter)["Reservations"]
    for reservation in reservations:
        for instance in reservation["Instances"]:
            if instance["State"]["Name"] in ("terminated", "shutting-down"):
                continue
            consider(
                "instance",
                instance["InstanceId"],
                _tags(dict(instance)),
                instance.get("LaunchTime"),
                "temporary instance",
            )
    with aws_call("DescribeVolumes", region):
        volumes = ec2.describe_volumes(Filters=tag_filter)["Volumes"]
    for volume in volumes:
        consider(
            "volume",
            volume["VolumeId"],
            _tags(dict(volume)),
            volume.get("CreateTime"),
            "temporary volume",
        )
    with aws_call("DescribeKeyPairs", region):
        pairs = ec2.describe_key_pairs()["KeyPairs"]
    for pair in pairs:
        consider(
            "key-pair",
            pair.get("KeyPairId", ""),
            _tags(dict(pair)),
            pair.get("CreateTime"),
            "temporary key pair",
        )
    with aws_call("DescribeSecurityGroups", region):
        groups = ec2.describe_security_groups()["SecurityGroups"]
    for group in groups:
        consider(
            "security-group", group["GroupId"], _tags(dict(group)), now, "temporary security group"
        )
    with aws_call("DescribeImages", region):
        images = ec2.describe_images(Owners=["self"])["Images"]
    used = {
        m["Ebs"]["SnapshotId"]
        for image in images
        for m in image.get("BlockDeviceMappings", [])
        if "Ebs" in m and "SnapshotId" in m["Ebs"]
    }
    with aws_call("DescribeSnapshots", region):
        snapshots = ec2.describe_snapshots(OwnerIds=["self"], Filters=tag_filter)["Snapshots"]
    for snapshot in snapshots:
        tags = _tags(dict(snapshot))
        if snapshot["SnapshotId"] in used:
            continue
        if tags.get(TAG_JOB) in jobs.resumable and snapshot.get("State") == "completed":
            continue
        consider(
            "snapshot",
            snapshot["SnapshotId"],
            tags,
            snapshot.get("StartTime"),
            f"{snapshot.get('State', '?')} snapshot used by no AMI",
        )
    return found


def find_orphans(
    *,
    clients: ClientFactory,
    catalog: Catalog,
    regions: list[str],
    older_than: dt.timedelta,
    parallelism: int = 8,
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> list[Orphan]:
    """Orphans in every region, sorted by region then kind."""
    moment = now()
    jobs = job_view(catalog, moment)
    outcomes = fan_out(
        regions,
        lambda region: find_in_region(
            clients=clients, region=region, jobs=jobs, older_than=older_than, now=moment
        ),
        parallelism=parallelism,
    )
    orphans: list[Orphan] = []
    for outcome in outcomes:
        if outcome.error is not None:
            raise outcome.error
        orphans.extend(outcome.value or [])
    order = {"instance": 0, "volume": 1, "key-pair": 2, "security-group": 3, "snapshot": 4}
    return sorted(orphans, key=lambda o: (o.region, order.get(o.kind, 9), o.resource_id))


def sweep(*, clients: ClientFactory, catalog: Catalog, orphans: list[Orphan]) -> list[str]:
    """Delete the orphans (instances first); returns the ids that could not be deleted."""
    failed: list[str] = []
    for orphan in orphans:
        entry = LedgerEntry(region=orphan.region, kind=orphan.kind, resource_id=orphan.resource_id)
        try:
            delete_resource(clients, entry)
        except (ClientError, BotoCoreError) as exc:
            if (error_code(exc) or "").endswith("NotFound"):
                catalog.release_resource(resource_id=orphan.resource_id)
                continue
            log.error("gc: could not delete %s %s: %s", orphan.kind, orphan.resource_id, exc)
            failed.append(orphan.resource_id)
            continue
        catalog.release_resource(resource_id=orphan.resource_id)
        log.info("gc: deleted %s %s in %s", orphan.kind, orphan.resource_id, orphan.region)
    return failed

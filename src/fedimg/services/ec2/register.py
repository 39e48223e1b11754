"""Register the flavours of an image in one region from a snapshot, idempotently.

RegisterImage has no ClientToken, so idempotency comes from lookups: an AMI tagged with this
image's checksum and this flavour is reused; otherwise the lowest free name index is taken
(``<image>-<virt>-<region>-<voltype>-<n>``), so a name taken by another image is never clobbered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedimg.services.ec2.errors import AWSError, aws_call
from fedimg.services.ec2.flavours import AmiAttributes, Flavour, register_image_params
from fedimg.services.ec2.resources import TAG_FLAVOUR, TAG_ROLE, TAG_SHA256

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

log = logging.getLogger(__name__)

MAX_NAME_INDEX = 100


@dataclass(frozen=True)
class RegisterRequest:
    """Register ``flavours`` in ``region``: EBS rows from ``snapshots[storage]`` (``ebs`` or
    ``ebs-encrypted``), instance-store rows from the bundle manifest at ``image_location``."""

    region: str
    snapshots: dict[str, str]
    flavours: tuple[Flavour, ...]
    image_name: str
    image_sha256: str
    arch: str
    volume_size_gib: int
    kernel_id: str | None
    description: str
    tags: dict[str, str]
    attributes: Callable[[Flavour], AmiAttributes]
    image_location: str | None = None


@dataclass(frozen=True)
class RegisteredAmi:
    """An AMI that exists in ``region`` for ``flavour``; ``reused`` if it existed before.

    ``snapshot_id`` is the root snapshot of EBS rows ("" for instance-store rows, whose image
    lives at ``image_location``).
    """

    region: str
    ami_id: str
    name: str
    flavour: Flavour
    snapshot_id: str
    reused: bool = False
    image_location: str | None = None


def find_registered(
    ec2: EC2Client, *, region: str, image_sha256: str, flavour: Flavour
) -> tuple[str, str, str | None] | None:
    """(ami id, name, root snapshot id) of this image's AMI for ``flavour`` in ``region``.

    None if there is none.

    Raises :class:`AWSError` if there are several (the region needs a human look).
    """
    with aws_call("DescribeImages", region):
        images = ec2.describe_images(
            Owners=["self"],
            Filters=[
                {"Name": f"tag:{TAG_SHA256}", "Values": [image_sha256]},
                {"Name": f"tag:{TAG_FLAVOUR}", "Values": [flavour.name]},
            ],
        )["Images"]
    images = [i for i in images if i.get("State") not in ("deregistered", "failed")]
    if not images:
        return None
    if len(images) > 1:
        ids = sorted(i["ImageId"] for i in images)
        raise AWSError(
            operation="DescribeImages",
            region=region,
            resource_ids=ids,
            code="AmbiguousImages",
            detail=f"{len(ids)} AMIs for flavour {flavour.name} of this image",
        )
    image = images[0]
    root = image.get("RootDeviceName")
    snapshot = next(
        (
            m["Ebs"].get("SnapshotId")
            for m in image.get("BlockDeviceMappings", [])
            if m.get("DeviceName") == root and "Ebs" in m
        ),
        None,
    )
    return image["ImageId"], image.get("Name", ""), snapshot


def free_name(ec2: EC2Client, *, region: str, flavour: Flavour, image_name: str) -> str:
    """The first ``...-<n>`` name not yet used in ``region``."""
    prefix = flavour.ami_name(image_name=image_name, region=region, index=0)[:-1]
    with aws_call("DescribeImages", region):
        taken = {
            i.get("Name", "")
            for i in ec2.describe_images(
                Owners=["self"], Filters=[{"Name": "name", "Values": [prefix + "*"]}]
            )["Images"]
        }
    for index in range(MAX_NAME_INDEX):
        name = f"{prefix}{index}"
        if name not in taken:
            return name
    raise AWSError(
        operation="DescribeImages",
        region=region,
        code="NoFreeName",
        detail=f"names {prefix}0..{MAX_NAME_INDEX - 1} are all taken",
    )


def register_flavours(
    *,
    request: RegisterRequest,
    ec2: EC2Client,
    on_registered: Callable[[RegisteredAmi], None] = lambda _ami: None,
) -> list[RegisteredAmi]:
    """Register every EBS flavour of ``request`` (reusing this image's existing AMIs).

    ``on_registered`` is called as soon as each AMI exists (the ledger records it there).
    """
    registered: list[RegisteredAmi] = []
    for flavour in request.flavours:
        if flavour.is_ebs and flavour.storage not in request.snapshots:
            continue
        if not flavour.is_ebs and request.image_location is None:
            continue
        found = find_registered(
            ec2, region=request.region, image_sha256=request.image_sha256, flavour=flavour
        )
        if found is not None:
            ami = RegisteredAmi(
                region=request.region,
                ami_id=found[0],
                name=found[1],
                flavour=flavour,
                snapshot_id=found[2] or request.snapshots.get(flavour.storage, ""),
                reused=True,
                image_location=None if flavour.is_ebs else request.image_location,
            )
            log.info("reusing %s (%s) in %s", ami.ami_id, ami.name, request.region)
        else:
            ami = _register_one(ec2, request, flavour)
        on_registered(ami)
        registered.append(ami)
    return registered


def _register_one(ec2: EC2Client, request: RegisterRequest, flavour: Flavour) -> RegisteredAmi:
    name = free_name(ec2, region=request.region, flavour=flavour, image_name=request.image_name)
    tags = {
        **request.tags,
        "Name": name,
        TAG_SHA256: request.image_sha256,
        TAG_FLAVOUR: flavour.name,
        TAG_ROLE: "ami",
    }
    snapshot_id = request.snapshots.get(flavour.storage) if flavour.is_ebs else None
    params: dict[str, Any] = register_image_params(
        flavour=flavour,
        name=name,
        description=request.description,
        arch=request.arch,
        volume_size_gib=request.volume_size_gib,
        kernel_id=request.kernel_id,
        tags=tags,
        attributes=request.attributes(flavour),
        snapshot_id=snapshot_id,
        image_location=None if flavour.is_ebs else request.image_location,
    )
    with aws_call("RegisterImage", request.region, snapshot_id or "", name):
        ami_id = ec2.register_image(**params)["ImageId"]
    log.info("registered %s (%s) in %s", ami_id, name, request.region)
    return RegisteredAmi(
        region=request.region,
        ami_id=ami_id,
        name=name,
        flavour=flavour,
        snapshot_id=snapshot_id or "",
        image_location=None if flavour.is_ebs else request.image_location,
    )


def wait_available(
    ec2: EC2Client, *, region: str, ami_ids: list[str], delay: int = 5, attempts: int = 360
) -> None:
    """Wait until every AMI is ``available``; raise :class:`AWSError` on ``failed`` or timeout."""
    if not ami_ids:
        return
    with aws_call("DescribeImages", region, *ami_ids):
        ec2.get_waiter("image_available").wait(
            ImageIds=ami_ids, WaiterConfig={"Delay": delay, "MaxAttempts": attempts}
        )

"""Pre-flight: per region, what would stop a job, found before anything is created.

Checked per region: the opt-in status; image block public access (it forbids public AMIs); EBS
encryption by default (it makes every copy encrypted, so nothing can be public); an AKI for
paravirtual rows; the bundle bucket for instance-store rows. APIs an endpoint does not offer are
reported as ``unknown`` rather than failing the check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedimg.aws import ClientFactory
from fedimg.config import Config
from fedimg.services.ec2.errors import AWSError, aws_call
from fedimg.services.ec2.flavours import Flavour
from fedimg.services.ec2.instance_store import bucket_for
from fedimg.services.ec2.replicate import fan_out

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client


@dataclass(frozen=True)
class RegionCheck:
    """One region's pre-flight facts and the problems they mean for this job."""

    region: str
    opt_in: str
    block_public_access: str
    encryption_by_default: str
    aki: str | None
    bucket: str | None
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """True when nothing stops the job in this region."""
        return not self.problems


def _optional(ec2: EC2Client, region: str, call: str) -> str:
    try:
        with aws_call(call, region):
            if call == "GetImageBlockPublicAccessState":
                return str(ec2.get_image_block_public_access_state()["ImageBlockPublicAccessState"])
            enabled = ec2.get_ebs_encryption_by_default()["EbsEncryptionByDefault"]
            return "enabled" if enabled else "disabled"
    except AWSError as exc:
        if exc.code in ("InvalidAction", "UnsupportedOperation", "NotImplemented"):
            return "unknown"
        raise


def check_region(
    *,
    clients: ClientFactory,
    config: Config,
    region: str,
    flavours: list[Flavour],
    arch: str,
    opt_in: dict[str, str],
) -> RegionCheck:
    """The pre-flight facts of one region."""
    ec2 = clients.ec2(region)
    problems: list[str] = []
    status = opt_in.get(region, "unknown")
    if status == "not-opted-in":
        problems.append("the account has not opted in to this region")
    public_rows = config.aws.make_public and any(not f.encrypted for f in flavours)
    block = _optional(ec2, region, "GetImageBlockPublicAccessState")
    if block == "block-new-sharing" and public_rows:
        problems.append("image block public access is on: AMIs cannot be made public")
    encryption = _optional(ec2, region, "GetEbsEncryptionByDefault")
    if encryption == "enabled" and public_rows:
        problems.append(
            "EBS encryption by default is on: copies would be encrypted and never public"
        )
    aki = config.aki_for(region, arch)
    if any(f.virtualization == "paravirtual" for f in flavours) and not aki:
        problems.append(f"no AKI in the AMI list for paravirtual {arch} rows")
    bucket: str | None = None
    if any(f.storage == "instance-store" for f in flavours) and config.aws.bundle.bucket:
        bucket = bucket_for(config.aws.bundle, region)
        s3 = clients.s3(region)
        try:
            with aws_call("HeadBucket", region, bucket):
                s3.head_bucket(Bucket=bucket)
        except AWSError:
            if not config.aws.bundle.create_bucket:
                problems.append(f"bucket {bucket} is missing and create_bucket is off")
    return RegionCheck(
        region=region,
        opt_in=status,
        block_public_access=block,
        encryption_by_default=encryption,
        aki=aki,
        bucket=bucket,
        problems=tuple(problems),
    )


def preflight(
    *,
    clients: ClientFactory,
    config: Config,
    regions: list[str],
    flavours: list[Flavour],
    arch: str,
) -> list[RegionCheck]:
    """Check every region (in parallel); one :class:`RegionCheck` per region, in order.

    Raises :class:`AWSError` only if a region cannot be checked at all.
    """
    base = regions[0]
    with aws_call("DescribeRegions", base):
        listed = clients.ec2(base).describe_regions(AllRegions=True)["Regions"]
    opt_in = {r["RegionName"]: r.get("OptInStatus", "unknown") for r in listed}
    outcomes = fan_out(
        regions,
        lambda region: check_region(
            clients=clients,
            config=config,
            region=region,
            flavours=flavours,
            arch=arch,
            opt_in=opt_in,
        ),
        parallelism=config.aws.parallel_regions,
    )
    checks: list[RegionCheck] = []
    for outcome in outcomes:
        if outcome.error is not None:
            raise outcome.error
        assert outcome.value is not None
        checks.append(outcome.value)
    return checks

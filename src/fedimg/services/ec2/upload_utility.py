"""The ``utility`` upload, the seed's way: an instance writes the image onto a blank volume.

    temporary key pair + security group (access)
    → utility instance from the first AMI-list entry (its AMI; its AKI for a paravirtual AMI)
    → blank volume in the instance's zone (CreateVolume with a ClientToken), attached as /dev/sdf
    → over SSH: curl -fL URL | xz -dc | dd onto the volume's device, found by the volume id
      (NVMe serial, or the xvd/sd name); a local image is streamed through SSH instead of curl
    → the device read back must hash to the raw SHA-256 of what was decompressed
    → stop, detach, terminate → CreateSnapshot (tagged) → wait → DeleteVolume

Every resource is tagged at creation and in the ledger the moment it exists; the ``finally``
terminates the instance before deleting the volume, the group and the key pair. Failures on the
instance raise :class:`EC2UtilityException` carrying the command's output; a checksum that does not
match the expected one is an :class:`InputError`, as in the direct upload.

The result is a :class:`~fedimg.services.ec2.upload_direct.DirectUploadResult` (a subclass), so
registration and replication take it as they take the direct upload's. ``dd`` writes every block,
so ``blocks_written`` is every block and ``blocks_zero`` is 0.

Memory: the remote command's output tail (1 MiB); a local image streams in 1 MiB chunks.
"""

from __future__ import annotations

import logging
import math
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from fedimg.config import AmiListEntry, AwsSettings, Config
from fedimg.errors import ConfigError, InputError
from fedimg.progress import NullProgress, Progress
from fedimg.services.ec2.access import (
    Access,
    AccessRequest,
    close_access,
    open_access,
    resolve_ssh_cidr,
)
from fedimg.services.ec2.errors import (
    AWSError,
    EC2ServiceException,
    EC2UtilityException,
    aws_call,
)
from fedimg.services.ec2.instances import (
    LaunchRequest,
    client_token,
    discard_instance,
    launch_instance,
    open_instance_ssh,
    stop_instance,
    terminate_instance,
    wait_instance,
)
from fedimg.services.ec2.resources import TAG_ROLE, Tracker, tag_specification
from fedimg.services.ec2.snapshots import wait_snapshot_completed
from fedimg.services.ec2.ssh import CommandResult, InstanceSeam, default_seam
from fedimg.services.ec2.upload_direct import (
    BLOCK_SIZE,
    DirectUploadResult,
    volume_size_for,
)
from fedimg.source import ImageSource, compressed_chunks, raw_size, stored_size

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

log = logging.getLogger(__name__)

#: The device name the blank volume is attached as (the seed's).
UTILITY_DEVICE = "/dev/sdf"
#: Exit status of the remote script when the volume's device never appears.
EXIT_NO_DEVICE = 90
_DECOMPRESS = {"xz": "xz -dc", "gzip": "gzip -dc", "zstd": "zstd -dc", "none": "cat"}
_RESULT_PREFIX = "FEDIMG-RESULT "
_GPT_SIGNATURE = b"EFI PART".hex()


@dataclass(frozen=True)
class UtilityUploadRequest:
    """Write ``source`` to a snapshot in ``region`` with a utility instance from ``utility_ami``.

    ``client_token`` seeds the ClientTokens of RunInstances and CreateVolume; ``name`` names the
    key pair and the security group; ``tags`` go on everything (``fedimg:role`` is set per
    resource; the snapshot keeps the one given, default ``root-snapshot``).
    """

    source: ImageSource
    region: str
    utility_ami: str
    utility_aki: str | None
    client_token: str
    name: str
    tags: dict[str, str]
    description: str
    settings: AwsSettings
    endpoint_url: str | None = None
    volume_size_gib: int | None = None
    expected_sha256: str | None = None
    expected_sha256_raw: str | None = None
    require_disk_label: bool = False
    device: str = UTILITY_DEVICE
    poll_interval: float = 5.0


@dataclass(frozen=True)
class UtilityUploadResult(DirectUploadResult):
    """The snapshot made, what the utility instance measured, and where it wrote."""

    instance_id: str = ""
    volume_id: str = ""
    device_path: str = ""
    output: str = ""


def utility_entry(config: Config, base_region: str) -> AmiListEntry:
    """The AMI-list entry the utility instance starts from: the first, in the base region.

    Raises :class:`ConfigError` without an AMI list, or when its first entry is elsewhere (the
    volume, and so the snapshot, are in the utility instance's region).
    """
    if not config.aws.amis:
        raise ConfigError(
            "[aws] upload_method = 'utility' needs an AMI list ([aws] amis): the utility "
            "instance starts from its first entry"
        )
    entry = config.aws.amis[0]
    if entry.region != base_region:
        raise ConfigError(
            f"[aws] upload_method = 'utility': the first AMI-list entry is in {entry.region}, "
            f"the base region is {base_region}; they must be the same"
        )
    return entry


def write_script(
    *,
    url: str | None,
    decompress: str,
    candidates: list[str],
    volume_id: str,
    device_wait: float,
) -> str:
    """The bash script the utility instance runs: find the device, write, read back, report.

    ``url`` None reads the compressed image from stdin. The last line of its output is
    ``FEDIMG-RESULT bytes=… compressed=… raw=… written=… label=… device=…``: the SHA-256 of the
    bytes downloaded, of the bytes decompressed, and of the device's first ``bytes`` bytes read
    back, plus the disk label bytes 510-519 in hex.
    """
    fetch = (
        "cat"
        if url is None
        else f"curl -fsSL --retry 5 --retry-delay 5 --connect-timeout 30 {shlex.quote(url)}"
    )
    paths = " ".join(shlex.quote(c) for c in candidates)
    looked = shlex.quote(", ".join(candidates))
    return f"""set -euo pipefail
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo -n"; fi
dev=""
deadline=$(( $(date +%s) + {max(1, math.ceil(device_wait))} ))
while [ -z "$dev" ]; do
  for candidate in {paths}; do
    if [ -e "$candidate" ] && [ ! -d "$candidate" ]; then dev=$candidate; break; fi
  done
  if [ -z "$dev" ]; then
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "fedimg: no device for {volume_id}; looked for "{looked} >&2
      exit {EXIT_NO_DEVICE}
    fi
    sleep 2
  fi
done
echo "fedimg: writing the image to $dev" >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkfifo "$work/compressed" "$work/raw" "$work/count"
sha256sum < "$work/compressed" > "$work/compressed.sum" 2>/dev/null &
sha256sum < "$work/raw" > "$work/raw.sum" 2>/dev/null &
wc -c < "$work/count" > "$work/count.txt" 2>/dev/null &
{fetch} | tee "$work/compressed" | {decompress} | tee "$work/raw" "$work/count" \\
  | $sudo dd of="$dev" bs=4M iflag=fullblock conv=fsync status=none
wait
if [ -b "$dev" ]; then $sudo blockdev --flushbufs "$dev"; fi
bytes=$(tr -d ' \\n' < "$work/count.txt")
written=$($sudo head -c "$bytes" "$dev" | sha256sum | cut -d' ' -f1)
label=$($sudo head -c 520 "$dev" | tail -c 10 | od -An -tx1 | tr -d ' \\n')
compressed=$(cut -d' ' -f1 < "$work/compressed.sum")
raw=$(cut -d' ' -f1 < "$work/raw.sum")
echo "{_RESULT_PREFIX}bytes=$bytes compressed=$compressed raw=$raw written=$written label=$label device=$dev"
"""


def parse_result(output: str) -> dict[str, str] | None:
    """The ``FEDIMG-RESULT`` fields of the script's output; None if it did not get that far."""
    for line in reversed(output.splitlines()):
        if line.startswith(_RESULT_PREFIX):
            fields = dict(
                item.split("=", 1) for item in line[len(_RESULT_PREFIX) :].split() if "=" in item
            )
            if {"bytes", "compressed", "raw", "written", "label"} <= fields.keys():
                return fields
            return None
    return None


def upload_utility(
    *,
    request: UtilityUploadRequest,
    ec2: EC2Client,
    tracker: Tracker,
    seam: InstanceSeam | None = None,
    progress: Progress | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> UtilityUploadResult:
    """Write ``request.source`` into a new snapshot with a utility instance (see the module doc).

    Raises :class:`EC2UtilityException` (with the command's output) when the instance cannot
    write the image, :class:`InputError` for a checksum mismatch or a file that is not a disk
    image, :class:`AWSError` for AWS failures and timeouts, :class:`SSHError` when SSH fails. On
    any failure every resource it made is removed (the ledger keeps what could not be).
    """
    progress = progress or NullProgress()
    settings = request.settings
    seam = seam or default_seam(settings)
    started = time.monotonic()
    source = request.source
    region = request.region
    volume_gib = _volume_size(request)
    kernel_id = _utility_kernel(ec2, request)
    cidr = resolve_ssh_cidr(
        settings.ssh_cidr,
        target=settings.target,
        endpoint_url=request.endpoint_url,
        proxy_jump=settings.ssh_proxy_jump,
    )
    tags = {k: v for k, v in request.tags.items() if k != TAG_ROLE}
    snapshot_tags = {**tags, TAG_ROLE: request.tags.get(TAG_ROLE, "root-snapshot")}
    access: Access | None = None
    instance_id: str | None = None
    volume_id: str | None = None
    snapshot_id: str | None = None
    failed = True
    progress.begin(f"utility upload {source.name}", stored_size(source) if source.path else None)
    try:
        access = open_access(
            request=AccessRequest(
                region=region,
                name=request.name,
                tags=tags,
                ssh_cidr=cidr,
                ssh_port=settings.ssh_port,
                keyname=settings.keyname,
                keypath=settings.keypath,
            ),
            ec2=ec2,
            tracker=tracker,
        )
        instance_id = launch_instance(
            request=LaunchRequest(
                region=region,
                image_id=request.utility_ami,
                instance_type=settings.util_instance_type,
                access=access,
                client_token=client_token(request.client_token, "utility-instance"),
                tags={
                    **tags,
                    TAG_ROLE: "utility-instance",
                    "Name": f"fedimg utility: {source.name}",
                },
                kernel_id=kernel_id,
                iam_profile=settings.iam_profile,
            ),
            ec2=ec2,
            tracker=tracker,
        )
        instance = wait_instance(
            ec2,
            region=region,
            instance_id=instance_id,
            state="running",
            timeout=settings.instance_running_timeout,
            delay=request.poll_interval,
            sleep=sleep,
        )
        zone = instance["Placement"]["AvailabilityZone"]
        volume_id = _create_volume(
            ec2=ec2, request=request, zone=zone, size_gib=volume_gib, tags=tags, tracker=tracker
        )
        _attach(ec2=ec2, request=request, volume_id=volume_id, instance_id=instance_id, sleep=sleep)
        with open_instance_ssh(
            ec2=ec2,
            region=region,
            instance=instance,
            access=access,
            username=settings.util_username,
            settings=settings,
            seam=seam,
            label=f"utility instance {instance_id}",
            delay=request.poll_interval,
            sleep=sleep,
        ) as session:
            script = write_script(
                url=None if source.path is not None else source.url,
                decompress=_DECOMPRESS[source.compression],
                candidates=seam.device_candidates(volume_id=volume_id, device=request.device),
                volume_id=volume_id,
                device_wait=settings.volume_timeout,
            )
            log.info("utility instance %s: writing %s onto %s", instance_id, source.url, volume_id)
            result = session.run(
                f"bash -c {shlex.quote(script)}",
                timeout=settings.util_timeout,
                stdin=_local_chunks(source),
                on_sent=progress.advance,
            )
        measured = _check(result, request, instance_id=instance_id, volume_id=volume_id)
        stop_instance(
            ec2,
            region=region,
            instance_id=instance_id,
            timeout=settings.instance_stop_timeout,
            delay=request.poll_interval,
            sleep=sleep,
        )
        with aws_call("DetachVolume", region, volume_id, instance_id):
            ec2.detach_volume(VolumeId=volume_id, InstanceId=instance_id, Device=request.device)
        _wait_volume(ec2=ec2, request=request, volume_id=volume_id, want="available", sleep=sleep)
        terminate_instance(
            ec2,
            region=region,
            instance_id=instance_id,
            tracker=tracker,
            timeout=settings.instance_stop_timeout,
            delay=request.poll_interval,
            sleep=sleep,
        )
        instance_id = None
        with aws_call("CreateSnapshot", region, volume_id):
            snapshot_id = ec2.create_snapshot(
                VolumeId=volume_id,
                Description=request.description,
                TagSpecifications=tag_specification("snapshot", snapshot_tags),  # type: ignore[arg-type]
            )["SnapshotId"]
        tracker.record(region=region, kind="snapshot", resource_id=snapshot_id)
        log.info("snapshot %s of %s in %s", snapshot_id, volume_id, region)
        wait_snapshot_completed(
            ec2,
            region=region,
            snapshot_id=snapshot_id,
            timeout=settings.snapshot_timeout,
            delay=request.poll_interval,
            sleep=sleep,
        )
        failed = False
    finally:
        progress.end()
        if failed and snapshot_id is not None:
            _delete_snapshot(ec2, region, snapshot_id, tracker)
        leftovers = _clean_up(
            ec2=ec2,
            request=request,
            instance_id=instance_id,
            volume_id=volume_id,
            access=access,
            tracker=tracker,
            sleep=sleep,
        )
    if leftovers:
        raise AWSError(
            operation="cleanup",
            region=region,
            resource_ids=leftovers,
            code="CleanupFailed",
            detail="the snapshot is made, but temporary resources could not all be removed",
        )
    assert snapshot_id is not None
    assert volume_id is not None
    bytes_raw = int(measured["bytes"])
    blocks = math.ceil(bytes_raw / BLOCK_SIZE)
    return UtilityUploadResult(
        snapshot_id=snapshot_id,
        region=region,
        volume_size_gib=volume_gib,
        blocks_total=blocks,
        blocks_written=blocks,
        blocks_zero=0,
        bytes_raw=bytes_raw,
        sha256_raw=measured["raw"],
        sha256_compressed=measured["compressed"],
        seconds=round(time.monotonic() - started, 3),
        instance_id=measured["instance_id"],
        volume_id=volume_id,
        device_path=measured.get("device", ""),
        output=result.output,
    )


def _volume_size(request: UtilityUploadRequest) -> int:
    if request.volume_size_gib is not None:
        return request.volume_size_gib
    size = raw_size(request.source)
    if size is None:
        raise InputError(
            f"{request.source.name}: the raw size cannot be known before reading "
            f"({request.source.compression}); set [aws] util_volume_size"
        )
    return volume_size_for(size)


def _utility_kernel(ec2: EC2Client, request: UtilityUploadRequest) -> str | None:
    """The AKI to boot the utility AMI with: the entry's, if the AMI is paravirtual."""
    with aws_call("DescribeImages", request.region, request.utility_ami):
        images = ec2.describe_images(ImageIds=[request.utility_ami])["Images"]
    if not images:
        raise AWSError(
            operation="DescribeImages",
            region=request.region,
            resource_ids=[request.utility_ami],
            code="InvalidAMIID.NotFound",
            detail="the utility AMI (first AMI-list entry) does not exist",
        )
    if images[0].get("VirtualizationType") == "paravirtual":
        return request.utility_aki
    return None


def _local_chunks(source: ImageSource) -> Iterator[bytes] | None:
    """A local image's bytes as stored (streamed to the instance); None for URLs (curl)."""
    return compressed_chunks(source) if source.path is not None else None


def _create_volume(
    *,
    ec2: EC2Client,
    request: UtilityUploadRequest,
    zone: str,
    size_gib: int,
    tags: dict[str, str],
    tracker: Tracker,
) -> str:
    with aws_call("CreateVolume", request.region):
        volume_id = ec2.create_volume(
            AvailabilityZone=zone,
            Size=size_gib,
            VolumeType="gp3",
            ClientToken=client_token(request.client_token, "utility-volume"),
            TagSpecifications=tag_specification(  # type: ignore[arg-type]
                "volume",
                {**tags, TAG_ROLE: "utility-volume", "Name": f"fedimg: {request.source.name}"},
            ),
        )["VolumeId"]
    tracker.record(region=request.region, kind="volume", resource_id=volume_id)
    log.info("created %d GiB volume %s in %s", size_gib, volume_id, zone)
    return volume_id


def _attach(
    *,
    ec2: EC2Client,
    request: UtilityUploadRequest,
    volume_id: str,
    instance_id: str,
    sleep: Callable[[float], None],
) -> None:
    _wait_volume(ec2=ec2, request=request, volume_id=volume_id, want="available", sleep=sleep)
    with aws_call("AttachVolume", request.region, volume_id, instance_id):
        ec2.attach_volume(VolumeId=volume_id, InstanceId=instance_id, Device=request.device)
    _wait_volume(ec2=ec2, request=request, volume_id=volume_id, want="attached", sleep=sleep)


def _wait_volume(
    *,
    ec2: EC2Client,
    request: UtilityUploadRequest,
    volume_id: str,
    want: Literal["available", "attached"],
    sleep: Callable[[float], None],
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Wait (``volume_timeout``) for the volume to be available, or attached; stop on error."""
    region = request.region
    timeout = request.settings.volume_timeout
    deadline = clock() + timeout
    state = "unknown"
    while True:
        with aws_call("DescribeVolumes", region, volume_id):
            volumes = ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"]
        if volumes:
            volume = volumes[0]
            state = volume["State"]
            if want == "attached":
                attachments = volume.get("Attachments", [])
                state = attachments[0]["State"] if attachments else "detached"
            if state == want:
                return
            if state in ("error", "deleting", "deleted"):
                raise AWSError(
                    operation="DescribeVolumes",
                    region=region,
                    resource_ids=[volume_id],
                    code="UnexpectedState",
                    detail=f"volume is {state}, not {want}",
                )
        remaining = deadline - clock()
        if remaining <= 0:
            raise AWSError(
                operation="DescribeVolumes",
                region=region,
                resource_ids=[volume_id],
                code="Timeout",
                detail=f"volume still {state} after {timeout:.0f}s (waiting for {want})",
            )
        sleep(min(request.poll_interval, remaining))


def _check(
    result: CommandResult, request: UtilityUploadRequest, *, instance_id: str, volume_id: str
) -> dict[str, str]:
    """What the script measured, verified; raises on any failure or mismatch."""
    source = request.source
    where = f"utility instance {instance_id} in {request.region}"
    if result.timed_out:
        raise EC2UtilityException(
            f"{where}: writing {source.name} onto {volume_id} did not finish within "
            f"{request.settings.util_timeout:.0f}s: {_tail(result.output)}",
            output=result.output,
        )
    measured = parse_result(result.output)
    if result.exit_code == EXIT_NO_DEVICE:
        raise EC2UtilityException(
            f"{where} found no device for {volume_id}: {_tail(result.output)}",
            output=result.output,
        )
    if result.exit_code != 0 or measured is None:
        raise EC2UtilityException(
            f"{where} failed to write {source.url} onto {volume_id} (exit {result.exit_code}): "
            f"{_tail(result.output)}",
            output=result.output,
        )
    if request.expected_sha256 and measured["compressed"] != request.expected_sha256:
        raise InputError(
            f"{source.name}: checksum mismatch: expected sha256 {request.expected_sha256}, "
            f"the utility instance downloaded {measured['compressed']}"
        )
    if request.expected_sha256_raw and measured["raw"] != request.expected_sha256_raw:
        raise InputError(
            f"{source.name}: raw checksum mismatch: expected sha256 {request.expected_sha256_raw}, "
            f"got {measured['raw']}"
        )
    if measured["written"] != measured["raw"]:
        raise EC2UtilityException(
            f"{where}: {volume_id} ({measured.get('device', '?')}) reads back as sha256 "
            f"{measured['written']}, but the image's raw sha256 is {measured['raw']}",
            output=result.output,
        )
    label = measured["label"]
    if request.require_disk_label and not (label[:4] == "55aa" or label[4:] == _GPT_SIGNATURE):
        raise InputError(f"{source.name}: not a disk image (no MBR or GPT partition table)")
    log.info(
        "%s wrote %s bytes of %s (raw sha256 %s) to %s",
        where,
        measured["bytes"],
        source.name,
        measured["raw"],
        measured.get("device"),
    )
    return {**measured, "instance_id": instance_id}


def _tail(output: str, lines: int = 3) -> str:
    """The last few non-empty lines of ``output``, on one line."""
    kept = [line.strip() for line in output.splitlines() if line.strip()][-lines:]
    return " | ".join(kept) or "(no output)"


def _delete_snapshot(ec2: EC2Client, region: str, snapshot_id: str, tracker: Tracker) -> None:
    try:
        with aws_call("DeleteSnapshot", region, snapshot_id):
            ec2.delete_snapshot(SnapshotId=snapshot_id)
    except AWSError as exc:
        if exc.code != "InvalidSnapshot.NotFound":
            log.error("could not delete snapshot %s: %s", snapshot_id, exc)
            return
    tracker.release(snapshot_id)


def _clean_up(
    *,
    ec2: EC2Client,
    request: UtilityUploadRequest,
    instance_id: str | None,
    volume_id: str | None,
    access: Access | None,
    tracker: Tracker,
    sleep: Callable[[float], None],
) -> list[str]:
    """Instance (terminate and wait), then volume, group and key; the ids left. Never raises."""
    region = request.region
    settings = request.settings
    leftovers: list[str] = []
    if instance_id is not None:
        leftovers += discard_instance(
            ec2,
            region=region,
            instance_id=instance_id,
            tracker=tracker,
            timeout=settings.instance_stop_timeout,
            label="utility instance",
            delay=request.poll_interval,
            sleep=sleep,
        )
    if volume_id is not None:
        try:
            # Terminating the instance detaches the volume (it is not DeleteOnTermination).
            _wait_volume(
                ec2=ec2, request=request, volume_id=volume_id, want="available", sleep=sleep
            )
            with aws_call("DeleteVolume", region, volume_id):
                ec2.delete_volume(VolumeId=volume_id)
            tracker.release(volume_id)
            log.info("deleted volume %s in %s", volume_id, region)
        except EC2ServiceException as exc:
            if isinstance(exc, AWSError) and exc.code == "InvalidVolume.NotFound":
                tracker.release(volume_id)
            else:
                log.error("could not delete utility volume %s: %s", volume_id, exc)
                leftovers.append(volume_id)
    if access is not None:
        leftovers += close_access(
            access=access,
            ec2=ec2,
            tracker=tracker,
            timeout=settings.instance_stop_timeout,
            sleep=sleep,
        )
    return leftovers


__all__ = [
    "UtilityUploadRequest",
    "UtilityUploadResult",
    "parse_result",
    "upload_utility",
    "utility_entry",
    "write_script",
]

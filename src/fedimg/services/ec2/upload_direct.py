"""The ``direct`` upload: stream a compressed image straight into an EBS snapshot.

Pipeline (one pass, nothing unpacked to disk)::

    source reader → decompressor → 512 KiB blocks → zero check → bounded queue
        → N PutSnapshotBlock workers (SHA-256 per block) → CompleteSnapshot (LINEAR aggregate)

Memory ceiling: ``(queue_depth + workers + 2) × 512 KiB`` for blocks in flight, plus the
decompressor's pipe (1 MiB) and one read chunk (1 MiB); independent of the image size.

Rules (after coldsnap): all-zero blocks are skipped for unencrypted snapshots only (an encrypted
snapshot returns random data for blocks never written); ``ChangedBlocksCount`` is the number of
blocks sent; the checksum is the SHA-256 of the concatenated per-block SHA-256 digests in block
order (``LINEAR``). On any failure the pending snapshot is deleted and the error names the
snapshot id and, for a block, its index.

Idempotent: ``StartSnapshot`` carries a ClientToken derived from the image's identity, so a retried
start in the same process (or after a crash, within AWS's token lifetime) reuses the snapshot.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from fedimg.checkpoints import checkpoint
from fedimg.errors import InputError
from fedimg.progress import NullProgress, Progress
from fedimg.services.ec2.errors import AWSError, aws_call, error_code
from fedimg.services.ec2.snapshots import wait_snapshot_completed
from fedimg.source import ImageSource, RawBlocks, raw_size

if TYPE_CHECKING:
    from mypy_boto3_ebs import EBSClient
    from mypy_boto3_ec2 import EC2Client

log = logging.getLogger(__name__)

BLOCK_SIZE = 512 * 1024
GIB = 1024**3
ZERO_BLOCK = bytes(BLOCK_SIZE)
#: Attempts per block on top of botocore's own retries: throttling bursts and dropped connections
#: that outlast botocore's budget get a few more, slower chances before the upload fails.
BLOCK_ATTEMPTS = 4
_RETRYABLE_CODES = {
    "RequestThrottledException",
    "ThrottlingException",
    "Throttling",
    "InternalServerException",
    "ServiceUnavailableException",
    "InternalError",
}
#: Pending snapshots that nobody completes expire after this many minutes (StartSnapshot Timeout).
PENDING_TIMEOUT_MINUTES = 60
#: The crash harness's ``mid-upload`` checkpoint fires after this many blocks were queued.
CRASH_BLOCK = 8


@dataclass(frozen=True)
class DirectUploadRequest:
    """What to upload where. ``client_token`` makes StartSnapshot idempotent."""

    source: ImageSource
    region: str
    client_token: str
    tags: dict[str, str]
    description: str
    workers: int = 8
    queue_depth: int | None = None
    volume_size_gib: int | None = None
    encrypted: bool = False
    kms_key_arn: str | None = None
    expected_sha256: str | None = None
    require_disk_label: bool = False
    snapshot_wait_seconds: float = 1800.0


@dataclass(frozen=True)
class DirectUploadResult:
    """The snapshot made, and what the stream measured."""

    snapshot_id: str
    region: str
    volume_size_gib: int
    blocks_total: int
    blocks_written: int
    blocks_zero: int
    bytes_raw: int
    sha256_raw: str
    sha256_compressed: str
    seconds: float


@dataclass
class _Shared:
    """State the producer and the workers share."""

    digests: dict[int, bytes] = field(default_factory=dict)
    error: BaseException | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def volume_size_for(raw_bytes: int) -> int:
    """The volume size in GiB that holds ``raw_bytes`` (at least 1)."""
    return max(1, math.ceil(raw_bytes / GIB))


def has_disk_label(block: bytes) -> bool:
    """True if the first block carries an MBR boot signature or a GPT header."""
    return block[510:512] == b"\x55\xaa" or block[512:520] == b"EFI PART"


def upload_direct(
    *,
    request: DirectUploadRequest,
    ebs: EBSClient,
    ec2: EC2Client,
    on_snapshot_started: Callable[[str], None] = lambda _sid: None,
    progress: Progress | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> DirectUploadResult:
    """Upload ``request.source`` into a new snapshot in ``request.region``.

    ``on_snapshot_started`` is called with the snapshot id as soon as StartSnapshot returns (the
    ledger records it there). Raises :class:`InputError` for bad input (the pending snapshot is
    deleted first) and :class:`AWSError` for AWS failures (likewise).
    """
    progress = progress or NullProgress()
    started = time.monotonic()
    source = request.source
    known_size = raw_size(source)
    if request.volume_size_gib is not None:
        volume_gib = request.volume_size_gib
        if known_size is not None and known_size > volume_gib * GIB:
            raise InputError(
                f"{source.name}: the image ({known_size} bytes) does not fit a "
                f"{volume_gib} GiB volume"
            )
    elif known_size is not None:
        volume_gib = volume_size_for(known_size)
    else:
        raise InputError(
            f"{source.name}: the raw size cannot be known before reading "
            f"({source.compression}); set [aws] volume_size"
        )
    blocks = RawBlocks(source, block_size=BLOCK_SIZE, on_chunk=None)
    # Unencrypted: the source says which blocks are all zeros and never copies them (they are
    # skipped). Encrypted: every block is written, so every block is read out.
    iterator: Iterator[tuple[int, bytes | None]] = (
        iter(blocks) if request.encrypted else blocks.sparse()
    )
    snapshot_id: str | None = None
    try:
        first = next(iterator, None)
        if request.require_disk_label and (
            first is None or first[1] is None or not has_disk_label(first[1])
        ):
            raise InputError(f"{source.name}: not a disk image (no MBR or GPT partition table)")
        snapshot_id = _start_snapshot(ebs, request, volume_gib)
        on_snapshot_started(snapshot_id)
        progress.begin(f"upload {source.name}", known_size)
        shared = _Shared()
        counts = _pump(
            request=request,
            ebs=ebs,
            snapshot_id=snapshot_id,
            first=first,
            rest=iterator,
            shared=shared,
            progress=progress,
            sleep=sleep,
        )
        stats = blocks.stats
        if stats.bytes_raw > volume_gib * GIB:
            raise InputError(
                f"{source.name}: the image ({stats.bytes_raw} bytes) is larger than its "
                f"{volume_gib} GiB volume"
            )
        if request.expected_sha256 and stats.sha256_compressed != request.expected_sha256:
            raise InputError(
                f"{source.name}: checksum mismatch: expected sha256 {request.expected_sha256}, "
                f"got {stats.sha256_compressed}"
            )
        written, zero = counts
        _complete(ebs, request.region, snapshot_id, shared.digests, written)
        wait_snapshot_completed(
            ec2,
            region=request.region,
            snapshot_id=snapshot_id,
            timeout=request.snapshot_wait_seconds,
            sleep=sleep,
        )
    except BaseException:
        blocks.close()
        if snapshot_id is not None:
            _delete_pending(ec2, request.region, snapshot_id)
        raise
    finally:
        progress.end()
    return DirectUploadResult(
        snapshot_id=snapshot_id,
        region=request.region,
        volume_size_gib=volume_gib,
        blocks_total=written + zero,
        blocks_written=written,
        blocks_zero=zero,
        bytes_raw=stats.bytes_raw,
        sha256_raw=stats.sha256_raw,
        sha256_compressed=stats.sha256_compressed,
        seconds=round(time.monotonic() - started, 3),
    )


def _start_snapshot(ebs: EBSClient, request: DirectUploadRequest, volume_gib: int) -> str:
    params: dict[str, object] = {
        "VolumeSize": volume_gib,
        "Tags": [{"Key": k, "Value": v} for k, v in request.tags.items()],
        "Description": request.description,
        "ClientToken": request.client_token,
        "Timeout": PENDING_TIMEOUT_MINUTES,
    }
    if request.encrypted:
        params["Encrypted"] = True
        if request.kms_key_arn:
            params["KmsKeyArn"] = request.kms_key_arn
    with aws_call("StartSnapshot", request.region):
        response = ebs.start_snapshot(**params)  # type: ignore[arg-type]
    snapshot_id = response["SnapshotId"]
    block_size = response.get("BlockSize", BLOCK_SIZE)
    if block_size != BLOCK_SIZE:
        raise AWSError(
            operation="StartSnapshot",
            region=request.region,
            resource_ids=[snapshot_id],
            code="UnexpectedBlockSize",
            detail=f"block size {block_size}, expected {BLOCK_SIZE}",
        )
    log.info("started snapshot %s in %s (%d GiB)", snapshot_id, request.region, volume_gib)
    return snapshot_id


def _pump(
    *,
    request: DirectUploadRequest,
    ebs: EBSClient,
    snapshot_id: str,
    first: tuple[int, bytes | None] | None,
    rest: Iterator[tuple[int, bytes | None]],
    shared: _Shared,
    progress: Progress,
    sleep: Callable[[float], None],
) -> tuple[int, int]:
    """Feed blocks to the workers; returns (blocks written, zero blocks skipped).

    A block given as ``None`` is all zeros and skipped (the source yields those only for an
    unencrypted snapshot); any other block is written, whatever its content.
    """
    depth = request.queue_depth or 2 * request.workers
    work: queue.Queue[tuple[int, bytes] | None] = queue.Queue(maxsize=depth)
    workers = [
        threading.Thread(
            target=_worker,
            kwargs={
                "work": work,
                "ebs": ebs,
                "region": request.region,
                "snapshot_id": snapshot_id,
                "shared": shared,
                "sleep": sleep,
            },
            name=f"fedimg-put-{n}",
            daemon=True,
        )
        for n in range(request.workers)
    ]
    for thread in workers:
        thread.start()
    written = zero = 0
    try:
        items = [first] if first is not None else []
        for index, block in _chain(items, rest):
            if shared.error is not None:
                break
            progress.advance(BLOCK_SIZE)
            if block is None:
                zero += 1
                continue
            written += 1
            work.put((index, block))
            if written == CRASH_BLOCK:
                checkpoint("mid-upload")
    finally:
        for _ in workers:
            work.put(None)
        for thread in workers:
            thread.join()
    if shared.error is not None:
        raise shared.error
    return written, zero


def _chain(
    first: list[tuple[int, bytes | None]], rest: Iterator[tuple[int, bytes | None]]
) -> Iterator[tuple[int, bytes | None]]:
    yield from first
    yield from rest


def _worker(
    *,
    work: queue.Queue[tuple[int, bytes] | None],
    ebs: EBSClient,
    region: str,
    snapshot_id: str,
    shared: _Shared,
    sleep: Callable[[float], None],
) -> None:
    while True:
        item = work.get()
        if item is None:
            return
        if shared.error is not None:
            continue  # drain: another block already failed
        index, block = item
        try:
            digest = hashlib.sha256(block).digest()
            put_block(
                ebs,
                region=region,
                snapshot_id=snapshot_id,
                index=index,
                block=block,
                digest=digest,
                sleep=sleep,
            )
            with shared.lock:
                shared.digests[index] = digest
        except BaseException as exc:
            with shared.lock:
                if shared.error is None:
                    shared.error = exc


def put_block(
    ebs: EBSClient,
    *,
    region: str,
    snapshot_id: str,
    index: int,
    block: bytes,
    digest: bytes,
    sleep: Callable[[float], None] = time.sleep,
    attempts: int = BLOCK_ATTEMPTS,
) -> None:
    """PutSnapshotBlock with its SHA-256, retried with jittered backoff on throttling, 5xx and
    dropped connections. Raises :class:`AWSError` naming the snapshot and the block index."""
    checksum = base64.b64encode(digest).decode("ascii")
    for attempt in range(1, attempts + 1):
        try:
            ebs.put_snapshot_block(
                SnapshotId=snapshot_id,
                BlockIndex=index,
                BlockData=block,
                DataLength=len(block),
                Checksum=checksum,
                ChecksumAlgorithm="SHA256",
            )
            return
        except (ClientError, BotoCoreError) as exc:
            code = error_code(exc)
            retryable = code in _RETRYABLE_CODES or _is_server_error(exc) or code is None
            if not retryable or attempt == attempts:
                raise AWSError(
                    operation="PutSnapshotBlock",
                    region=region,
                    resource_ids=[snapshot_id, f"block {index}"],
                    code=code or type(exc).__name__,
                    request_id=_request_id(exc),
                    detail=str(exc).splitlines()[0],
                ) from exc
            delay = min(0.2 * 2**attempt, 10.0) * (0.5 + random.random())
            log.debug("block %d of %s: %s; retry in %.1fs", index, snapshot_id, code, delay)
            sleep(delay)


def _is_server_error(exc: BaseException) -> bool:
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return int(status) >= 500
    return False


def _request_id(exc: BaseException) -> str | None:
    if isinstance(exc, ClientError):
        rid = exc.response.get("ResponseMetadata", {}).get("RequestId")
        return str(rid) if rid else None
    return None


def linear_checksum(digests: dict[int, bytes]) -> str:
    """SHA-256 over the per-block SHA-256 digests in block order, base64 (CompleteSnapshot)."""
    aggregate = hashlib.sha256()
    for index in sorted(digests):
        aggregate.update(digests[index])
    return base64.b64encode(aggregate.digest()).decode("ascii")


def _complete(
    ebs: EBSClient, region: str, snapshot_id: str, digests: dict[int, bytes], written: int
) -> None:
    if len(digests) != written:
        raise AWSError(
            operation="CompleteSnapshot",
            region=region,
            resource_ids=[snapshot_id],
            code="IncompleteUpload",
            detail=f"{len(digests)} of {written} blocks acknowledged",
        )
    with aws_call("CompleteSnapshot", region, snapshot_id):
        response = ebs.complete_snapshot(
            SnapshotId=snapshot_id,
            ChangedBlocksCount=written,
            Checksum=linear_checksum(digests),
            ChecksumAlgorithm="SHA256",
            ChecksumAggregationMethod="LINEAR",
        )
    if response.get("Status") == "error":
        raise AWSError(
            operation="CompleteSnapshot",
            region=region,
            resource_ids=[snapshot_id],
            code="SnapshotError",
            detail="AWS reports the snapshot in error state",
        )


def _delete_pending(ec2: EC2Client, region: str, snapshot_id: str) -> None:
    try:
        ec2.delete_snapshot(SnapshotId=snapshot_id)
        log.info("deleted pending snapshot %s in %s", snapshot_id, region)
    except (ClientError, BotoCoreError) as exc:
        if error_code(exc) != "InvalidSnapshot.NotFound":
            log.error("could not delete pending snapshot %s in %s: %s", snapshot_id, region, exc)


__all__ = [
    "BLOCK_SIZE",
    "DirectUploadRequest",
    "DirectUploadResult",
    "linear_checksum",
    "upload_direct",
    "volume_size_for",
]

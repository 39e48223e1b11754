"""Read a snapshot back through the EBS direct APIs and compare it with the source, block by block.

Blocks the snapshot does not list are zeros (that is how skipped blocks read back). Reads run on a
small pool; memory is bounded by ``workers × 2`` blocks in flight.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedimg.services.ec2.errors import aws_call
from fedimg.services.ec2.upload_direct import BLOCK_SIZE, ZERO_BLOCK
from fedimg.source import ImageSource, RawBlocks

if TYPE_CHECKING:
    from mypy_boto3_ebs import EBSClient


@dataclass(frozen=True)
class VerifyResult:
    """The comparison: ``identical`` only if every block matched and sizes agree."""

    snapshot_id: str
    region: str
    identical: bool
    blocks_compared: int
    blocks_in_snapshot: int
    mismatched_blocks: tuple[int, ...] = field(default_factory=tuple)
    extra_blocks: tuple[int, ...] = field(default_factory=tuple)
    sha256_raw: str = ""


def list_blocks(ebs: EBSClient, *, region: str, snapshot_id: str) -> dict[int, str]:
    """Every written block of the snapshot: index → block token (all pages)."""
    blocks: dict[int, str] = {}
    token: str | None = None
    while True:
        kwargs: dict[str, object] = {"SnapshotId": snapshot_id, "MaxResults": 10000}
        if token:
            kwargs["NextToken"] = token
        with aws_call("ListSnapshotBlocks", region, snapshot_id):
            page = ebs.list_snapshot_blocks(**kwargs)  # type: ignore[arg-type]
        for block in page.get("Blocks", []):
            blocks[int(block["BlockIndex"])] = str(block["BlockToken"])
        token = page.get("NextToken")
        if not token:
            return blocks


def read_block(ebs: EBSClient, *, region: str, snapshot_id: str, index: int, token: str) -> bytes:
    """One block's bytes (GetSnapshotBlock)."""
    with aws_call("GetSnapshotBlock", region, snapshot_id, f"block {index}"):
        response = ebs.get_snapshot_block(
            SnapshotId=snapshot_id, BlockIndex=index, BlockToken=token
        )
        data: bytes = response["BlockData"].read()
    return data


def verify_snapshot(
    *, ebs: EBSClient, region: str, snapshot_id: str, source: ImageSource, workers: int = 8
) -> VerifyResult:
    """Compare ``snapshot_id`` with ``source``; raises AWSError/InputError if either can't be read."""
    listed = list_blocks(ebs, region=region, snapshot_id=snapshot_id)
    mismatched: list[int] = []
    lock = threading.Lock()
    slots = threading.Semaphore(workers * 2)
    compared = 0

    def compare(index: int, expected_digest: bytes) -> None:
        try:
            data = read_block(
                ebs, region=region, snapshot_id=snapshot_id, index=index, token=listed[index]
            )
            if len(data) != BLOCK_SIZE or hashlib.sha256(data).digest() != expected_digest:
                with lock:
                    mismatched.append(index)
        finally:
            slots.release()

    blocks = RawBlocks(source, block_size=BLOCK_SIZE)
    futures: list[Future[None]] = []
    seen: set[int] = set()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for index, block in blocks:
            seen.add(index)
            compared += 1
            if index in listed:
                slots.acquire()
                futures.append(pool.submit(compare, index, hashlib.sha256(block).digest()))
            elif block != ZERO_BLOCK:
                mismatched.append(index)
        for future in futures:
            future.result()
    extra = sorted(
        i
        for i in listed
        if i not in seen and read_block_nonzero(ebs, region, snapshot_id, i, listed[i])
    )
    return VerifyResult(
        snapshot_id=snapshot_id,
        region=region,
        identical=not mismatched and not extra,
        blocks_compared=compared,
        blocks_in_snapshot=len(listed),
        mismatched_blocks=tuple(sorted(mismatched)),
        extra_blocks=tuple(extra),
        sha256_raw=blocks.stats.sha256_raw,
    )


def read_block_nonzero(
    ebs: EBSClient, region: str, snapshot_id: str, index: int, token: str
) -> bool:
    """True if a block past the source's end holds anything but zeros."""
    return (
        read_block(ebs, region=region, snapshot_id=snapshot_id, index=index, token=token)
        != ZERO_BLOCK
    )

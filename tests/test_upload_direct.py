"""The streaming uploader: round trips, CompleteSnapshot, faults, corrupt input, bounded memory."""

from __future__ import annotations

import base64
import hashlib
import itertools
import random
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse, HTTPHeaders
from botocore.exceptions import ConnectionClosedError

from fedimg.aws import ClientFactory, TargetSpec
from fedimg.embedded import EmbeddedAWS
from fedimg.errors import InputError
from fedimg.services.ec2.errors import AWSError
from fedimg.services.ec2.upload_direct import (
    BLOCK_SIZE,
    DirectUploadRequest,
    DirectUploadResult,
    linear_checksum,
    upload_direct,
)
from fedimg.services.ec2.verify import verify_snapshot
from fedimg.source import resolve_source
from tests.conftest import Recorder

REGION = "us-east-1"


def write_image(path: Path, pieces: list[bytes]) -> Path:
    """Write ``pieces`` as a raw image and xz it (multi-threaded, several blocks)."""
    raw = path.with_suffix("")
    raw.write_bytes(b"".join(pieces))
    subprocess.run(["xz", "-f", "-1", "-T2", "--block-size=1MiB", str(raw)], check=True)
    return path


def request(path: Path, **fields: Any) -> DirectUploadRequest:
    return DirectUploadRequest(
        source=resolve_source(str(path), arch="x86_64"),
        region=REGION,
        client_token=hashlib.sha256(f"{path}{time.time()}".encode()).hexdigest(),
        tags={"fedimg:role": "test"},
        description="test upload",
        workers=fields.pop("workers", 4),
        **fields,
    )


def upload(clients: ClientFactory, path: Path, **fields: Any) -> DirectUploadResult:
    return upload_direct(
        request=request(path, **fields),
        ebs=clients.ebs(REGION),
        ec2=clients.ec2(REGION),
        sleep=lambda _s: None,
    )


def noise(n: int, seed: int = 0) -> bytes:
    """Non-zero bytes, every 4 KiB page distinct, cheap to compress (random data is slow to xz)."""
    page = random.Random(seed).randbytes(4096)
    pages = (i.to_bytes(8, "big") + page[8:] for i in range(n // 4096 + 1))
    return b"".join(pages)[:n]


CASES = {
    "with-zero-runs": [noise(BLOCK_SIZE), bytes(3 * BLOCK_SIZE), noise(2 * BLOCK_SIZE, 1)],
    "no-zero-runs": [noise(5 * BLOCK_SIZE, 2)],
    "not-a-multiple": [noise(BLOCK_SIZE + 12345, 3), bytes(1000), b"tail"],
    "empty": [],
    "only-zeros": [bytes(7 * BLOCK_SIZE)],
}


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_reads_back_equal(
    tmp_path: Path, aws: EmbeddedAWS, clients: ClientFactory, case: str
) -> None:
    pieces = CASES[case]
    raw = b"".join(pieces)
    image = write_image(tmp_path / f"{case}.raw.xz", pieces)
    result = upload(clients, image)

    expected_blocks = -(-len(raw) // BLOCK_SIZE)
    zero_blocks = sum(
        1
        for i in range(expected_blocks)
        if raw[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE].strip(b"\0") == b""
    )
    assert result.blocks_total == expected_blocks
    assert result.blocks_zero == zero_blocks
    assert result.blocks_written == expected_blocks - zero_blocks
    assert result.bytes_raw == len(raw)
    assert result.sha256_raw == hashlib.sha256(raw).hexdigest()
    assert result.volume_size_gib == 1
    verified = verify_snapshot(
        ebs=clients.ebs(REGION),
        region=REGION,
        snapshot_id=result.snapshot_id,
        source=resolve_source(str(image), arch="x86_64"),
    )
    assert verified.identical, verified
    assert verified.blocks_in_snapshot == result.blocks_written
    state = clients.ec2(REGION).describe_snapshots(SnapshotIds=[result.snapshot_id])
    assert state["Snapshots"][0]["State"] == "completed"


def test_verify_detects_a_different_image(
    tmp_path: Path, aws: EmbeddedAWS, clients: ClientFactory
) -> None:
    image = write_image(tmp_path / "a.raw.xz", [noise(3 * BLOCK_SIZE, 7)])
    other = write_image(tmp_path / "b.raw.xz", [noise(BLOCK_SIZE, 7), noise(2 * BLOCK_SIZE, 8)])
    result = upload(clients, image)
    verified = verify_snapshot(
        ebs=clients.ebs(REGION),
        region=REGION,
        snapshot_id=result.snapshot_id,
        source=resolve_source(str(other), arch="x86_64"),
    )
    assert not verified.identical
    assert verified.mismatched_blocks == (1, 2)


def test_complete_snapshot_parameters(
    tmp_path: Path, aws: EmbeddedAWS, clients: ClientFactory, recorder: Recorder
) -> None:
    clients.add_hook("provide-client-params.*.*", recorder.hook)
    blocks = [noise(BLOCK_SIZE, 10), bytes(BLOCK_SIZE), noise(BLOCK_SIZE, 11)]
    image = write_image(tmp_path / "c.raw.xz", blocks)
    result = upload(clients, image)
    (complete,) = recorder.of("CompleteSnapshot")
    digests = {0: hashlib.sha256(blocks[0]).digest(), 2: hashlib.sha256(blocks[2]).digest()}
    assert complete.params == {
        "SnapshotId": result.snapshot_id,
        "ChangedBlocksCount": 2,
        "Checksum": linear_checksum(digests),
        "ChecksumAlgorithm": "SHA256",
        "ChecksumAggregationMethod": "LINEAR",
    }
    puts = recorder.of("PutSnapshotBlock")
    assert sorted(p.params["BlockIndex"] for p in puts) == [0, 2]
    for put in puts:
        index = put.params["BlockIndex"]
        assert put.params["Checksum"] == base64.b64encode(digests[index]).decode()
        assert put.params["ChecksumAlgorithm"] == "SHA256"
        assert put.params["DataLength"] == BLOCK_SIZE
    (start,) = recorder.of("StartSnapshot")
    assert start.params["VolumeSize"] == 1
    assert start.params["Timeout"] == 60
    assert "Encrypted" not in start.params


def test_encrypted_snapshots_write_zero_blocks_too(
    tmp_path: Path, aws: EmbeddedAWS, clients: ClientFactory, recorder: Recorder
) -> None:
    clients.add_hook("provide-client-params.*.*", recorder.hook)
    image = write_image(tmp_path / "e.raw.xz", [noise(BLOCK_SIZE, 12), bytes(2 * BLOCK_SIZE)])
    result = upload(clients, image, encrypted=True)
    assert (result.blocks_written, result.blocks_zero) == (3, 0)
    (start,) = recorder.of("StartSnapshot")
    assert start.params["Encrypted"] is True


class Faulty:
    """A before-send hook: throttles or drops a share of PutSnapshotBlock requests."""

    def __init__(self, *, throttle: float = 0.0, drop: float = 0.0, seed: int = 3) -> None:
        self.throttle = throttle
        self.drop = drop
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.throttled = 0
        self.dropped = 0

    def __call__(self, request: Any, **_: Any) -> AWSResponse | None:
        with self.lock:
            roll = self.rng.random()
            if roll < self.throttle:
                self.throttled += 1
                raw = _Raw(b'{"message": "Rate exceeded"}')
                headers = HTTPHeaders()
                headers["x-amzn-ErrorType"] = "RequestThrottledException"
                headers["content-type"] = "application/json"
                return AWSResponse(request.url, 400, headers, raw)
            if roll < self.throttle + self.drop:
                self.dropped += 1
                raise ConnectionClosedError(endpoint_url=request.url)
        return None


class _Raw:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_: Any) -> Any:
        yield self.data


@pytest.mark.parametrize("botocore_attempts", [10, 1])
def test_throttling_and_dropped_connections_still_read_back_equal(
    tmp_path: Path, aws: EmbeddedAWS, botocore_attempts: int
) -> None:
    faults = Faulty(throttle=0.2, drop=0.1)
    clients = ClientFactory(
        TargetSpec(target="embedded", endpoint_url=aws.endpoint.url),
        max_attempts=botocore_attempts,
    )
    clients.add_hook("before-send.ebs.PutSnapshotBlock", faults)
    pieces = [noise(6 * BLOCK_SIZE, 4), bytes(BLOCK_SIZE), noise(5 * BLOCK_SIZE, 5)]
    image = write_image(tmp_path / "f.raw.xz", pieces)
    result = upload(clients, image)
    assert faults.throttled > 0
    assert faults.dropped > 0
    plain = ClientFactory(TargetSpec(target="embedded", endpoint_url=aws.endpoint.url))
    verified = verify_snapshot(
        ebs=plain.ebs(REGION),
        region=REGION,
        snapshot_id=result.snapshot_id,
        source=resolve_source(str(image), arch="x86_64"),
    )
    assert verified.identical


def test_a_block_that_keeps_failing_deletes_the_pending_snapshot(
    tmp_path: Path, aws: EmbeddedAWS
) -> None:
    # Standard retries: adaptive mode would also pace the client down (real sleeps) while
    # every request is throttled, which is right in production and slow in a test.
    clients = ClientFactory(
        TargetSpec(target="embedded", endpoint_url=aws.endpoint.url),
        max_attempts=1,
        retry_mode="standard",
    )
    clients.add_hook("before-send.ebs.PutSnapshotBlock", Faulty(throttle=1.0))
    image = write_image(tmp_path / "g.raw.xz", [noise(2 * BLOCK_SIZE, 6)])
    with pytest.raises(AWSError) as caught:
        upload(clients, image)
    message = str(caught.value)
    assert "PutSnapshotBlock" in message
    assert "RequestThrottledException" in message
    assert "snap-" in message
    assert "block " in message
    assert clients.ec2(REGION).describe_snapshots(OwnerIds=["self"])["Snapshots"] == []


def test_corrupt_stream_midway_deletes_the_pending_snapshot(
    tmp_path: Path, aws: EmbeddedAWS, clients: ClientFactory, recorder: Recorder
) -> None:
    clients.add_hook("provide-client-params.*.*", recorder.hook)
    image = write_image(tmp_path / "h.raw.xz", [noise(8 * BLOCK_SIZE, 9)])
    data = bytearray(image.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    image.write_bytes(bytes(data))
    with pytest.raises(InputError, match="corrupt|truncated"):
        upload(clients, image)
    assert len(recorder.of("StartSnapshot")) == 1
    assert recorder.of("CompleteSnapshot") == []
    (deleted,) = recorder.of("DeleteSnapshot")
    assert clients.ec2(REGION).describe_snapshots(OwnerIds=["self"])["Snapshots"] == []
    assert deleted.params["SnapshotId"].startswith("snap-")


def test_checksum_mismatch_deletes_the_pending_snapshot(
    tmp_path: Path, aws: EmbeddedAWS, clients: ClientFactory
) -> None:
    image = write_image(tmp_path / "i.raw.xz", [noise(BLOCK_SIZE, 13)])
    with pytest.raises(InputError, match="checksum mismatch"):
        upload(clients, image, expected_sha256="0" * 64)
    assert clients.ec2(REGION).describe_snapshots(OwnerIds=["self"])["Snapshots"] == []


def test_memory_is_bounded_by_the_queue(
    tmp_path: Path, aws: EmbeddedAWS, clients: ClientFactory
) -> None:
    """Blocks read from the source but not yet acknowledged never exceed queue + workers + 1."""
    workers, depth = 2, 3
    produced = itertools.count(1)
    acked = itertools.count(1)
    state = {"produced": 0, "acked": 0, "peak": 0}
    lock = threading.Lock()

    class Counting:
        def begin(self, label: str, total: int | None) -> None:
            return None

        def advance(self, amount: int) -> None:
            with lock:
                state["produced"] = next(produced)
                state["peak"] = max(state["peak"], state["produced"] - state["acked"])

        def end(self) -> None:
            return None

    def slow_ack(**_: Any) -> None:
        time.sleep(0.01)
        with lock:
            state["acked"] = next(acked)

    clients.add_hook("after-call.ebs.PutSnapshotBlock", slow_ack)
    image = write_image(tmp_path / "j.raw.xz", [noise(40 * BLOCK_SIZE, 14)])
    result = upload_direct(
        request=request(image, workers=workers, queue_depth=depth),
        ebs=clients.ebs(REGION),
        ec2=clients.ec2(REGION),
        progress=Counting(),
    )
    assert result.blocks_written == 40
    assert state["peak"] <= depth + workers + 1
    assert state["peak"] >= depth  # the queue really filled: the bound was exercised

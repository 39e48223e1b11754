"""The image source: names, sizes from the xz index, streaming, decompression errors, HTTP resume."""

from __future__ import annotations

import hashlib
import lzma
import os
import subprocess
from pathlib import Path

import pytest

from fedimg.errors import InputError
from fedimg.source import (
    RawBlocks,
    parse_checksum_file,
    raw_size,
    resolve_source,
    split_image_name,
)
from tests.httpfiles import Faults, serve_files

BLOCK = 512 * 1024


def make_raw(path: Path, size: int, seed: int = 0) -> bytes:
    """Random data with zero runs, like a disk."""
    rng = __import__("random").Random(seed)
    chunks: list[bytes] = []
    while sum(len(c) for c in chunks) < size:
        n = rng.randint(1, 3) * 100_000
        chunks.append(bytes(n) if rng.random() < 0.5 else rng.randbytes(n))
    data = b"".join(chunks)[:size]
    path.write_bytes(data)
    return data


def xz(path: Path, *extra: str) -> Path:
    subprocess.run(["xz", "-k", "-f", "-1", *extra, str(path)], check=True)
    return path.with_name(path.name + ".xz")


def test_names_and_architectures(tmp_path: Path) -> None:
    assert split_image_name("Fedora-Cloud-Base-41-1.4.x86_64.raw.xz") == (
        "Fedora-Cloud-Base-41-1.4.x86_64",
        "xz",
    )
    image = tmp_path / "Fedora-Cloud-Base-AmazonEC2.aarch64-41-1.4.raw.xz"
    image.write_bytes(b"x")
    assert resolve_source(str(image)).arch == "arm64"
    assert resolve_source(str(image), arch="x86_64").arch == "x86_64"
    assert resolve_source(image.as_uri()).path == image
    anonymous = tmp_path / "disk.raw"
    anonymous.write_bytes(b"x")
    with pytest.raises(InputError, match="pass --arch"):
        resolve_source(str(anonymous))
    with pytest.raises(InputError, match="no such file"):
        resolve_source(str(tmp_path / "missing.x86_64.raw.xz"))
    with pytest.raises(InputError, match="not a disk image name"):
        split_image_name("notes.txt")


def test_raw_size_from_the_xz_index_of_multi_block_multi_stream_files(tmp_path: Path) -> None:
    data = make_raw(tmp_path / "a.x86_64.raw", 3 * BLOCK + 1234)
    single = xz(tmp_path / "a.x86_64.raw", "-T2", "--block-size=300000")
    assert raw_size(resolve_source(str(single))) == len(data)
    # Two concatenated streams with padding between them.
    other = make_raw(tmp_path / "b.raw", 777, seed=2)
    joined = tmp_path / "joined.x86_64.raw.xz"
    joined.write_bytes(single.read_bytes() + bytes(8) + lzma.compress(other))
    assert raw_size(resolve_source(str(joined))) == len(data) + len(other)


@pytest.mark.parametrize("subprocess_decoder", [True, False])
def test_blocks_and_hashes(tmp_path: Path, subprocess_decoder: bool) -> None:
    data = make_raw(tmp_path / "img.x86_64.raw", 2 * BLOCK + 4321)
    compressed = xz(tmp_path / "img.x86_64.raw", "-T2", "--block-size=400000")
    blocks = RawBlocks(
        resolve_source(str(compressed)), block_size=BLOCK, prefer_subprocess=subprocess_decoder
    )
    got = list(blocks)
    assert [i for i, _ in got] == [0, 1, 2]
    assert all(len(b) == BLOCK for _, b in got)
    assert b"".join(b for _, b in got)[: len(data)] == data
    assert got[-1][1][4321:] == bytes(BLOCK - 4321)
    assert blocks.stats.bytes_raw == len(data)
    assert blocks.stats.sha256_raw == hashlib.sha256(data).hexdigest()
    assert blocks.stats.sha256_compressed == hashlib.sha256(compressed.read_bytes()).hexdigest()


@pytest.mark.parametrize("subprocess_decoder", [True, False])
def test_sparse_blocks_give_none_for_zero_blocks(tmp_path: Path, subprocess_decoder: bool) -> None:
    pieces = [os.urandom(BLOCK), bytes(2 * BLOCK), b"\x01" + bytes(BLOCK - 1), os.urandom(1000)]
    data = b"".join(pieces)
    (tmp_path / "s.x86_64.raw").write_bytes(data)
    compressed = xz(tmp_path / "s.x86_64.raw")
    source = resolve_source(str(compressed))
    full = RawBlocks(source, block_size=BLOCK, prefer_subprocess=subprocess_decoder)
    sparse = RawBlocks(source, block_size=BLOCK, prefer_subprocess=subprocess_decoder)
    expected = list(full)
    got = list(sparse.sparse())
    assert [i for i, _ in got] == [0, 1, 2, 3, 4]
    assert [b is None for _, b in got] == [False, True, True, False, False]
    for (_, block), (_, want) in zip(got, expected, strict=True):
        assert block == (None if want == bytes(BLOCK) else want)
    assert got[4][1] == pieces[3] + bytes(BLOCK - 1000)  # the reused buffer is zero-padded
    assert sparse.stats == full.stats
    assert sparse.stats.sha256_raw == hashlib.sha256(data).hexdigest()


def test_decompressor_feed_survives_partial_pipe_writes() -> None:
    """A raw pipe may take only part of a chunk (a signal interrupts the write): none is lost."""
    from fedimg.source import _write_all

    class Trickle:
        def __init__(self) -> None:
            self.got = bytearray()

        def write(self, data: memoryview) -> int:
            taken = bytes(data[:1000])
            self.got += taken
            return len(taken)

    pipe = Trickle()
    chunk = os.urandom(10_500)
    _write_all(pipe, chunk)  # type: ignore[arg-type]
    assert bytes(pipe.got) == chunk


@pytest.mark.parametrize("subprocess_decoder", [True, False])
def test_corrupt_and_truncated_xz_are_input_errors(
    tmp_path: Path, subprocess_decoder: bool
) -> None:
    make_raw(tmp_path / "img.x86_64.raw", 3 * BLOCK)
    compressed = xz(tmp_path / "img.x86_64.raw").read_bytes()
    corrupt = tmp_path / "corrupt.x86_64.raw.xz"
    corrupt.write_bytes(
        compressed[:200] + bytes(b ^ 0xFF for b in compressed[200:400]) + compressed[400:]
    )
    truncated = tmp_path / "truncated.x86_64.raw.xz"
    truncated.write_bytes(compressed[: len(compressed) // 2])
    for bad, words in ((corrupt, "corrupt"), (truncated, "truncated|corrupt|end")):
        blocks = RawBlocks(
            resolve_source(str(bad)), block_size=BLOCK, prefer_subprocess=subprocess_decoder
        )
        with pytest.raises(InputError, match=words):
            list(blocks)


def test_checksum_file_lines(reference_dir: Path) -> None:
    text = (
        reference_dir / "checksum" / "Fedora-Cloud-40-1.14-x86_64-CHECKSUM.RECONSTRUCTED-unsigned"
    ).read_text()
    names = [
        line.split("(")[1].split(")")[0]
        for line in text.splitlines()
        if line.startswith("SHA256 (")
    ]
    assert names
    found = parse_checksum_file(text, names[0])
    assert found is not None
    assert len(found) == 64
    signed = (
        reference_dir
        / "checksum"
        / "Fedora-Cloud-40-1.14-x86_64-CHECKSUM.RECONSTRUCTED-clearsign-shape"
    ).read_text()
    assert parse_checksum_file(signed, names[0]) == found
    assert parse_checksum_file(text, "nope.raw.xz") is None


def test_http_source_resumes_after_dropped_connections(tmp_path: Path) -> None:
    data = make_raw(tmp_path / "img.x86_64.raw", 5 * BLOCK)
    compressed = xz(tmp_path / "img.x86_64.raw")
    with serve_files(tmp_path, Faults(drop_after=100_000)) as (base, faults):
        source = resolve_source(f"{base}/{compressed.name}")
        assert raw_size(source) == len(data)
        faults.drops = 2
        faults.requests.clear()
        blocks = RawBlocks(source, block_size=BLOCK, prefer_subprocess=False)
        assert b"".join(b for _, b in blocks)[: len(data)] == data
    assert blocks.stats.sha256_compressed == hashlib.sha256(compressed.read_bytes()).hexdigest()
    assert faults.requests == ["", "bytes=100000-", "bytes=200000-"]


def test_http_errors_are_input_errors(tmp_path: Path) -> None:
    with serve_files(tmp_path) as (base, _):
        source = resolve_source(f"{base}/missing.x86_64.raw.xz")
        with pytest.raises(InputError, match="HTTP 404"):
            raw_size(source)
        with pytest.raises(InputError, match="HTTP 404"):
            list(RawBlocks(source, block_size=BLOCK))
    with pytest.raises(InputError, match="cannot connect"):
        raw_size(resolve_source("http://127.0.0.1:9/x.x86_64.raw.xz"))


def test_blocks_never_read_the_whole_image_into_memory(tmp_path: Path) -> None:
    # A 64 MiB sparse raw image streams block by block: each block is a fresh 512 KiB object.
    path = tmp_path / "big.x86_64.raw"
    with path.open("wb") as handle:
        handle.truncate(64 * 1024 * 1024)
    os.sync()
    count = 0
    for _index, block in RawBlocks(resolve_source(str(path)), block_size=BLOCK):
        assert len(block) == BLOCK
        count += 1
    assert count == 128

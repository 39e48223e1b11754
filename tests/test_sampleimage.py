"""Tests for fedimg.sampleimage: the sample disk images used by the demo, tests and benchmarks."""

from __future__ import annotations

import hashlib
import lzma
import math
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from fedimg import sampleimage
from fedimg.errors import FedimgError, InputError
from fedimg.sampleimage import SampleImage, parse_size, write_sample_image

MiB = 1 << 20
SIZE = 32 * MiB
FILL = 0.3
BLOCK = 512 << 10

pytestmark = pytest.mark.skipif(
    shutil.which("mke2fs", path="/usr/sbin:/sbin:/usr/bin:/bin") is None,
    reason="e2fsprogs is not installed",
)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(MiB):
            digest.update(block)
    return digest.hexdigest()


def _decompress(source: Path, target: Path) -> None:
    with lzma.open(source) as reader, open(target, "wb") as writer:
        shutil.copyfileobj(reader, writer, MiB)


def _nonzero_share(raw: Path) -> float:
    """Share of the disk in 512 KiB blocks that hold anything but zeros."""
    nonzero = total = 0
    with open(raw, "rb") as handle:
        while block := handle.read(BLOCK):
            total += 1
            nonzero += block != bytes(len(block))
    return nonzero / total


@pytest.fixture(scope="module")
def xz_image(tmp_path_factory: pytest.TempPathFactory) -> SampleImage:
    directory = tmp_path_factory.mktemp("xz")
    return write_sample_image(directory / "disk.raw.xz", size_bytes=SIZE, fill=FILL, seed=7)


@pytest.fixture(scope="module")
def raw_of_xz(xz_image: SampleImage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The xz image decompressed with Python's lzma, outside the image's own directory."""
    raw = tmp_path_factory.mktemp("decompressed") / "disk.raw"
    _decompress(xz_image.path, raw)
    return raw


def test_xz_output_is_a_valid_multithreaded_xz_stream(xz_image: SampleImage) -> None:
    data = xz_image.path.read_bytes()
    assert data.startswith(b"\xfd7zXZ\x00")
    assert data.endswith(b"YZ")
    assert _sha256(xz_image.path) == xz_image.sha256_compressed
    assert xz_image.sha256_compressed != xz_image.sha256_raw


def test_output_directory_holds_only_the_image(xz_image: SampleImage) -> None:
    assert list(xz_image.path.parent.iterdir()) == [xz_image.path]


def test_raw_size_and_hash_match_the_decompressed_bytes(
    xz_image: SampleImage, raw_of_xz: Path
) -> None:
    assert xz_image.size_bytes == SIZE
    assert raw_of_xz.stat().st_size == SIZE
    assert _sha256(raw_of_xz) == xz_image.sha256_raw


def test_mbr_has_one_linux_partition_at_1mib_filling_the_disk(raw_of_xz: Path) -> None:
    with open(raw_of_xz, "rb") as handle:
        mbr = handle.read(512)
    assert mbr[510:512] == b"\x55\xaa"
    partition_type = mbr[446 + 4]
    start, count = struct.unpack_from("<II", mbr, 446 + 8)
    assert partition_type == 0x83
    assert start == 2048
    assert start + count == SIZE // 512
    assert mbr[462:510] == bytes(48)  # the other three entries are empty


def test_partition_holds_ext4(raw_of_xz: Path) -> None:
    with open(raw_of_xz, "rb") as handle:
        handle.seek(MiB + 1024)
        superblock = handle.read(1024)
    assert superblock[56:58] == b"\x53\xef"
    (incompat,) = struct.unpack_from("<I", superblock, 0x60)
    assert incompat & 0x40  # extents: ext4, not ext2/ext3
    assert superblock[0x78:0x80] == b"root\x00\x00\x00\x00"  # volume label


def test_fill_is_roughly_respected(xz_image: SampleImage, raw_of_xz: Path) -> None:
    wanted = FILL * SIZE
    assert wanted - 64 * 1024 <= xz_image.data_bytes <= wanted
    # Files are rounded up to blocks and small ones straddle 512 KiB boundaries; metadata adds a
    # little. What matters is that about fill of the disk holds data and the rest is zeros.
    assert FILL * 0.9 <= _nonzero_share(raw_of_xz) <= FILL + 0.2


def test_fill_zero_gives_an_empty_filesystem(tmp_path: Path) -> None:
    image = write_sample_image(tmp_path / "empty.img", size_bytes=16 * MiB, fill=0)
    assert image.data_bytes == 0
    assert _nonzero_share(image.path) < 0.1
    with open(image.path, "rb") as handle:
        handle.seek(MiB + 1024 + 56)
        assert handle.read(2) == b"\x53\xef"


def test_uncompressed_image_is_deterministic_and_matches_the_xz_one(
    xz_image: SampleImage, tmp_path: Path
) -> None:
    first = write_sample_image(tmp_path / "a.img", size_bytes=SIZE, fill=FILL, seed=7)
    second = write_sample_image(tmp_path / "b.img", size_bytes=SIZE, fill=FILL, seed=7)
    assert first.sha256_raw == second.sha256_raw == xz_image.sha256_raw
    assert first.sha256_compressed == first.sha256_raw
    assert first.data_bytes == xz_image.data_bytes
    assert first.path.stat().st_size == SIZE
    assert _sha256(first.path) == first.sha256_raw


def test_other_seed_gives_another_image(xz_image: SampleImage, tmp_path: Path) -> None:
    other = write_sample_image(tmp_path / "other.img", size_bytes=SIZE, fill=FILL, seed=8)
    assert other.sha256_raw != xz_image.sha256_raw


def test_size_is_rounded_down_to_whole_sectors(tmp_path: Path) -> None:
    image = write_sample_image(tmp_path / "odd.img", size_bytes=16 * MiB + 1000, fill=0.1)
    assert image.size_bytes == 16 * MiB + 512
    assert image.path.stat().st_size == image.size_bytes


def test_compress_flag_overrides_the_suffix(tmp_path: Path) -> None:
    image = write_sample_image(tmp_path / "disk.img", size_bytes=16 * MiB, fill=0.1, compress=True)
    assert image.path.read_bytes()[:6] == b"\xfd7zXZ\x00"
    raw = tmp_path / "disk.raw"
    _decompress(image.path, raw)
    assert _sha256(raw) == image.sha256_raw


def test_python_lzma_is_used_without_the_xz_binary(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real_find_tool: Callable[[str], str | None] = sampleimage._find_tool
    monkeypatch.setattr(
        sampleimage, "_find_tool", lambda name: None if name == "xz" else real_find_tool(name)
    )
    compressed = write_sample_image(tmp_path / "disk.xz", size_bytes=16 * MiB, fill=0.2)
    plain = write_sample_image(tmp_path / "disk.img", size_bytes=16 * MiB, fill=0.2)
    raw = tmp_path / "disk.raw"
    _decompress(compressed.path, raw)
    assert _sha256(raw) == compressed.sha256_raw == plain.sha256_raw
    assert _sha256(compressed.path) == compressed.sha256_compressed


def test_failed_compression_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    false = shutil.which("false")
    assert false is not None
    real_find_tool: Callable[[str], str | None] = sampleimage._find_tool
    monkeypatch.setattr(
        sampleimage, "_find_tool", lambda name: false if name == "xz" else real_find_tool(name)
    )
    with pytest.raises(FedimgError, match=r"^xz failed \(exit 1\)"):
        write_sample_image(tmp_path / "disk.xz", size_bytes=16 * MiB, fill=0.1)
    assert list(tmp_path.iterdir()) == []


def test_missing_e2fsprogs_is_an_input_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(sampleimage, "_find_tool", lambda name: None)
    with pytest.raises(InputError, match="install e2fsprogs"):
        write_sample_image(tmp_path / "disk.img", size_bytes=16 * MiB)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size_bytes": 16 * MiB - 512}, "too small"),
        ({"size_bytes": 0}, "too small"),
        ({"size_bytes": 3 << 40}, "too large"),
        ({"size_bytes": float(32 * MiB)}, "whole number of bytes"),
        ({"size_bytes": 32 * MiB, "fill": 0.95}, "fill must be a number from 0 to 0.9"),
        ({"size_bytes": 32 * MiB, "fill": -0.1}, "fill must be"),
        ({"size_bytes": 32 * MiB, "fill": math.nan}, "fill must be"),
    ],
)
def test_bad_arguments_are_input_errors(
    kwargs: dict[str, object], message: str, tmp_path: Path
) -> None:
    with pytest.raises(InputError, match=message) as caught:
        write_sample_image(tmp_path / "disk.img", **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_bad_paths_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        write_sample_image(tmp_path / "missing" / "disk.img", size_bytes=16 * MiB)
    with pytest.raises(InputError, match="is a directory"):
        write_sample_image(tmp_path, size_bytes=16 * MiB)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("0", 0),
        ("1536K", 1536 * 1024),
        ("512M", 512 * MiB),
        ("512m", 512 * MiB),
        ("2G", 2 << 30),
        ("2GiB", 2 << 30),
        ("2GB", 2 << 30),
        ("1.5G", 3 << 29),
        (".5M", 512 * 1024),
        ("1T", 1 << 40),
        (" 64 M ", 64 * MiB),
        ("0.1K", 102),  # fractional bytes are rounded down
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "-1G", "2X", "1e9", "2 G B", "1.2.3M", "two", "0x10"])
def test_parse_size_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size") as caught:
        parse_size(text)
    assert repr(text) in str(caught.value)

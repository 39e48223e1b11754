"""Write realistic sample disk images for the demo, the tests and the benchmarks.

A sample image stands in for a Fedora Cloud raw image. Its layout is:

* sector 0: an MBR partition table with one Linux partition (type 0x83) that starts at sector 2048
  (1 MiB) and runs to the end of the disk;
* the partition: an ext4 filesystem made by ``mke2fs -t ext4 -d STAGING_DIR``, holding real files
  copied from this machine (from :data:`SOURCE_ROOTS`), about ``fill * size`` bytes of them, so the
  image compresses like an operating system image does;
* everything else: zeros, left as holes when the image is written uncompressed.

The image is assembled while it is streamed out: the ext4 filesystem is built in a sparse temporary
file and the disk bytes (partition table, gap, filesystem, tail) are generated chunk by chunk, hashed
and either written sparsely or piped through ``xz -T0``. Neither the disk nor its compressed form is
ever held in memory.

The output is a pure function of the arguments and of the files found on this machine: the same
``size_bytes``, ``fill`` and ``seed`` on the same machine give the same raw bytes. (The compressed
bytes depend on the xz version too.) Another machine has other files, so another image.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import lzma
import math
import os
import random
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from fedimg.errors import FedimgError, InputError

SECTOR_SIZE = 512
PARTITION_START_SECTOR = 2048
"""The partition starts at 1 MiB, the alignment every current partitioning tool uses."""
MIN_SIZE_BYTES = 16 << 20
MAX_SIZE_BYTES = (PARTITION_START_SECTOR + 0xFFFF_FFFF) * SECTOR_SIZE
"""An MBR partition entry counts sectors in 32 bits, which caps the disk just above 2 TiB."""
MAX_FILL = 0.9
SOURCE_ROOTS = (Path("/usr/share"), Path("/usr/lib"))
"""Where the files that fill the filesystem are copied from."""
XZ_PRESET = 0
"""xz compression level. For a 2 GiB image with fill 0.3 (614 MiB of files from /usr) xz needs
about 80 CPU-seconds at level 0 (194 MB out), 118 at level 1 (185 MB) and roughly twice and four
times that at levels 2 and 3 (182 and 179 MB); on a 2-core machine only level 0 keeps the whole
image near the one-minute mark. Real images use xz's default, level 6, which would take minutes."""
FIXED_EPOCH = 1_704_067_200
"""2024-01-01T00:00:00Z: every timestamp inside the filesystem, so the image is reproducible."""

_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)
_MBR_SIGNATURE = b"\x55\xaa"
_LINUX_PARTITION_TYPE = 0x83
_EXT4_BLOCK_SIZE = 4096
_EXT4_INODE_SIZE = 256
_ROOT_INODE = 2
# Stop looking for files once the remaining data budget is this small: the last few KiB are not
# worth walking the rest of /usr for.
_DONE_SLACK = 64 << 10
# Files that are already compressed (by their magic number: gzip, xz, zstd, bzip2, zip/jar, PNG,
# JPEG, lz4, 7z) make at most this share of the data. A real OS image has some (compressed kernel
# modules, the initramfs, man pages), but xz crawls through incompressible data, so too much of it
# would make the sample both unrealistic and slow to write.
_COMPRESSED_SHARE = 0.1
_COMPRESSED_MAGIC = (
    b"\x1f\x8b",
    b"\xfd7zXZ\x00",
    b"\x28\xb5\x2f\xfd",
    b"BZh",
    b"PK\x03\x04",
    b"\x89PNG",
    b"\xff\xd8\xff",
    b"\x04\x22\x4d\x18",
    b"7z\xbc\xaf\x27\x1c",
)
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
# The free-space budget keeps this share of the filesystem's free blocks in reserve for what the
# per-file estimate does not count (extent index blocks, directory growth).
_SPACE_MARGIN = 0.03


@dataclass(frozen=True)
class SampleImage:
    """What :func:`write_sample_image` wrote.

    ``size_bytes`` is the raw (uncompressed) disk size, ``sha256_raw`` the hex SHA-256 of those raw
    bytes, ``sha256_compressed`` the hex SHA-256 of the file actually written (equal to
    ``sha256_raw`` when the image was written uncompressed) and ``data_bytes`` the total size of
    the files put into the filesystem.
    """

    path: Path
    size_bytes: int
    sha256_raw: str
    sha256_compressed: str
    data_bytes: int


_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([KMGT])(?:i?B)?|B)?\s*\Z", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Parse a human size into bytes, with binary units.

    Accepts a non-negative decimal number followed by an optional ``K``, ``M``, ``G`` or ``T``
    (powers of 1024, case-insensitive, optionally written ``KiB``/``KB`` and so on; a bare ``B``
    means bytes): ``"4096"``,
    ``"1536K"``, ``"512M"``, ``"2G"``, ``"1.5G"``. A fractional result is rounded down to a whole
    byte. Raises :class:`ValueError` naming the text for anything else.
    """
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(
            f"invalid size {text!r}: expected a number with an optional K, M, G or T suffix "
            "(binary units), e.g. 2G, 512M or 1.5G"
        )
    number: str = match.group(1)
    unit: str = match.group(2) or ""
    whole, _, fraction = number.partition(".")
    # Integer arithmetic, so "1.5G" is exact and huge values do not lose precision in a float.
    scale = _UNITS[unit.upper()]
    denominator: int = 10 ** len(fraction)
    return (int(whole or "0") * denominator + int(fraction or "0")) * scale // denominator


def write_sample_image(
    path: Path,
    *,
    size_bytes: int,
    fill: float = 0.3,
    seed: int = 0,
    compress: bool | None = None,
) -> SampleImage:
    """Write a sample disk image of ``size_bytes`` bytes to ``path`` and describe it.

    ``size_bytes`` is rounded down to a whole number of 512-byte sectors; it must be at least
    16 MiB and at most the MBR limit (just over 2 TiB). ``fill`` (0 to 0.9) is the share of the disk
    to fill with file data; the files are real ones from :data:`SOURCE_ROOTS`, repeated under
    ``/copyN`` directories if the machine has too few, chosen by a walk shuffled with ``seed``.
    The data put in is at most ``fill * size`` and normally short of it by less than 64 KiB; when
    the filesystem has no room for that much (its metadata takes a few percent, more on small
    disks, and it has a fixed number of inodes) it holds as much as fits, and with no readable
    files under the roots it stays empty. ``data_bytes`` in the result says how much it got.
    ``fill=0`` gives an empty ext4 filesystem.

    ``compress=None`` compresses with xz when ``path`` ends in ``.xz`` and writes the raw disk
    (sparse) otherwise; ``True``/``False`` force it. The xz binary is used (multi-threaded, so the
    stream has several blocks like real images); Python's :mod:`lzma` only when it is missing.

    The output appears at ``path`` only when complete (it is renamed into place); temporary files
    live in a hidden directory next to it and are removed whatever happens. Raises
    :class:`~fedimg.errors.InputError` for bad arguments or when e2fsprogs (``mke2fs``,
    ``debugfs``, ``dumpe2fs``) is not installed, and :class:`~fedimg.errors.FedimgError` when a tool fails.
    """
    sectors = _check_arguments(path, size_bytes, fill, seed)
    if compress is None:
        compress = path.name.endswith(".xz")
    mke2fs = _find_tool("mke2fs")
    debugfs = _find_tool("debugfs")
    dumpe2fs = _find_tool("dumpe2fs")
    if mke2fs is None or debugfs is None or dumpe2fs is None:
        raise InputError("mke2fs not found: install e2fsprogs to write sample images")
    xz = _find_tool("xz") if compress else None

    disk_bytes = sectors * SECTOR_SIZE
    partition_bytes = (sectors - PARTITION_START_SECTOR) * SECTOR_SIZE
    # Every identifier in the image (filesystem UUID, directory hash seed, MBR disk signature)
    # comes from the seed, so none is random.
    digest = hashlib.sha512(f"fedimg sample image, seed {seed}".encode()).digest()
    fs_uuid = uuid.UUID(bytes=digest[:16], version=4)
    hash_seed = uuid.UUID(bytes=digest[16:32], version=4)
    tool_env = {
        **os.environ,
        "LC_ALL": "C",
        "SOURCE_DATE_EPOCH": str(FIXED_EPOCH),
        # libext2fs reads this for every "now" it stamps (superblock times, new inodes).
        "E2FSPROGS_FAKE_TIME": str(FIXED_EPOCH),
    }
    mkfs_command = [
        mke2fs,
        "-q",
        "-F",
        "-t",
        "ext4",
        "-T",
        "default",
        "-b",
        str(_EXT4_BLOCK_SIZE),
        "-I",
        str(_EXT4_INODE_SIZE),
        "-L",
        "root",
        "-U",
        str(fs_uuid),
        "-E",
        f"hash_seed={hash_seed},root_owner=0:0,nodiscard",
    ]

    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        work = Path(tmp)
        fs_image = work / "fs.img"
        staging = work / "root"
        staging.mkdir()

        # An empty filesystem first, to learn how much room the files will really have.
        _make_sparse(fs_image, partition_bytes)
        _run_tool([*mkfs_command, str(fs_image)], tool_env)
        free_blocks, free_inodes = _ext4_free_space(fs_image)

        wanted = math.floor(fill * disk_bytes)
        budget = _Budget(
            data_bytes=wanted,
            compressed_bytes=math.floor(wanted * _COMPRESSED_SHARE),
            blocks=math.floor(free_blocks * (1 - _SPACE_MARGIN)) - 16,
            inodes=free_inodes - 16,
        )
        _stage_files(staging, budget, random.Random(seed), exclude=work)

        _make_sparse(fs_image, partition_bytes)
        _run_tool([*mkfs_command, "-d", str(staging), str(fs_image)], tool_env)
        inodes = _used_inodes(dumpe2fs, fs_image, tool_env)
        _normalise_inodes(debugfs, fs_image, inodes, work / "debugfs.cmd", tool_env)

        output = work / "output"
        chunks = _disk_chunks(_mbr(sectors, digest[32:36]), fs_image, partition_bytes)
        if not compress:
            raw_hash = _write_raw(chunks, output)
            compressed_hash = raw_hash
        elif xz is not None:
            raw_hash, compressed_hash = _write_xz(chunks, output, xz, work / "xz.err")
        else:
            raw_hash, compressed_hash = _write_lzma(chunks, output)
        os.replace(output, path)

    return SampleImage(
        path=path,
        size_bytes=disk_bytes,
        sha256_raw=raw_hash,
        sha256_compressed=compressed_hash,
        data_bytes=budget.used_data,
    )


def _check_arguments(path: Path, size_bytes: int, fill: float, seed: int) -> int:
    """Validate the arguments and return the disk size in sectors; raise InputError otherwise."""
    if isinstance(size_bytes, bool) or not isinstance(size_bytes, int):
        raise InputError(f"sample image size must be a whole number of bytes, not {size_bytes!r}")
    if size_bytes < MIN_SIZE_BYTES:
        raise InputError(
            f"sample image size {size_bytes} bytes is too small: the minimum is 16 MiB "
            f"({MIN_SIZE_BYTES} bytes)"
        )
    if size_bytes > MAX_SIZE_BYTES:
        raise InputError(
            f"sample image size {size_bytes} bytes is too large: an MBR disk holds at most "
            f"{MAX_SIZE_BYTES} bytes"
        )
    if (
        isinstance(fill, bool)
        or not isinstance(fill, int | float)
        or not math.isfinite(fill)
        or not 0 <= fill <= MAX_FILL
    ):
        raise InputError(f"sample image fill must be a number from 0 to {MAX_FILL}, not {fill!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"sample image seed must be an integer, not {seed!r}")
    if path.is_dir():
        raise InputError(f"sample image path {path} is a directory")
    if not path.parent.is_dir():
        raise InputError(f"sample image directory {path.parent} does not exist")
    return size_bytes // SECTOR_SIZE


def _find_tool(name: str) -> str | None:
    """Return the full path of a program, also looking in the sbin directories a user's PATH lacks."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/sbin"])
    return shutil.which(name, path=search)


def _run_tool(command: list[str], env: dict[str, str]) -> None:
    """Run an e2fsprogs command; raise FedimgError with its last error line if it fails."""
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise FedimgError(
            f"{Path(command[0]).name} failed (exit {result.returncode}): {_last_line(result.stderr)}"
        )


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no error message"


def _make_sparse(file: Path, size: int) -> None:
    """(Re)create ``file`` as a hole of ``size`` bytes, which takes no space until written."""
    with open(file, "wb") as handle:
        handle.truncate(size)


def _ext4_free_space(fs_image: Path) -> tuple[int, int]:
    """Return the free block and free inode counts from an ext4 superblock."""
    with open(fs_image, "rb") as handle:
        handle.seek(1024)
        superblock = handle.read(1024)
    free_inodes = struct.unpack_from("<I", superblock, 0x10)[0]
    free_blocks = struct.unpack_from("<I", superblock, 0x0C)[0]
    (incompat,) = struct.unpack_from("<I", superblock, 0x60)
    if incompat & 0x80:  # INCOMPAT_64BIT: the count has a high half
        free_blocks |= struct.unpack_from("<I", superblock, 0x158)[0] << 32
    return free_blocks, free_inodes


@dataclass
class _Budget:
    """What is left to fill: file bytes wanted, filesystem blocks and inodes available.

    ``compressed_bytes`` caps the already-compressed files (see :data:`_COMPRESSED_SHARE`).
    """

    data_bytes: int
    compressed_bytes: int
    blocks: int
    inodes: int
    used_data: int = 0

    def room_for(self, size: int, *, compressed: bool, directories: int) -> bool:
        return (
            size <= self.data_bytes
            and (not compressed or size <= self.compressed_bytes)
            and _blocks(size) + directories <= self.blocks
            and 1 + directories <= self.inodes
        )

    def take(self, size: int, *, compressed: bool) -> None:
        self.data_bytes -= size
        if compressed:
            self.compressed_bytes -= size
        self.blocks -= _blocks(size)
        self.inodes -= 1
        self.used_data += size

    def take_directory(self) -> None:
        self.blocks -= 1
        self.inodes -= 1

    def done(self) -> bool:
        return self.data_bytes < _DONE_SLACK or self.blocks < 1 or self.inodes < 1


def _blocks(size: int) -> int:
    return -(-size // _EXT4_BLOCK_SIZE)


def _stage_files(staging: Path, budget: _Budget, rng: random.Random, exclude: Path) -> None:
    """Copy real files into ``staging`` (the future filesystem's root) within ``budget``.

    Each pass walks :data:`SOURCE_ROOTS` in an order shuffled by ``rng``, copying whole directory
    trees as it goes (as packages lay files out) and skipping files that do not fit; a pass after
    the first copies under ``/copyN``. Passes stop when the budget is spent or a pass finds
    nothing more that fits.
    """
    made: set[str] = set()
    pass_number = 0
    while not budget.done():
        prefix = "" if pass_number == 0 else f"/copy{pass_number}"
        inodes_before = budget.inodes
        roots = sorted(str(root) for root in SOURCE_ROOTS)
        rng.shuffle(roots)
        for root in roots:
            for source, size in _walk_files(root, rng, str(exclude.resolve())):
                if budget.done():
                    break
                target = prefix + source
                _stage_file(source, size, target, staging=staging, budget=budget, made=made)
        if budget.inodes == inodes_before:
            break
        pass_number += 1


def _stage_file(
    source: str,
    size: int,
    target: str,
    *,
    staging: Path,
    budget: _Budget,
    made: set[str],
) -> None:
    """Copy ``source`` to ``target`` (a path inside the filesystem) if readable and in budget.

    ``size`` is what the directory walk saw, to skip files that cannot fit without opening them.
    ``made`` holds the directories already created, and receives those this creates.
    """
    ancestors = list(reversed(PurePosixPath(target).parents))[1:]  # without "/"
    new_dirs = [str(d) for d in ancestors if str(d) not in made]
    if size == 0 or not budget.room_for(size, compressed=False, directories=len(new_dirs)):
        return
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        try:
            status = os.fstat(fd)
            head = os.pread(fd, 8, 0)
        except OSError:
            return
        compressed = head.startswith(_COMPRESSED_MAGIC)
        if (
            not stat.S_ISREG(status.st_mode)
            or status.st_size == 0
            or not budget.room_for(status.st_size, compressed=compressed, directories=len(new_dirs))
        ):
            return
        for directory in new_dirs:
            local = staging / directory.lstrip("/")
            local.mkdir()
            os.chmod(local, 0o755)  # explicit, so the image does not depend on the umask
            made.add(directory)
            budget.take_directory()
        mode = 0o755 if status.st_mode & 0o111 else 0o644
        copied = _copy_contents(fd, staging / target.lstrip("/"), mode)
    finally:
        os.close(fd)
    if copied is not None:
        budget.take(copied, compressed=compressed)


def _walk_files(directory: str, rng: random.Random, exclude: str) -> Iterator[tuple[str, int]]:
    """Yield (path, size) of the regular files under ``directory``, depth-first, shuffled by ``rng``.

    Symbolic links, unreadable directories and ``exclude`` (the temporary directory, should it
    lie under a root) are skipped. The walk is lazy, so a small image does not pay for listing all
    of /usr.
    """
    try:
        with os.scandir(directory) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError:
        return
    rng.shuffle(entries)
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                if entry.path != exclude:
                    yield from _walk_files(entry.path, rng, exclude)
            elif entry.is_file(follow_symlinks=False):
                yield entry.path, entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue


def _copy_contents(source_fd: int, destination: Path, mode: int) -> int | None:
    """Copy an open file into a new file; return the bytes copied, or None if reading failed.

    A failed copy leaves no file behind. Read errors mean "skip this file"; errors that can only
    come from writing (a full disk, say) propagate.
    """
    target_fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    copied: int | None = 0
    try:
        os.fchmod(target_fd, mode)  # explicit, so the image does not depend on the umask
        copied = _sendfile_all(source_fd, target_fd)
    finally:
        os.close(target_fd)
        if copied is None:
            destination.unlink()
    return copied


def _sendfile_all(source_fd: int, target_fd: int) -> int | None:
    """Copy all of ``source_fd`` into ``target_fd`` in the kernel if possible, else by reading."""
    copied = 0
    try:
        while sent := os.sendfile(target_fd, source_fd, copied, 8 * _CHUNK):
            copied += sent
        return copied
    except OSError as error:
        if error.errno in _WRITE_ERRNOS:
            raise
        if error.errno not in (errno.EINVAL, errno.ENOSYS) or copied:
            return None
    # No sendfile between these two filesystems: copy through user space.
    while True:
        try:
            block = os.pread(source_fd, _CHUNK, copied)
        except OSError:
            return None
        if not block:
            return copied
        view = memoryview(block)
        while view:
            view = view[os.write(target_fd, view) :]
        copied += len(block)


def _used_inodes(dumpe2fs: str, fs_image: Path, env: dict[str, str]) -> list[int]:
    """Return the numbers of the root directory's inode and of every ordinary inode in use.

    The reserved inodes below the first ordinary one (journal, resize inode...) are left out.
    The free ranges come from dumpe2fs's per-group "Free inodes:" lines; their total is checked
    against the superblock so that a change in dumpe2fs's output cannot go unnoticed.
    """
    result = subprocess.run(
        [dumpe2fs, str(fs_image)], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise FedimgError(
            f"dumpe2fs failed (exit {result.returncode}): {_last_line(result.stderr)}"
        )
    header: dict[str, str] = {}
    free: list[tuple[int, int]] = []
    try:
        for line in result.stdout.splitlines():
            if line.startswith("  Free inodes:"):
                ranges = line.partition(":")[2].strip()
                for item in filter(None, (part.strip() for part in ranges.split(","))):
                    first, _, last = item.partition("-")
                    free.append((int(first), int(last or first)))
            elif not line.startswith(" ") and ":" in line:
                key, _, value = line.partition(":")
                header[key] = value.strip()
        inode_count = int(header["Inode count"])
        first_inode = int(header["First inode"])
    except (KeyError, ValueError) as error:
        raise FedimgError(f"unexpected dumpe2fs output: {error}") from error
    _, free_inodes = _ext4_free_space(fs_image)
    if sum(high - low + 1 for low, high in free) != free_inodes:
        raise FedimgError(
            "unexpected dumpe2fs output: its free inodes disagree with the superblock"
        )
    used = [_ROOT_INODE]
    next_inode = first_inode
    for low, high in sorted(free):
        if high < next_inode:
            continue
        used.extend(range(next_inode, low))
        next_inode = high + 1
    used.extend(range(next_inode, inode_count + 1))
    return used


def _normalise_inodes(
    debugfs: str, fs_image: Path, inodes: list[int], command_file: Path, env: dict[str, str]
) -> None:
    """Give ``inodes`` owner root and the fixed timestamps.

    ``mke2fs -d`` copies each staged file's owner and times, including its ctime, which records
    when the copy was made and cannot be set from user space. Rewriting them with debugfs makes
    the filesystem reproducible, and owned by root whoever runs this. Inodes are named by number:
    debugfs looks paths up by scanning directories, which is slow for the big ones under /usr.
    """
    epoch = f"@{FIXED_EPOCH}"
    fields = (("uid", "0"), ("gid", "0"), ("atime", epoch), ("mtime", epoch), ("ctime", epoch))
    with open(command_file, "w", encoding="ascii") as commands:
        for inode in inodes:
            for field, value in fields:
                commands.write(f"sif <{inode}> {field} {value}\n")
    result = subprocess.run(
        [debugfs, "-w", "-f", str(command_file), str(fs_image)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    # debugfs exits 0 even when a command fails; anything on stderr but its banner is an error.
    errors = [
        line for line in result.stderr.splitlines() if line and not line.startswith("debugfs ")
    ]
    if result.returncode != 0 or errors:
        detail = errors[-1] if errors else _last_line(result.stderr)
        raise FedimgError(f"debugfs failed to normalise the sample filesystem: {detail}")


def _mbr(sectors: int, disk_signature: bytes) -> bytes:
    """Return a 512-byte MBR with one Linux partition from sector 2048 to the end of the disk."""
    start = PARTITION_START_SECTOR
    count = sectors - start
    entry = struct.pack(
        "<B3sB3sII",
        0x00,  # not bootable: there is no boot loader
        _chs(start),
        _LINUX_PARTITION_TYPE,
        _chs(start + count - 1),
        start,
        count,
    )
    mbr = bytearray(SECTOR_SIZE)
    mbr[440:444] = disk_signature
    mbr[446:462] = entry
    mbr[510:512] = _MBR_SIGNATURE
    return bytes(mbr)


def _chs(lba: int) -> bytes:
    """Encode a sector number as MBR cylinder/head/sector, for a 255-head, 63-sector geometry.

    Sectors past cylinder 1023 get the conventional "use LBA" maximum, as fdisk writes it.
    """
    heads, per_track = 255, 63
    cylinder = lba // (heads * per_track)
    if cylinder > 1023:
        return bytes((0xFE, 0xFF, 0xFF))
    head = (lba // per_track) % heads
    sector = lba % per_track + 1
    return bytes((head, sector | ((cylinder >> 2) & 0xC0), cylinder & 0xFF))


_Chunk = tuple[bytes | memoryview, bool]
"""A piece of the disk and whether it is all zeros (so a raw writer can leave a hole)."""


def _disk_chunks(mbr: bytes, fs_image: Path, partition_bytes: int) -> Iterator[_Chunk]:
    """Yield the whole disk, in order, in pieces of at most 1 MiB."""
    yield mbr, False
    yield from _zero_chunks(PARTITION_START_SECTOR * SECTOR_SIZE - len(mbr))
    with open(fs_image, "rb") as handle:
        yield from _file_chunks(handle, partition_bytes)


def _zero_chunks(length: int) -> Iterator[_Chunk]:
    zeros = memoryview(_ZEROS)
    while length > 0:
        piece = min(length, _CHUNK)
        yield zeros[:piece], True
        length -= piece


def _file_chunks(handle: BinaryIO, length: int) -> Iterator[_Chunk]:
    """Yield ``length`` bytes of a file, zero-padded past its end, skipping reads of its holes."""
    fd = handle.fileno()
    end = min(os.fstat(fd).st_size, length)
    position = 0
    while position < end:
        data, hole = _next_data(fd, position, end)
        yield from _zero_chunks(data - position)
        position = data
        while position < hole:
            block = os.pread(fd, min(_CHUNK, hole - position), position)
            if not block:
                raise FedimgError("the temporary filesystem image shrank while being read")
            yield block, block == _ZEROS[: len(block)]
            position += len(block)
    yield from _zero_chunks(length - position)


def _next_data(fd: int, position: int, end: int) -> tuple[int, int]:
    """Return the next data region at or after ``position`` as (start, end), clipped to ``end``."""
    try:
        data = os.lseek(fd, position, os.SEEK_DATA)
    except OSError as error:
        if error.errno == errno.ENXIO:  # nothing but hole up to the end of the file
            return end, end
        if error.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no hole support: read it all
            return position, end
        raise
    data = min(data, end)
    hole = min(os.lseek(fd, data, os.SEEK_HOLE), end) if data < end else end
    return data, hole


def _write_raw(chunks: Iterator[_Chunk], output: Path) -> str:
    """Write the disk uncompressed and sparse; return the hex SHA-256 of its bytes."""
    digest = hashlib.sha256()
    with open(output, "wb") as handle:
        for chunk, is_zero in chunks:
            digest.update(chunk)
            if is_zero:
                handle.seek(len(chunk), os.SEEK_CUR)
            else:
                handle.write(chunk)
        handle.truncate()  # a trailing hole only moved the position; this sets the length
    return digest.hexdigest()


def _write_xz(chunks: Iterator[_Chunk], output: Path, xz: str, error_log: Path) -> tuple[str, str]:
    """Pipe the disk through ``xz -T0`` into ``output``; return the raw and compressed SHA-256.

    A thread drains xz's output (writing and hashing it) while this one feeds it, so neither pipe
    can fill up and stall the other.
    """
    raw_digest = hashlib.sha256()
    compressed_digest = hashlib.sha256()
    failures: list[BaseException] = []
    with open(output, "wb") as sink, open(error_log, "wb") as error_sink:
        process = subprocess.Popen(
            [xz, "-T0", f"-{XZ_PRESET}", "--compress", "--stdout"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=error_sink,
        )
        assert process.stdin is not None
        assert process.stdout is not None
        source, drain = process.stdin, process.stdout

        def pump() -> None:
            try:
                while block := drain.read(_CHUNK):
                    sink.write(block)
                    compressed_digest.update(block)
            except BaseException as error:
                failures.append(error)
                process.kill()  # unblocks the feeding thread with a broken pipe

        reader = threading.Thread(target=pump, name="xz-output", daemon=True)
        reader.start()
        finished = False
        try:
            with contextlib.suppress(BrokenPipeError):  # xz died: its status says why
                for chunk, _ in chunks:
                    raw_digest.update(chunk)
                    source.write(chunk)
                source.close()
            reader.join()
            returncode = process.wait()
            finished = True
        finally:
            if not finished:
                process.kill()
                reader.join()
                process.wait()
            with contextlib.suppress(BrokenPipeError):
                source.close()
            drain.close()
    if failures:
        raise failures[0]
    if returncode != 0:
        message = _last_line(error_log.read_text(errors="replace"))
        raise FedimgError(f"xz failed (exit {returncode}): {message}")
    return raw_digest.hexdigest(), compressed_digest.hexdigest()


def _write_lzma(chunks: Iterator[_Chunk], output: Path) -> tuple[str, str]:
    """Compress the disk with Python's lzma (single-threaded, one block) into ``output``."""
    raw_digest = hashlib.sha256()
    compressed_digest = hashlib.sha256()
    compressor = lzma.LZMACompressor(
        format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET
    )
    with open(output, "wb") as sink:
        for chunk, _ in chunks:
            raw_digest.update(chunk)
            block = compressor.compress(chunk)
            sink.write(block)
            compressed_digest.update(block)
        block = compressor.flush()
        sink.write(block)
        compressed_digest.update(block)
    return raw_digest.hexdigest(), compressed_digest.hexdigest()

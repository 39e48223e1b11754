"""The image source: a path or URL, streamed, decompressed and cut into fixed-size blocks.

Nothing here holds the image in memory or writes it to disk. A source is read once, front to back:

    reader (file, or HTTP with range-resume) → SHA-256 of the compressed bytes
      → decompressor (``xz -dc -T0`` / ``gzip -dc`` / ``zstd -dc`` subprocess, else Python's lzma)
      → fixed-size blocks (the last one zero-padded) → SHA-256 of the raw bytes

Memory: one read chunk (1 MiB) in the feeder, the OS pipe buffer, the one (reused) block buffer
being filled, and the copy of each block handed out.

Every problem with the input (missing file, HTTP 404, connection refused, corrupt or truncated data,
checksum mismatch) is an :class:`~fedimg.errors.InputError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import lzma
import os
import re
import shutil
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from fedimg.errors import InputError

log = logging.getLogger(__name__)

Compression = Literal["xz", "gzip", "zstd", "none"]

READ_CHUNK = 1024 * 1024
HTTP_TIMEOUT = 30.0
HTTP_RESUME_ATTEMPTS = 5
XZ_MAGIC = b"\xfd7zXZ\x00"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

#: Architecture as written in Fedora's file names → AWS's name for it.
_ARCH_IN_NAME = (("x86_64", "x86_64"), ("aarch64", "arm64"), ("arm64", "arm64"))
_SUFFIXES: tuple[tuple[str, Compression], ...] = (
    (".raw.xz", "xz"),
    (".raw.gz", "gzip"),
    (".raw.zst", "zstd"),
    (".xz", "xz"),
    (".gz", "gzip"),
    (".zst", "zstd"),
    (".raw", "none"),
    (".img", "none"),
)


@dataclass(frozen=True)
class ImageSource:
    """Where an image is and what it is. ``url`` is what messages report (http(s) or file URL)."""

    location: str
    name: str
    arch: str
    compression: Compression
    path: Path | None
    url: str

    @property
    def is_remote(self) -> bool:
        """True for http(s) sources."""
        return self.path is None


@dataclass
class StreamStats:
    """What reading a source measured; complete once the stream is exhausted."""

    bytes_compressed: int = 0
    bytes_raw: int = 0
    sha256_compressed: str = ""
    sha256_raw: str = ""


def resolve_source(location: str, *, arch: str | None = None) -> ImageSource:
    """Describe the image at ``location`` (a path, ``file://`` or ``http(s)://`` URL).

    The name is the file name without its image suffix (fedimg's convention); the architecture
    comes from the name (x86_64, aarch64 → arm64) unless ``arch`` is given. A local file must
    exist and be readable; a URL is checked when it is opened.
    """
    parsed = urllib.parse.urlparse(location)
    path: Path | None
    if parsed.scheme in ("http", "https"):
        path = None
        file_name = Path(urllib.parse.unquote(parsed.path)).name
        url = location
    elif parsed.scheme in ("", "file"):
        path = Path(urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else location)
        if not path.exists():
            raise InputError(f"{path}: no such file")
        if not path.is_file():
            raise InputError(f"{path}: not a regular file")
        if not os.access(path, os.R_OK):
            raise InputError(f"{path}: not readable")
        file_name = path.name
        url = path.resolve().as_uri()
    else:
        raise InputError(f"{location}: unsupported URL scheme {parsed.scheme!r}")
    name, compression = split_image_name(file_name)
    return ImageSource(
        location=location,
        name=name,
        arch=_resolve_arch(name, arch),
        compression=compression,
        path=path,
        url=url,
    )


def split_image_name(file_name: str) -> tuple[str, Compression]:
    """``Fedora-Cloud-Base-41-1.4.x86_64.raw.xz`` → (``Fedora-Cloud-Base-41-1.4.x86_64``, xz)."""
    for suffix, compression in _SUFFIXES:
        if file_name.endswith(suffix) and len(file_name) > len(suffix):
            return file_name[: -len(suffix)], compression
    raise InputError(
        f"{file_name}: not a disk image name (expected .raw.xz, .raw.gz, .raw.zst or .raw)"
    )


def _resolve_arch(name: str, arch: str | None) -> str:
    if arch:
        aliases = {"x86_64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}
        if arch not in aliases:
            raise InputError(f"unknown architecture {arch!r} (x86_64, aarch64 or arm64)")
        return aliases[arch]
    for marker, aws_arch in _ARCH_IN_NAME:
        if marker in name:
            return aws_arch
    raise InputError(f"{name}: cannot tell the architecture from the name; pass --arch")


def parse_checksum_file(text: str, file_name: str) -> str | None:
    """The SHA-256 a pungi CHECKSUM file gives for ``file_name`` (lowercase hex), or None.

    Reads both the plain and the clear-signed form (lines ``SHA256 (name) = hex``).
    """
    pattern = re.compile(r"^SHA256 \((?P<name>[^)]+)\) = (?P<hex>[0-9a-fA-F]{64})\s*$")
    for line in text.splitlines():
        match = pattern.match(line.strip())
        if match and match.group("name") == file_name:
            return match.group("hex").lower()
    return None


def normalise_sha256(value: str) -> str:
    """Validate a user-given SHA-256 (``sha256:`` prefix allowed) and return lowercase hex."""
    text = value.strip().lower().removeprefix("sha256:")
    if not _SHA256_HEX.match(text):
        raise InputError(f"{value!r} is not a SHA-256 checksum (64 hex digits)")
    return text


# --- reading compressed bytes ------------------------------------------------------------------


def _file_chunks(path: Path) -> Iterator[bytes]:
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(READ_CHUNK):
                yield chunk
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from exc


def _http_open(url: str, offset: int) -> http.client.HTTPResponse:
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    request = urllib.request.Request(url, headers=headers)
    response: http.client.HTTPResponse = urllib.request.urlopen(request, timeout=HTTP_TIMEOUT)
    if offset and response.status != 206:
        response.close()
        raise InputError(f"{url}: the server ignored a Range request; cannot resume the download")
    return response


def http_chunks(
    url: str,
    *,
    attempts: int = HTTP_RESUME_ATTEMPTS,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[bytes]:
    """The body of ``url`` in chunks; a dropped connection resumes with a Range request.

    Up to ``attempts`` consecutive failures are retried with exponential backoff. 4xx answers and a
    refused connection on the first request fail at once with :class:`InputError`.
    """
    offset = 0
    failures = 0
    while True:
        try:
            response = _http_open(url, offset)
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or failures >= attempts:
                raise InputError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
            failures += 1
            sleep(min(2.0**failures * 0.25, 8.0))
            continue
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if offset == 0 or failures >= attempts:
                raise InputError(f"{url}: cannot connect: {reason}") from exc
            failures += 1
            sleep(min(2.0**failures * 0.25, 8.0))
            continue
        length = response.headers.get("Content-Length")
        end = offset + int(length) if length and length.isdigit() else None
        try:
            with response:
                while chunk := response.read(READ_CHUNK):
                    offset += len(chunk)
                    failures = 0
                    yield chunk
            # http.client returns a short body without an error when the peer closes early.
            if end is not None and offset < end:
                raise http.client.IncompleteRead(b"", end - offset)
            return
        except (http.client.IncompleteRead, ConnectionError, TimeoutError, OSError) as exc:
            failures += 1
            if failures > attempts:
                raise InputError(f"{url}: download failed at byte {offset}: {exc}") from exc
            log.warning("%s: connection dropped at byte %d; resuming", url, offset)
            sleep(min(2.0**failures * 0.25, 8.0))


def compressed_chunks(source: ImageSource) -> Iterator[bytes]:
    """The source's bytes as stored (compressed), in chunks."""
    if source.path is not None:
        return _file_chunks(source.path)
    return http_chunks(source.url)


def read_range(source: ImageSource, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` of the stored file (a negative offset counts from the end)."""
    if source.path is not None:
        with source.path.open("rb") as handle:
            handle.seek(offset, os.SEEK_END if offset < 0 else os.SEEK_SET)
            return handle.read(length)
    if offset < 0:
        header = f"bytes={offset}" if length >= -offset else f"bytes={offset}-{offset + length - 1}"
    else:
        header = f"bytes={offset}-{offset + length - 1}"
    request = urllib.request.Request(source.url, headers={"Range": header})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            if response.status != 206:
                raise InputError(f"{source.url}: the server does not support Range requests")
            data: bytes = response.read()
            return data
    except urllib.error.HTTPError as exc:
        raise InputError(f"{source.url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise InputError(f"{source.url}: cannot connect: {getattr(exc, 'reason', exc)}") from exc


def stored_size(source: ImageSource) -> int | None:
    """Size of the stored (compressed) file, when known without reading it."""
    if source.path is not None:
        return source.path.stat().st_size
    request = urllib.request.Request(source.url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            length = response.headers.get("Content-Length")
            return int(length) if length else None
    except urllib.error.HTTPError as exc:
        raise InputError(f"{source.url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise InputError(f"{source.url}: cannot connect: {getattr(exc, 'reason', exc)}") from exc


# --- the raw size, before reading ----------------------------------------------------------------


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 63, 7):
        if pos >= len(data):
            raise ValueError("truncated multibyte integer")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise ValueError("multibyte integer too long")


def xz_uncompressed_size(read_at: Callable[[int, int], bytes], total: int) -> int:
    """The uncompressed size an .xz file declares in its indexes (every stream, back to front).

    ``read_at(offset, length)`` reads the file; ``total`` is its size. Raises ValueError when the
    file is not a well-formed xz container.
    """
    end = total
    size = 0
    while end > 0:
        # Skip stream padding (multiples of four zero bytes) between streams.
        while end >= 4 and read_at(end - 4, 4) == b"\0\0\0\0":
            end -= 4
        if end < 24:
            raise ValueError("too short for an xz stream")
        footer = read_at(end - 12, 12)
        if footer[10:12] != b"YZ":
            raise ValueError("no xz stream footer")
        backward = (struct.unpack("<I", footer[4:8])[0] + 1) * 4
        index_start = end - 12 - backward
        if index_start < 12:
            raise ValueError("xz index points outside the file")
        index = read_at(index_start, backward)
        if index[0] != 0:
            raise ValueError("no xz index indicator")
        count, pos = _varint(index, 1)
        blocks_size = 0
        for _ in range(count):
            unpadded, pos = _varint(index, pos)
            uncompressed, pos = _varint(index, pos)
            blocks_size += (unpadded + 3) // 4 * 4
            size += uncompressed
        end = index_start - blocks_size - 12
        if end < 0 or read_at(end, 6) != XZ_MAGIC:
            raise ValueError("xz stream header not where the index says")
    return size


def raw_size(source: ImageSource) -> int | None:
    """The raw (uncompressed) size of the image, if it can be known before reading it all.

    Known for raw files (their size), xz files (their index, read from the end with a seek or an
    HTTP Range request); None for gzip and zstd or when the server refuses Range requests.
    """
    total = stored_size(source)
    if source.compression == "none":
        return total
    if source.compression != "xz" or total is None:
        return None
    try:
        if read_range(source, 0, 6) != XZ_MAGIC:
            raise InputError(f"{source.name}: not an xz file (bad magic bytes)")
        return xz_uncompressed_size(lambda off, n: read_range(source, off, n), total)
    except ValueError as exc:
        raise InputError(f"{source.name}: corrupt or truncated xz file: {exc}") from exc


# --- decompression -------------------------------------------------------------------------------


class _Decoder:
    """A readable stream of raw bytes, decompressed from compressed chunks; ``close`` reports errors."""

    def readinto(self, buffer: memoryview) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self, *, complete: bool) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class _SubprocessDecoder(_Decoder):
    """``xz -dc -T0`` (or gzip, zstd) fed by a thread; the tool's own error text becomes the message."""

    def __init__(self, argv: list[str], chunks: Iterator[bytes], label: str) -> None:
        self._label = label
        self._argv = argv
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        assert self._proc.stdin
        assert self._proc.stdout
        _grow_pipe(self._proc.stdout)
        self._stdout = self._proc.stdout
        self._feed_error: BaseException | None = None
        self._feeder = threading.Thread(
            target=self._feed, args=(chunks, self._proc.stdin), name="fedimg-feed", daemon=True
        )
        self._feeder.start()

    def _feed(self, chunks: Iterator[bytes], stdin: IO[bytes]) -> None:
        try:
            for chunk in chunks:
                _write_all(stdin, chunk)
        except BrokenPipeError:
            pass  # the decompressor stopped early; its exit status says why
        except BaseException as exc:  # handed to the reading thread, raised there
            self._feed_error = exc
        finally:
            with contextlib.suppress(BrokenPipeError):
                stdin.close()

    def readinto(self, buffer: memoryview) -> int:
        count = self._stdout.readinto(buffer)  # type: ignore[attr-defined]
        return int(count or 0)

    def close(self, *, complete: bool) -> None:
        if not complete and self._proc.poll() is None:
            self._proc.kill()
        self._feeder.join(timeout=None if complete else 5)
        returncode = self._proc.wait()
        stderr = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
        self._stdout.close()
        if self._proc.stderr:
            self._proc.stderr.close()
        if self._feed_error is not None:
            if isinstance(self._feed_error, InputError):
                raise self._feed_error
            raise InputError(f"{self._label}: reading failed: {self._feed_error}")
        if complete and returncode != 0:
            message = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {returncode}"
            raise InputError(f"{self._label}: corrupt or truncated image: {message}")


class _InProcessDecoder(_Decoder):
    """Python's lzma / zlib, for machines without the command-line tools."""

    def __init__(self, compression: Compression, chunks: Iterator[bytes], label: str) -> None:
        self._label = label
        self._chunks = chunks
        self._pending = b""
        self._done = False
        self._lzma: lzma.LZMADecompressor | None = None
        self._zlib: zlib._Decompress | None = None
        self._in_stream = False
        if compression == "xz":
            self._lzma = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        elif compression == "gzip":
            self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif compression != "none":
            raise InputError(f"{label}: {compression} needs the {compression} command, not found")

    def _decompress(self, chunk: bytes) -> bytes:
        try:
            if self._lzma is not None:
                out = b""
                while chunk:
                    self._in_stream = True
                    out += self._lzma.decompress(chunk)
                    if not self._lzma.eof:
                        break
                    # Concatenated xz streams (what `xz -T0` may write) restart the decompressor.
                    chunk = self._lzma.unused_data.lstrip(b"\0")
                    self._lzma = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
                    self._in_stream = False
                return out
            if self._zlib is not None:
                return self._zlib.decompress(chunk)
        except (lzma.LZMAError, zlib.error) as exc:
            raise InputError(f"{self._label}: corrupt image data: {exc}") from exc
        return chunk

    def readinto(self, buffer: memoryview) -> int:
        while not self._pending and not self._done:
            chunk = next(self._chunks, None)
            if chunk is None:
                self._done = True
                self._check_end()
            else:
                self._pending = self._decompress(chunk)
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    def _check_end(self) -> None:
        if self._lzma is not None and self._in_stream:
            raise InputError(f"{self._label}: truncated image (the xz stream ends early)")
        if self._zlib is not None and not self._zlib.eof:
            raise InputError(f"{self._label}: truncated image (the gzip stream ends early)")

    def close(self, *, complete: bool) -> None:
        return None


def _write_all(pipe: IO[bytes], data: bytes) -> None:
    """Write all of ``data`` to an unbuffered pipe.

    A raw (``bufsize=0``) pipe's ``write`` may write only part of a large chunk when a signal
    interrupts it (seen under py-spy: the rest of the chunk was lost and xz reported corrupt
    data), so the remainder is written until none is left.
    """
    view = memoryview(data)
    while view:
        written = pipe.write(view)
        view = view[written or 0 :]


def _grow_pipe(pipe: IO[bytes]) -> None:
    # A 1 MiB pipe halves the read syscalls per block; Linux only, best effort.
    try:
        import fcntl

        fcntl.fcntl(pipe.fileno(), 1031, 1024 * 1024)  # F_SETPIPE_SZ
    except (OSError, ImportError, AttributeError):
        pass


def decompressor_argv(compression: Compression) -> list[str] | None:
    """The command that decompresses ``compression`` to stdout, if installed here."""
    tools: dict[str, list[str]] = {
        "xz": ["xz", "-dc", "-T0"],
        "gzip": ["gzip", "-dc"],
        "zstd": ["zstd", "-dc", "-q"],
    }
    argv = tools.get(compression)
    if argv is None or shutil.which(argv[0]) is None:
        return None
    return argv


class RawBlocks:
    """The raw image as numbered fixed-size blocks; iterate once, then read :attr:`stats`.

    Each item is ``(index, block)``, where ``block`` is a fresh ``bytes`` of exactly
    ``block_size`` (the last one zero-padded). :meth:`sparse` is the same stream with every
    all-zero block given as ``None`` (no copy made). Either way, one pass only. ``stats`` is
    complete after the iteration ends without error; :meth:`close` stops the decompressor early
    (on failure elsewhere).
    """

    def __init__(
        self,
        source: ImageSource,
        *,
        block_size: int,
        prefer_subprocess: bool = True,
        on_chunk: Callable[[int], None] | None = None,
    ) -> None:
        self.source = source
        self.block_size = block_size
        self.stats = StreamStats()
        self._compressed_hash = hashlib.sha256()
        self._on_chunk = on_chunk
        argv = decompressor_argv(source.compression) if prefer_subprocess else None
        chunks = self._counted(compressed_chunks(source))
        label = source.name
        if source.compression == "none":
            self._decoder: _Decoder = _InProcessDecoder("none", chunks, label)
        elif argv is not None:
            self._decoder = _SubprocessDecoder(argv, chunks, label)
        else:
            self._decoder = _InProcessDecoder(source.compression, chunks, label)
        self._closed = False

    def _counted(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self._compressed_hash.update(chunk)
            self.stats.bytes_compressed += len(chunk)
            if self._on_chunk is not None:
                self._on_chunk(len(chunk))
            yield chunk

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        for index, block in self._blocks(zero_as_none=False):
            assert block is not None
            yield index, block

    def sparse(self) -> Iterator[tuple[int, bytes | None]]:
        """The blocks, with ``None`` for each all-zero block (its bytes are never copied)."""
        return self._blocks(zero_as_none=True)

    def _blocks(self, *, zero_as_none: bool) -> Iterator[tuple[int, bytes | None]]:
        # One buffer, filled in place, for the whole stream: a fresh zeroed buffer per block
        # cost a memset, page faults and a copy for every block, zero blocks included. Only a
        # block handed out is copied (into immutable bytes: the consumer may keep it).
        size = self.block_size
        zero = bytes(size)
        buffer = bytearray(size)
        view = memoryview(buffer)
        raw_hash = hashlib.sha256()
        index = 0
        complete = False
        try:
            while True:
                filled = 0
                while filled < size:
                    count = self._decoder.readinto(view[filled:])
                    if count == 0:
                        break
                    filled += count
                if filled == 0:
                    break
                if filled < size:
                    view[filled:] = zero[filled:]  # the last block is zero-padded
                raw_hash.update(view[:filled])
                self.stats.bytes_raw += filled
                if zero_as_none and buffer == zero:
                    yield index, None
                else:
                    yield index, bytes(buffer)
                index += 1
                if filled < size:
                    break
            complete = True
        finally:
            self._close(complete=complete)
        self.stats.sha256_raw = raw_hash.hexdigest()
        self.stats.sha256_compressed = self._compressed_hash.hexdigest()

    def _close(self, *, complete: bool) -> None:
        if not self._closed:
            self._closed = True
            self._decoder.close(complete=complete)

    def close(self) -> None:
        """Stop reading (kills the decompressor); errors are not reported after an early close."""
        with contextlib.suppress(InputError):
            self._close(complete=False)

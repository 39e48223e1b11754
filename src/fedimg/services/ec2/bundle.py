"""Build and unpack EC2 instance-store AMI bundles, the way ``ec2-bundle-image`` does.

An instance-store AMI is registered from a *bundle* in S3: an XML manifest (format version
2007-10-10) plus the image itself, cut into encrypted parts. :func:`build_bundle` produces both
on local disk; uploading them (with the ``aws-exec-read`` ACL) and calling
``RegisterImage(ImageLocation="bucket/prefix/NAME.manifest.xml")`` is done elsewhere.

The pipeline is the one in ec2-ami-tools' ``bundle.rb``
(``tar -c -h -S --owner 0 --group 0 | tee >(openssl sha1) | gzip -9 | openssl enc -e
-aes-128-cbc -K KEY -iv IV``, then a split into 10 MiB parts):

1. the raw image becomes the single member of a GNU tar stream, named after the image file,
   owned by uid/gid 0 (``root``), and padded to whole 10 KiB tar records;
2. the SHA-1 of that tar stream is the manifest's ``<image><digest>``;
3. the tar stream is gzip-compressed at level 9;
4. the gzip stream is encrypted with AES-128-CBC under a random 16-byte key and 16-byte IV with
   PKCS#7 padding (what ``openssl enc`` writes with ``-K``/``-iv``: no salt header);
5. the ciphertext is split into ``NAME.part.00``, ``NAME.part.01``, ... of ``part_size`` bytes
   (the last one shorter), each listed in the manifest with its SHA-1.

The AES key and IV go into the manifest as *lowercase hex strings* (the ASCII text, not the raw
bytes: EC2 hands them to ``openssl enc -K/-iv``), each RSA-encrypted with PKCS#1 v1.5 twice: for
EC2's certificate and for the user's. The manifest is signed with the user's private key:
RSA PKCS#1 v1.5 over SHA-1 of the exact manifest text from ``<machine_configuration>`` to
``</machine_configuration>`` immediately followed by the text from ``<image>`` to ``</image>``,
hex-encoded into ``<signature>``. EC2 cannot check that signature (it never sees the user's
certificate); it is there so the owner can verify a bundle they download again, which is what
:func:`unbundle` does.

Known differences from the Ruby tool, none of which EC2 can observe after untarring: sparse
regions are stored as data rather than as a GNU sparse member (gzip squeezes zero runs anyway),
and the ``<bundler>`` element names fedimg.

Memory: both directions stream through fixed 1 MiB buffers. Neither the image, the tar stream,
nor a part is ever held in memory, so the footprint is a few MiB whatever the image size.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedimg import __version__
from fedimg.errors import FedimgError, InputError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = [
    "ARCHITECTURES",
    "CIPHER_ALGORITHM",
    "DEFAULT_BLOCK_DEVICE_MAPPING",
    "DEFAULT_PART_SIZE",
    "DIGEST_ALGORITHM",
    "MANIFEST_VERSION",
    "MAX_IMAGE_SIZE",
    "Bundle",
    "BundleError",
    "BundlePart",
    "BundleRequest",
    "build_bundle",
    "unbundle",
]

MANIFEST_VERSION: Final = "2007-10-10"
#: ``CHUNK_SIZE`` in ec2-ami-tools' bundle.rb: 10 MiB, not 10**7.
DEFAULT_PART_SIZE: Final = 10 * 1024 * 1024
#: ec2-bundle-image refuses images larger than this (``MAX_SIZE`` in bundle_image.rb).
MAX_IMAGE_SIZE: Final = 10 * 1024 * 1024 * 1024
CIPHER_ALGORITHM: Final = "AES-128-CBC"
DIGEST_ALGORITHM: Final = "SHA1"
ARCHITECTURES: Final = frozenset({"i386", "x86_64", "arm64"})
#: The root-device mapping a machine-image manifest carries; add ephemeralN/swap pairs as needed.
DEFAULT_BLOCK_DEVICE_MAPPING: Final[tuple[tuple[str, str], ...]] = (
    ("ami", "sda1"),
    ("root", "/dev/sda1"),
)

_BUNDLER_NAME: Final = "fedimg"
# The Ruby tool writes its package release here; EC2 does not interpret <bundler>.
_BUNDLER_RELEASE: Final = "1"
_IMAGE_TYPE: Final = "machine"
_IO_CHUNK: Final = 1024 * 1024
_AES_BLOCK_BITS: Final = 128
_TAR_BLOCK: Final = tarfile.BLOCKSIZE
# GNU tar's default blocking factor (20 blocks): its output is always whole 10240-byte records,
# and the manifest digest covers that padding too.
_TAR_RECORD: Final = tarfile.RECORDSIZE
# A 10 GiB image makes about 1000 parts, roughly 150 KB of XML; anything far bigger is not ours.
_MAX_MANIFEST_BYTES: Final = 16 * 1024 * 1024
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,199}")
_ACCOUNT_RE: Final = re.compile(r"[0-9]{12}")
_KERNEL_RE: Final = re.compile(r"aki-[0-9a-f]{8}(?:[0-9a-f]{9})?")
_RAMDISK_RE: Final = re.compile(r"ari-[0-9a-f]{8}(?:[0-9a-f]{9})?")
_HEX_RE: Final = re.compile(r"(?:[0-9a-fA-F]{2}){1,16}")


class BundleError(FedimgError):
    """A bundle could not be written, or a bundle being unpacked fails verification.

    Raised for a manifest that is not a 2007-10-10 bundle manifest, a signature that does not
    verify, a part or image digest that does not match the manifest, a corrupt ciphertext or
    gzip/tar stream, and for OS errors while writing bundle or output files.
    """


@dataclass(frozen=True, kw_only=True)
class BundleRequest:
    """What to bundle and with which keys.

    ``name`` names the bundle: the parts are ``NAME.part.NN`` and the manifest
    ``NAME.manifest.xml`` in ``out_dir`` (created if missing); it must be 1-200 characters of
    ``[A-Za-z0-9._+-]`` not starting with a dot, dash or plus. ``account_id`` is the 12-digit AWS
    account number without dashes. ``arch`` is written to the manifest as given and must be one
    of :data:`ARCHITECTURES`. ``kernel_id`` (``aki-...``) and ``ramdisk_id`` (``ari-...``) are
    written only when given. ``block_device_mapping`` holds ``(virtual, device)`` pairs and is
    written sorted by virtual name, as the Ruby tool does.

    The PEM fields hold an X.509 certificate with an RSA key for EC2 (the region's
    ``cert-ec2.pem``), the user's X.509 certificate, and the user's unencrypted RSA private key
    (PKCS#1 or PKCS#8), which must belong to that certificate. They are left out of ``repr`` so
    the key cannot end up in a log.

    Raises :class:`ValueError` on construction when a field breaks these rules; the PEM data is
    only checked by :func:`build_bundle`.
    """

    image_path: Path
    name: str
    arch: str
    account_id: str
    ec2_cert_pem: bytes = field(repr=False)
    user_cert_pem: bytes = field(repr=False)
    user_key_pem: bytes = field(repr=False)
    kernel_id: str | None = None
    ramdisk_id: str | None = None
    part_size: int = DEFAULT_PART_SIZE
    block_device_mapping: tuple[tuple[str, str], ...] = DEFAULT_BLOCK_DEVICE_MAPPING
    out_dir: Path

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise ValueError(
                f"bundle name {self.name!r} must be 1-200 characters of [A-Za-z0-9._+-] "
                "starting with a letter or digit"
            )
        if self.arch not in ARCHITECTURES:
            raise ValueError(
                f"architecture {self.arch!r} is not one of {', '.join(sorted(ARCHITECTURES))}"
            )
        if not _ACCOUNT_RE.fullmatch(self.account_id):
            raise ValueError(f"account id {self.account_id!r} must be 12 digits without dashes")
        if self.kernel_id is not None and not _KERNEL_RE.fullmatch(self.kernel_id):
            raise ValueError(f"kernel id {self.kernel_id!r} is not an aki-... id")
        if self.ramdisk_id is not None and not _RAMDISK_RE.fullmatch(self.ramdisk_id):
            raise ValueError(f"ramdisk id {self.ramdisk_id!r} is not an ari-... id")
        if self.part_size < 1:
            raise ValueError(f"part size must be positive, not {self.part_size}")
        virtuals = [virtual for virtual, _ in self.block_device_mapping]
        if len(set(virtuals)) != len(virtuals):
            raise ValueError("block device mapping names a virtual device twice")
        for virtual, device in self.block_device_mapping:
            if not virtual or not device:
                raise ValueError("block device mapping entries need a virtual name and a device")


@dataclass(frozen=True, kw_only=True)
class BundlePart:
    """One encrypted part on disk: ``filename`` is its name in ``out_dir`` and in S3."""

    index: int
    filename: str
    path: Path
    sha1_hex: str
    size: int


@dataclass(frozen=True, kw_only=True)
class Bundle:
    """A finished bundle on local disk, ready to upload next to each other under one prefix.

    ``image_sha1_hex`` is the manifest's ``<image><digest>``: the SHA-1 of the *tar stream*
    (what ec2-bundle-image records), not of the raw image. ``image_size`` is the raw image size
    in bytes and ``bundled_size`` the total size of the parts.
    """

    manifest_path: Path
    manifest_name: str
    parts: tuple[BundlePart, ...]
    image_sha1_hex: str
    image_size: int
    bundled_size: int


def build_bundle(*, request: BundleRequest) -> Bundle:
    """Bundle ``request.image_path`` into encrypted parts and a signed manifest in ``out_dir``.

    The image is read once, front to back, and every stage streams (see the module docstring
    for the format and the memory bound). Existing files with the same names are overwritten;
    an existing ``NAME.manifest.xml`` is deleted before the first part is written. The new
    manifest is written last and atomically; if anything fails, the parts written so far are
    removed and no manifest is left behind.

    Raises :class:`~fedimg.errors.InputError` if the image cannot be read, is not a regular
    file, exceeds :data:`MAX_IMAGE_SIZE` or changes size while being read, or if a certificate
    or the private key cannot be loaded, is not RSA, or the key does not match the user's
    certificate. Raises :class:`BundleError` if the output cannot be written.
    """
    ec2_public = _load_certificate_key(request.ec2_cert_pem, "EC2 certificate (ec2_cert_pem)")
    user_public = _load_certificate_key(request.user_cert_pem, "user certificate (user_cert_pem)")
    user_private = _load_private_key(request.user_key_pem, "user private key (user_key_pem)")
    if user_private.public_key().public_numbers() != user_public.public_numbers():
        raise InputError(
            "the user private key (user_key_pem) does not belong to the user certificate "
            "(user_cert_pem)"
        )

    try:
        request.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleError(f"cannot create {request.out_dir}: {exc.strerror or exc}") from exc

    manifest_name = f"{request.name}.manifest.xml"
    manifest_path = request.out_dir / manifest_name
    try:
        # A manifest left by an earlier run would describe parts this run overwrites.
        manifest_path.unlink(missing_ok=True)
    except OSError as exc:
        raise BundleError(f"cannot remove {manifest_path}: {exc.strerror or exc}") from exc

    key = os.urandom(16)
    iv = os.urandom(16)
    writer = _PartWriter(out_dir=request.out_dir, name=request.name, part_size=request.part_size)
    try:
        tar_sha1, image_size = _write_encrypted_parts(request.image_path, key, iv, writer)
        parts = tuple(writer.parts)
        key_hex = key.hex().encode("ascii")
        iv_hex = iv.hex().encode("ascii")
        manifest_text = _render_manifest(
            request=request,
            tar_sha1_hex=tar_sha1,
            image_size=image_size,
            parts=parts,
            ec2_encrypted_key=_rsa_encrypt_hex(ec2_public, key_hex),
            user_encrypted_key=_rsa_encrypt_hex(user_public, key_hex),
            ec2_encrypted_iv=_rsa_encrypt_hex(ec2_public, iv_hex),
            user_encrypted_iv=_rsa_encrypt_hex(user_public, iv_hex),
            user_private=user_private,
        )
        _write_atomically(manifest_path, manifest_text.encode("utf-8"))
    except BaseException:
        writer.discard()
        raise
    return Bundle(
        manifest_path=manifest_path,
        manifest_name=manifest_name,
        parts=parts,
        image_sha1_hex=tar_sha1,
        image_size=image_size,
        bundled_size=sum(part.size for part in parts),
    )


def unbundle(
    *,
    manifest_path: Path,
    parts_dir: Path,
    user_key_pem: bytes,
    out_path: Path,
    user_cert_pem: bytes | None = None,
) -> Path:
    """Verify a bundle and restore the original image to ``out_path``; return ``out_path``.

    This is ``ec2-unbundle`` with the checks made mandatory, in this order:

    1. the manifest signature must verify with ``user_cert_pem``'s public key when given,
       otherwise with the public half of ``user_key_pem`` (the same key for a matching pair);
    2. every value used afterwards is read from the signed ``<machine_configuration>`` and
       ``<image>`` text only, so unsigned additions to the file cannot steer the unpacking;
    3. every part in ``parts_dir`` must match its manifest SHA-1 before anything is decrypted;
    4. the key and IV come from ``user_encrypted_key``/``user_encrypted_iv`` decrypted with
       ``user_key_pem``; the joined parts are decrypted, gunzipped and untarred as one stream;
    5. the tar stream must hash to the manifest ``<digest>`` and hold exactly one regular file
       of the manifest ``<size>``.

    The image is written to a temporary file beside ``out_path`` and renamed into place only
    after every check passed, so ``out_path`` never holds unverified data. Memory use is bounded
    as for :func:`build_bundle`.

    Raises :class:`~fedimg.errors.InputError` if the key, the certificate, the manifest or a
    part cannot be read, and :class:`BundleError` if any verification fails or ``out_path``
    cannot be written.
    """
    user_private = _load_private_key(user_key_pem, "user private key (user_key_pem)")
    verify_key = (
        _load_certificate_key(user_cert_pem, "user certificate (user_cert_pem)")
        if user_cert_pem is not None
        else user_private.public_key()
    )
    manifest = _read_signed_manifest(manifest_path, verify_key)
    key = _decrypt_secret(user_private, manifest.user_encrypted_key, "key", manifest_path)
    iv = _decrypt_secret(user_private, manifest.user_encrypted_iv, "IV", manifest_path)
    part_paths = [parts_dir / filename for filename, _ in manifest.parts]
    for path, (_, expected) in zip(part_paths, manifest.parts, strict=True):
        actual = _sha1_file(path)
        if actual != expected:
            raise BundleError(
                f"part {path.name}: SHA-1 {actual} does not match the manifest's {expected}"
            )

    tar_sha1 = hashlib.sha1()
    stream = _decrypted_tar_stream(
        part_paths=part_paths,
        part_digests=[digest for _, digest in manifest.parts],
        key=key,
        iv=iv,
        observe=tar_sha1.update,
    )
    try:
        fd, tmp_name = tempfile.mkstemp(
            dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".partial"
        )
    except OSError as exc:
        raise BundleError(f"cannot write {out_path}: {exc.strerror or exc}") from exc
    tmp_path = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            _extract_single_member(stream, out, manifest.size, manifest_path)
        if tar_sha1.hexdigest() != manifest.digest:
            raise BundleError(
                f"{manifest_path.name}: the unpacked tar stream's SHA-1 {tar_sha1.hexdigest()} "
                f"does not match the manifest's {manifest.digest}"
            )
        os.replace(tmp_path, out_path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise BundleError(f"cannot write {out_path}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    finally:
        stream.close()  # releases the open part file if the stream was abandoned early
    return out_path


# -- building ------------------------------------------------------------------------------


class _PartWriter:
    """Cuts a byte stream into ``NAME.part.NN`` files of ``part_size`` bytes, hashing each.

    A part is opened only when there are bytes for it, so a stream whose length is a multiple
    of ``part_size`` does not end with an empty part.
    """

    def __init__(self, *, out_dir: Path, name: str, part_size: int) -> None:
        self._out_dir = out_dir
        self._name = name
        self._part_size = part_size
        self._file: BinaryIO | None = None
        self._path: Path | None = None
        self._sha1 = hashlib.sha1()
        self._filled = 0
        self._written: list[Path] = []
        self.parts: list[BundlePart] = []

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._file is None:
                self._open_next()
            assert self._file is not None
            chunk = view[: self._part_size - self._filled]
            self._io(self._file.write, chunk)
            self._sha1.update(chunk)
            self._filled += len(chunk)
            view = view[len(chunk) :]
            if self._filled == self._part_size:
                self._finish_current()

    def close(self) -> None:
        if self._file is not None:
            self._finish_current()

    def discard(self) -> None:
        """Close and delete every part written so far; used when the build fails."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for path in self._written:
            path.unlink(missing_ok=True)
        self._written.clear()
        self.parts.clear()

    def _open_next(self) -> None:
        # bundle.rb pads the index to two digits; from part 100 on it simply grows.
        filename = f"{self._name}.part.{len(self.parts):02d}"
        self._path = self._out_dir / filename
        try:
            self._file = self._path.open("wb")
        except OSError as exc:
            raise BundleError(f"cannot write {self._path}: {exc.strerror or exc}") from exc
        self._written.append(self._path)
        self._sha1 = hashlib.sha1()
        self._filled = 0

    def _finish_current(self) -> None:
        assert self._file is not None
        assert self._path is not None
        self._io(self._file.close)
        self._file = None
        self.parts.append(
            BundlePart(
                index=len(self.parts),
                filename=self._path.name,
                path=self._path,
                sha1_hex=self._sha1.hexdigest(),
                size=self._filled,
            )
        )

    def _io(self, operation: Callable[..., object], *args: object) -> None:
        try:
            operation(*args)
        except OSError as exc:
            raise BundleError(f"cannot write {self._path}: {exc.strerror or exc}") from exc


def _write_encrypted_parts(
    image_path: Path, key: bytes, iv: bytes, writer: _PartWriter
) -> tuple[str, int]:
    """Stream the image as tar → gzip -9 → AES-128-CBC into ``writer``.

    Returns the SHA-1 hex digest of the tar stream and the image size.
    """
    try:
        # stat before opening: opening a FIFO or a tape for reading could block or consume it.
        if not stat.S_ISREG(image_path.stat().st_mode):
            raise InputError(f"image {image_path} is not a regular file")
        image = image_path.open("rb")
    except OSError as exc:
        raise InputError(f"cannot read image {image_path}: {exc.strerror or exc}") from exc
    with image:
        info = os.fstat(image.fileno())
        if info.st_size > MAX_IMAGE_SIZE:
            raise InputError(
                f"image {image_path} is {info.st_size} bytes; instance-store bundles are "
                f"limited to {MAX_IMAGE_SIZE} bytes"
            )

        tar_sha1 = hashlib.sha1()
        compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip wrapper
        padder = sym_padding.PKCS7(_AES_BLOCK_BITS).padder()
        encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
        tar_length = 0

        def feed(tar_bytes: bytes) -> None:
            nonlocal tar_length
            tar_length += len(tar_bytes)
            tar_sha1.update(tar_bytes)
            compressed = compressor.compress(tar_bytes)
            if compressed:
                writer.write(encryptor.update(padder.update(compressed)))

        feed(_tar_header(image_path.name, info))
        copied = 0
        while chunk := _read_image(image, image_path):
            copied += len(chunk)
            if copied > info.st_size:
                break
            feed(chunk)
        if copied != info.st_size:
            raise InputError(f"image {image_path} changed size while it was being bundled")

    feed(bytes(-info.st_size % _TAR_BLOCK))  # pad the member's data to a whole block
    feed(bytes(2 * _TAR_BLOCK))  # end-of-archive marker
    feed(bytes(-tar_length % _TAR_RECORD))
    tail = compressor.flush()
    writer.write(encryptor.update(padder.update(tail) + padder.finalize()) + encryptor.finalize())
    writer.close()
    return tar_sha1.hexdigest(), info.st_size


def _read_image(image: BinaryIO, image_path: Path) -> bytes:
    try:
        return image.read(_IO_CHUNK)
    except OSError as exc:
        raise InputError(f"cannot read image {image_path}: {exc.strerror or exc}") from exc


def _tar_header(member_name: str, info: os.stat_result) -> bytes:
    """The GNU tar header ``tar -c -h --owner 0 --group 0`` writes for the image file."""
    member = tarfile.TarInfo(member_name)
    member.size = info.st_size
    member.mode = stat.S_IMODE(info.st_mode)
    member.mtime = int(info.st_mtime)
    member.type = tarfile.REGTYPE
    member.uid = member.gid = 0
    member.uname = member.gname = "root"
    return member.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def _render_manifest(
    *,
    request: BundleRequest,
    tar_sha1_hex: str,
    image_size: int,
    parts: tuple[BundlePart, ...],
    ec2_encrypted_key: str,
    user_encrypted_key: str,
    ec2_encrypted_iv: str,
    user_encrypted_iv: str,
    user_private: rsa.RSAPrivateKey,
) -> str:
    """The manifest text, laid out as REXML serialises ec2-ami-tools' document.

    The element order is the order in which manifestv20071010.rb creates the elements; there
    is no whitespace between elements, which matters because the signature covers the text.
    """
    machine = ["<machine_configuration>", _element("architecture", request.arch)]
    if request.block_device_mapping:
        machine.append("<block_device_mapping>")
        for virtual, device in sorted(request.block_device_mapping):
            machine.append(
                f"<mapping>{_element('virtual', virtual)}{_element('device', device)}</mapping>"
            )
        machine.append("</block_device_mapping>")
    if request.kernel_id is not None:
        machine.append(_element("kernel_id", request.kernel_id))
    if request.ramdisk_id is not None:
        machine.append(_element("ramdisk_id", request.ramdisk_id))
    machine.append("</machine_configuration>")

    cipher = {"algorithm": CIPHER_ALGORITHM}
    digest = {"algorithm": DIGEST_ALGORITHM}
    image = [
        "<image>",
        _element("name", request.name),
        _element("user", request.account_id),
        _element("type", _IMAGE_TYPE),
        _element("digest", tar_sha1_hex, digest),
        _element("size", str(image_size)),
        _element("bundled_size", str(sum(part.size for part in parts))),
        _element("ec2_encrypted_key", ec2_encrypted_key, cipher),
        _element("user_encrypted_key", user_encrypted_key, cipher),
        _element("ec2_encrypted_iv", ec2_encrypted_iv),
        _element("user_encrypted_iv", user_encrypted_iv),
        f"<parts count='{len(parts)}'>",
    ]
    for part in parts:
        image.append(
            f"<part index='{part.index}'>{_element('filename', part.filename)}"
            f"{_element('digest', part.sha1_hex, digest)}</part>"
        )
    image.append("</parts></image>")

    signed_text = "".join(machine) + "".join(image)
    signature = user_private.sign(
        signed_text.encode("utf-8"), asym_padding.PKCS1v15(), hashes.SHA1()
    )
    bundler = (
        f"<bundler>{_element('name', _BUNDLER_NAME)}{_element('version', __version__)}"
        f"{_element('release', _BUNDLER_RELEASE)}</bundler>"
    )
    return (
        "<?xml version='1.0'?><manifest>"
        f"{_element('version', MANIFEST_VERSION)}{bundler}{signed_text}"
        f"{_element('signature', signature.hex())}</manifest>"
    )


def _element(tag: str, text: str, attributes: dict[str, str] | None = None) -> str:
    # REXML quotes attributes with single quotes; keep its look so the files diff cleanly.
    attrs = "".join(
        f" {name}='{_escape_attribute(value)}'" for name, value in (attributes or {}).items()
    )
    return f"<{tag}{attrs}>{escape(text)}</{tag}>"


def _escape_attribute(value: str) -> str:
    return escape(value, {"'": "&apos;"})


def _rsa_encrypt_hex(public_key: rsa.RSAPublicKey, plaintext: bytes) -> str:
    return public_key.encrypt(plaintext, asym_padding.PKCS1v15()).hex()


def _write_atomically(path: Path, data: bytes) -> None:
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp_path.write_bytes(data)
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise BundleError(f"cannot write {path}: {exc.strerror or exc}") from exc


# -- unbundling ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _SignedManifest:
    """The values unbundling needs, all taken from the signed part of the manifest."""

    digest: str
    size: int
    user_encrypted_key: str
    user_encrypted_iv: str
    parts: tuple[tuple[str, str], ...]  # (filename, sha1 hex) in index order


def _read_signed_manifest(manifest_path: Path, verify_key: rsa.RSAPublicKey) -> _SignedManifest:
    try:
        with manifest_path.open("rb") as handle:
            raw = handle.read(_MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise InputError(f"cannot read manifest {manifest_path}: {exc.strerror or exc}") from exc
    name = manifest_path.name

    def invalid(reason: str) -> BundleError:
        return BundleError(f"{name} is not a valid {MANIFEST_VERSION} bundle manifest: {reason}")

    if len(raw) > _MAX_MANIFEST_BYTES:
        raise invalid("it is larger than 16 MiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid("it is not UTF-8") from exc
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise invalid("it declares a DTD")
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as exc:
        raise invalid(f"XML error: {exc}") from exc
    if root.tag != "manifest":
        raise invalid(f"the root element is <{root.tag}>")
    if (root.findtext("version") or "").strip() != MANIFEST_VERSION:
        raise invalid(f"its version is {root.findtext('version')!r}")
    signature_hex = (root.findtext("signature") or "").strip()
    try:
        signature = bytes.fromhex(signature_hex)
    except ValueError as exc:
        raise invalid("<signature> is not hex") from exc

    # XMLUtil.get_xml in ec2-ami-tools: from the first start tag to the first end tag, as text.
    signed_text = _element_text(text, "machine_configuration") + _element_text(text, "image")
    if not signed_text or not signature:
        raise invalid("it has no <image> or no <signature>")
    try:
        verify_key.verify(
            signature, signed_text.encode("utf-8"), asym_padding.PKCS1v15(), hashes.SHA1()
        )
    except InvalidSignature as exc:
        raise BundleError(f"{name}: the signature does not verify with the user's key") from exc

    try:
        image = ElementTree.fromstring(f"<signed>{signed_text}</signed>").find("image")
    except ElementTree.ParseError as exc:
        raise invalid(f"XML error in the signed text: {exc}") from exc
    if image is None:
        raise invalid("it has no <image>")

    def required(path: str) -> ElementTree.Element:
        element = image.find(path)
        if element is None or not (element.text or "").strip():
            raise invalid(f"<image>/{path} is missing or empty")
        return element

    digest = required("digest")
    if digest.get("algorithm") != DIGEST_ALGORITHM:
        raise invalid(f"the image digest algorithm is {digest.get('algorithm')!r}")
    algorithm = required("user_encrypted_key").get("algorithm")
    if algorithm != CIPHER_ALGORITHM:
        raise invalid(f"the cipher is {algorithm!r}")
    try:
        size = int(required("size").text or "")
    except ValueError as exc:
        raise invalid("<size> is not a number") from exc

    parts_element = image.find("parts")
    if parts_element is None:
        raise invalid("it has no <parts>")
    by_index: dict[int, tuple[str, str]] = {}
    for part in parts_element.findall("part"):
        filename = (part.findtext("filename") or "").strip()
        part_digest = part.find("digest")
        if part_digest is None or part_digest.get("algorithm") != DIGEST_ALGORITHM:
            raise invalid(f"part {filename!r} has no SHA1 digest")
        # Part names come from a file: keep them inside parts_dir.
        if not filename or filename in {".", ".."} or "/" in filename or "\\" in filename:
            raise invalid(f"part file name {filename!r} is not a plain file name")
        try:
            index = int(part.get("index", ""))
        except ValueError as exc:
            raise invalid(f"part {filename!r} has no numeric index") from exc
        by_index[index] = (filename, (part_digest.text or "").strip().lower())
    count = parts_element.get("count")
    if not by_index or sorted(by_index) != list(range(len(by_index))):
        raise invalid("the part indexes are not 0..N-1")
    if count != str(len(by_index)):
        raise invalid(f"<parts count={count!r}> but {len(by_index)} parts are listed")

    return _SignedManifest(
        digest=(digest.text or "").strip().lower(),
        size=size,
        user_encrypted_key=(required("user_encrypted_key").text or "").strip(),
        user_encrypted_iv=(required("user_encrypted_iv").text or "").strip(),
        parts=tuple(by_index[index] for index in range(len(by_index))),
    )


def _element_text(text: str, tag: str) -> str:
    start = text.find(f"<{tag}>")
    end_tag = f"</{tag}>"
    end = text.find(end_tag)
    if start < 0 or end < 0:
        return ""
    return text[start : end + len(end_tag)]


def _decrypt_secret(
    private_key: rsa.RSAPrivateKey, encrypted_hex: str, what: str, manifest_path: Path
) -> bytes:
    """Decrypt a manifest key or IV to the 16 bytes ``openssl enc -K/-iv`` would use."""
    failure = BundleError(
        f"{manifest_path.name}: the user private key cannot decrypt the bundle {what}"
    )
    try:
        # OpenSSL's implicit rejection returns random bytes rather than failing for a wrong
        # key, so the hex check below is what catches that case.
        secret = private_key.decrypt(bytes.fromhex(encrypted_hex), asym_padding.PKCS1v15())
        secret_text = secret.decode("ascii")
    except (ValueError, UnicodeDecodeError) as exc:
        raise failure from exc
    if not _HEX_RE.fullmatch(secret_text):
        raise failure
    # openssl enc zero-pads a short -K/-iv; some old bundlers wrote 8-byte IVs.
    return bytes.fromhex(secret_text).ljust(16, b"\0")


def _sha1_file(path: Path) -> str:
    digest = hashlib.sha1()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(_IO_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise InputError(f"cannot read bundle part {path}: {exc.strerror or exc}") from exc
    return digest.hexdigest()


def _decrypted_tar_stream(
    *,
    part_paths: list[Path],
    part_digests: list[str],
    key: bytes,
    iv: bytes,
    observe: Callable[[bytes], object],
) -> Generator[bytes, None, None]:
    """Yield the tar stream: joined parts → AES-128-CBC decrypt → gunzip.

    Every yielded chunk is passed to ``observe`` first (to hash the tar stream).

    The parts are hashed again while they are read, so a part swapped after the up-front check
    is still caught. Inflation is capped per call so a run of zeros cannot balloon in memory.
    """
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    unpadder = sym_padding.PKCS7(_AES_BLOCK_BITS).unpadder()
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def inflate(compressed: bytes) -> Iterator[bytes]:
        while True:
            out = inflater.decompress(compressed, _IO_CHUNK)
            if out:
                observe(out)
                yield out
            compressed = inflater.unconsumed_tail
            if not compressed and len(out) < _IO_CHUNK:
                return

    try:
        for path, expected in zip(part_paths, part_digests, strict=True):
            part_sha1 = hashlib.sha1()
            try:
                with path.open("rb") as handle:
                    while chunk := handle.read(_IO_CHUNK):
                        part_sha1.update(chunk)
                        yield from inflate(unpadder.update(decryptor.update(chunk)))
            except OSError as exc:
                raise InputError(f"cannot read bundle part {path}: {exc.strerror or exc}") from exc
            if part_sha1.hexdigest() != expected:
                raise BundleError(f"part {path.name} changed while it was being unbundled")
        yield from inflate(unpadder.update(decryptor.finalize()) + unpadder.finalize())
    except (ValueError, zlib.error) as exc:
        raise BundleError(f"the bundle does not decrypt and decompress cleanly: {exc}") from exc
    if not inflater.eof:
        raise BundleError("the bundle's gzip stream is truncated")
    if inflater.unused_data:
        raise BundleError("the bundle has data after the end of its gzip stream")


class _IteratorReader(io.RawIOBase):
    """A read-only raw stream over an iterator of byte chunks, for :mod:`tarfile`."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        super().__init__()
        self._chunks = chunks
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        target = memoryview(buffer).cast("B")
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = memoryview(chunk)
        count = min(len(target), len(self._pending))
        target[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count


def _extract_single_member(
    stream: Iterator[bytes], out: BinaryIO, expected_size: int, manifest_path: Path
) -> None:
    """Copy the tar stream's only member into ``out`` and read the stream to its very end."""
    reader = io.BufferedReader(_IteratorReader(stream), buffer_size=_IO_CHUNK)
    name = manifest_path.name
    try:
        with tarfile.open(fileobj=reader, mode="r|") as archive:
            member = archive.next()
            if member is None or not member.isreg():
                raise BundleError(f"{name}: the bundle's tar stream has no regular file")
            if member.size != expected_size:
                raise BundleError(
                    f"{name}: the tar member is {member.size} bytes, the manifest says "
                    f"{expected_size}"
                )
            source = archive.extractfile(member)
            assert source is not None  # a regular member always has a file object
            while chunk := source.read(_IO_CHUNK):
                out.write(chunk)
            if archive.next() is not None:
                raise BundleError(f"{name}: the bundle's tar stream holds more than one file")
    except tarfile.TarError as exc:
        raise BundleError(f"{name}: the bundle's tar stream is corrupt: {exc}") from exc
    # Drain the record padding after the end-of-archive marker: the manifest digest covers it,
    # and the decryption and gzip checks only run once the stream is exhausted.
    while reader.read(_IO_CHUNK):
        pass


# -- keys ----------------------------------------------------------------------------------


def _load_certificate_key(pem: bytes, what: str) -> rsa.RSAPublicKey:
    try:
        certificate = x509.load_pem_x509_certificate(pem)
        public_key = certificate.public_key()
    except ValueError as exc:
        raise InputError(f"cannot load the {what}: not a PEM X.509 certificate") from exc
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise InputError(f"the {what} does not hold an RSA key")
    return public_key


def _load_private_key(pem: bytes, what: str) -> rsa.RSAPrivateKey:
    try:
        private_key = serialization.load_pem_private_key(pem, password=None)
    except TypeError as exc:
        raise InputError(f"cannot load the {what}: it is password-protected") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InputError(f"cannot load the {what}: not a PEM private key") from exc
    if not isinstance(private_key, rsa.RSAPrivateKey):
        raise InputError(f"the {what} is not an RSA key")
    return private_key

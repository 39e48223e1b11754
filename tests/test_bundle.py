"""Tests for fedimg.services.ec2.bundle: ec2-bundle-image compatible bundles and their unbundling.

The "EC2" and user identities are throw-away self-signed RSA certificates made per session.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedimg.errors import InputError
from fedimg.services.ec2 import bundle as bundle_module
from fedimg.services.ec2.bundle import (
    DEFAULT_PART_SIZE,
    Bundle,
    BundleError,
    BundleRequest,
    build_bundle,
    unbundle,
)
from tests.certs import Identity, make_identity

MIB = 1024 * 1024
ACCOUNT = "123456789012"


@dataclass(frozen=True)
class Identities:
    ec2: Identity
    user: Identity
    stranger: Identity


@pytest.fixture(scope="session")
def identities() -> Identities:
    return Identities(
        ec2=make_identity("ec2 (test)"),
        user=make_identity("user (test)"),
        stranger=make_identity("stranger"),
    )


def _write_image(path: Path, layout: list[tuple[str, int]]) -> bytes:
    """Write random and zero runs, like a disk image with empty space; return the bytes."""
    data = b"".join(os.urandom(size) if kind == "random" else bytes(size) for kind, size in layout)
    path.write_bytes(data)
    return data


def _request(
    identities: Identities, image: Path, out_dir: Path, **overrides: object
) -> BundleRequest:
    fields: dict[str, object] = {
        "image_path": image,
        "name": "fedora-test",
        "arch": "x86_64",
        "account_id": ACCOUNT,
        "ec2_cert_pem": identities.ec2.cert_pem,
        "user_cert_pem": identities.user.cert_pem,
        "user_key_pem": identities.user.key_pem,
        "part_size": MIB,
        "out_dir": out_dir,
    }
    fields.update(overrides)
    return BundleRequest(**fields)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Built:
    bundle: Bundle
    image: Path
    data: bytes


@pytest.fixture
def built(tmp_path: Path, identities: Identities) -> Built:
    image = tmp_path / "Fedora-Cloud-Base.raw"
    data = _write_image(image, [("random", MIB), ("zero", 2 * MIB), ("random", 1536 * 1024)])
    bundle = build_bundle(request=_request(identities, image, tmp_path / "out"))
    return Built(bundle, image, data)


def _manifest(built: Built) -> ElementTree.Element:
    return ElementTree.parse(built.bundle.manifest_path).getroot()


def _signed_text(manifest_text: str) -> bytes:
    """The ec2-ami-tools rule: <machine_configuration>...</...> + <image>...</image>, as text."""
    pieces = []
    for tag in ("machine_configuration", "image"):
        start = manifest_text.index(f"<{tag}>")
        end = manifest_text.index(f"</{tag}>") + len(f"</{tag}>")
        pieces.append(manifest_text[start:end])
    return "".join(pieces).encode("utf-8")


def _decrypt_secret(key: rsa.RSAPrivateKey, element: ElementTree.Element) -> bytes:
    return key.decrypt(bytes.fromhex(element.text or ""), asym_padding.PKCS1v15())


# -- round trip and layout -----------------------------------------------------------------


def test_round_trip_restores_identical_bytes(
    built: Built, identities: Identities, tmp_path: Path
) -> None:
    restored = unbundle(
        manifest_path=built.bundle.manifest_path,
        parts_dir=built.bundle.manifest_path.parent,
        user_key_pem=identities.user.key_pem,
        out_path=tmp_path / "restored.raw",
    )

    assert restored == tmp_path / "restored.raw"
    assert restored.read_bytes() == built.data
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def test_bundle_describes_the_files_it_wrote(built: Built) -> None:
    bundle = built.bundle
    assert bundle.manifest_name == "fedora-test.manifest.xml"
    assert bundle.manifest_path.name == bundle.manifest_name
    assert bundle.image_size == len(built.data)
    assert bundle.bundled_size == sum(part.size for part in bundle.parts)
    for index, part in enumerate(bundle.parts):
        assert part.index == index
        assert part.filename == f"fedora-test.part.{index:02d}"
        assert part.path == bundle.manifest_path.parent / part.filename
        content = part.path.read_bytes()
        assert len(content) == part.size
        assert hashlib.sha1(content).hexdigest() == part.sha1_hex
    # The zero run compresses away, so ~2.5 MiB of random data gives three 1 MiB parts.
    assert len(bundle.parts) == 3
    assert sorted(p.name for p in bundle.manifest_path.parent.iterdir()) == sorted(
        [bundle.manifest_name, *(part.filename for part in bundle.parts)]
    )


def test_25mb_image_gives_three_10_mib_parts(tmp_path: Path, identities: Identities) -> None:
    assert DEFAULT_PART_SIZE == 10 * 1024 * 1024  # ec2-ami-tools' CHUNK_SIZE
    image = tmp_path / "big.raw"
    data = _write_image(image, [("random", 24_000_000), ("zero", 1_000_000)])
    request = _request(identities, image, tmp_path / "out", part_size=DEFAULT_PART_SIZE)

    bundle = build_bundle(request=request)

    sizes = [part.size for part in bundle.parts]
    assert [part.filename for part in bundle.parts] == [
        "fedora-test.part.00",
        "fedora-test.part.01",
        "fedora-test.part.02",
    ]
    assert sizes[:2] == [DEFAULT_PART_SIZE, DEFAULT_PART_SIZE]
    assert 0 < sizes[2] <= DEFAULT_PART_SIZE
    assert sum(sizes) == bundle.bundled_size
    assert bundle.bundled_size % 16 == 0  # whole AES blocks
    assert bundle.image_size == len(data)


def test_part_writer_never_ends_with_an_empty_part(tmp_path: Path) -> None:
    writer = bundle_module._PartWriter(out_dir=tmp_path, name="n", part_size=16)
    writer.write(bytes(10))
    writer.write(bytes(22))
    writer.close()

    assert [(part.filename, part.size) for part in writer.parts] == [
        ("n.part.00", 16),
        ("n.part.01", 16),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.part.00", "n.part.01"]


# -- the manifest --------------------------------------------------------------------------


def test_manifest_has_the_2007_10_10_layout(built: Built) -> None:
    text = built.bundle.manifest_path.read_text("utf-8")
    assert text.startswith("<?xml version='1.0'?><manifest><version>2007-10-10</version>")
    assert "\n" not in text  # the signature covers the text: no pretty-printing

    root = _manifest(built)
    assert [child.tag for child in root] == [
        "version",
        "bundler",
        "machine_configuration",
        "image",
        "signature",
    ]
    assert [child.tag for child in root.find("bundler") or []] == ["name", "version", "release"]

    machine = root.find("machine_configuration")
    assert machine is not None
    assert machine.findtext("architecture") == "x86_64"
    mappings = [
        (m.findtext("virtual"), m.findtext("device"))
        for m in machine.findall("block_device_mapping/mapping")
    ]
    assert mappings == [("ami", "sda1"), ("root", "/dev/sda1")]
    assert machine.find("kernel_id") is None
    assert machine.find("ramdisk_id") is None

    image = root.find("image")
    assert image is not None
    assert [child.tag for child in image] == [
        "name",
        "user",
        "type",
        "digest",
        "size",
        "bundled_size",
        "ec2_encrypted_key",
        "user_encrypted_key",
        "ec2_encrypted_iv",
        "user_encrypted_iv",
        "parts",
    ]
    assert image.findtext("name") == "fedora-test"
    assert image.findtext("user") == ACCOUNT
    assert image.findtext("type") == "machine"
    digest = image.find("digest")
    assert digest is not None
    assert digest.get("algorithm") == "SHA1"
    assert digest.text == built.bundle.image_sha1_hex
    assert image.findtext("size") == str(len(built.data))
    assert image.findtext("bundled_size") == str(built.bundle.bundled_size)
    for tag in ("ec2_encrypted_key", "user_encrypted_key"):
        element = image.find(tag)
        assert element is not None
        assert element.get("algorithm") == "AES-128-CBC"

    parts = image.find("parts")
    assert parts is not None
    assert parts.get("count") == str(len(built.bundle.parts))
    listed = [
        (part.get("index"), part.findtext("filename"), part.find("digest"))
        for part in parts.findall("part")
    ]
    assert [(index, name) for index, name, _ in listed] == [
        (str(part.index), part.filename) for part in built.bundle.parts
    ]
    for (_, _, part_digest), part in zip(listed, built.bundle.parts, strict=True):
        assert part_digest is not None
        assert part_digest.get("algorithm") == "SHA1"
        assert part_digest.text == part.sha1_hex

    signature = root.findtext("signature") or ""
    assert len(bytes.fromhex(signature)) == 256  # a 2048-bit RSA signature


def test_manifest_writes_kernel_ramdisk_and_arch_as_given(
    tmp_path: Path, identities: Identities
) -> None:
    image = tmp_path / "img.raw"
    _write_image(image, [("random", 4096)])
    request = _request(
        identities,
        image,
        tmp_path / "out",
        arch="arm64",
        kernel_id="aki-0123abcd",
        ramdisk_id="ari-89abcdef",
        block_device_mapping=(("root", "/dev/sda1"), ("ami", "sda1"), ("ephemeral0", "sdb")),
    )

    bundle = build_bundle(request=request)

    machine = ElementTree.parse(bundle.manifest_path).getroot().find("machine_configuration")
    assert machine is not None
    assert [child.tag for child in machine] == [
        "architecture",
        "block_device_mapping",
        "kernel_id",
        "ramdisk_id",
    ]
    assert machine.findtext("architecture") == "arm64"
    assert machine.findtext("kernel_id") == "aki-0123abcd"
    assert machine.findtext("ramdisk_id") == "ari-89abcdef"
    virtuals = [m.findtext("virtual") for m in machine.findall("block_device_mapping/mapping")]
    assert virtuals == ["ami", "ephemeral0", "root"]  # sorted, as the Ruby tool does


def test_ec2_and_user_copies_hold_the_same_key_and_iv(built: Built, identities: Identities) -> None:
    image = _manifest(built).find("image")
    assert image is not None

    secrets = {}
    for what in ("key", "iv"):
        ec2_copy = image.find(f"ec2_encrypted_{what}")
        user_copy = image.find(f"user_encrypted_{what}")
        assert ec2_copy is not None
        assert user_copy is not None
        from_ec2 = _decrypt_secret(identities.ec2.key, ec2_copy)
        from_user = _decrypt_secret(identities.user.key, user_copy)
        assert from_ec2 == from_user
        # ec2-ami-tools encrypts the hex text that openssl enc -K/-iv takes.
        assert len(from_ec2) == 32
        assert from_ec2.decode("ascii") == from_ec2.decode("ascii").lower()
        secrets[what] = bytes.fromhex(from_ec2.decode("ascii"))
    assert secrets["key"] != secrets["iv"]


def test_parts_are_encrypted_gzipped_tar_of_the_image(built: Built, identities: Identities) -> None:
    """Undo the pipeline with independent code: AES-128-CBC/PKCS#7, gzip, tar."""
    image = _manifest(built).find("image")
    assert image is not None
    user_key = image.find("user_encrypted_key")
    user_iv = image.find("user_encrypted_iv")
    assert user_key is not None
    assert user_iv is not None
    key = bytes.fromhex(_decrypt_secret(identities.user.key, user_key).decode())
    iv = bytes.fromhex(_decrypt_secret(identities.user.key, user_iv).decode())
    ciphertext = b"".join(part.path.read_bytes() for part in built.bundle.parts)

    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = sym_padding.PKCS7(128).unpadder()
    compressed = unpadder.update(padded) + unpadder.finalize()
    tar_stream = gzip.decompress(compressed)

    assert hashlib.sha1(tar_stream).hexdigest() == built.bundle.image_sha1_hex
    assert len(tar_stream) % tarfile.RECORDSIZE == 0  # GNU tar writes whole records
    with tarfile.open(fileobj=io.BytesIO(tar_stream), mode="r:") as archive:
        members = archive.getmembers()
        assert [m.name for m in members] == [built.image.name]
        member = members[0]
        assert member.isreg()
        assert (member.uid, member.gid, member.uname, member.gname) == (0, 0, "root", "root")
        extracted = archive.extractfile(member)
        assert extracted is not None
        assert extracted.read() == built.data


@pytest.mark.skipif(
    shutil.which("openssl") is None or shutil.which("tar") is None,
    reason="needs the openssl and tar commands",
)
def test_openssl_and_gnu_tar_unpack_the_parts(
    built: Built, identities: Identities, tmp_path: Path
) -> None:
    """The commands ec2-unbundle runs: cat parts | openssl enc -d ... -K -iv | tar -xz."""
    image = _manifest(built).find("image")
    assert image is not None
    user_key = image.find("user_encrypted_key")
    user_iv = image.find("user_encrypted_iv")
    assert user_key is not None
    assert user_iv is not None
    key_hex = _decrypt_secret(identities.user.key, user_key).decode()
    iv_hex = _decrypt_secret(identities.user.key, user_iv).decode()
    joined = tmp_path / "joined.enc"
    joined.write_bytes(b"".join(part.path.read_bytes() for part in built.bundle.parts))
    out_dir = tmp_path / "untarred"
    out_dir.mkdir()

    decrypted = subprocess.run(
        ["openssl", "enc", "-d", "-aes-128-cbc", "-K", key_hex, "-iv", iv_hex, "-in", joined],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-xzf", "-", "-C", out_dir], input=decrypted, check=True)

    assert [p.name for p in out_dir.iterdir()] == [built.image.name]
    assert (out_dir / built.image.name).read_bytes() == built.data


# -- the signature -------------------------------------------------------------------------


def test_signature_verifies_with_the_user_certificate(built: Built, identities: Identities) -> None:
    text = built.bundle.manifest_path.read_text("utf-8")
    signature = bytes.fromhex(_manifest(built).findtext("signature") or "")
    cert_key = x509.load_pem_x509_certificate(identities.user.cert_pem).public_key()
    assert isinstance(cert_key, rsa.RSAPublicKey)

    cert_key.verify(signature, _signed_text(text), asym_padding.PKCS1v15(), hashes.SHA1())

    altered = text.replace(f"<size>{len(built.data)}</size>", f"<size>{len(built.data) + 1}</size>")
    assert altered != text
    with pytest.raises(InvalidSignature):
        cert_key.verify(signature, _signed_text(altered), asym_padding.PKCS1v15(), hashes.SHA1())


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("<architecture>x86_64</architecture>", "<architecture>i386</architecture>"),
        ("<user>123456789012</user>", "<user>210987654321</user>"),
        (".part.01</filename>", ".part.1</filename>"),
    ],
)
def test_unbundle_rejects_an_altered_manifest(
    built: Built, identities: Identities, tmp_path: Path, old: str, new: str
) -> None:
    text = built.bundle.manifest_path.read_text("utf-8")
    assert old in text
    built.bundle.manifest_path.write_text(text.replace(old, new), "utf-8")

    with pytest.raises(BundleError, match="signature does not verify"):
        unbundle(
            manifest_path=built.bundle.manifest_path,
            parts_dir=built.bundle.manifest_path.parent,
            user_key_pem=identities.user.key_pem,
            out_path=tmp_path / "restored.raw",
        )
    assert not (tmp_path / "restored.raw").exists()


def test_unbundle_checks_against_a_given_certificate(
    built: Built, identities: Identities, tmp_path: Path
) -> None:
    def run(cert_pem: bytes, out_path: Path) -> Path:
        return unbundle(
            manifest_path=built.bundle.manifest_path,
            parts_dir=built.bundle.manifest_path.parent,
            user_key_pem=identities.user.key_pem,
            out_path=out_path,
            user_cert_pem=cert_pem,
        )

    assert run(identities.user.cert_pem, tmp_path / "ok.raw").read_bytes() == built.data
    with pytest.raises(BundleError, match="signature does not verify"):
        run(identities.stranger.cert_pem, tmp_path / "bad.raw")
    assert not (tmp_path / "bad.raw").exists()


def test_unbundle_with_someone_elses_key_fails(
    built: Built, identities: Identities, tmp_path: Path
) -> None:
    with pytest.raises(BundleError, match="signature does not verify"):
        unbundle(
            manifest_path=built.bundle.manifest_path,
            parts_dir=built.bundle.manifest_path.parent,
            user_key_pem=identities.stranger.key_pem,
            out_path=tmp_path / "restored.raw",
        )


# -- tampered and missing parts ------------------------------------------------------------


def test_unbundle_detects_a_tampered_part(
    built: Built, identities: Identities, tmp_path: Path
) -> None:
    part = built.bundle.parts[1]
    content = bytearray(part.path.read_bytes())
    content[len(content) // 2] ^= 0x01
    part.path.write_bytes(bytes(content))

    with pytest.raises(BundleError, match=r"part fedora-test\.part\.01: SHA-1 .* does not match"):
        unbundle(
            manifest_path=built.bundle.manifest_path,
            parts_dir=built.bundle.manifest_path.parent,
            user_key_pem=identities.user.key_pem,
            out_path=tmp_path / "restored.raw",
        )
    assert not (tmp_path / "restored.raw").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def test_unbundle_reports_a_missing_part(
    built: Built, identities: Identities, tmp_path: Path
) -> None:
    built.bundle.parts[-1].path.unlink()

    with pytest.raises(InputError, match=r"cannot read bundle part .*fedora-test\.part\.02"):
        unbundle(
            manifest_path=built.bundle.manifest_path,
            parts_dir=built.bundle.manifest_path.parent,
            user_key_pem=identities.user.key_pem,
            out_path=tmp_path / "restored.raw",
        )


# -- bad input -----------------------------------------------------------------------------


def test_missing_image_is_an_input_error_naming_it(tmp_path: Path, identities: Identities) -> None:
    image = tmp_path / "nowhere.raw"
    with pytest.raises(InputError, match=r"cannot read image .*nowhere\.raw"):
        build_bundle(request=_request(identities, image, tmp_path / "out"))


def test_directory_as_image_is_an_input_error(tmp_path: Path, identities: Identities) -> None:
    with pytest.raises(InputError, match="is not a regular file"):
        build_bundle(request=_request(identities, tmp_path, tmp_path / "out"))


def test_unusable_keys_are_input_errors(tmp_path: Path, identities: Identities) -> None:
    image = tmp_path / "img.raw"
    _write_image(image, [("random", 1024)])
    out = tmp_path / "out"
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_pem = ec_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )

    with pytest.raises(InputError, match=r"EC2 certificate \(ec2_cert_pem\)"):
        build_bundle(request=_request(identities, image, out, ec2_cert_pem=b"not a cert"))
    with pytest.raises(InputError, match=r"user private key \(user_key_pem\).*not a PEM"):
        build_bundle(request=_request(identities, image, out, user_key_pem=b"garbage"))
    with pytest.raises(InputError, match="is not an RSA key"):
        build_bundle(request=_request(identities, image, out, user_key_pem=ec_pem))
    with pytest.raises(InputError, match="does not belong to the user certificate"):
        build_bundle(
            request=_request(identities, image, out, user_key_pem=identities.stranger.key_pem)
        )
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("arch", "ppc64le", "architecture"),
        ("account_id", "1234-5678-9012", "12 digits"),
        ("name", "../escape", "bundle name"),
        ("name", "", "bundle name"),
        ("kernel_id", "vmlinuz", "aki-"),
        ("part_size", 0, "part size"),
        ("block_device_mapping", (("ami", "sda1"), ("ami", "sdb")), "twice"),
    ],
)
def test_invalid_request_fields_are_rejected(
    tmp_path: Path, identities: Identities, field: str, value: object, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        _request(identities, tmp_path / "img.raw", tmp_path, **{field: value})


def test_request_repr_hides_the_private_key(tmp_path: Path, identities: Identities) -> None:
    request = _request(identities, tmp_path / "img.raw", tmp_path)
    assert "PRIVATE KEY" not in repr(request)


def test_failed_build_leaves_no_parts_or_manifest(tmp_path: Path, identities: Identities) -> None:
    image = tmp_path / "img.raw"
    _write_image(image, [("random", 3 * MIB)])
    out = tmp_path / "out"
    out.mkdir()
    (out / "fedora-test.part.01").mkdir()  # the second part cannot be created

    with pytest.raises(BundleError, match=r"cannot write .*fedora-test\.part\.01"):
        build_bundle(request=_request(identities, image, out))
    assert [p.name for p in out.iterdir()] == ["fedora-test.part.01"]

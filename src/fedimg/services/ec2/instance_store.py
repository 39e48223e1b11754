"""Instance-store rows: build the AMI bundle once, upload it to each region's S3 bucket.

The bundle (see :mod:`fedimg.services.ec2.bundle`) is made from the raw image, which is streamed
out of the source into a temporary file first (bundling needs a seekable file and its size). It is
built once per job, without a kernel id (PV kernels differ per region: RegisterImage's KernelId
gives each region its own), and uploaded once per region: every part and the manifest, with the
``aws-exec-read`` ACL EC2 needs to read them. Each object is recorded in the ledger as it is
written, so a failed job removes what it uploaded.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedimg.config import BundleSettings
from fedimg.errors import ConfigError
from fedimg.services.ec2.bundle import Bundle, BundleRequest, build_bundle
from fedimg.services.ec2.errors import aws_call, error_code
from fedimg.source import ImageSource, RawBlocks

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

_COPY_BLOCK = 1024 * 1024


def missing_bundle_settings(settings: BundleSettings) -> tuple[str, ...]:
    """The ``[aws.bundle]`` keys instance-store rows need that are not set."""
    needed = {
        "ec2_cert": settings.ec2_cert,
        "user_cert": settings.user_cert,
        "user_key": settings.user_key,
        "account_id": settings.account_id,
        "bucket": settings.bucket,
    }
    return tuple(name for name, value in needed.items() if not value)


def bucket_for(settings: BundleSettings, region: str) -> str:
    """The bucket of ``region`` (``{region}`` in the setting is replaced)."""
    if not settings.bucket:
        raise ConfigError("[aws.bundle] bucket: required for instance-store rows")
    return settings.bucket.replace("{region}", region)


def _read_pem(path: Path | None, key: str) -> bytes:
    if path is None:
        raise ConfigError(f"[aws.bundle] {key}: required for instance-store rows")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"[aws.bundle] {key}: cannot read {path}: {exc.strerror}") from exc


def unpack_to_file(source: ImageSource, target: Path) -> int:
    """Stream the source's raw bytes into ``target`` (sparse where the image is zero)."""
    written = 0
    zero = bytes(_COPY_BLOCK)
    with target.open("wb") as handle:
        blocks = RawBlocks(source, block_size=_COPY_BLOCK)
        for _index, block in blocks:
            if block == zero:
                handle.seek(_COPY_BLOCK, 1)
            else:
                handle.write(block)
        written = blocks.stats.bytes_raw
        handle.truncate(written)
    return written


@dataclass
class BuiltBundle:
    """A bundle on local disk, with the directory to remove when the job ends."""

    bundle: Bundle
    workdir: tempfile.TemporaryDirectory[str]

    def close(self) -> None:
        """Remove the local parts."""
        self.workdir.cleanup()


def make_bundle(
    *, source: ImageSource, settings: BundleSettings, name: str, arch: str
) -> BuiltBundle:
    """Unpack the image and bundle it (parts + signed manifest) in a temporary directory."""
    workdir = tempfile.TemporaryDirectory(prefix="fedimg-bundle-")
    try:
        root = Path(workdir.name)
        raw = root / f"{name}.raw"
        unpack_to_file(source, raw)
        out = root / "bundle"
        out.mkdir()
        bundle = build_bundle(
            request=BundleRequest(
                image_path=raw,
                name=name,
                arch=arch,
                account_id=settings.account_id or "",
                ec2_cert_pem=_read_pem(settings.ec2_cert, "ec2_cert"),
                user_cert_pem=_read_pem(settings.user_cert, "user_cert"),
                user_key_pem=_read_pem(settings.user_key, "user_key"),
                out_dir=out,
            )
        )
        raw.unlink()
    except BaseException:
        workdir.cleanup()
        raise
    return BuiltBundle(bundle=bundle, workdir=workdir)


def ensure_bucket(s3: S3Client, *, region: str, bucket: str, create: bool) -> None:
    """Make sure the bucket exists (creating it if allowed); ConfigError if it can't be used."""
    with aws_call("HeadBucket", region, bucket):
        try:
            s3.head_bucket(Bucket=bucket)
            return
        except Exception as exc:
            if error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise
    if not create:
        raise ConfigError(
            f"[aws.bundle] bucket: {bucket} does not exist in {region} (set create_bucket = true)"
        )
    with aws_call("CreateBucket", region, bucket):
        if region == "us-east-1":
            s3.create_bucket(Bucket=bucket)
        else:
            s3.create_bucket(
                Bucket=bucket,
                CreateBucketConfiguration={"LocationConstraint": region},  # type: ignore[typeddict-item]
            )
    log.info("created bucket %s in %s", bucket, region)


def upload_bundle(
    *,
    s3: S3Client,
    region: str,
    bucket: str,
    prefix: str,
    bundle: Bundle,
    tags: dict[str, str],
    on_object: Callable[[str], None],
) -> str:
    """Upload the parts, then the manifest; returns the ImageLocation (``bucket/key``).

    ``on_object`` receives ``bucket/key`` of each object as soon as it exists (the ledger).
    """
    tagging = "&".join(f"{k}={v}" for k, v in tags.items())
    keys = [(part.path, f"{prefix}/{part.filename}") for part in bundle.parts]
    keys.append((bundle.manifest_path, f"{prefix}/{bundle.manifest_name}"))
    for path, key in keys:
        with aws_call("PutObject", region, f"{bucket}/{key}"), path.open("rb") as body:
            s3.put_object(Bucket=bucket, Key=key, Body=body, ACL="aws-exec-read", Tagging=tagging)
        on_object(f"{bucket}/{key}")
    location = f"{bucket}/{prefix}/{bundle.manifest_name}"
    log.info("uploaded bundle %s (%d parts) in %s", location, len(bundle.parts), region)
    return location


__all__ = [
    "BuiltBundle",
    "bucket_for",
    "ensure_bucket",
    "make_bundle",
    "missing_bundle_settings",
    "unpack_to_file",
    "upload_bundle",
]

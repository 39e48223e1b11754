"""SSH access to fedimg's instances: a temporary key pair and a temporary security group.

:func:`open_access` imports a fresh ed25519 key (made here; the private half never leaves this
process) with ImportKeyPair, or uses the configured ``keyname``/``keypath``, and creates a security
group that lets only ``ssh_cidr`` reach the SSH port. Both are tagged at creation and recorded in
the ledger the moment they exist; :func:`close_access` deletes them (the group only once no
instance uses it, so instances are terminated first).

Idempotent: names derive from the job, so a re-run finds its own group (and reuses it) and its own
key pair (and replaces it: the old private key is gone).
"""

from __future__ import annotations

import io
import ipaddress
import logging
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import paramiko
from botocore.exceptions import BotoCoreError, ClientError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedimg.errors import ConfigError
from fedimg.services.ec2.errors import AWSError, EC2ServiceException, aws_call, error_code
from fedimg.services.ec2.resources import TAG_ROLE, Tracker, tag_specification
from fedimg.services.ec2.ssh import JumpHost

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

log = logging.getLogger(__name__)

#: Where this machine's public address is asked for (real AWS only).
CHECKIP_URL = "https://checkip.amazonaws.com"


@dataclass(frozen=True)
class AccessRequest:
    """Access to instances in ``region``; ``name`` names the key pair and the group."""

    region: str
    name: str
    tags: dict[str, str]
    ssh_cidr: str
    ssh_port: int = 22
    keyname: str | None = None
    keypath: Path | None = None


@dataclass(frozen=True)
class Access:
    """A key to log in with and a group that lets this machine in.

    ``key_pair_id`` is set when fedimg imported the key pair (and deletes it).
    """

    region: str
    key_name: str
    pkey: paramiko.PKey
    key_pair_id: str | None
    security_group_id: str


def generate_key() -> tuple[paramiko.PKey, bytes]:
    """A new ed25519 key: (the private key for paramiko, the public key in OpenSSH format)."""
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode("ascii")
    public = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return paramiko.Ed25519Key.from_private_key(io.StringIO(pem)), public + b" fedimg"


def load_key(path: Path) -> paramiko.PKey:
    """The configured private key (``keypath``); :class:`ConfigError` if it cannot be used."""
    try:
        return paramiko.PKey.from_path(path)
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise ConfigError(f"[aws] keypath: cannot load {path}: {exc}") from exc


def open_access(*, request: AccessRequest, ec2: EC2Client, tracker: Tracker) -> Access:
    """Create (or take from the config) the key pair, and create the security group.

    Each resource is in ``tracker`` as soon as it exists; if a later step fails, what was created
    is deleted before the error propagates. Raises :class:`AWSError` or :class:`ConfigError`.
    """
    region = request.region
    key_pair_id: str | None = None
    if request.keyname:
        if request.keypath is None:
            raise ConfigError("[aws] keyname needs keypath (the private key to log in with)")
        pkey = load_key(request.keypath)
        key_name = request.keyname
    else:
        pkey, public = generate_key()
        key_name = request.name
        key_pair_id = _import_key_pair(ec2, request, public, tracker)
    try:
        group_id = _create_group(ec2, request, tracker)
    except BaseException:
        if key_pair_id is not None:
            _delete_key_pair(ec2, region, key_pair_id, tracker)
        raise
    return Access(
        region=region,
        key_name=key_name,
        pkey=pkey,
        key_pair_id=key_pair_id,
        security_group_id=group_id,
    )


def _import_key_pair(
    ec2: EC2Client, request: AccessRequest, public: bytes, tracker: Tracker
) -> str:
    tags = {**request.tags, TAG_ROLE: "ssh-key"}
    for attempt in (1, 2):
        try:
            with aws_call("ImportKeyPair", request.region, request.name):
                response = ec2.import_key_pair(
                    KeyName=request.name,
                    PublicKeyMaterial=public,
                    TagSpecifications=tag_specification("key-pair", tags),  # type: ignore[arg-type]
                )
        except AWSError as exc:
            if attempt == 1 and exc.code == "InvalidKeyPair.Duplicate":
                # A previous run of this job left it; its private half is gone: replace it.
                log.info("replacing key pair %s left by an earlier run", request.name)
                with aws_call("DeleteKeyPair", request.region, request.name):
                    ec2.delete_key_pair(KeyName=request.name)
                continue
            raise
        key_pair_id = response["KeyPairId"]
        tracker.record(region=request.region, kind="key-pair", resource_id=key_pair_id)
        log.info("imported key pair %s (%s) in %s", request.name, key_pair_id, request.region)
        return key_pair_id
    raise AssertionError("unreachable")


def _create_group(ec2: EC2Client, request: AccessRequest, tracker: Tracker) -> str:
    region = request.region
    with aws_call("DescribeVpcs", region):
        vpcs = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
    if not vpcs:
        raise EC2ServiceException(
            f"{region} has no default VPC: fedimg starts its instances in the default VPC"
        )
    vpc_id = vpcs[0]["VpcId"]
    tags = {**request.tags, TAG_ROLE: "ssh-group"}
    try:
        with aws_call("CreateSecurityGroup", region, request.name):
            group_id = ec2.create_security_group(
                GroupName=request.name,
                Description=f"fedimg: SSH from {request.ssh_cidr} (temporary)",
                VpcId=vpc_id,
                TagSpecifications=tag_specification("security-group", tags),  # type: ignore[arg-type]
            )["GroupId"]
    except AWSError as exc:
        if exc.code != "InvalidGroup.Duplicate":
            raise
        group_id = _find_group(ec2, region, request.name, vpc_id)
        log.info("reusing security group %s left by an earlier run", group_id)
    tracker.record(region=region, kind="security-group", resource_id=group_id)
    try:
        with aws_call("AuthorizeSecurityGroupIngress", region, group_id):
            ec2.authorize_security_group_ingress(
                GroupId=group_id,
                IpPermissions=[
                    {
                        "IpProtocol": "tcp",
                        "FromPort": request.ssh_port,
                        "ToPort": request.ssh_port,
                        "IpRanges": [{"CidrIp": request.ssh_cidr, "Description": "fedimg SSH"}],
                    }
                ],
            )
    except AWSError as exc:
        if exc.code != "InvalidPermission.Duplicate":
            _delete_group(ec2, region, group_id, tracker, timeout=60.0)
            raise
    log.info(
        "security group %s in %s: port %d from %s",
        group_id,
        region,
        request.ssh_port,
        request.ssh_cidr,
    )
    return group_id


def _find_group(ec2: EC2Client, region: str, name: str, vpc_id: str) -> str:
    with aws_call("DescribeSecurityGroups", region, name):
        groups = ec2.describe_security_groups(
            Filters=[
                {"Name": "group-name", "Values": [name]},
                {"Name": "vpc-id", "Values": [vpc_id]},
            ]
        )["SecurityGroups"]
    if len(groups) != 1:
        raise EC2ServiceException(
            f"{region}: expected one security group named {name}, found {len(groups)}"
        )
    return groups[0]["GroupId"]


def close_access(
    *,
    access: Access,
    ec2: EC2Client,
    tracker: Tracker,
    timeout: float = 300.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> list[str]:
    """Delete the group and the key pair fedimg made; returns the ids it could not delete.

    Never raises (it runs in ``finally`` blocks): what it could not delete stays in the ledger for
    the job's cleanup and ``fedimg gc``. Instances using the group must be terminated first; a
    group still held by a terminating instance is retried for up to ``timeout`` seconds.
    """
    failed: list[str] = []
    if not _delete_group(
        ec2, access.region, access.security_group_id, tracker, timeout, sleep=sleep, clock=clock
    ):
        failed.append(access.security_group_id)
    if access.key_pair_id is not None and not _delete_key_pair(
        ec2, access.region, access.key_pair_id, tracker
    ):
        failed.append(access.key_pair_id)
    return failed


def _delete_group(
    ec2: EC2Client,
    region: str,
    group_id: str,
    tracker: Tracker,
    timeout: float,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    deadline = clock() + timeout
    while True:
        try:
            ec2.delete_security_group(GroupId=group_id)
        except (ClientError, BotoCoreError) as exc:
            code = error_code(exc)
            if code == "InvalidGroup.NotFound":
                break
            # The network interfaces of a terminated instance linger for a while.
            if code == "DependencyViolation" and clock() < deadline:
                sleep(min(10.0, max(0.0, deadline - clock())))
                continue
            log.error("could not delete security group %s in %s: %s", group_id, region, exc)
            return False
        break
    tracker.release(group_id)
    log.info("deleted security group %s in %s", group_id, region)
    return True


def _delete_key_pair(ec2: EC2Client, region: str, key_pair_id: str, tracker: Tracker) -> bool:
    try:
        ec2.delete_key_pair(KeyPairId=key_pair_id)
    except (ClientError, BotoCoreError) as exc:
        if error_code(exc) != "InvalidKeyPair.NotFound":
            log.error("could not delete key pair %s in %s: %s", key_pair_id, region, exc)
            return False
    tracker.release(key_pair_id)
    log.info("deleted key pair %s in %s", key_pair_id, region)
    return True


def resolve_ssh_cidr(
    configured: str | None,
    *,
    target: str,
    endpoint_url: str | None,
    proxy_jump: str | None = None,
    public_address: Callable[[], str] | None = None,
) -> str:
    """The block allowed to reach port 22: configured, else this machine's address/32.

    Through a jump host it is the jump host's address; on real AWS this machine's public address
    (as checkip.amazonaws.com sees it); on other targets the local address that reaches the
    endpoint (127.0.0.1 for the embedded one). Raises :class:`EC2ServiceException` when the
    address cannot be found (set ``ssh_cidr``).
    """
    if configured:
        return configured
    if proxy_jump:
        host = JumpHost.parse(proxy_jump).host
        return f"{_resolve_ipv4(host)}/32"
    if target == "aws":
        return f"{(public_address or _public_address)()}/32"
    host = urllib.parse.urlparse(endpoint_url or "").hostname or "127.0.0.1"
    return f"{_local_address_towards(host)}/32"


def _resolve_ipv4(host: str) -> str:
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET)
    except OSError as exc:
        raise EC2ServiceException(f"cannot resolve {host}: {exc}; set [aws] ssh_cidr") from exc
    return str(infos[0][4][0])


def _public_address() -> str:
    try:
        with urllib.request.urlopen(CHECKIP_URL, timeout=10) as response:
            text = response.read(64).decode("ascii", errors="replace").strip()
        return str(ipaddress.IPv4Address(text))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise EC2ServiceException(
            f"cannot find this machine's public address at {CHECKIP_URL}: {exc}; set [aws] ssh_cidr"
        ) from exc


def _local_address_towards(host: str) -> str:
    address = _resolve_ipv4(host)
    if ipaddress.IPv4Address(address).is_loopback:
        return address
    # A UDP "connection" sends nothing; it only picks the route and so the source address.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((address, 9))
            return str(probe.getsockname()[0])
        except OSError as exc:
            raise EC2ServiceException(
                f"cannot find the local address towards {host}: {exc}; set [aws] ssh_cidr"
            ) from exc


__all__ = [
    "Access",
    "AccessRequest",
    "close_access",
    "generate_key",
    "open_access",
    "resolve_ssh_cidr",
]

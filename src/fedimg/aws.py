"""The one AWS client factory: region → client, with retries, timeouts and the target's endpoint.

Every boto3 client fedimg uses comes from a :class:`ClientFactory`; stages receive clients, they never
build them. The factory decides where requests go:

- ``embedded``: the embedded endpoint (moto on 127.0.0.1) with fixed fake credentials, so that the
  user's real AWS credentials are never even read;
- ``endpoint``: any AWS-compatible endpoint URL, with the configured or ambient credentials;
- ``aws``: real AWS, only when the configuration says so.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import boto3
from botocore.config import Config as BotoConfig

from fedimg.embedded import EMBEDDED_ACCESS_KEY, EMBEDDED_SECRET_KEY

if TYPE_CHECKING:
    from mypy_boto3_ebs import EBSClient
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sts import STSClient

Target = Literal["embedded", "endpoint", "aws"]
EventHook = tuple[str, Callable[..., Any]]

#: Timeouts chosen so a dead connection is noticed well before a block's retry budget runs out,
#: while a 512 KiB PutSnapshotBlock on a slow link (≥ 100 KiB/s) still fits in the read timeout.
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
MAX_ATTEMPTS = 10


@dataclass(frozen=True)
class TargetSpec:
    """Where requests go and as whom. Secrets stay out of ``repr``."""

    target: Target
    endpoint_url: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    profile: str | None = None

    def describe(self) -> str:
        """A one-line, secret-free description for the user (the CLI prints it on stderr)."""
        if self.target == "aws":
            return "target: real AWS" + (f" (profile {self.profile})" if self.profile else "")
        return f"target: {self.target} AWS endpoint at {self.endpoint_url}"


_session_lock = threading.Lock()
_session: boto3.session.Session | None = None


def _shared_session() -> boto3.session.Session:
    # One session per process: its loader parses each service model (EC2's is megabytes of
    # JSON) once, instead of once per factory. Credentials are passed per client.
    global _session  # noqa: PLW0603
    with _session_lock:
        if _session is None:
            _session = boto3.session.Session()
        return _session


class ClientFactory:
    """Cached boto3 clients per (service, region) for one target. Thread-safe.

    ``pool_size`` sizes each client's connection pool (the upload's worker count plus headroom);
    ``retry_mode`` is botocore's: ``adaptive`` (the default) also slows the client down while AWS
    throttles it. ``hooks`` are botocore event handlers registered on every client created (tests use them to
    record the requests fedimg sends).
    """

    def __init__(
        self,
        spec: TargetSpec,
        *,
        pool_size: int = 16,
        hooks: list[EventHook] | None = None,
        max_attempts: int = MAX_ATTEMPTS,
        retry_mode: Literal["adaptive", "standard"] = "adaptive",
    ) -> None:
        if spec.target != "aws" and not spec.endpoint_url:
            raise ValueError(f"target {spec.target!r} needs an endpoint URL")
        self.spec = spec
        self._hooks = list(hooks or [])
        self._lock = threading.Lock()
        self._clients: dict[tuple[str, str], Any] = {}
        self._session = self._make_session()
        self._config = BotoConfig(
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            retries={"mode": retry_mode, "max_attempts": max_attempts},
            max_pool_connections=pool_size,
        )

    def _make_session(self) -> boto3.session.Session:
        if self.spec.target != "embedded" and self.spec.profile and not self.spec.access_key:
            return boto3.session.Session(profile_name=self.spec.profile)
        return _shared_session()

    def _credentials(self) -> dict[str, str]:
        spec = self.spec
        if spec.target == "embedded":
            return {
                "aws_access_key_id": EMBEDDED_ACCESS_KEY,
                "aws_secret_access_key": EMBEDDED_SECRET_KEY,
            }
        if spec.access_key and spec.secret_key:
            return {"aws_access_key_id": spec.access_key, "aws_secret_access_key": spec.secret_key}
        return {}

    def add_hook(self, event: str, handler: Callable[..., Any]) -> None:
        """Register a botocore event handler on every client, existing and future."""
        with self._lock:
            self._hooks.append((event, handler))
            for client in self._clients.values():
                client.meta.events.register(event, handler)

    def client(self, service: str, region: str) -> Any:
        """The client of ``service`` in ``region`` (created once, then reused)."""
        key = (service, region)
        with self._lock:
            found = self._clients.get(key)
            if found is None:
                found = self._session.client(
                    service,  # type: ignore[call-overload]
                    region_name=region,
                    endpoint_url=self.spec.endpoint_url,
                    config=self._config,
                    **self._credentials(),
                )
                for event, handler in self._hooks:
                    found.meta.events.register(event, handler)
                self._clients[key] = found
            return found

    def ec2(self, region: str) -> EC2Client:
        """The EC2 client of ``region``."""
        client: EC2Client = self.client("ec2", region)
        return client

    def ebs(self, region: str) -> EBSClient:
        """The EBS direct APIs client of ``region``."""
        client: EBSClient = self.client("ebs", region)
        return client

    def s3(self, region: str) -> S3Client:
        """The S3 client of ``region``."""
        client: S3Client = self.client("s3", region)
        return client

    def sts(self, region: str) -> STSClient:
        """The STS client of ``region``."""
        client: STSClient = self.client("sts", region)
        return client

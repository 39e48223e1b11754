"""Wiring for entry points: from a Config to a target, clients, catalog and messenger.

Entry points (CLI, bus consumer, web) build a :class:`Runtime` and close it when done. It starts the
embedded AWS endpoint when the configuration targets it, and never otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedimg.aws import ClientFactory, EventHook, TargetSpec
from fedimg.config import Config
from fedimg.embedded import EmbeddedAWS
from fedimg.errors import ConfigError

# The heavy parts (SQLAlchemy, paramiko, the orchestrator) are imported when first used, so a
# command that needs only the uploader (``fedimg snapshot``) starts fast.
if TYPE_CHECKING:
    from fedimg.catalog import Catalog
    from fedimg.messages import Messenger, Publisher
    from fedimg.progress import Progress
    from fedimg.services.ec2.service import EC2Service
    from fedimg.services.ec2.ssh import InstanceSeam
    from fedimg.services.ec2.testing import TestRunner

log = logging.getLogger(__name__)


def target_spec(config: Config, embedded: EmbeddedAWS | None) -> TargetSpec:
    """Where requests go, from the config (the embedded endpoint must be started by the caller)."""
    aws = config.aws
    if aws.target == "embedded":
        if embedded is None:
            raise ConfigError("the embedded target needs a running embedded endpoint")
        return TargetSpec(target="embedded", endpoint_url=embedded.endpoint.url)
    access = aws.access_id.get_secret_value() if aws.access_id else None
    secret = aws.secret_key.get_secret_value() if aws.secret_key else None
    if aws.target == "endpoint":
        if not aws.endpoint_url:
            raise ConfigError("[aws] endpoint_url: required when target = 'endpoint'")
        return TargetSpec(
            target="endpoint",
            endpoint_url=aws.endpoint_url,
            access_key=access or "fedimg",
            secret_key=secret or "fedimg",
            profile=aws.profile,
        )
    return TargetSpec(target="aws", access_key=access, secret_key=secret, profile=aws.profile)


@dataclass
class Runtime:
    """Everything a job needs, built from one Config. Use as a context manager."""

    config: Config
    hooks: list[EventHook] = field(default_factory=list)
    publishers: list[Publisher] = field(default_factory=list)
    embedded: EmbeddedAWS | None = None
    owns_embedded: bool = False
    #: Where instances are dialled over SSH; None: their EC2 addresses (tests: a local sshd).
    seam: InstanceSeam | None = None
    _clients: ClientFactory | None = None
    _catalog: Catalog | None = None
    _messenger: Messenger | None = None

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the embedded endpoint if the config targets it (idempotent)."""
        if self.config.aws.target == "embedded" and self.embedded is None:
            self.embedded = EmbeddedAWS()
            self.owns_embedded = True
        if self.embedded is not None:
            self.embedded.start()

    @property
    def spec(self) -> TargetSpec:
        """The target, started if needed."""
        self.start()
        return target_spec(self.config, self.embedded)

    @property
    def clients(self) -> ClientFactory:
        """The one client factory."""
        if self._clients is None:
            self._clients = ClientFactory(
                self.spec, pool_size=self.config.aws.workers + 8, hooks=self.hooks
            )
        return self._clients

    @property
    def catalog(self) -> Catalog:
        """The catalog (created on first use)."""
        if self._catalog is None:
            from fedimg.catalog import Catalog

            self._catalog = Catalog(self.config.catalog_url())
        return self._catalog

    @property
    def messenger(self) -> Messenger:
        """The messenger with the configured publishers (the journal is always on)."""
        if self._messenger is None:
            from fedimg.messages import Messenger, StdoutPublisher

            publishers = list(self.publishers)
            messaging = self.config.messaging
            if "stdout" in messaging.publishers:
                publishers.append(StdoutPublisher())
            if "amqp" in messaging.publishers:
                from fedimg.bus import AmqpPublisher

                publishers.append(AmqpPublisher.from_config(messaging))
            self._messenger = Messenger(
                catalog=self.catalog,
                topic_prefix=messaging.topic_prefix,
                publishers=publishers,
                flush_interval=messaging.flush_interval,
                successor_summary=messaging.successor_summary,
            )
        return self._messenger

    def test_runner(self) -> TestRunner:
        """The configured test runner (default: ``ssh`` on real AWS, ``command`` elsewhere)."""
        aws = self.config.aws
        name = aws.test_runner or ("ssh" if aws.target == "aws" else "command")
        if name == "command":
            from fedimg.services.ec2.testing import CommandRunner

            return CommandRunner()
        if name == "ssh":
            from fedimg.services.ec2.testing_ssh import SshTestRunner

            return SshTestRunner(clients=self.clients, settings=aws, seam=self.seam)
        if name == "qemu":
            from fedimg.services.ec2.testing_qemu import QemuRunner

            return QemuRunner(clients=self.clients, settings=aws)
        raise ConfigError(f"[aws] test_runner: {name!r} is not available in this version")

    def source_gate(self) -> TestRunner | None:
        """The runner that tests the source image before upload (``test_before_upload``)."""
        aws = self.config.aws
        if not (aws.test_before_upload and aws.test):
            return None
        from fedimg.services.ec2.testing_qemu import QemuRunner

        return QemuRunner(clients=self.clients, settings=aws)

    def service(self, *, progress: Progress | None = None) -> EC2Service:
        """The EC2 service for this runtime."""
        from fedimg.services.ec2.service import EC2Service

        endpoint = self.spec.endpoint_url
        return EC2Service(
            config=self.config,
            clients=self.clients,
            catalog=self.catalog,
            messenger=self.messenger,
            runner=self.test_runner() if self.config.aws.test else None,
            gate=self.source_gate(),
            progress=progress,
            endpoint_url=endpoint,
            seam=self.seam,
        )

    def close(self) -> None:
        """Stop what was started; release the catalog."""
        if self._messenger is not None:
            # Last try at the outbox, then the broker connections close.
            self._messenger.close()
            self._messenger = None
        if self._catalog is not None:
            self._catalog.close()
            self._catalog = None
        if self.embedded is not None and self.owns_embedded:
            self.embedded.stop()
            self.embedded = None

    def describe(self) -> dict[str, Any]:
        """Secret-free facts for the user: target, catalog."""
        from sqlalchemy.engine import make_url

        catalog = make_url(self.config.catalog_url()).render_as_string(hide_password=True)
        return {"target": self.spec.describe(), "catalog": catalog}

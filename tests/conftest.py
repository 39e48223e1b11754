"""Shared fixtures: the embedded AWS over HTTP, a request recorder, sample images, leak checks."""

from __future__ import annotations

import copy
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from fedimg.aws import ClientFactory, TargetSpec
from fedimg.config import Config
from fedimg.embedded import EmbeddedAWS
from fedimg.runtime import Runtime
from fedimg.sampleimage import SampleImage, write_sample_image

if TYPE_CHECKING:
    from tests.amqp_support import BrokerTap
    from tests.web_support import Published

IN_CI = os.environ.get("CI") == "true"
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def require(condition: bool, reason: str) -> None:
    """Skip when ``condition`` is false, except under CI=true, where it fails."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required under CI=true: {reason}")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``cli.main`` configures the root logger on the stream of the moment; undo it after each
    test, so later log records do not go to a stream pytest has closed."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """Fedora's real reference data (shared/reference): skipped if absent, unless in CI."""
    require(REFERENCE.is_dir(), f"{REFERENCE} is absent")
    return REFERENCE


@pytest.fixture(scope="session")
def embedded_aws() -> Iterator[EmbeddedAWS]:
    """One embedded endpoint for the session (moto's state is per process anyway)."""
    aws = EmbeddedAWS()
    aws.start()
    yield aws
    aws.stop()


@pytest.fixture
def aws(embedded_aws: EmbeddedAWS) -> EmbeddedAWS:
    """The embedded endpoint, emptied before the test."""
    embedded_aws.reset()
    return embedded_aws


@dataclass
class Call:
    """One AWS request as fedimg sent it."""

    service: str
    operation: str
    params: dict[str, Any]
    region: str


class Recorder:
    """Records every request's parameters (botocore ``provide-client-params``); thread-safe."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._lock = threading.Lock()

    def hook(self, params: dict[str, Any], model: Any, context: Any = None, **_: Any) -> None:
        service = model.service_model.service_name if model is not None else "?"
        region = ""
        if isinstance(context, dict):
            region = str(context.get("client_region", ""))
        with self._lock:
            self.calls.append(
                Call(
                    service=service,
                    operation=model.name,
                    params=copy.deepcopy(_strip_bytes(params)),
                    region=region,
                )
            )

    def of(self, operation: str) -> list[Call]:
        """Calls of one operation, in order."""
        with self._lock:
            return [c for c in self.calls if c.operation == operation]

    def operations(self) -> list[str]:
        """Operation names in order."""
        with self._lock:
            return [c.operation for c in self.calls]


def _strip_bytes(params: dict[str, Any]) -> dict[str, Any]:
    """Request bodies (bytes, files) replaced by a short description, so they can be copied."""

    def describe(value: Any) -> Any:
        if isinstance(value, bytes | bytearray):
            return f"<{len(value)} bytes>"
        if hasattr(value, "read"):
            return f"<stream {getattr(value, 'name', '')}>"
        return value

    return {k: describe(v) for k, v in params.items()}


@pytest.fixture
def recorder() -> Recorder:
    """A fresh request recorder."""
    return Recorder()


def make_config(tmp_path: Path, **aws: Any) -> Config:
    """A Config on the embedded target with its catalog in ``tmp_path``; ``aws`` overrides [aws]."""
    data: dict[str, Any] = {
        "general": {"catalog_url": f"sqlite:///{tmp_path / 'catalog.sqlite'}"},
        "aws": {"target": "embedded", **aws},
    }
    return Config.model_validate(data)


@pytest.fixture
def runtime_factory(aws: EmbeddedAWS, recorder: Recorder) -> Iterator[Callable[[Config], Runtime]]:
    """Builds Runtimes on the shared embedded endpoint, recording every request."""
    made: list[Runtime] = []

    def build(config: Config) -> Runtime:
        runtime = Runtime(config=config, embedded=aws)
        runtime.hooks.append(("provide-client-params.*.*", recorder.hook))
        made.append(runtime)
        return runtime

    yield build
    for runtime in made:
        runtime.close()


@pytest.fixture
def clients(aws: EmbeddedAWS) -> ClientFactory:
    """Plain clients on the embedded endpoint (for assertions, not recorded)."""
    return ClientFactory(TargetSpec(target="embedded", endpoint_url=aws.endpoint.url))


@pytest.fixture(scope="session")
def image_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where sample images are built once per session."""
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="session")
def sample_image(image_cache: Path) -> SampleImage:
    """A small realistic image: 48 MiB disk, ext4 with 30 % real files, xz-compressed."""
    return write_sample_image(
        image_cache / "Fedora-Cloud-Base-Test-41-1.1.x86_64.raw.xz",
        size_bytes=48 * 1024 * 1024,
        fill=0.3,
        seed=1,
    )


def leaked(clients: ClientFactory, regions: list[str]) -> list[str]:
    """Resources fedimg must never leave behind, in ``regions``.

    Running instances, volumes, key pairs and security groups tagged by fedimg, and fedimg-tagged
    snapshots that no AMI uses.
    """
    found: list[str] = []
    for region in regions:
        ec2 = clients.ec2(region)
        for reservation in ec2.describe_instances()["Reservations"]:
            for instance in reservation["Instances"]:
                if instance["State"]["Name"] not in ("terminated", "shutting-down"):
                    found.append(f"{region}:{instance['InstanceId']}")
        found += [f"{region}:{v['VolumeId']}" for v in ec2.describe_volumes()["Volumes"]]
        used = {
            m["Ebs"]["SnapshotId"]
            for image in ec2.describe_images(Owners=["self"])["Images"]
            for m in image.get("BlockDeviceMappings", [])
            if "Ebs" in m and "SnapshotId" in m["Ebs"]
        }
        tagged = ec2.describe_snapshots(
            OwnerIds=["self"], Filters=[{"Name": "tag-key", "Values": ["fedimg:role"]}]
        )["Snapshots"]
        found += [f"{region}:{s['SnapshotId']}" for s in tagged if s["SnapshotId"] not in used]
        for pair in ec2.describe_key_pairs()["KeyPairs"]:
            if any(t["Key"].startswith("fedimg:") for t in pair.get("Tags", [])):
                found.append(f"{region}:{pair['KeyPairId']}")
        for group in ec2.describe_security_groups()["SecurityGroups"]:
            if any(t["Key"].startswith("fedimg:") for t in group.get("Tags", [])):
                found.append(f"{region}:{group['GroupId']}")
    return found


# The support modules import this one: their fixtures import them when first used.


@pytest.fixture(scope="session")
def published(
    embedded_aws: EmbeddedAWS, sample_image: SampleImage, tmp_path_factory: pytest.TempPathFactory
) -> Published:
    """Five jobs' catalog (see :class:`tests.web_support.Published`)."""
    from tests.web_support import published_once

    return published_once(aws=embedded_aws, sample=sample_image, factory=tmp_path_factory)


@pytest.fixture
def tap() -> Iterator[BrokerTap]:
    """A test's own exchange on the real broker (skipped without it, failed under CI=true)."""
    from tests.amqp_support import BrokerTap, require_broker

    require_broker()
    tap = BrokerTap()
    yield tap
    tap.close()

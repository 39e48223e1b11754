"""The catalog on a real PostgreSQL (127.0.0.1:5432, database ``test``), through a real job."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy

from fedimg.catalog import AmiFilter, Base, Catalog
from fedimg.config import Config
from fedimg.runtime import Runtime
from fedimg.sampleimage import SampleImage
from fedimg.services.ec2.service import PublishRequest
from fedimg.source import resolve_source
from tests.conftest import require

URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


def _reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A clean fedimg schema in the ``test`` database."""
    require(_reachable(), "PostgreSQL is not running on 127.0.0.1:5432")
    engine = sqlalchemy.create_engine(URL)
    Base.metadata.drop_all(engine)
    engine.dispose()
    yield URL
    engine = sqlalchemy.create_engine(URL)
    Base.metadata.drop_all(engine)
    engine.dispose()


def test_a_job_is_recorded_in_postgresql(
    pg_url: str,
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
) -> None:
    config = Config.model_validate(
        {"general": {"catalog_url": pg_url}, "aws": {"regions": ["us-east-1", "eu-west-1"]}}
    )
    runtime = runtime_factory(config)
    result = runtime.service().publish(
        PublishRequest(source=resolve_source(str(sample_image.path)), release="41")
    )
    assert result.status == "published", result.error

    catalog = Catalog(pg_url)
    try:
        (job,) = catalog.jobs()
        assert job.status == "published"
        assert job.image_sha256 == sample_image.sha256_compressed
        assert job.state["upload"]["snapshot_id"] == result.upload.snapshot_id  # type: ignore[union-attr]
        amis = catalog.amis(AmiFilter(region="eu-west-1", release="41"))
        assert {a.flavour for a in amis} == {"hvm-ebs-standard", "hvm-ebs-gp2"}
        assert all(a.public for a in amis)
        messages, total = catalog.messages(topics=["org.fedoraproject.dev.fedimg.image.publish"])
        assert total == len(messages) == 4
        steps = [s.name for s in catalog.steps(job.id)]
        assert steps[:2] == ["upload", "register"]
        assert all(s.status == "completed" for s in catalog.steps(job.id))
        assert catalog.active_resources(job.id) == []
    finally:
        catalog.close()

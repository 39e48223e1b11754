"""Helpers for the web tests: a catalog filled by real uploads, a server in a thread, Chromium.

The catalog is built once per session (uploads on the embedded AWS take seconds) and never changed
afterwards; a test that writes to a catalog works on its own copy (:func:`clone_catalog`).
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from fedimg.catalog import Catalog
from fedimg.embedded import EmbeddedAWS
from fedimg.runtime import Runtime
from fedimg.sampleimage import SampleImage
from fedimg.services.ec2.service import PublishRequest, PublishResult
from fedimg.source import resolve_source
from fedimg.web import WebContext, create_app
from fedimg.web.server import BackgroundServer
from tests.conftest import make_config, require

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver

F41_COMPOSE = "Fedora-41-20241027.0"
F42_COMPOSE = "Fedora-42-20250415.3"
F41_RESPIN = "Fedora-41-20241110.0"
F41_LATER = "Fedora-41-20241120.0"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


@dataclass(frozen=True)
class Published:
    """The catalog after five jobs, oldest first (each image has its own name and checksum, so no
    job reuses another's AMIs):

    - ``f41``: F41 1.1 x86_64 in us-east-1, eu-west-1, ap-south-1 (standard, gp2): published;
    - ``f42_arm``: F42 1.2 aarch64 (arm64) in us-east-1 and eu-west-1, hvm-ebs-gp3: published;
    - ``f41_respin``: F41 1.5 x86_64 (a newer compose), us-east-1 only: published;
    - ``rejected``: F41 1.1 again with an unknown region: failed before any AWS call;
    - ``failed_test``: F41 1.6 x86_64, us-east-1, test script ``false``: failed, AMIs deleted.
    """

    catalog_url: str
    path: Path
    results: dict[str, PublishResult]

    def job(self, label: str) -> str:
        """The job id of ``label``."""
        job_id = self.results[label].job_id
        assert job_id is not None
        return job_id

    def ami(self, label: str, region: str, flavour: str) -> str:
        """The AMI id ``label`` published in ``region`` for ``flavour``."""
        (found,) = [
            a.id for a in self.results[label].amis if (a.region, a.flavour) == (region, flavour)
        ]
        return found


def _publish(
    aws: EmbeddedAWS, workdir: Path, image: Path, request: dict[str, Any], **settings: Any
) -> PublishResult:
    config = make_config(workdir, **settings)
    with Runtime(config=config, embedded=aws) as runtime:
        return runtime.service().publish(
            PublishRequest(source=resolve_source(str(image)), **request)
        )


def build_published(*, aws: EmbeddedAWS, sample: SampleImage, workdir: Path) -> Published:
    """Run the five jobs of :class:`Published` on the embedded AWS into one catalog."""
    aws.reset()

    def image(name: str, variant: int) -> Path:
        # The same disk, but other bytes (xz stream padding: 4 zero bytes per variant), so each
        # image has its own checksum and fedimg does not take its AMIs for another image's.
        path = workdir / f"{name}.raw.xz"
        shutil.copyfile(sample.path, path)
        with path.open("ab") as file:
            file.write(b"\0" * 4 * variant)
        return path

    f41 = {"compose_id": F41_COMPOSE, "release": "41"}
    results = {
        "f41": _publish(
            aws,
            workdir,
            sample.path,
            {**f41, "regions": ("us-east-1", "eu-west-1", "ap-south-1")},
        ),
        "f42_arm": _publish(
            aws,
            workdir,
            image("Fedora-Cloud-Base-Test-42-1.2.aarch64", 1),
            {
                "compose_id": F42_COMPOSE,
                "release": "42",
                "regions": ("us-east-1", "eu-west-1"),
                "flavours": ("hvm-ebs-gp3",),
            },
        ),
        "f41_respin": _publish(
            aws,
            workdir,
            image("Fedora-Cloud-Base-Test-41-1.5.x86_64", 2),
            {"compose_id": F41_RESPIN, "release": "41", "regions": ("us-east-1",)},
        ),
        "rejected": _publish(aws, workdir, sample.path, {**f41, "regions": ("xx-nowhere-1",)}),
        "failed_test": _publish(
            aws,
            workdir,
            image("Fedora-Cloud-Base-Test-41-1.6.x86_64", 3),
            {"compose_id": F41_LATER, "release": "41", "regions": ("us-east-1",)},
            test="false",
        ),
    }
    statuses = {label: result.status for label, result in results.items()}
    assert statuses == {
        "f41": "published",
        "f42_arm": "published",
        "f41_respin": "published",
        "rejected": "failed",
        "failed_test": "failed",
    }, {label: result.error for label, result in results.items()}
    path = workdir / "catalog.sqlite"
    return Published(catalog_url=f"sqlite:///{path}", path=path, results=results)


_SESSION: dict[str, Published] = {}


def published_once(
    *, aws: EmbeddedAWS, sample: SampleImage, factory: pytest.TempPathFactory
) -> Published:
    """:func:`build_published`, once per test session (every web test module shares it)."""
    if "published" not in _SESSION:
        _SESSION["published"] = build_published(
            aws=aws, sample=sample, workdir=factory.mktemp("published")
        )
    return _SESSION["published"]


def clone_catalog(published: Published, directory: Path) -> str:
    """A copy of the published catalog in ``directory`` (SQLite's backup API: WAL included)."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "catalog.sqlite"
    with sqlite3.connect(published.path) as source, sqlite3.connect(target) as copy:
        source.backup(copy)
    source.close()
    copy.close()
    return f"sqlite:///{target}"


@contextmanager
def serving(catalog: Catalog, *, poll_seconds: float = 2.0) -> Iterator[str]:
    """The web application over ``catalog`` on a free loopback port; yields its base URL."""
    app = create_app(WebContext(catalog=catalog, poll_seconds=poll_seconds))
    with BackgroundServer(app) as server:
        yield server.url


CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)


@contextmanager
def chromium() -> Iterator[WebDriver]:
    """Debian's headless Chromium driven by its chromedriver (no download: both paths given).

    Skips when either is missing, except under ``CI=true``, where it fails.
    """
    require(shutil.which("chromium") is not None, "chromium is not installed (Debian: chromium)")
    require(
        shutil.which("chromedriver") is not None,
        "chromedriver is not installed (Debian: chromium-driver)",
    )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="fedimg-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    service = Service(executable_path=shutil.which("chromedriver") or CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)

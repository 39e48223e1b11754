"""The dashboard in real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium).

Load, filter, open a job, copy an AMI id, watch a running job's progress move while the test writes
it to the catalog. Screenshots go to ``artifacts/`` (gitignored). Skipped without Chromium, except
under ``CI=true``, where a missing browser fails.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from fedimg.catalog import Catalog
from tests.web_support import (
    ARTIFACTS,
    Published,
    chromium,
    clone_catalog,
    serving,
)

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement

pytestmark = pytest.mark.slow

POLL_SECONDS = 0.3
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """One headless Chromium for the module."""
    with chromium() as driver:
        driver.set_page_load_timeout(20)
        yield driver


@dataclass
class Site:
    """The dashboard over a private copy of the published catalog (tests may write to it)."""

    url: str
    catalog: Catalog


@pytest.fixture
def site(published: Published, tmp_path: Path) -> Iterator[Site]:
    catalog = Catalog(clone_catalog(published, tmp_path))
    try:
        with serving(catalog, poll_seconds=POLL_SECONDS) as url:
            yield Site(url=url, catalog=catalog)
    finally:
        catalog.close()


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll ``condition`` until it is truthy (selenium errors count as not yet)."""
    from selenium.common.exceptions import WebDriverException

    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except WebDriverException:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.1)


def css(driver: WebDriver, selector: str) -> list[WebElement]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def screenshot(driver: WebDriver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.set_window_size(
        1400, max(900, int(driver.execute_script("return document.body.scrollHeight")))
    )
    assert driver.save_screenshot(str(path))
    driver.set_window_size(1400, 1000)
    return path


def console_errors(driver: WebDriver) -> list[str]:
    """Errors the page logged (a CSP violation or a failed request would show here)."""
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [e["message"] for e in entries if e["level"] == "SEVERE"]


def job_rows(driver: WebDriver) -> list[str]:
    return [row.get_attribute("data-job") or "" for row in css(driver, "table.jobs tbody tr")]


def test_the_dashboard_lists_every_job_newest_first(
    browser: WebDriver, site: Site, published: Published
) -> None:
    browser.get(site.url + "/")
    assert browser.title == "Jobs · fedimg"
    order = ["failed_test", "rejected", "f41_respin", "f42_arm", "f41"]
    assert job_rows(browser) == [published.job(label) for label in order]
    statuses = [e.text for e in css(browser, "table.jobs tbody [data-field=status]")]
    assert statuses == ["failed", "failed", "published", "published", "published"]
    assert css(browser, "#summary")[0].text == "5 jobs"
    assert "test script exited 1" in css(browser, "table.jobs tbody tr")[0].text
    assert console_errors(browser) == []
    screenshot(browser, "web-dashboard")


def test_filters_narrow_the_jobs(browser: WebDriver, site: Site, published: Published) -> None:
    from selenium.webdriver.support.ui import Select

    browser.get(site.url + "/")
    Select(css(browser, "#filter-release")[0]).select_by_value("42")  # submits on change
    wait_for(lambda: "release=42" in browser.current_url, what="the release filter")
    assert job_rows(browser) == [published.job("f42_arm")]
    assert css(browser, "#summary")[0].text == "1 job matches"

    browser.get(site.url + "/")
    Select(css(browser, "#filter-status")[0]).select_by_value("failed")
    wait_for(lambda: "status=failed" in browser.current_url, what="the status filter")
    assert job_rows(browser) == [published.job("failed_test"), published.job("rejected")]
    Select(css(browser, "#filter-region")[0]).select_by_value("us-east-1")
    wait_for(lambda: "region=us-east-1" in browser.current_url, what="the region filter")
    assert "status=failed" in browser.current_url
    assert job_rows(browser) == [published.job("failed_test")]

    css(browser, "a.clear")[0].click()
    wait_for(lambda: len(job_rows(browser)) == 5, what="every job again")
    assert console_errors(browser) == []


def test_the_dashboard_pages(browser: WebDriver, site: Site, published: Published) -> None:
    browser.get(site.url + "/?per_page=2")
    assert css(browser, ".pager span")[0].text == "page 1 of 3"
    css(browser, "a[rel=next]")[0].click()
    wait_for(lambda: "page=2" in browser.current_url, what="page 2")
    assert job_rows(browser) == [published.job("f41_respin"), published.job("f42_arm")]
    assert css(browser, ".pager span")[0].text == "page 2 of 3"


def test_a_job_page_shows_timeline_amis_and_messages(
    browser: WebDriver, site: Site, published: Published
) -> None:
    browser.get(site.url + "/")
    job_id = published.job("f41")
    css(browser, f'tr[data-job="{job_id}"] a.job-link')[0].click()
    wait_for(lambda: browser.current_url.endswith(f"/jobs/{job_id}"), what="the job page")
    assert css(browser, "h1")[0].text == "Fedora-Cloud-Base-Test-41-1.1.x86_64"
    steps = [row.text.split()[0] for row in css(browser, "table.timeline tbody tr")]
    assert steps == ["upload", "register", "test", "replicate", "publish"]
    bars = css(browser, "table.timeline .bar")
    assert all(float(bar.value_of_css_property("width").removesuffix("px")) > 0 for bar in bars)
    shown = {e.text for e in css(browser, "table.matrix code.ami")}
    assert shown == {a.id for a in published.results["f41"].amis}
    assert len(css(browser, "table.messages tbody tr")) > 0
    button = css(browser, "table.matrix button.copy")[0]
    button.click()
    wait_for(lambda: button.text == "copied", what="the copy button to confirm")
    assert console_errors(browser) == []
    screenshot(browser, "web-job")


def test_an_image_page_shows_the_matrix(
    browser: WebDriver, site: Site, published: Published
) -> None:
    browser.get(site.url + "/images")
    css(browser, "table.images a[href$='Fedora-Cloud-Base-Test-41-1.1.x86_64']")[0].click()
    wait_for(lambda: css(browser, "table.matrix"), what="the matrix")
    header = [th.text for th in css(browser, "table.matrix thead th")]
    assert header == ["region", "hvm-ebs-standard", "hvm-ebs-gp2"]
    regions = [th.text for th in css(browser, "table.matrix tbody th")]
    assert regions == ["us-east-1", "eu-west-1", "ap-south-1"]
    first = css(browser, "table.matrix tbody tr")[0]
    assert published.ami("f41", "us-east-1", "hvm-ebs-standard") in first.text
    assert "public" in first.text
    screenshot(browser, "web-image")


def test_latest_amis_page(browser: WebDriver, site: Site, published: Published) -> None:
    browser.get(site.url + "/amis?release=41&arch=x86_64&region=us-east-1")
    shown = [e.text for e in css(browser, "table.amis code.ami")]
    assert sorted(shown) == sorted(
        published.ami("f41_respin", "us-east-1", flavour)
        for flavour in ("hvm-ebs-standard", "hvm-ebs-gp2")
    )


def test_the_api_docs_render_from_local_files(browser: WebDriver, site: Site) -> None:
    browser.get(site.url + "/docs")
    operations = wait_for(lambda: css(browser, ".opblock-summary-path"), what="Swagger UI")
    paths = {e.get_attribute("data-path") or e.text for e in operations}
    assert "/api/v1/amis/latest" in paths
    assert console_errors(browser) == []  # nothing blocked by the CSP, nothing fetched elsewhere
    screenshot(browser, "web-docs")


def test_a_running_job_shows_its_progress_live(browser: WebDriver, site: Site) -> None:
    catalog = site.catalog
    job = catalog.create_job(
        image_name="Fedora-Cloud-Base-AmazonEC2.x86_64-43-20251201.n.0",
        image_url="https://kojipkgs.example.org/compose/Fedora-Cloud-Base-AmazonEC2.x86_64-43.raw.xz",
        arch="x86_64",
        image_sha256=None,
        compose_id="Fedora-Rawhide-20251201.n.0",
        release="43",
        config_fingerprint=None,
    )
    catalog.update_job(job.id, step="upload", state={"regions": ["us-east-1", "eu-west-1"]})
    step = catalog.start_step(job.id, "upload", "us-east-1")
    total = 5 * 1024 * MIB

    def progress(fraction: float, state: str = "running") -> None:
        catalog.set_progress(
            job.id,
            {
                "task": "upload Fedora-Cloud-Base-AmazonEC2.x86_64-43",
                "done": int(total * fraction),
                "total": total,
                "rate": 180.0 * MIB,
                "elapsed": 30 * fraction,
                "eta": 30 * (1 - fraction),
                "state": state,
            },
        )

    progress(0.10)
    browser.get(site.url + "/")
    row = f'tr[data-job="{job.id}"]'
    assert css(browser, f"{row} [data-field=progress-pct]")[0].text == "10%"
    progress(0.40)
    wait_for(
        lambda: css(browser, f"{row} [data-field=progress-pct]")[0].text == "40%",
        what="the dashboard row at 40%",
    )
    assert "2.00 GiB of 5.00 GiB" in css(browser, f"{row} [data-field=progress-text]")[0].text
    screenshot(browser, "web-dashboard-running")

    css(browser, f"{row} a.job-link")[0].click()
    wait_for(lambda: css(browser, "#job[data-live-job]"), what="the job page")
    progress(0.75)
    wait_for(
        lambda: css(browser, "#job [data-field=progress-pct]")[0].text == "75%",
        what="the job page at 75%",
    )
    bar = css(browser, "#job progress[data-field=progress-bar]")[0]
    assert float(bar.get_attribute("value") or 0) == pytest.approx(75, abs=0.1)
    assert "180.0 MiB/s" in css(browser, "#job [data-field=progress-text]")[0].text
    screenshot(browser, "web-job-running")

    catalog.finish_step(step, "completed")
    catalog.start_step(job.id, "register", "us-east-1")
    catalog.update_job(job.id, step="register")
    progress(1.0, state="done")
    wait_for(
        lambda: css(browser, "#job [data-field=step]")[0].text == "register",
        what="the step to move on",
    )
    wait_for(lambda: len(css(browser, "table.timeline tbody tr")) == 2, what="a second step")

    catalog.update_job(job.id, status="published", step="done")
    wait_for(
        lambda: (
            css(browser, "#job [data-field=status]")[0].text == "published"
            and not css(browser, "#job[data-live-job]")
        ),
        what="the page to show the job published",
    )
    assert console_errors(browser) == []

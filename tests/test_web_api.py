"""The JSON API (/api/v1) over a catalog filled by real uploads on the embedded AWS, over real HTTP."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fedimg.catalog import Catalog
from fedimg.web import WebContext, create_app
from fedimg.web.server import BackgroundServer
from tests.conftest import require
from tests.web_support import F41_COMPOSE, F42_COMPOSE, Published, serving


@pytest.fixture(scope="module")
def api(published: Published) -> Iterator[httpx.Client]:
    """An HTTP client on the web application served over the published catalog."""
    catalog = Catalog(published.catalog_url)
    try:
        with serving(catalog) as url, httpx.Client(base_url=url, timeout=10) as client:
            yield client
    finally:
        catalog.close()


def get(api: httpx.Client, path: str, **params: Any) -> Any:
    response = api.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def ids(rows: list[dict[str, Any]]) -> list[str]:
    return [row["id"] for row in rows]


# --- jobs ------------------------------------------------------------------------------------


def test_jobs_are_listed_newest_first(api: httpx.Client, published: Published) -> None:
    page = get(api, "/api/v1/jobs")
    order = ["failed_test", "rejected", "f41_respin", "f42_arm", "f41"]
    assert ids(page["jobs"]) == [published.job(label) for label in order]
    assert (page["total"], page["page"], page["per_page"], page["pages"]) == (5, 1, 25, 1)


def test_a_job_summary_says_what_was_published(api: httpx.Client, published: Published) -> None:
    (job,) = [j for j in get(api, "/api/v1/jobs")["jobs"] if j["id"] == published.job("f41")]
    assert job["status"] == "published"
    assert job["image_name"] == "Fedora-Cloud-Base-Test-41-1.1.x86_64"
    assert (job["release"], job["arch"], job["compose_id"]) == ("41", "x86_64", F41_COMPOSE)
    assert job["regions"] == ["us-east-1", "eu-west-1", "ap-south-1"]
    assert job["flavours"] == ["hvm-ebs-standard", "hvm-ebs-gp2"]
    assert (job["ami_count"], job["region_count"]) == (6, 3)
    assert job["image_sha256"] == published.results["f41"].image.sha256
    assert job["seconds"] > 0


def test_jobs_are_paged(api: httpx.Client, published: Published) -> None:
    pages = [get(api, "/api/v1/jobs", per_page=2, page=n) for n in (1, 2, 3, 4)]
    assert [len(p["jobs"]) for p in pages] == [2, 2, 1, 0]
    assert {(p["total"], p["pages"]) for p in pages} == {(5, 3)}
    every = [job for p in pages for job in ids(p["jobs"])]
    assert every == ids(get(api, "/api/v1/jobs")["jobs"])


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"release": "42"}, ["f42_arm"]),
        ({"arch": "aarch64"}, ["f42_arm"]),
        ({"arch": "arm64"}, ["f42_arm"]),
        ({"compose": F41_COMPOSE}, ["rejected", "f41"]),
        ({"compose": F42_COMPOSE}, ["f42_arm"]),
        ({"region": "ap-south-1"}, ["f41"]),
        ({"flavour": "hvm-ebs-gp3"}, ["f42_arm"]),
        ({"status": "failed"}, ["failed_test", "rejected"]),
        ({"status": "published", "release": "41"}, ["f41_respin", "f41"]),
        ({"image": "Fedora-Cloud-Base-Test-41-1.1.x86_64"}, ["rejected", "f41"]),
        ({"release": "41", "arch": "arm64"}, []),
        ({"release": ""}, ["failed_test", "rejected", "f41_respin", "f42_arm", "f41"]),
    ],
)
def test_jobs_filter(
    api: httpx.Client, published: Published, params: dict[str, str], expected: list[str]
) -> None:
    page = get(api, "/api/v1/jobs", **params)
    assert ids(page["jobs"]) == [published.job(label) for label in expected]
    assert page["total"] == len(expected)


@pytest.mark.parametrize("params", [{"page": 0}, {"per_page": 101}, {"per_page": 0}])
def test_bad_paging_is_refused(api: httpx.Client, params: dict[str, int]) -> None:
    assert api.get("/api/v1/jobs", params=params).status_code == 422


def test_a_job_has_its_timeline_and_amis(api: httpx.Client, published: Published) -> None:
    job = get(api, f"/api/v1/jobs/{published.job('f41')}")
    steps = job["steps"]
    assert [s["name"] for s in steps] == ["upload", "register", "test", "replicate", "publish"]
    assert {s["status"] for s in steps} == {"completed"}
    assert all(s["seconds"] >= 0 and s["finished_at"] >= s["started_at"] for s in steps)
    result = published.results["f41"]
    assert sorted(ids(job["amis"])) == sorted(a.id for a in result.amis)
    by_id = {a.id: a for a in result.amis}
    for ami in job["amis"]:
        sent = by_id[ami["id"]]
        assert (ami["region"], ami["flavour"], ami["snapshot_id"]) == (
            sent.region,
            sent.flavour,
            sent.snapshot_id,
        )
        assert (ami["public"], ami["visibility"], ami["state"]) == (True, "public", "public")
    # Base region first, as the job published.
    assert [a["region"] for a in job["amis"]][:2] == ["us-east-1", "us-east-1"]
    copies = [a for a in job["amis"] if a["region"] != "us-east-1"]
    base = {a.flavour: a.id for a in result.amis if a.region == "us-east-1"}
    assert all(a["source_ami_id"] == base[a["flavour"]] for a in copies)
    assert job["messages"] > 0


def test_a_failed_job_says_why(api: httpx.Client, published: Published) -> None:
    job = get(api, f"/api/v1/jobs/{published.job('failed_test')}")
    assert job["status"] == "failed"
    assert "test script exited 1" in job["error"]
    assert [s["status"] for s in job["steps"] if s["name"] == "test"] == ["failed"]
    assert {a["state"] for a in job["amis"]} == {"deleted"}
    assert (job["ami_count"], job["region_count"]) == (0, 0)
    rejected = get(api, f"/api/v1/jobs/{published.job('rejected')}")
    assert "xx-nowhere-1" in rejected["error"]
    assert (rejected["steps"], rejected["amis"]) == ([], [])


def test_a_job_is_found_by_a_prefix_of_its_id(api: httpx.Client, published: Published) -> None:
    job_id = published.job("f42_arm")
    assert get(api, f"/api/v1/jobs/{job_id[:8]}")["id"] == job_id


def test_an_unknown_job_is_404(api: httpx.Client) -> None:
    response = api.get("/api/v1/jobs/no-such-job")
    assert response.status_code == 404
    assert response.json() == {"error": "not_found", "detail": "no such job"}
    assert api.get("/api/v1/jobs/no-such-job/progress").status_code == 404


def test_the_progress_endpoint_reports_a_finished_job(
    api: httpx.Client, published: Published
) -> None:
    live = get(api, f"/api/v1/jobs/{published.job('f41')}/progress")
    assert (live["status"], live["step"], live["ami_count"]) == ("published", "done", 6)
    assert [s["name"] for s in live["steps"]][-1] == "publish"


# --- images ----------------------------------------------------------------------------------


def test_images_are_listed_newest_first(api: httpx.Client) -> None:
    page = get(api, "/api/v1/images")
    names = [i["image_name"] for i in page["images"]]
    assert names == [
        "Fedora-Cloud-Base-Test-41-1.6.x86_64",
        "Fedora-Cloud-Base-Test-41-1.1.x86_64",
        "Fedora-Cloud-Base-Test-41-1.5.x86_64",
        "Fedora-Cloud-Base-Test-42-1.2.aarch64",
    ]
    f41 = page["images"][1]
    assert (f41["jobs"], f41["latest_status"], f41["ami_count"], f41["region_count"]) == (
        2,
        "failed",
        6,
        3,
    )
    assert [i["image_name"] for i in get(api, "/api/v1/images", arch="aarch64")["images"]] == [
        "Fedora-Cloud-Base-Test-42-1.2.aarch64"
    ]


def test_an_image_has_its_region_by_flavour_matrix(api: httpx.Client, published: Published) -> None:
    image = get(api, "/api/v1/images/Fedora-Cloud-Base-Test-41-1.1.x86_64")
    assert image["regions"] == ["us-east-1", "eu-west-1", "ap-south-1"]
    assert image["flavours"] == ["hvm-ebs-standard", "hvm-ebs-gp2"]
    for region in image["regions"]:
        for flavour in image["flavours"]:
            cell = image["matrix"][region][flavour]
            assert cell["id"] == published.ami("f41", region, flavour)
            assert (cell["visibility"], cell["state"]) == ("public", "public")
    assert [j["id"] for j in image["job_list"]] == [
        published.job("rejected"),
        published.job("f41"),
    ]


def test_an_unknown_image_is_404(api: httpx.Client) -> None:
    assert api.get("/api/v1/images/Fedora-Nothing").status_code == 404


# --- AMIs ------------------------------------------------------------------------------------


def test_latest_answers_the_question_people_ask_most(
    api: httpx.Client, published: Published
) -> None:
    answer = get(
        api,
        "/api/v1/amis/latest",
        release="41",
        arch="x86_64",
        region="us-east-1",
        flavour="hvm-ebs-gp2",
    )
    # The respin is newer than 1.1; 1.6 is newer still, but its test failed (AMIs deleted).
    assert ids(answer["amis"]) == [published.ami("f41_respin", "us-east-1", "hvm-ebs-gp2")]
    assert answer["count"] == 1
    ami = answer["amis"][0]
    assert (ami["release"], ami["arch"], ami["region"], ami["flavour"]) == (
        "41",
        "x86_64",
        "us-east-1",
        "hvm-ebs-gp2",
    )


def test_latest_is_one_ami_per_arch_region_and_flavour(
    api: httpx.Client, published: Published
) -> None:
    answer = get(api, "/api/v1/amis/latest", release="41")
    cells = {(a["region"], a["flavour"]): a["id"] for a in answer["amis"]}
    expected = {
        (region, flavour): published.ami(
            "f41_respin" if region == "us-east-1" else "f41", region, flavour
        )
        for region in ("us-east-1", "eu-west-1", "ap-south-1")
        for flavour in ("hvm-ebs-standard", "hvm-ebs-gp2")
    }
    assert cells == expected
    assert answer["count"] == 6
    everything = get(api, "/api/v1/amis/latest")["amis"]
    assert sorted((a["arch"], a["region"]) for a in everything if a["arch"] == "arm64") == [
        ("arm64", "eu-west-1"),
        ("arm64", "us-east-1"),
    ]
    assert len(everything) == 8


def test_latest_takes_fedoras_arch_names(api: httpx.Client, published: Published) -> None:
    answer = get(api, "/api/v1/amis/latest", arch="aarch64", region="eu-west-1")
    assert ids(answer["amis"]) == [published.ami("f42_arm", "eu-west-1", "hvm-ebs-gp3")]


def test_latest_with_no_match_is_empty(api: httpx.Client) -> None:
    assert get(api, "/api/v1/amis/latest", release="99") == {"amis": [], "count": 0}


def test_amis_filter_and_page(api: httpx.Client, published: Published) -> None:
    assert get(api, "/api/v1/amis")["total"] == 12
    deleted = get(api, "/api/v1/amis", state="deleted")
    assert {a["job_id"] for a in deleted["amis"]} == {published.job("failed_test")}
    assert deleted["total"] == 2
    public = get(api, "/api/v1/amis", public="true", region="eu-west-1")
    assert sorted(ids(public["amis"])) == sorted(
        [
            published.ami("f41", "eu-west-1", "hvm-ebs-standard"),
            published.ami("f41", "eu-west-1", "hvm-ebs-gp2"),
            published.ami("f42_arm", "eu-west-1", "hvm-ebs-gp3"),
        ]
    )
    of_job = get(api, "/api/v1/amis", job=published.job("f42_arm"), per_page=1)
    assert (of_job["total"], of_job["pages"], len(of_job["amis"])) == (2, 2, 1)


# --- messages --------------------------------------------------------------------------------


def test_messages_of_a_job(api: httpx.Client, published: Published) -> None:
    job_id = published.job("f42_arm")
    page = get(api, "/api/v1/messages", job=job_id, per_page=100)
    assert page["total"] == get(api, f"/api/v1/jobs/{job_id}")["messages"] > 0
    assert {m["job_id"] for m in page["messages"]} == {job_id}
    topics = {m["topic"] for m in page["messages"]}
    assert topics >= {
        "org.fedoraproject.dev.fedimg.image.upload",
        "org.fedoraproject.dev.fedimg.image.copy",
        "org.fedoraproject.dev.fedimg.image.publish",
    }
    published_ids = {
        m["body"]["extra"]["id"] for m in page["messages"] if m["topic"].endswith("image.publish")
    }
    assert published_ids == {a.id for a in published.results["f42_arm"].amis}
    times = [m["timestamp"] for m in page["messages"]]
    assert times == sorted(times, reverse=True)


def test_messages_filter_by_topic(api: httpx.Client) -> None:
    topic = "org.fedoraproject.dev.fedimg.image.copy"
    page = get(api, "/api/v1/messages", topic=topic, per_page=100)
    assert page["total"] > 0
    assert {m["topic"] for m in page["messages"]} == {topic}


# --- read-only, no secret, no boto3 ------------------------------------------------------------


def test_every_route_is_read_only(api: httpx.Client, published: Published) -> None:
    app = create_app(WebContext(catalog=Catalog("sqlite:///:memory:")))
    for route in app.routes:
        methods = getattr(route, "methods", None) or {"GET"}
        assert methods <= {"GET", "HEAD"}, route
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        for path in ("/api/v1/jobs", f"/api/v1/jobs/{published.job('f41')}", "/raw", "/"):
            assert api.request(method, path).status_code == 405, (method, path)


def test_credentials_in_an_image_url_are_masked(tmp_path: Path) -> None:
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    job = catalog.create_job(
        image_name="Fedora-Cloud-Base-Secret-41-1.1.x86_64",
        image_url="https://builder:hunter2@kojipkgs.example.org/compose/x.raw.xz?sig=1",
        arch="x86_64",
        image_sha256=None,
        compose_id=None,
        release="41",
        config_fingerprint=None,
    )
    try:
        with serving(catalog) as url, httpx.Client(base_url=url) as client:
            bodies = [
                client.get(path).text
                for path in ("/api/v1/jobs", f"/api/v1/jobs/{job.id}", f"/jobs/{job.id}", "/")
            ]
    finally:
        catalog.close()
    for body in bodies:
        assert "hunter2" not in body
    assert "https://builder:***@kojipkgs.example.org/compose/x.raw.xz?sig=1" in bodies[1]


def test_the_web_layer_never_imports_boto3(published: Published) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        import httpx
        from fedimg.catalog import Catalog
        from fedimg.web import WebContext, create_app
        from fedimg.web.server import BackgroundServer
        catalog = Catalog({published.catalog_url!r})
        with BackgroundServer(create_app(WebContext(catalog=catalog))) as server:
            for path in ("/", "/api/v1/jobs", "/api/v1/amis/latest", "/raw", "/amis", "/images"):
                assert httpx.get(server.url + path).status_code == 200, path
        assert "boto3" not in sys.modules and "botocore" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


def test_pages_and_api_carry_security_headers(api: httpx.Client) -> None:
    page = api.get("/")
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert page.headers["x-frame-options"] == "DENY"
    data = api.get("/api/v1/jobs", headers={"Origin": "https://example.org"})
    assert data.headers["access-control-allow-origin"] == "*"
    assert data.headers["x-content-type-options"] == "nosniff"


# --- PostgreSQL ------------------------------------------------------------------------------

POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432"


@pytest.fixture
def postgres_copy(published: Published) -> Iterator[str]:
    """The published catalog copied into a fresh PostgreSQL database (dropped afterwards)."""
    import uuid

    from sqlalchemy import create_engine, text

    from fedimg.catalog import Base

    admin = create_engine(f"{POSTGRES}/test", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:  # no server: skip, except under CI=true
        require(False, f"PostgreSQL at {POSTGRES} is unreachable: {exc}")
    name = f"fedimg_web_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"{POSTGRES}/{name}"
    try:
        Catalog(url).close()  # creates the schema
        source, target = create_engine(published.catalog_url), create_engine(url)
        with source.connect() as reading, target.begin() as writing:
            for table in Base.metadata.sorted_tables:
                rows = [dict(row) for row in reading.execute(table.select()).mappings()]
                if rows:
                    writing.execute(table.insert(), rows)
        source.dispose()
        target.dispose()
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_postgresql_gives_the_same_answers(
    api: httpx.Client, postgres_copy: str, published: Published
) -> None:
    queries: list[tuple[str, dict[str, Any]]] = [
        ("/api/v1/jobs", {}),
        ("/api/v1/jobs", {"region": "ap-south-1"}),
        ("/api/v1/jobs", {"flavour": "hvm-ebs-gp3", "status": "published"}),
        (f"/api/v1/jobs/{published.job('f41')}", {}),
        ("/api/v1/images", {}),
        ("/api/v1/images/Fedora-Cloud-Base-Test-41-1.1.x86_64", {}),
        ("/api/v1/amis", {"public": "true", "per_page": 100}),
        ("/api/v1/amis/latest", {}),
        ("/api/v1/amis/latest", {"release": "41", "region": "us-east-1"}),
        ("/api/v1/messages", {"job": published.job("f42_arm"), "per_page": 100}),
        ("/raw", {"category": "fedimg", "rows_per_page": 100, "order": "asc"}),
        ("/raw", {"contains": published.ami("f41", "eu-west-1", "hvm-ebs-gp2")}),
    ]
    catalog = Catalog(postgres_copy)
    try:
        with serving(catalog) as url, httpx.Client(base_url=url, timeout=10) as postgres:
            for path, params in queries:
                from_postgres = postgres.get(path, params=params)
                assert from_postgres.status_code == 200, (path, from_postgres.text)
                assert from_postgres.json() == get(api, path, **params), (path, params)
    finally:
        catalog.close()


def test_behind_a_proxy_links_carry_the_prefix(published: Published) -> None:
    """``fedimg serve --root-path /fedimg`` behind a proxy that strips the prefix."""
    catalog = Catalog(published.catalog_url)
    try:
        app = create_app(WebContext(catalog=catalog))
        with BackgroundServer(app, root_path="/fedimg") as server:
            base = server.url.removesuffix("/fedimg")
            page = httpx.get(base + "/")
            assert page.status_code == 200
            assert 'href="/fedimg/static/app.css"' in page.text
            assert f'href="/fedimg/jobs/{published.job("f41")}"' in page.text
            assert httpx.get(base + "/raw/", params={"rows_per_page": 1}).json()["count"] == 1
            assert httpx.get(base + "/raw", params={"page": 0}).status_code == 400
            assert httpx.get(base + "/static/app.js").status_code == 200
    finally:
        catalog.close()

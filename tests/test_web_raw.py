"""The datagrepper-compatible /raw and /id over the journal, over real HTTP.

The contract is datagrepper's (shared/reference/README.md): repeatable OR-ed topic and category
filters, delta/start/end, page ≥ 1, rows_per_page ≤ 100 (default 25), order desc|asc, contains;
HTTP 400 on bad values; ``raw_messages``, ``total``, ``pages``, ``count``, ``arguments``.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from fedimg.catalog import Catalog
from fedimg.events import ImageInfo, StepEvent
from fedimg.messages import Messenger
from fedimg.web import WebContext, create_app
from fedimg.web.server import BackgroundServer

NOW = 1_730_000_000.0
PREFIX = "org.fedoraproject.dev"
UPLOAD = f"{PREFIX}.fedimg.image.upload"
COPY = f"{PREFIX}.fedimg.image.copy"
PUBLISH = f"{PREFIX}.fedimg.image.publish"
SUMMARY = f"{PREFIX}.fedora_image_uploader.published.v1.aws.Cloud_Base.41.x86_64"
PUNGI = "org.fedoraproject.prod.pungi.compose.status.change"
IMAGE = ImageInfo(
    name="Fedora-Cloud-Base-AmazonEC2.x86_64-41-1.4",
    url="https://kojipkgs.example.org/compose/Fedora-Cloud-Base-AmazonEC2.x86_64-41-1.4.raw.xz",
    arch="x86_64",
    compose_id="Fedora-Cloud-41-20241027.0",
    release="41",
)
STEPS = ("upload", "copy", "publish")
REGIONS = ("us-east-1", "eu-west-1", "ap-south-1")
FEDIMG_MESSAGES = 30


def ami_of(n: int) -> str:
    return f"ami-{n:017x}"


@pytest.fixture(scope="module")
def journal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Catalog]:
    """35 messages, one every 10 s up to NOW - 10: 30 fedimg (upload, copy, publish in turn), 3
    summary messages, 2 pungi messages of another environment (newest)."""
    path = tmp_path_factory.mktemp("raw") / "catalog.sqlite"
    catalog = Catalog(f"sqlite:///{path}")
    messenger = Messenger(catalog=catalog, topic_prefix=PREFIX)
    total = FEDIMG_MESSAGES + 5
    for n in range(FEDIMG_MESSAGES):
        step = STEPS[n % 3]
        messenger.emit(
            StepEvent(
                job_id="job-1",
                step=step,  # type: ignore[arg-type]
                status="completed",
                region=REGIONS[n % 3],
                image=IMAGE,
                ami_id=ami_of(n),
                virt_type="hvm",
                vol_type="gp3",
                timestamp=NOW - 10 * (total - n),
            )
        )
    for n in range(3):
        catalog.add_message(
            msg_id=f"summary-{n}",
            topic=SUMMARY,
            body={"architecture": "x86_64", "regions": {"us-east-1": ami_of(100 + n)}},
            headers={"fedora_messaging_schema": "fedora_image_uploader.published.v1.aws"},
            timestamp=NOW - 10 * (total - FEDIMG_MESSAGES - n),
            job_id="job-1",
            delivered=True,
        )
    for n in range(2):
        catalog.add_message(
            msg_id=f"pungi-{n}",
            topic=PUNGI,
            body={"status": "FINISHED", "compose_id": "Fedora-41-20241027.0"},
            headers={},
            timestamp=NOW - 10 * (2 - n),
            job_id=None,
            delivered=True,
        )
    yield catalog
    catalog.close()


@pytest.fixture(scope="module")
def server(journal: Catalog) -> Iterator[str]:
    """The application over the journal, with its clock at NOW."""
    app = create_app(WebContext(catalog=journal, topic_prefix=PREFIX, clock=lambda: NOW))
    with BackgroundServer(app) as running:
        yield running.url


@pytest.fixture
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=10) as http_client:
        yield http_client


def raw(client: httpx.Client, params: Any = None) -> dict[str, Any]:
    response = client.get("/raw", params=params)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def topics(page: dict[str, Any]) -> list[str]:
    return [m["topic"] for m in page["raw_messages"]]


def get_path(server: str, path: str) -> tuple[int, Any]:
    """GET ``path`` exactly as written (``//raw`` included), over a plain HTTP connection."""
    url = urlsplit(server)
    connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


# --- the response ------------------------------------------------------------------------------


def test_a_page_has_datagreppers_shape(client: httpx.Client) -> None:
    page = raw(client)
    assert set(page) == {"raw_messages", "total", "pages", "count", "arguments"}
    assert (page["total"], page["pages"], page["count"]) == (35, 2, 25)
    assert page["arguments"] == {
        "start": None,
        "end": None,
        "delta": None,
        "topics": [],
        "categories": [],
        "not_topics": [],
        "not_categories": [],
        "users": [],
        "packages": [],
        "not_users": [],
        "not_packages": [],
        "contains": [],
        "page": 1,
        "rows_per_page": 25,
        "order": "desc",
        "meta": [],
    }


def test_a_message_has_datagreppers_fields(client: httpx.Client) -> None:
    page = raw(client, {"topic": PUBLISH, "rows_per_page": 1})
    (message,) = page["raw_messages"]
    assert set(message) >= {
        "i",
        "msg_id",
        "topic",
        "timestamp",
        "msg",
        "headers",
        "username",
        "certificate",
        "signature",
        "crypto",
        "agent_name",
        "users",
        "packages",
        "source_name",
        "source_version",
    }
    assert message["topic"] == PUBLISH
    assert isinstance(message["timestamp"], float)
    assert message["msg"]["image_name"] == IMAGE.name
    assert message["msg"]["extra"]["id"] == ami_of(29)
    assert message["headers"]["fedora_messaging_schema"] == "fedimg.image.publish.v1"
    sent_at = dt.datetime.fromisoformat(message["headers"]["sent-at"])
    assert sent_at.timestamp() == pytest.approx(message["timestamp"], abs=1)
    assert (message["username"], message["users"], message["packages"]) == (None, [], [])


def test_the_fields_match_the_real_datagrepper(client: httpx.Client, reference_dir: Path) -> None:
    example = json.loads((reference_dir / "datagrepper/raw-response-example.json").read_text())
    page = raw(client, {"rows_per_page": 1})
    assert set(example) <= set(page)
    (ours,) = page["raw_messages"]
    theirs = example["raw_messages"][0]
    assert set(theirs) <= set(ours)
    for key, value in theirs.items():
        assert type(ours[key]) is type(value) or value is None or ours[key] is None, key


# --- paging and order --------------------------------------------------------------------------


def test_pages_cover_every_message_once_newest_first(client: httpx.Client) -> None:
    first = raw(client, {"rows_per_page": 8})
    assert (first["total"], first["pages"]) == (35, math.ceil(35 / 8))
    seen: list[dict[str, Any]] = []
    for page_number in range(1, first["pages"] + 1):
        page = raw(client, {"rows_per_page": 8, "page": page_number})
        assert page["count"] == len(page["raw_messages"])
        assert page["arguments"]["page"] == page_number
        seen += page["raw_messages"]
    assert len(seen) == 35
    assert len({m["msg_id"] for m in seen}) == 35
    times = [m["timestamp"] for m in seen]
    assert times == sorted(times, reverse=True)
    assert [m["count"] for m in [raw(client, {"rows_per_page": 8, "page": 5})]] == [3]


def test_a_page_past_the_end_is_empty(client: httpx.Client) -> None:
    page = raw(client, {"page": 3})
    assert (page["raw_messages"], page["count"], page["total"], page["pages"]) == ([], 0, 35, 2)


def test_order_asc_is_oldest_first(client: httpx.Client) -> None:
    page = raw(client, {"order": "asc", "rows_per_page": 100})
    times = [m["timestamp"] for m in page["raw_messages"]]
    assert times == sorted(times)
    assert page["raw_messages"][0]["msg"]["extra"]["id"] == ami_of(0)


def test_rows_per_page_up_to_100(client: httpx.Client) -> None:
    assert raw(client, {"rows_per_page": 100})["count"] == 35
    assert raw(client, {"rows_per_page": 1})["pages"] == 35


# --- filters -----------------------------------------------------------------------------------


def test_topics_are_ored(client: httpx.Client) -> None:
    assert set(topics(raw(client, {"topic": COPY, "rows_per_page": 100}))) == {COPY}
    both = raw(client, [("topic", COPY), ("topic", SUMMARY), ("rows_per_page", "100")])
    assert both["total"] == 10 + 3
    assert set(topics(both)) == {COPY, SUMMARY}
    assert both["arguments"]["topics"] == [COPY, SUMMARY]


def test_categories_are_the_app_segment(client: httpx.Client) -> None:
    fedimg = raw(client, {"category": "fedimg", "rows_per_page": 100})
    assert (fedimg["total"], set(topics(fedimg))) == (30, {UPLOAD, COPY, PUBLISH})
    pungi = raw(client, {"category": "pungi"})
    assert (pungi["total"], set(topics(pungi))) == (2, {PUNGI})
    two = raw(client, [("category", "pungi"), ("category", "fedora_image_uploader")])
    assert (two["total"], set(topics(two))) == (5, {PUNGI, SUMMARY})
    assert raw(client, {"category": "bodhi"})["total"] == 0


def test_different_filters_are_anded(client: httpx.Client) -> None:
    assert raw(client, {"category": "fedimg", "topic": COPY})["total"] == 10
    assert raw(client, {"category": "fedimg", "topic": SUMMARY})["total"] == 0


def test_not_topic_and_not_category_exclude(client: httpx.Client) -> None:
    assert raw(client, {"not_category": "fedimg"})["total"] == 5
    page = raw(client, [("not_topic", UPLOAD), ("not_topic", PUNGI), ("rows_per_page", "100")])
    assert page["total"] == 35 - 10 - 2
    assert not {UPLOAD, PUNGI} & set(topics(page))


def test_users_and_packages_match_nothing_of_fedimgs(client: httpx.Client) -> None:
    assert raw(client, {"user": "releng"})["total"] == 0
    assert raw(client, {"package": "kernel"})["total"] == 0
    assert raw(client, {"not_user": "releng"})["total"] == 35


def test_contains_looks_into_bodies(client: httpx.Client) -> None:
    page = raw(client, {"contains": ami_of(7), "category": "fedimg"})
    assert [m["msg"]["extra"]["id"] for m in page["raw_messages"]] == [ami_of(7)]
    either = raw(client, [("contains", ami_of(7)), ("contains", ami_of(101))])
    assert either["total"] == 2
    assert raw(client, {"contains": "100%_literal"})["total"] == 0


def test_delta_is_seconds_back_from_now(client: httpx.Client) -> None:
    page = raw(client, {"delta": 55, "rows_per_page": 100})
    # Messages at NOW-10 .. NOW-50.
    assert page["total"] == 5
    assert all(m["timestamp"] >= NOW - 55 for m in page["raw_messages"])
    assert (page["arguments"]["start"], page["arguments"]["end"], page["arguments"]["delta"]) == (
        NOW - 55,
        NOW,
        55,
    )


def test_start_and_end_bound_the_time(client: httpx.Client) -> None:
    start, end = NOW - 100, NOW - 60
    page = raw(client, {"start": start, "end": end, "rows_per_page": 100})
    assert page["total"] == 5
    assert all(start <= m["timestamp"] <= end for m in page["raw_messages"])
    assert page["arguments"]["delta"] == 40
    assert raw(client, {"start": start, "delta": 20})["total"] == 3
    assert raw(client, {"end": NOW - 330})["total"] == 3
    assert raw(client, {"start": NOW - 30})["total"] == 3


def test_start_and_end_take_dates(client: httpx.Client) -> None:
    start = dt.datetime.fromtimestamp(NOW - 100, dt.UTC)
    iso = raw(client, {"start": start.isoformat(), "end": NOW - 60})
    naive = raw(client, {"start": start.replace(tzinfo=None).isoformat(), "end": NOW - 60})
    assert iso["total"] == naive["total"] == 5
    assert iso["arguments"]["start"] == NOW - 100
    day = dt.datetime.fromtimestamp(NOW, dt.UTC).date().isoformat()
    assert raw(client, {"start": day})["total"] == 35


# --- bad values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"page": "0"},
        {"page": "-1"},
        {"page": "two"},
        {"rows_per_page": "0"},
        {"rows_per_page": "101"},
        {"rows_per_page": "many"},
        {"order": "up"},
        {"delta": "-5"},
        {"delta": "yesterday"},
        {"start": "not a date"},
        {"end": "2024-13-45"},
        {"start": "1e400"},
        {"end": "nan"},
        {"delta": "inf"},
    ],
)
def test_bad_values_are_400(client: httpx.Client, params: dict[str, str]) -> None:
    response = client.get("/raw", params=params)
    assert response.status_code == 400, response.text
    assert response.json()["error"]


# --- slashes and /id ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["//raw", "/raw/", "//raw/", "///raw"])
def test_extra_slashes_are_tolerated(server: str, client: httpx.Client, path: str) -> None:
    status, data = get_path(server, f"{path}?rows_per_page=3&category=fedimg")
    assert status == 200
    assert data == raw(client, {"rows_per_page": 3, "category": "fedimg"})
    assert get_path(server, f"{path}?page=0")[0] == 400


def test_id_returns_the_message(server: str, client: httpx.Client) -> None:
    (listed,) = raw(client, {"topic": COPY, "rows_per_page": 1})["raw_messages"]
    response = client.get("/id", params={"id": listed["msg_id"]})
    assert response.status_code == 200
    assert response.json() == listed
    assert get_path(server, f"//id/?id={listed['msg_id']}") == (200, listed)


def test_id_without_an_id_is_400(client: httpx.Client) -> None:
    assert client.get("/id").status_code == 400
    assert client.get("/id", params={"id": ""}).status_code == 400


def test_an_unknown_id_is_404(client: httpx.Client) -> None:
    response = client.get("/id", params={"id": "no-such-message"})
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


def test_a_datagrepper_client_loop_reads_everything(client: httpx.Client) -> None:
    """What scripts do: page until past ``pages``, with only the base URL changed."""
    collected: list[str] = []
    page = 1
    while True:
        data = raw(client, {"category": "fedimg", "rows_per_page": 7, "page": page, "order": "asc"})
        collected += [m["msg"]["extra"]["id"] for m in data["raw_messages"]]
        if page >= data["pages"]:
            break
        page += 1
    assert collected == [ami_of(n) for n in range(FEDIMG_MESSAGES)]

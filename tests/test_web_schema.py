"""Schemathesis against the OpenAPI schema: every operation, generated requests, every response
checked against what the schema documents (status codes, content types, bodies), no server error.

Kept bounded: a few examples per operation, over real HTTP to the published catalog.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case
from schemathesis.core.result import Ok

from fedimg.catalog import Catalog
from tests.web_support import Published, serving

MAX_EXAMPLES = 15


@pytest.fixture(scope="module")
def base_url(published: Published) -> Iterator[str]:
    """The application over the published catalog."""
    catalog = Catalog(published.catalog_url)
    try:
        with serving(catalog) as url:
            yield url
    finally:
        catalog.close()


def test_the_api_keeps_its_schema(base_url: str) -> None:
    # Driven by hand rather than by schemathesis' pytest plugin (whose lazy loader breaks on
    # pytest 9.2): the same generation and checks, one bounded Hypothesis run per operation.
    loaded = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    results = list(loaded.get_all_operations())
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) == len(results) == 10
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Case[Any]) -> None:
            case.call_and_validate()

        check()


def test_the_schema_documents_the_api(base_url: str) -> None:
    loaded = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    paths = set(loaded.raw_schema["paths"])
    assert paths == {
        "/api/v1/jobs",
        "/api/v1/jobs/{job_id}",
        "/api/v1/jobs/{job_id}/progress",
        "/api/v1/images",
        "/api/v1/images/{image_name}",
        "/api/v1/amis",
        "/api/v1/amis/latest",
        "/api/v1/messages",
        "/raw",
        "/id",
    }
    raw = loaded.raw_schema["paths"]["/raw"]["get"]
    assert set(raw["responses"]) == {"200", "400"}
    docs = httpx.get(f"{base_url}/docs")
    assert docs.status_code == 200
    assert "/openapi.json" in docs.text
    # Swagger UI comes from here, not a CDN: /docs works without Internet access.
    assets = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
    assert assets and all(a.startswith("/docs-assets/") for a in assets), assets
    for asset in assets:
        assert httpx.get(f"{base_url}{asset}").status_code == 200, asset
    assert "cdn." not in docs.headers["content-security-policy"]

"""datagrepper-compatible ``GET /raw`` and ``GET /id`` over fedimg's message journal.

Scripts written for Fedora's datagrepper work with only their base URL changed:

- ``topic`` and ``category`` are repeatable; values of one parameter are OR-ed, different parameters
  AND-ed (``not_topic``, ``not_category`` exclude). A category is a topic's app segment: the one
  after the environment prefix (``org.fedoraproject.prod.fedimg.image.upload`` → ``fedimg``).
- ``user``/``package`` filters are accepted; fedimg's messages name no users or packages, so they
  match nothing (and ``not_user``/``not_package`` exclude nothing).
- ``delta`` (seconds back), ``start``/``end`` (epoch seconds or an ISO date, UTC unless it says);
  combined as datagrepper does; no time window when none is given.
- ``contains``: substrings of the message body (repeatable, OR-ed).
- ``page`` ≥ 1, ``rows_per_page`` 1..100 (default 25), ``order`` desc (default) or asc.
- Bad values answer HTTP 400 with ``{"error": ...}``; ``/id`` without ``id`` 400, unknown 404.
- ``//raw`` and ``/raw/`` are the same as ``/raw`` (see :mod:`fedimg.web.app`).
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from fedimg import __version__
from fedimg.catalog import MessageQuery, MessageRecord
from fedimg.web.context import WebContext, web_context
from fedimg.web.models import MAX_PAGE, ErrorOut, pages_for

router = APIRouter(tags=["datagrepper"])

MAX_ROWS_PER_PAGE = 100
DEFAULT_ROWS_PER_PAGE = 25
#: Paths whose bad parameters answer 400 (datagrepper's code), not FastAPI's 422.
DATAGREPPER_PATHS = frozenset({"/raw", "/id"})


class BadRequest(Exception):
    """A parameter datagrepper would refuse with HTTP 400."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RawMessage(BaseModel):
    """A message as datagrepper (datanommer) shows it."""

    i: int = Field(description="The message's sequence number in fedimg's journal")
    msg_id: str
    topic: str
    timestamp: float = Field(description="Seconds since the epoch")
    certificate: None = None
    signature: None = None
    agent_name: str | None = None
    username: str | None = None
    crypto: None = None
    msg: dict[str, Any] = Field(description="The message body")
    headers: dict[str, Any]
    source_name: str = "fedimg"
    source_version: str = __version__
    users: list[str] = Field(default_factory=list)
    packages: list[str] = Field(default_factory=list)


class RawArguments(BaseModel):
    """The parameters the query ran with, defaults and derived times filled in."""

    start: float | None
    end: float | None
    delta: float | None
    topics: list[str]
    categories: list[str]
    not_topics: list[str]
    not_categories: list[str]
    users: list[str]
    packages: list[str]
    not_users: list[str]
    not_packages: list[str]
    contains: list[str]
    page: int
    rows_per_page: int
    order: Literal["desc", "asc"]
    meta: list[str]


class RawPage(BaseModel):
    """One page of ``/raw``."""

    raw_messages: list[RawMessage]
    total: int
    pages: int = Field(description="ceil(total / rows_per_page)")
    count: int = Field(description="Messages on this page")
    arguments: RawArguments


def category_of(topic: str, prefix: str) -> str:
    """A topic's category: the segment after the environment prefix, as datanommer names it."""
    prefix = prefix.rstrip(".")
    if prefix and topic.startswith(prefix + "."):
        return topic[len(prefix) + 1 :].split(".", 1)[0]
    parts = topic.split(".")
    if topic.startswith(("org.fedoraproject.", "org.centos.")) and len(parts) > 3:
        return parts[3]
    return parts[0]


def to_epoch(value: float | dt.datetime | None, name: str) -> float | None:
    """An epoch timestamp from a parsed ``start``/``end``; naive dates are UTC."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.timestamp()
    if not math.isfinite(value):
        raise BadRequest(f"{name} must be a finite timestamp or a date")
    return float(value)


def time_range(
    start: float | None, end: float | None, delta: float | None, now: float
) -> tuple[float | None, float | None, float | None]:
    """(start, end, delta) as datagrepper combines them, with no default window."""
    if delta is not None and not math.isfinite(delta):
        raise BadRequest("delta must be a finite number of seconds")
    if start is None and end is None and delta is None:
        return None, None, None
    if start is None and end is None:
        assert delta is not None
        return now - delta, now, delta
    if start is None:
        assert end is not None
        return (end - delta, end, delta) if delta is not None else (0.0, end, None)
    if end is None:
        if delta is not None:
            return start, start + delta, delta
        return start, now, now - start
    return start, end, end - start


def raw_message(record: MessageRecord) -> RawMessage:
    """A journal record as datagrepper shows a message."""
    headers = dict(record.headers or {})
    headers.setdefault(
        "sent-at", dt.datetime.fromtimestamp(record.timestamp, dt.UTC).isoformat(timespec="seconds")
    )
    return RawMessage(
        i=record.id,
        msg_id=record.msg_id,
        topic=record.topic,
        timestamp=record.timestamp,
        msg=dict(record.body or {}),
        headers=headers,
    )


Repeated = Annotated[list[str], Query()]
_ERRORS: dict[int | str, dict[str, Any]] = {400: {"model": ErrorOut, "description": "Bad value"}}


@router.get(
    "/raw",
    response_model=RawPage,
    responses=_ERRORS,
    summary="Messages, datagrepper style",
)
def raw(
    *,
    ctx: Annotated[WebContext, Depends(web_context)],
    topic: Annotated[list[str], Query(description="Full topic (repeatable, OR-ed)")] = [],  # noqa: B006
    category: Annotated[
        list[str], Query(description="App segment of the topic, e.g. fedimg (repeatable, OR-ed)")
    ] = [],  # noqa: B006
    not_topic: Repeated = [],  # noqa: B006
    not_category: Repeated = [],  # noqa: B006
    user: Repeated = [],  # noqa: B006
    package: Repeated = [],  # noqa: B006
    not_user: Repeated = [],  # noqa: B006
    not_package: Repeated = [],  # noqa: B006
    contains: Annotated[
        list[str], Query(description="Substring of the body (repeatable, OR-ed)")
    ] = [],  # noqa: B006
    meta: Annotated[list[str], Query(description="Accepted and ignored")] = [],  # noqa: B006
    delta: Annotated[
        float | None, Query(ge=0, description="Seconds back from end (or now)")
    ] = None,
    start: Annotated[
        float | dt.datetime | None, Query(description="Epoch seconds or ISO date (UTC)")
    ] = None,
    end: Annotated[
        float | dt.datetime | None, Query(description="Epoch seconds or ISO date (UTC)")
    ] = None,
    page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1,
    rows_per_page: Annotated[int, Query(ge=1, le=MAX_ROWS_PER_PAGE)] = DEFAULT_ROWS_PER_PAGE,
    order: Literal["desc", "asc"] = "desc",
) -> RawPage | JSONResponse:
    """datagrepper's ``/raw`` over fedimg's journal."""
    try:
        start_s, end_s, delta_s = time_range(
            to_epoch(start, "start"), to_epoch(end, "end"), delta, ctx.clock()
        )
    except BadRequest as exc:
        return JSONResponse({"error": exc.message}, status_code=400)
    arguments = RawArguments(
        start=start_s,
        end=end_s,
        delta=delta_s,
        topics=topic,
        categories=category,
        not_topics=not_topic,
        not_categories=not_category,
        users=user,
        packages=package,
        not_users=not_user,
        not_packages=not_package,
        contains=contains,
        page=page,
        rows_per_page=rows_per_page,
        order=order,
        meta=meta,
    )
    if user or package:  # fedimg's messages name neither
        return RawPage(raw_messages=[], total=0, pages=0, count=0, arguments=arguments)
    groups: list[tuple[str, ...]] = []
    if topic:
        groups.append(tuple(topic))
    known = ctx.catalog.message_topics() if (category or not_category) else []
    if category:
        wanted = set(category)
        groups.append(tuple(t for t in known if category_of(t, ctx.topic_prefix) in wanted))
    excluded = set(not_topic)
    if not_category:
        unwanted = set(not_category)
        excluded |= {t for t in known if category_of(t, ctx.topic_prefix) in unwanted}
    records, total = ctx.catalog.search_messages(
        MessageQuery(
            topic_groups=tuple(groups),
            not_topics=tuple(sorted(excluded)),
            contains=tuple(contains),
            start=start_s,
            end=end_s,
            newest_first=order == "desc",
            limit=rows_per_page,
            offset=(page - 1) * rows_per_page,
        )
    )
    messages = [raw_message(r) for r in records]
    return RawPage(
        raw_messages=messages,
        total=total,
        pages=pages_for(total, rows_per_page),
        count=len(messages),
        arguments=arguments,
    )


@router.get(
    "/id",
    response_model=RawMessage,
    responses={
        400: {"model": ErrorOut, "description": "No id given"},
        404: {"model": ErrorOut, "description": "No such message"},
    },
    summary="One message by its id, datagrepper style",
)
def message_by_id(
    *,
    ctx: Annotated[WebContext, Depends(web_context)],
    id: Annotated[str, Query(min_length=1, description="The message id (msg_id)")],
) -> RawMessage | JSONResponse:
    """datagrepper's ``/id`` (without an id: 400, like every bad value here)."""
    record = ctx.catalog.message(id)
    if record is None:
        return JSONResponse({"error": "not_found"}, status_code=404)
    return raw_message(record)

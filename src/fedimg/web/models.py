"""What the JSON API answers (pydantic models, so the OpenAPI schema documents them), and the
conversions from catalog rows.

Nothing secret leaves here: credentials in an image URL are masked, and the configuration is never
shown. Times are timezone-aware UTC (SQLite hands them back naive; they were written as UTC).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, Field

from fedimg.catalog import Ami, ImageSummary, Job, MessageRecord, StepRecord

Visibility = Literal["public", "shared", "private"]

#: The highest page number asked for: beyond it the row offset would not fit the database's integers.
MAX_PAGE = 1_000_000_000


def utc(value: dt.datetime) -> dt.datetime:
    """``value`` as aware UTC (naive values are UTC already)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


def mask_url(url: str) -> str:
    """``url`` with any password in it replaced by ``***`` (the rest is what messages carry)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username or ''}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def pages_for(total: int, per_page: int) -> int:
    """How many pages ``total`` rows take (0 for none), as datagrepper counts them."""
    return math.ceil(total / per_page) if per_page else 0


def visibility(ami: Ami) -> Visibility:
    """public, shared (with listed accounts) or private."""
    if ami.public:
        return "public"
    if ami.shared_with:
        return "shared"
    return "private"


class StepOut(BaseModel):
    """One step of a job's timeline."""

    name: str = Field(description="upload, register, test, replicate, publish...")
    region: str | None = Field(description="Region of the step; none for fan-out steps")
    status: str = Field(description="running, completed, failed or skipped")
    detail: str | None = Field(description="Why it failed, when it did")
    started_at: dt.datetime
    finished_at: dt.datetime | None
    seconds: float | None = Field(description="Duration; so far, while running")


class AmiOut(BaseModel):
    """An AMI fedimg registered or copied."""

    id: str = Field(description="The AMI id (ami-...)")
    region: str
    name: str
    image_name: str
    release: str | None
    arch: str = Field(description="AWS's spelling: x86_64 or arm64")
    flavour: str = Field(description="The AMI row, e.g. hvm-ebs-gp3")
    virtualization: str
    storage: str
    volume_type: str | None
    encrypted: bool
    public: bool
    shared_with: list[str] = Field(description="Accounts an encrypted AMI is shared with")
    visibility: Visibility
    snapshot_id: str | None
    source_ami_id: str | None = Field(description="The base-region AMI this one was copied from")
    state: str = Field(description="registered, public, kept or deleted")
    job_id: str
    created_at: dt.datetime


class JobOut(BaseModel):
    """One upload job."""

    id: str
    image_name: str
    image_url: str
    image_sha256: str | None
    arch: str
    compose_id: str | None
    release: str | None
    status: str = Field(description="running, published, partial, failed or interrupted")
    step: str | None = Field(description="The step running now (or the last one)")
    error: str | None
    regions: list[str] = Field(description="Regions the job publishes to, base region first")
    flavours: list[str] = Field(description="AMI rows the job registers")
    progress: dict[str, Any] = Field(
        description="Live upload progress: task, done, total (bytes), rate (bytes/s), elapsed, "
        "eta (s), state"
    )
    ami_count: int = Field(description="AMIs recorded, deleted ones not counted")
    region_count: int = Field(description="Regions with an AMI")
    created_at: dt.datetime
    updated_at: dt.datetime
    seconds: float = Field(description="Duration; so far, while running")


class JobDetail(JobOut):
    """A job with its timeline and AMIs."""

    steps: list[StepOut]
    amis: list[AmiOut]
    messages: int = Field(description="Messages this job sent (see /api/v1/messages?job=)")


class JobLive(BaseModel):
    """What the dashboard polls while a job runs."""

    id: str
    status: str
    step: str | None
    error: str | None
    progress: dict[str, Any]
    ami_count: int
    updated_at: dt.datetime
    seconds: float
    steps: list[StepOut]


class Page(BaseModel):
    """Paging of a list."""

    total: int = Field(description="Rows matching, on every page")
    page: int
    per_page: int
    pages: int


class JobPage(Page):
    """A page of jobs, newest first."""

    jobs: list[JobOut]


class AmiPage(Page):
    """A page of AMIs, newest first."""

    amis: list[AmiOut]


class LatestAmis(BaseModel):
    """The newest released AMI per (arch, region, flavour)."""

    amis: list[AmiOut]
    count: int


class ImageOut(BaseModel):
    """An image (by name) and its newest job."""

    image_name: str
    arch: str
    release: str | None
    compose_id: str | None
    jobs: int
    latest_job_id: str
    latest_status: str
    latest_at: dt.datetime
    ami_count: int
    region_count: int


class ImagePage(Page):
    """A page of images, newest first."""

    images: list[ImageOut]


class ImageDetail(ImageOut):
    """An image with its region × flavour matrix (the current AMI of each cell) and its jobs."""

    regions: list[str]
    flavours: list[str]
    matrix: dict[str, dict[str, AmiOut]] = Field(
        description="matrix[region][flavour]: the newest AMI that is not deleted (else the newest)"
    )
    job_list: list[JobOut]


class MessageOut(BaseModel):
    """A message from the journal."""

    msg_id: str
    topic: str
    timestamp: float = Field(description="Seconds since the epoch")
    time: dt.datetime
    job_id: str | None
    delivered: bool = Field(description="False while it waits in the outbox")
    body: dict[str, Any]
    headers: dict[str, Any]


class MessagePage(Page):
    """A page of messages, newest first."""

    messages: list[MessageOut]


class ErrorOut(BaseModel):
    """An error."""

    error: str
    detail: Any = None


# --- conversions ---------------------------------------------------------------------------------


def _seconds(start: dt.datetime, end: dt.datetime | None, now: dt.datetime) -> float:
    return round(max((utc(end) if end else now) - utc(start), dt.timedelta(0)).total_seconds(), 3)


def step_out(step: StepRecord, now: dt.datetime) -> StepOut:
    """The API's view of a step."""
    return StepOut(
        name=step.name,
        region=step.region,
        status=step.status,
        detail=step.detail,
        started_at=utc(step.started_at),
        finished_at=utc(step.finished_at) if step.finished_at else None,
        seconds=_seconds(step.started_at, step.finished_at, now)
        if step.finished_at or step.status == "running"
        else None,
    )


def ami_out(ami: Ami) -> AmiOut:
    """The API's view of an AMI."""
    return AmiOut(
        id=ami.ami_id,
        region=ami.region,
        name=ami.name,
        image_name=ami.image_name,
        release=ami.release,
        arch=ami.arch,
        flavour=ami.flavour,
        virtualization=ami.virtualization,
        storage=ami.storage,
        volume_type=ami.volume_type,
        encrypted=bool(ami.encrypted),
        public=bool(ami.public),
        shared_with=list(ami.shared_with or []),
        visibility=visibility(ami),
        snapshot_id=ami.snapshot_id,
        source_ami_id=ami.source_ami_id,
        state=ami.state,
        job_id=ami.job_id,
        created_at=utc(ami.created_at),
    )


def _job_seconds(job: Job, now: dt.datetime) -> float:
    end = None if job.status == "running" else job.updated_at
    return _seconds(job.created_at, end, now)


def _str_list(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def job_out(job: Job, counts: dict[str, tuple[int, int]], now: dt.datetime) -> JobOut:
    """The API's view of a job; ``counts`` from :meth:`Catalog.ami_counts`."""
    state = job.state or {}
    amis, regions = counts.get(job.id, (0, 0))
    return JobOut(
        id=job.id,
        image_name=job.image_name,
        image_url=mask_url(job.image_url),
        image_sha256=job.image_sha256,
        arch=job.arch,
        compose_id=job.compose_id,
        release=job.release,
        status=job.status,
        step=job.step,
        error=job.error,
        regions=_str_list(state.get("regions")),
        flavours=_str_list(state.get("flavours")),
        progress=dict(job.progress or {}),
        ami_count=amis,
        region_count=regions,
        created_at=utc(job.created_at),
        updated_at=utc(job.updated_at),
        seconds=_job_seconds(job, now),
    )


def job_live(job: Job, steps: Sequence[StepRecord], amis: int, now: dt.datetime) -> JobLive:
    """What the dashboard polls; while a job runs, its step is the one its timeline is in."""
    running = [s.name for s in steps if s.status == "running"]
    return JobLive(
        id=job.id,
        status=job.status,
        step=running[-1] if job.status == "running" and running else job.step,
        error=job.error,
        progress=dict(job.progress or {}),
        ami_count=amis,
        updated_at=utc(job.updated_at),
        seconds=_job_seconds(job, now),
        steps=[step_out(s, now) for s in steps],
    )


def image_out(image: ImageSummary) -> ImageOut:
    """The API's view of an image summary."""
    return ImageOut(
        image_name=image.image_name,
        arch=image.arch,
        release=image.release,
        compose_id=image.compose_id,
        jobs=image.jobs,
        latest_job_id=image.latest_job_id,
        latest_status=image.latest_status,
        latest_at=utc(image.latest_at),
        ami_count=image.amis,
        region_count=image.regions,
    )


def message_out(record: MessageRecord) -> MessageOut:
    """The API's view of a journal message."""
    return MessageOut(
        msg_id=record.msg_id,
        topic=record.topic,
        timestamp=record.timestamp,
        time=dt.datetime.fromtimestamp(record.timestamp, dt.UTC),
        job_id=record.job_id,
        delivered=record.delivered_at is not None,
        body=dict(record.body or {}),
        headers=dict(record.headers or {}),
    )


def region_order(regions: Iterable[str], preferred: Sequence[str] = ()) -> list[str]:
    """``preferred`` first (a job's own order: base region first), then the rest sorted."""
    found = set(regions)
    first = [r for r in dict.fromkeys(preferred) if r in found]
    return first + sorted(found - set(first))


def matrix(amis: Iterable[Ami]) -> dict[str, dict[str, Ami]]:
    """region → flavour → the current AMI: the newest that is not deleted, else the newest."""
    cells: dict[str, dict[str, Ami]] = {}
    for ami in sorted(amis, key=lambda a: (utc(a.created_at), a.id), reverse=True):
        row = cells.setdefault(ami.region, {})
        current = row.get(ami.flavour)
        if current is None or (current.state == "deleted" and ami.state != "deleted"):
            row[ami.flavour] = ami
    return cells

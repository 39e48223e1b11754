"""The JSON API under ``/api/v1``: jobs, images, AMIs (with ``latest``) and messages; read-only.

Lists are paged (``page`` ≥ 1, ``per_page`` 1..100) and newest first. Architectures may be given in
Fedora's spelling (aarch64) or AWS's (arm64); answers use AWS's.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query

from fedimg.catalog import AmiFilter, JobFilter, MessageQuery
from fedimg.config import aws_arch
from fedimg.web.context import WebContext, web_context
from fedimg.web.models import (
    MAX_PAGE,
    AmiPage,
    ErrorOut,
    ImageDetail,
    ImagePage,
    JobDetail,
    JobLive,
    JobPage,
    LatestAmis,
    MessagePage,
    ami_out,
    image_out,
    job_live,
    job_out,
    matrix,
    message_out,
    pages_for,
    region_order,
    step_out,
)

router = APIRouter(prefix="/api/v1", tags=["api"])

Context = Annotated[WebContext, Depends(web_context)]
PageNumber = Annotated[int, Query(ge=1, le=MAX_PAGE, description="Page, from 1")]
PerPage = Annotated[int, Query(ge=1, le=100, description="Rows per page (at most 100)")]
Text = Annotated[str | None, Query(max_length=255)]
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorOut, "description": "Unknown"}}


def _blank(value: str | None) -> str | None:
    """Empty filter values (an empty form field) mean any."""
    return value or None


def job_filter(
    *,
    image: Text = None,
    release: Text = None,
    compose: Text = None,
    arch: Text = None,
    region: Text = None,
    flavour: Text = None,
    status: Text = None,
) -> JobFilter:
    """The catalog filter of the dashboard's and the API's job query parameters (a dependency:
    FastAPI reads the parameters from the query string; blank values are no filter)."""
    return JobFilter(
        image_name=_blank(image),
        release=_blank(release),
        compose_id=_blank(compose),
        arch=aws_arch(arch),
        status=_blank(status),
        region=_blank(region),
        flavour=_blank(flavour),
    )


JobFilters = Annotated[JobFilter, Depends(job_filter)]


def list_jobs(ctx: WebContext, filters: JobFilter, page: int, per_page: int) -> JobPage:
    """A page of jobs (shared by the API and the dashboard)."""
    jobs, total = ctx.catalog.find_jobs(filters, limit=per_page, offset=(page - 1) * per_page)
    counts = ctx.catalog.ami_counts([j.id for j in jobs])
    now = ctx.now()
    return JobPage(
        jobs=[job_out(j, counts, now) for j in jobs],
        total=total,
        page=page,
        per_page=per_page,
        pages=pages_for(total, per_page),
    )


def list_images(
    ctx: WebContext, release: str | None, arch: str | None, page: int, per_page: int
) -> ImagePage:
    """A page of images (shared by the API and the dashboard)."""
    images, total = ctx.catalog.images(
        release=_blank(release), arch=aws_arch(arch), limit=per_page, offset=(page - 1) * per_page
    )
    return ImagePage(
        images=[image_out(i) for i in images],
        total=total,
        page=page,
        per_page=per_page,
        pages=pages_for(total, per_page),
    )


def get_job_detail(ctx: WebContext, job_id: str) -> JobDetail | None:
    """A job with its steps and AMIs, or None."""
    job = ctx.catalog.get_job(job_id)
    if job is None:
        return None
    now = ctx.now()
    summary = job_out(job, ctx.catalog.ami_counts([job.id]), now)
    amis = ctx.catalog.amis(AmiFilter(job_id=job.id), limit=100_000)
    order = region_order((a.region for a in amis), summary.regions)
    amis.sort(key=lambda a: (order.index(a.region), a.flavour))
    _, messages = ctx.catalog.search_messages(MessageQuery(job_id=job.id, limit=0))
    return JobDetail(
        **summary.model_dump(),
        steps=[step_out(s, now) for s in ctx.catalog.steps(job.id)],
        amis=[ami_out(a) for a in amis],
        messages=messages,
    )


def get_image_detail(ctx: WebContext, image_name: str) -> ImageDetail | None:
    """An image's summary, matrix and jobs, or None."""
    summaries, _ = ctx.catalog.images(image_name=image_name, limit=1)
    if not summaries:
        return None
    summary = summaries[0]
    amis = ctx.catalog.amis(AmiFilter(image_name=image_name), limit=100_000)
    jobs, _ = ctx.catalog.find_jobs(JobFilter(image_name=image_name), limit=100)
    counts = ctx.catalog.ami_counts([j.id for j in jobs])
    now = ctx.now()
    job_list = [job_out(j, counts, now) for j in jobs]
    # Rows and columns in the order the newest job that planned any used (base region first).
    planned = next((j for j in job_list if j.regions), None)
    cells = matrix(amis)
    found = {a.flavour for a in amis}
    flavours = [f for f in planned.flavours if f in found] if planned else []
    flavours += sorted(found - set(flavours))
    regions = region_order(cells, planned.regions if planned else ())
    return ImageDetail(
        **image_out(summary).model_dump(),
        regions=regions,
        flavours=flavours,
        matrix={r: {f: ami_out(a) for f, a in cells[r].items()} for r in regions},
        job_list=job_list,
    )


# --- routes ----------------------------------------------------------------------------------


@router.get("/jobs", response_model=JobPage, summary="Jobs, newest first")
def api_jobs(
    *, ctx: Context, filters: JobFilters, page: PageNumber = 1, per_page: PerPage = 25
) -> JobPage:
    """Jobs matching every filter given; ``region``/``flavour`` match jobs with an AMI there."""
    return list_jobs(ctx, filters, page, per_page)


@router.get("/jobs/{job_id}", response_model=JobDetail, responses=_NOT_FOUND, summary="One job")
def api_job(*, ctx: Context, job_id: str) -> JobDetail:
    """A job with its step timeline and AMIs; a unique id prefix (8+ characters) works too."""
    detail = get_job_detail(ctx, job_id)
    if detail is None:
        raise HTTPException(404, "no such job")
    return detail


@router.get(
    "/jobs/{job_id}/progress",
    response_model=JobLive,
    responses=_NOT_FOUND,
    summary="A job's live state (what the dashboard polls)",
)
def api_job_progress(*, ctx: Context, job_id: str) -> JobLive:
    """Status, step, upload progress and steps of a job."""
    job = ctx.catalog.get_job(job_id)
    if job is None:
        raise HTTPException(404, "no such job")
    amis = ctx.catalog.ami_counts([job.id]).get(job.id, (0, 0))[0]
    return job_live(job, ctx.catalog.steps(job.id), amis, ctx.now())


@router.get("/images", response_model=ImagePage, summary="Images, newest first")
def api_images(
    *,
    ctx: Context,
    release: Text = None,
    arch: Text = None,
    page: PageNumber = 1,
    per_page: PerPage = 25,
) -> ImagePage:
    """Every image fedimg worked on (by name), with its newest job."""
    return list_images(ctx, release, arch, page, per_page)


@router.get(
    "/images/{image_name}",
    response_model=ImageDetail,
    responses=_NOT_FOUND,
    summary="One image: its region × flavour matrix and its jobs",
)
def api_image(*, ctx: Context, image_name: str) -> ImageDetail:
    """The image's current AMI in each region and flavour, and its jobs (newest 100)."""
    detail = get_image_detail(ctx, image_name)
    if detail is None:
        raise HTTPException(404, "no such image")
    return detail


@router.get(
    "/amis/latest",
    response_model=LatestAmis,
    summary="The newest released AMI per arch, region and flavour",
)
def api_latest_amis(
    *,
    ctx: Context,
    release: Text = None,
    arch: Text = None,
    region: Text = None,
    flavour: Text = None,
) -> LatestAmis:
    """What people ask most: e.g. ``?release=41&arch=x86_64&region=us-east-1&flavour=hvm-ebs-gp3``.

    Only AMIs of jobs that published, and neither deleted nor kept after a failed test; an empty
    list when none matches.
    """
    amis = ctx.catalog.latest_amis(
        AmiFilter(
            release=_blank(release),
            arch=aws_arch(arch),
            region=_blank(region),
            flavour=_blank(flavour),
        )
    )
    return LatestAmis(amis=[ami_out(a) for a in amis], count=len(amis))


@router.get("/amis", response_model=AmiPage, summary="AMIs, newest first")
def api_amis(
    *,
    ctx: Context,
    image: Text = None,
    release: Text = None,
    arch: Text = None,
    region: Text = None,
    flavour: Text = None,
    job: Text = None,
    state: Text = None,
    public: bool | None = None,
    page: PageNumber = 1,
    per_page: PerPage = 25,
) -> AmiPage:
    """Every AMI recorded (deleted ones too: filter with ``state``)."""
    amis, total = ctx.catalog.find_amis(
        AmiFilter(
            image_name=_blank(image),
            release=_blank(release),
            arch=aws_arch(arch),
            region=_blank(region),
            flavour=_blank(flavour),
            job_id=_blank(job),
        ),
        state=_blank(state),
        public=public,
        limit=per_page,
        offset=(page - 1) * per_page,
    )
    return AmiPage(
        amis=[ami_out(a) for a in amis],
        total=total,
        page=page,
        per_page=per_page,
        pages=pages_for(total, per_page),
    )


@router.get("/messages", response_model=MessagePage, summary="Journal messages, newest first")
def api_messages(
    *,
    ctx: Context,
    topic: Annotated[list[str], Query(description="Full topic (repeatable, OR-ed)")] = [],  # noqa: B006
    job: Text = None,
    page: PageNumber = 1,
    per_page: PerPage = 25,
) -> MessagePage:
    """Messages fedimg sent (the outbox's undelivered ones too); see also the datagrepper ``/raw``."""
    records, total = ctx.catalog.search_messages(
        MessageQuery(
            topic_groups=(tuple(topic),) if topic else (),
            job_id=_blank(job),
            limit=per_page,
            offset=(page - 1) * per_page,
        )
    )
    return MessagePage(
        messages=[message_out(r) for r in records],
        total=total,
        page=page,
        per_page=per_page,
        pages=pages_for(total, per_page),
    )


__all__ = [
    "get_image_detail",
    "get_job_detail",
    "job_filter",
    "list_images",
    "list_jobs",
    "router",
]

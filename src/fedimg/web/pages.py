"""The dashboard: server-rendered pages (Jinja2), a little JavaScript for live progress and copying.

- ``/``: every job, newest first, paged, with filters (release, compose, arch, region, flavour,
  status); running jobs update themselves.
- ``/jobs/{id}``: a job's facts, live upload progress, step timeline, AMI matrix and messages.
- ``/images`` and ``/images/{name}``: images, and an image's region × flavour matrix.
- ``/amis``: the latest released AMIs (or every AMI), filtered.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from fedimg import __version__
from fedimg.catalog import AmiFilter, MessageQuery
from fedimg.config import aws_arch
from fedimg.web.api import (
    JobFilters,
    get_image_detail,
    get_job_detail,
    list_images,
    list_jobs,
)
from fedimg.web.context import WebContext, web_context
from fedimg.web.models import MAX_PAGE, AmiOut, StepOut, ami_out, message_out

TEMPLATE_DIR = Path(__file__).parent / "templates"
templates = Jinja2Templates(directory=TEMPLATE_DIR)

router = APIRouter(include_in_schema=False, default_response_class=HTMLResponse)

Context = Annotated[WebContext, Depends(web_context)]
Text = Annotated[str | None, Query(max_length=255)]
PageNumber = Annotated[int, Query(ge=1, le=MAX_PAGE)]
PerPage = Annotated[int, Query(ge=1, le=100)]

MIB = 1024 * 1024


# --- filters for the templates ---------------------------------------------------------------


def duration(seconds: float | None) -> str:
    """``95.2`` → ``1m 35s``."""
    if seconds is None:
        return ""
    whole = round(seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def size(value: float | None) -> str:
    """Bytes, in MiB or GiB."""
    if value is None:
        return "?"
    if value >= 1024 * MIB:
        return f"{value / (1024 * MIB):.2f} GiB"
    return f"{value / MIB:.1f} MiB"


def when(value: dt.datetime | None) -> str:
    """``2024-10-27 12:00:03Z``."""
    if value is None:
        return ""
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def progress_view(progress: dict[str, Any]) -> dict[str, Any] | None:
    """Percent and a line of text from a job's progress (see ``CallbackProgress``)."""
    if not progress:
        return None
    done = float(progress.get("done") or 0)
    total = progress.get("total")
    percent = min(100.0, 100.0 * done / float(total)) if total else None
    parts = [f"{size(done)} of {size(float(total))}" if total else size(done)]
    if progress.get("rate"):
        parts.append(f"{size(float(progress['rate']))}/s")
    if progress.get("eta") is not None and progress.get("state") != "done":
        parts.append(f"ETA {duration(float(progress['eta']))}")
    label = f"{percent:.0f}%" if percent is not None else ""
    return {
        "percent": percent,
        "label": label,
        "text": " · ".join(parts),
        "task": progress.get("task") or "upload",
        "state": progress.get("state") or "running",
    }


def short_topic(topic: str, prefix: str) -> str:
    """A topic without the environment prefix."""
    return topic.removeprefix(prefix.rstrip(".") + ".")


templates.env.filters["duration"] = duration
templates.env.filters["size"] = size
templates.env.filters["when"] = when


def _render(
    request: Request, ctx: WebContext, name: str, status_code: int = 200, **data: Any
) -> HTMLResponse:
    context = {
        "request": request,
        "root": request.scope.get("root_path", "").rstrip("/"),
        "poll_seconds": ctx.poll_seconds,
        "version": __version__,
        **data,
    }
    return templates.TemplateResponse(request, name, context, status_code=status_code)


def _link(request: Request, **changes: Any) -> str:
    """``?query`` of this page with ``changes`` (None drops a parameter)."""
    params = {k: v for k, v in request.query_params.items() if v}
    for key, value in changes.items():
        if value is None or value == "":
            params.pop(key, None)
        else:
            params[key] = str(value)
    return "?" + urlencode(params) if params else "?"


def _timeline(steps: list[StepOut], start: dt.datetime, seconds: float) -> list[dict[str, Any]]:
    """Steps with the offset and width of their bar, in percent of the job's duration."""
    total = max(seconds, 1e-3)
    rows = []
    for step in steps:
        left = max(0.0, (step.started_at - start).total_seconds()) / total * 100
        width = (step.seconds or 0) / total * 100
        rows.append(
            {
                "step": step,
                "left": f"{min(left, 100):.2f}",
                "width": f"{max(min(width, 100 - min(left, 100)), 0.5):.2f}",
            }
        )
    return rows


def _facets(ctx: WebContext) -> dict[str, list[str]]:
    """The filters' choices: newest release and compose first, the rest sorted."""
    facets = ctx.catalog.job_facets()
    facets["release"].sort(key=lambda r: (len(r), r), reverse=True)
    facets["compose_id"].reverse()
    return facets


def _matrix_view(
    regions: list[str], flavours: list[str], cells: dict[str, dict[str, AmiOut]]
) -> dict[str, Any]:
    """What the ``matrix_table`` macro draws: rows, columns, and the AMI of each cell."""
    return {"regions": regions, "flavours": flavours, "cells": cells}


# --- pages ------------------------------------------------------------------------------------


@router.get("/")
def dashboard(
    *,
    request: Request,
    ctx: Context,
    filters: JobFilters,
    page: PageNumber = 1,
    per_page: PerPage = 25,
) -> HTMLResponse:
    """Every job, newest first, with filters and paging."""
    result = list_jobs(ctx, filters, page, per_page)
    facets = _facets(ctx)
    selected = {
        "release": filters.release or "",
        "compose_id": filters.compose_id or "",
        "arch": filters.arch or "",
        "region": filters.region or "",
        "flavour": filters.flavour or "",
        "status": filters.status or "",
    }
    image = filters.image_name
    return _render(
        request,
        ctx,
        "dashboard.html",
        result=result,
        jobs=[(job, progress_view(job.progress)) for job in result.jobs],
        facets=facets,
        selected=selected,
        image=image or "",
        filtered=any(selected.values()) or bool(image),
        first=_link(request, page=None),
        prev=_link(request, page=page - 1) if page > 1 else None,
        next=_link(request, page=page + 1) if page < result.pages else None,
        last=_link(request, page=result.pages),
    )


@router.get("/jobs/{job_id}")
def job_page(*, request: Request, ctx: Context, job_id: str) -> HTMLResponse:
    """One job: facts, progress, timeline, AMIs, messages."""
    job = get_job_detail(ctx, job_id)
    if job is None:
        return _render(request, ctx, "error.html", 404, message=f"No job {job_id}.")
    records, _ = ctx.catalog.search_messages(
        MessageQuery(job_id=job.id, newest_first=False, limit=1000)
    )
    messages = [message_out(r) for r in records]
    regions = list(dict.fromkeys(a.region for a in job.amis))
    flavours = list(dict.fromkeys([*job.flavours, *(a.flavour for a in job.amis)]))
    flavours = [f for f in flavours if any(a.flavour == f for a in job.amis)]
    cells: dict[str, dict[str, AmiOut]] = {}
    for ami in job.amis:
        cells.setdefault(ami.region, {})[ami.flavour] = ami
    return _render(
        request,
        ctx,
        "job.html",
        job=job,
        progress=progress_view(job.progress),
        timeline=_timeline(job.steps, job.created_at, job.seconds),
        matrix=_matrix_view(regions, flavours, cells),
        messages=[(m, short_topic(m.topic, ctx.topic_prefix)) for m in messages],
    )


@router.get("/images")
def images_page(
    *,
    request: Request,
    ctx: Context,
    release: Text = None,
    arch: Text = None,
    page: PageNumber = 1,
    per_page: PerPage = 25,
) -> HTMLResponse:
    """Every image, newest first."""
    result = list_images(ctx, release, arch, page, per_page)
    return _render(
        request,
        ctx,
        "images.html",
        images=result.images,
        total=result.total,
        page=page,
        pages=result.pages,
        prev=_link(request, page=page - 1) if page > 1 else None,
        next=_link(request, page=page + 1) if page < result.pages else None,
    )


@router.get("/images/{image_name}")
def image_page(*, request: Request, ctx: Context, image_name: str) -> HTMLResponse:
    """An image's region × flavour matrix and its jobs."""
    image = get_image_detail(ctx, image_name)
    if image is None:
        return _render(request, ctx, "error.html", 404, message=f"No image {image_name}.")
    return _render(
        request,
        ctx,
        "image.html",
        image=image,
        matrix=_matrix_view(image.regions, image.flavours, image.matrix),
        jobs=[(job, progress_view(job.progress)) for job in image.job_list],
    )


@router.get("/amis")
def amis_page(
    *,
    request: Request,
    ctx: Context,
    release: Text = None,
    arch: Text = None,
    region: Text = None,
    flavour: Text = None,
    every: bool = False,
) -> HTMLResponse:
    """The latest released AMI per arch, region and flavour (or the newest 500 of every AMI)."""
    filters = AmiFilter(
        release=release or None,
        arch=aws_arch(arch),
        region=region or None,
        flavour=flavour or None,
    )
    if every:
        rows, total = ctx.catalog.find_amis(filters, limit=500)
    else:
        rows = ctx.catalog.latest_amis(filters)
        total = len(rows)
    facets = _facets(ctx)
    chosen = {"release": release, "arch": arch, "region": region, "flavour": flavour}
    api_query = urlencode({key: value for key, value in chosen.items() if value})
    return _render(
        request,
        ctx,
        "amis.html",
        amis=[ami_out(a) for a in rows],
        total=total,
        every=every,
        facets=facets,
        selected={
            "release": release or "",
            "arch": aws_arch(arch) or "",
            "region": region or "",
            "flavour": flavour or "",
        },
        api_link=f"/api/v1/amis/latest{'?' + api_query if api_query else ''}",
    )

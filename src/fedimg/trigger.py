"""Run the EC2 service for several images at once: a compose's images, or one image by URL.

Used by the bus consumer (:mod:`fedimg.consumer`) and by ``fedimg trigger``. Each image is one job
(:meth:`EC2Service.publish`), run in a bounded pool (``[general] process_count``); one image failing
never stops the others, and every outcome is returned (and was recorded in the catalog by the
service).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedimg.compose import ComposeImage
from fedimg.config import Config
from fedimg.errors import EXIT_FAILED, EXIT_INTERRUPTED, FedimgError, InputError
from fedimg.services.ec2.flavours import VOLUME_TYPES, parse_flavour
from fedimg.services.ec2.service import PublishRequest
from fedimg.source import normalise_sha256, resolve_source
from fedimg.successor import release_and_subvariant

if TYPE_CHECKING:
    from fedimg.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageJob:
    """One image to publish, with what messages and the catalog say about it."""

    url: str
    arch: str | None = None
    compose_id: str | None = None
    release: str | None = None
    subvariant: str | None = None
    sha256: str | None = None

    @classmethod
    def from_compose(cls, image: ComposeImage, *, compose_id: str, release: str | None) -> ImageJob:
        """The job for an image of a compose (its checksum from the metadata)."""
        return cls(
            url=image.url,
            arch=image.arch,
            compose_id=compose_id,
            release=release,
            subvariant=image.subvariant or None,
            sha256=image.sha256,
        )

    def request(self) -> PublishRequest:
        """The service's request; raises InputError for an unusable URL or checksum."""
        source = resolve_source(self.url, arch=self.arch)
        named_release, named_subvariant = release_and_subvariant(source.name)
        return PublishRequest(
            source=source,
            compose_id=self.compose_id,
            release=self.release or named_release,
            subvariant=self.subvariant or named_subvariant,
            expected_sha256=normalise_sha256(self.sha256) if self.sha256 else None,
        )


@dataclass(frozen=True)
class JobOutcome:
    """What became of one image."""

    url: str
    job_id: str | None
    status: str
    error: str | None
    exit_code: int
    amis: int = 0

    def to_json(self) -> dict[str, Any]:
        """For ``--json`` output."""
        return {
            "url": self.url,
            "job": self.job_id,
            "status": self.status,
            "amis": self.amis,
            "error": self.error,
        }


def restrict_volume_type(config: Config, volume_type: str) -> Config:
    """``config`` publishing only the flavours with ``volume_type`` (fedimg's partial upload).

    Configured flavours are filtered; without any, the default rows are built for that one volume
    type. Raises InputError for an unknown volume type or when no configured flavour has it.
    """
    if volume_type not in VOLUME_TYPES:
        raise InputError(f"unknown volume type {volume_type!r} ({', '.join(VOLUME_TYPES)})")
    aws = config.aws
    flavours = aws.flavours
    if flavours is not None:
        flavours = [f for f in flavours if parse_flavour(f).volume_type == volume_type]
        if not flavours:
            raise InputError(f"no configured flavour has volume type {volume_type!r}")
    restricted = aws.model_copy(update={"volume_types": [volume_type], "flavours": flavours})
    return config.model_copy(update={"aws": restricted})


def publish_images(
    runtime: Runtime, jobs: Sequence[ImageJob], *, stop: threading.Event | None = None
) -> list[JobOutcome]:
    """Publish every image, ``[general] process_count`` at a time; outcomes in ``jobs`` order.

    Never raises for an image that fails: its outcome says why (bad URL or checksum, AWS failure,
    or an unexpected error, which is logged with its traceback). Setting ``stop`` (a signal
    handler does) ends the running jobs as ``interrupted`` at their next step and starts no more.
    """

    def not_started(job: ImageJob) -> JobOutcome:
        return JobOutcome(
            url=job.url,
            job_id=None,
            status="interrupted",
            error="not started: fedimg is stopping",
            exit_code=EXIT_INTERRUPTED,
        )

    if stop is not None and stop.is_set():
        return [not_started(job) for job in jobs]
    if not jobs:
        return []
    # Build the shared parts once, before threads race to build them.
    _ = runtime.clients, runtime.messenger
    workers = max(1, min(runtime.config.general.process_count, len(jobs)))

    def run(job: ImageJob) -> JobOutcome:
        if stop is not None and stop.is_set():
            return not_started(job)
        try:
            request = job.request()
        except FedimgError as exc:
            log.error("%s: %s", job.url, exc)
            return JobOutcome(
                url=job.url, job_id=None, status="failed", error=str(exc), exit_code=exc.exit_code
            )
        service = runtime.service()
        if stop is not None:
            service.stop = stop
        try:
            result = service.publish(request)
        except Exception as exc:  # a bug must not take the other images (or the consumer) down
            log.exception("%s: the job failed unexpectedly", job.url)
            return JobOutcome(
                url=job.url, job_id=None, status="failed", error=str(exc), exit_code=EXIT_FAILED
            )
        log.info("%s: job %s %s", request.source.name, result.job_id, result.status)
        return JobOutcome(
            url=job.url,
            job_id=result.job_id,
            status=result.status,
            error=result.error,
            exit_code=result.exit_code,
            amis=len(result.amis),
        )

    if workers == 1:
        return [run(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedimg-job") as pool:
        return list(pool.map(run, jobs))


def plan_images(runtime: Runtime, jobs: Sequence[ImageJob]) -> list[dict[str, Any]]:
    """What publishing ``jobs`` would do (``--dry-run``): per image, its regions and flavours."""
    service = runtime.service()
    plans: list[dict[str, Any]] = []
    for job in jobs:
        entry: dict[str, Any] = {"url": job.url, "compose_id": job.compose_id}
        try:
            request = job.request()
            regions, flavours = service.plan(request)
        except FedimgError as exc:
            plans.append({**entry, "error": str(exc)})
            continue
        plans.append(
            {
                **entry,
                "image": request.source.name,
                "arch": request.source.arch,
                "release": request.release,
                "subvariant": request.subvariant,
                "sha256": request.expected_sha256,
                "regions": regions,
                "flavours": [f.name for f in flavours],
            }
        )
    return plans


__all__ = [
    "ImageJob",
    "JobOutcome",
    "plan_images",
    "publish_images",
    "restrict_volume_type",
]

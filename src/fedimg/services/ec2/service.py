"""The EC2 service, the orchestrator: the only place that knows the order of the steps.

    1. resolve the regions and the AMI matrix (bad config fails here, before any AWS resource)
    2. get the image bytes into one EBS snapshot in the base region      (upload_direct)
    3. register the flavours from that snapshot in the base region       (register)
    4. test the new AMIs with the configured test script                  (testing)
    5. only if the test passed: copy the snapshot once per other region,
       register every flavour there                                      (replicate)
    6. make every AMI and snapshot public                                 (replicate.make_public)
    7. record everything in the catalog; announce each step               (catalog, messages)

Every temporary resource goes into the ledger as soon as it exists; on failure the ledger is
cleaned (unless ``clean_up_on_failure`` is off) so nothing is leaked, and a ``failed`` message is
sent for the step that failed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from fedimg.aws import ClientFactory
from fedimg.catalog import Catalog
from fedimg.config import Config
from fedimg.errors import EXIT_FAILED, EXIT_OK, ConfigError, FedimgError, Interrupted
from fedimg.events import ImageInfo, JobFinished, Step, StepEvent
from fedimg.messages import Messenger
from fedimg.progress import NullProgress, Progress
from fedimg.services.ec2.errors import EC2TestException, aws_call
from fedimg.services.ec2.flavours import Flavour, MatrixContext, choose_flavours
from fedimg.services.ec2.register import RegisteredAmi, RegisterRequest, register_flavours
from fedimg.services.ec2.replicate import (
    CopyRequest,
    copy_snapshot,
    failed_regions_error,
    fan_out,
    make_public,
)
from fedimg.services.ec2.resources import (
    TAG_COMPOSE,
    TAG_JOB,
    TAG_ROLE,
    TAG_SHA256,
    ResourceLedger,
    tag_list,
)
from fedimg.services.ec2.testing import TestRunner, TestTarget
from fedimg.services.ec2.upload_direct import (
    DirectUploadRequest,
    DirectUploadResult,
    upload_direct,
)
from fedimg.source import ImageSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishRequest:
    """One image to publish; fields left None come from the configuration."""

    source: ImageSource
    compose_id: str | None = None
    release: str | None = None
    subvariant: str | None = None
    regions: tuple[str, ...] | None = None
    flavours: tuple[str, ...] | None = None
    expected_sha256: str | None = None
    workers: int | None = None


@dataclass(frozen=True)
class AmiResult:
    """One AMI of the result (the CLI's JSON ``amis`` entries)."""

    region: str
    id: str
    name: str
    flavour: str
    virtualization: str
    storage: str
    volume_type: str | None
    encrypted: bool
    public: bool
    snapshot_id: str


@dataclass(frozen=True)
class PublishResult:
    """What a job did. ``exit_code`` is the CLI's: 0 published, 1 failed, 2 bad input, 130."""

    job_id: str | None
    status: str
    image: ImageInfo
    amis: tuple[AmiResult, ...] = ()
    copies: dict[str, int] = field(default_factory=lambda: {"snapshot": 0, "image": 0})
    failed_regions: tuple[str, ...] = ()
    upload: DirectUploadResult | None = None
    error: str | None = None
    exit_code: int = EXIT_OK

    def to_json(self) -> dict[str, Any]:
        """The ``fedimg upload --json`` object."""
        return {
            "job": self.job_id,
            "status": self.status,
            "image": {
                "name": self.image.name,
                "url": self.image.url,
                "sha256": self.image.sha256,
                "arch": self.image.arch,
            },
            "amis": [
                {
                    "region": a.region,
                    "id": a.id,
                    "name": a.name,
                    "flavour": a.flavour,
                    "virtualization": a.virtualization,
                    "storage": a.storage,
                    "volume_type": a.volume_type,
                    "encrypted": a.encrypted,
                    "public": a.public,
                    "snapshot_id": a.snapshot_id,
                }
                for a in self.amis
            ],
            "copies": dict(self.copies),
            "failed_regions": list(self.failed_regions),
            "error": self.error,
        }


def config_fingerprint(config: Config) -> str:
    """A digest of the settings that decide what a job produces (resume matches on it)."""
    data = config.model_dump(mode="json", exclude={"general": {"catalog_url"}})
    data["aws"].pop("access_id", None)
    data["aws"].pop("secret_key", None)
    data.pop("messaging", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def resolve_regions(
    config: Config, requested: tuple[str, ...] | None, available: list[str]
) -> list[str]:
    """The regions to publish to, base region first; raises ConfigError for unknown ones."""
    aws = config.aws
    if requested:
        wanted = list(requested)
    elif aws.regions == "all" or (aws.regions is None and not aws.amis):
        wanted = list(available)
    elif isinstance(aws.regions, list):
        wanted = list(aws.regions)
    else:
        wanted = list(dict.fromkeys(entry.region for entry in aws.amis))
    wanted = [r for r in dict.fromkeys(wanted) if r not in set(aws.exclude_regions)]
    base = config.base_region()
    unknown = [r for r in [base, *wanted] if r not in available]
    if unknown:
        raise ConfigError(
            f"unknown region(s) {', '.join(dict.fromkeys(unknown))}: the endpoint offers "
            f"{len(available)} regions ({', '.join(sorted(available)[:5])}, ...)"
        )
    return [base, *[r for r in wanted if r != base]]


class EC2Service:
    """Publishes images to EC2 for one configuration. One instance may run several jobs in turn."""

    def __init__(
        self,
        *,
        config: Config,
        clients: ClientFactory,
        catalog: Catalog,
        messenger: Messenger,
        runner: TestRunner | None,
        progress: Progress | None = None,
        endpoint_url: str | None = None,
    ) -> None:
        self.config = config
        self.clients = clients
        self.catalog = catalog
        self.messenger = messenger
        self.runner = runner
        self.progress = progress or NullProgress()
        self.endpoint_url = endpoint_url

    # --- planning --------------------------------------------------------------------------

    def available_regions(self) -> list[str]:
        """Every region the target offers."""
        base = self.config.base_region()
        with aws_call("DescribeRegions", base):
            regions = self.clients.ec2(base).describe_regions()["Regions"]
        return sorted(r["RegionName"] for r in regions)

    def plan(self, request: PublishRequest) -> tuple[list[str], list[Flavour]]:
        """(regions, flavours) the request would publish; raises ConfigError if impossible."""
        regions = resolve_regions(self.config, request.regions, self.available_regions())
        arch = request.source.arch
        context = MatrixContext(
            arch=arch,
            regions=tuple(regions),
            akis={r: self.config.aki_for(r, arch) for r in regions},
        )
        configured = list(request.flavours) if request.flavours else self.config.aws.flavours
        flavours = choose_flavours(configured, self.config.aws.volume_types, context)
        unsupported = [f.name for f in flavours if not f.is_ebs or f.encrypted]
        if unsupported:
            raise ConfigError(
                f"[aws] flavours: {', '.join(unsupported)}: instance-store and encrypted rows "
                "are not available in this version"
            )
        if self.config.aws.upload_method != "direct":
            raise ConfigError(
                f"[aws] upload_method: {self.config.aws.upload_method!r} is not available in "
                "this version (use 'direct')"
            )
        return regions, flavours

    # --- the job ---------------------------------------------------------------------------

    def publish(self, request: PublishRequest) -> PublishResult:
        """Run the whole service for one image. Never raises for a job failure: the result says.

        Raises only for programming errors; every :class:`FedimgError` becomes a failed result
        with its exit code, after cleanup and a ``failed`` message.
        """
        source = request.source
        image = ImageInfo(
            name=source.name,
            url=source.url,
            arch=source.arch,
            compose_id=request.compose_id,
            sha256=request.expected_sha256,
            release=request.release,
            subvariant=request.subvariant,
        )
        try:
            regions, flavours = self.plan(request)
        except FedimgError as exc:
            return self.reject(image, exc)
        job = self.catalog.create_job(
            image_name=source.name,
            image_url=source.url,
            arch=source.arch,
            image_sha256=request.expected_sha256,
            compose_id=request.compose_id,
            release=request.release,
            config_fingerprint=config_fingerprint(self.config),
        )
        self.catalog.update_job(
            job.id, state={"regions": regions, "flavours": [f.name for f in flavours]}
        )
        run = _JobRun(
            service=self,
            job_id=job.id,
            request=request,
            image=image,
            regions=regions,
            flavours=flavours,
        )
        return run.execute()

    def reject(self, image: ImageInfo, error: FedimgError) -> PublishResult:
        """Record and announce a job that failed before it started (see record_rejection)."""
        return record_rejection(
            catalog=self.catalog,
            messenger=self.messenger,
            config=self.config,
            image=image,
            error=error,
        )


def record_rejection(
    *,
    catalog: Catalog,
    messenger: Messenger,
    config: Config,
    image: ImageInfo,
    error: FedimgError,
) -> PublishResult:
    """Record a job that failed before it started (bad input or config) and announce it.

    Nothing was created in AWS; the job is kept in the catalog as ``failed`` with the reason, and
    an ``image.upload`` ``failed`` message is sent for the base region.
    """
    job = catalog.create_job(
        image_name=image.name,
        image_url=image.url,
        arch=image.arch,
        image_sha256=image.sha256,
        compose_id=image.compose_id,
        release=image.release,
        config_fingerprint=None,
    )
    catalog.update_job(job.id, status="failed", error=str(error), step="plan")
    messenger.emit(
        StepEvent(
            job_id=job.id,
            step="upload",
            status="failed",
            region=config.base_region(),
            image=image,
            data=str(error),
        )
    )
    log.error("job %s rejected: %s", job.id, error)
    return PublishResult(
        job_id=job.id, status="failed", image=image, error=str(error), exit_code=error.exit_code
    )


class _JobRun:
    """One job's state while it runs (kept off :class:`EC2Service` so jobs never share it)."""

    def __init__(
        self,
        *,
        service: EC2Service,
        job_id: str,
        request: PublishRequest,
        image: ImageInfo,
        regions: list[str],
        flavours: list[Flavour],
    ) -> None:
        self.s = service
        self.config = service.config
        self.job_id = job_id
        self.request = request
        self.image = image
        self.regions = regions
        self.base = regions[0]
        self.flavours = flavours
        self.ledger = ResourceLedger(
            catalog=service.catalog, job_id=job_id, clients=service.clients
        )
        self.amis: list[RegisteredAmi] = []
        self.public: set[str] = set()
        self.step: Step = "upload"
        self.copies = {"snapshot": 0, "image": 0}
        self.upload: DirectUploadResult | None = None
        self.failed_regions: list[str] = []

    # --- helpers ---------------------------------------------------------------------------

    def emit(self, step: Step, status: str, region: str, **fields: Any) -> None:
        self.s.messenger.emit(
            StepEvent(
                job_id=self.job_id,
                step=step,
                status=status,  # type: ignore[arg-type]
                region=region,
                image=self.image,
                **fields,
            )
        )

    def emit_for_ami(self, step: Step, status: str, ami: RegisteredAmi, **fields: Any) -> None:
        self.emit(
            step,
            status,
            ami.region,
            ami_id=ami.ami_id,
            virt_type=ami.flavour.virt_type,
            vol_type=ami.flavour.vol_type,
            storage=ami.flavour.storage,
            encrypted=ami.flavour.encrypted,
            **fields,
        )

    def emit_for_flavours(self, step: Step, status: str, region: str, **fields: Any) -> None:
        for flavour in self.flavours:
            self.emit(
                step,
                status,
                region,
                virt_type=flavour.virt_type,
                vol_type=flavour.vol_type,
                storage=flavour.storage,
                encrypted=flavour.encrypted,
                **fields,
            )

    def base_tags(self) -> dict[str, str]:
        tags = {TAG_JOB: self.job_id}
        if self.image.compose_id:
            tags[TAG_COMPOSE] = self.image.compose_id
        if self.image.sha256:
            tags[TAG_SHA256] = self.image.sha256
        return tags

    def timed_step(self, name: str, region: str | None, action: Callable[[], Any]) -> Any:
        step_id = self.s.catalog.start_step(self.job_id, name, region)
        try:
            value = action()
        except BaseException as exc:
            self.s.catalog.finish_step(step_id, "failed", str(exc))
            raise
        self.s.catalog.finish_step(step_id, "completed")
        return value

    def description(self) -> str:
        compose = f" from compose {self.image.compose_id}" if self.image.compose_id else ""
        return f"{self.image.name}{compose}, published by fedimg"

    # --- the steps -------------------------------------------------------------------------

    def execute(self) -> PublishResult:
        try:
            self.step = "upload"
            self.emit_for_flavours("upload", "started", self.base)
            self.upload = self.timed_step("upload", self.base, self.upload_image)
            self.amis = self.timed_step("register", self.base, self.register_base)
            for ami in self.amis:
                self.emit_for_ami("upload", "completed", ami)
            self.step = "test"
            self.timed_step("test", self.base, self.test)
            self.step = "copy"
            self.timed_step("replicate", None, self.replicate)
            self.step = "publish"
            self.timed_step("publish", None, self.publish)
        except FedimgError as exc:
            return self.fail(exc)
        except KeyboardInterrupt:
            return self.fail(Interrupted("interrupted; temporary resources were removed"))
        for entry in self.ledger.active:
            self.ledger.release(entry.resource_id, state="kept")
        status = "partial" if self.failed_regions else "published"
        self.s.catalog.update_job(self.job_id, status=status, step="done")
        self.finish(status)
        return self.result(status=status, error=None, exit_code=EXIT_OK)

    def upload_image(self) -> DirectUploadResult:
        source = self.request.source
        identity = self.request.expected_sha256 or _fingerprint(source)
        token = hashlib.sha256(f"{identity}:{self.job_id}".encode()).hexdigest()[:64]
        tags = {**self.base_tags(), TAG_ROLE: "root-snapshot", "Name": source.name}
        progress = self.s.progress
        result = upload_direct(
            request=DirectUploadRequest(
                source=source,
                region=self.base,
                client_token=token,
                tags=tags,
                description=self.description(),
                workers=self.request.workers or self.config.aws.workers,
                volume_size_gib=self.config.aws.volume_size,
                expected_sha256=self.request.expected_sha256,
                require_disk_label=True,
            ),
            ebs=self.s.clients.ebs(self.base),
            ec2=self.s.clients.ec2(self.base),
            on_snapshot_started=lambda sid: self.ledger.record(
                region=self.base, kind="snapshot", resource_id=sid
            ),
            progress=progress,
        )
        self.image = replace(self.image, sha256=result.sha256_compressed)
        with aws_call("CreateTags", self.base, result.snapshot_id):
            self.s.clients.ec2(self.base).create_tags(
                Resources=[result.snapshot_id],
                Tags=tag_list({TAG_SHA256: result.sha256_compressed}),
            )
        self.s.catalog.update_job(
            self.job_id,
            image_sha256=result.sha256_compressed,
            sha256_raw=result.sha256_raw,
            state={
                "snapshot_id": result.snapshot_id,
                "volume_size_gib": result.volume_size_gib,
                "upload": {
                    "blocks_written": result.blocks_written,
                    "blocks_zero": result.blocks_zero,
                    "seconds": result.seconds,
                },
            },
        )
        return result

    def register_in(self, region: str, snapshot_id: str) -> list[RegisteredAmi]:
        assert self.upload is not None
        arch = self.image.arch
        return register_flavours(
            request=RegisterRequest(
                region=region,
                snapshot_id=snapshot_id,
                flavours=tuple(self.flavours),
                image_name=self.config.aws.name_prefix or self.image.name,
                image_sha256=self.upload.sha256_compressed,
                arch=arch,
                volume_size_gib=self.upload.volume_size_gib,
                kernel_id=self.config.aki_for(region, arch),
                description=self.description(),
                tags=self.base_tags(),
            ),
            ec2=self.s.clients.ec2(region),
            on_registered=lambda ami: self.ledger.record(
                region=region, kind="image", resource_id=ami.ami_id
            ),
        )

    def register_base(self) -> list[RegisteredAmi]:
        assert self.upload is not None
        amis = self.register_in(self.base, self.upload.snapshot_id)
        earlier = {a.snapshot_id for a in amis if a.reused}
        if amis and all(a.reused for a in amis) and len(earlier) == 1:
            # Every AMI of this image exists already (an earlier job): the snapshot just uploaded
            # is a duplicate. Drop it and continue from the earlier one, so replication finds the
            # earlier copies instead of copying again.
            (snapshot_id,) = earlier
            if snapshot_id != self.upload.snapshot_id:
                duplicate = self.upload.snapshot_id
                with aws_call("DeleteSnapshot", self.base, duplicate):
                    self.s.clients.ec2(self.base).delete_snapshot(SnapshotId=duplicate)
                self.ledger.release(duplicate)
                self.upload = replace(self.upload, snapshot_id=snapshot_id)
                log.info("image already published: reusing snapshot %s", snapshot_id)
        for ami in amis:
            self.record_ami(ami, source_ami_id=None)
        return amis

    def record_ami(self, ami: RegisteredAmi, *, source_ami_id: str | None) -> None:
        self.s.catalog.add_ami(
            job_id=self.job_id,
            image_name=self.image.name,
            release=self.image.release,
            arch=self.image.arch,
            region=ami.region,
            ami_id=ami.ami_id,
            name=ami.name,
            flavour=ami.flavour.name,
            virtualization=ami.flavour.virtualization,
            storage=ami.flavour.storage,
            volume_type=ami.flavour.volume_type,
            encrypted=ami.flavour.encrypted,
            public=False,
            shared_with=[],
            snapshot_id=ami.snapshot_id,
            source_ami_id=source_ami_id,
            state="registered",
        )

    def test(self) -> None:
        script = self.config.aws.test
        runner = self.s.runner
        if not script or runner is None:
            log.warning("no test script configured: the test step is skipped")
            return
        # One boot per (virtualization, storage): volume types do not change what boots.
        tested: dict[tuple[str, str], RegisteredAmi] = {}
        for ami in self.amis:
            tested.setdefault((ami.flavour.virtualization, ami.flavour.storage), ami)
        source = self.request.source
        for ami in tested.values():
            self.emit_for_ami("test", "started", ami)
            outcome = runner.run(
                target=TestTarget(
                    ami=ami,
                    image_name=self.image.name,
                    image_url=self.image.url,
                    image_path=str(source.path) if source.path else None,
                    arch=self.image.arch,
                    endpoint_url=self.s.endpoint_url,
                ),
                script=script,
                timeout=self.config.aws.test_timeout,
            )
            if not outcome.passed:
                self.emit_for_ami("test", "failed", ami, data=outcome.output or outcome.reason)
                raise EC2TestException(
                    f"test of {ami.ami_id} ({ami.flavour.name}) in {ami.region} failed: "
                    f"{outcome.reason}",
                    output=outcome.output,
                )
            self.emit_for_ami("test", "completed", ami)
            log.info("test of %s passed in %.1fs", ami.ami_id, outcome.seconds)

    def replicate(self) -> None:
        assert self.upload is not None
        upload = self.upload
        by_flavour = {ami.flavour.name: ami for ami in self.amis}
        others = self.regions[1:]

        def one_region(region: str) -> tuple[list[RegisteredAmi], bool]:
            ec2 = self.s.clients.ec2(region)
            snapshot_id, copied = copy_snapshot(
                request=CopyRequest(
                    source_region=self.base,
                    snapshot_id=upload.snapshot_id,
                    region=region,
                    image_sha256=upload.sha256_compressed,
                    description=self.description(),
                    tags={**self.base_tags(), "Name": self.image.name},
                ),
                ec2=ec2,
                on_created=lambda sid: self.ledger.record(
                    region=region, kind="snapshot", resource_id=sid
                ),
            )
            amis = self.register_in(region, snapshot_id)
            for ami in amis:
                source = by_flavour[ami.flavour.name]
                self.record_ami(ami, source_ami_id=source.ami_id)
                self.emit_for_ami("copy", "completed", ami, source_ami_id=source.ami_id)
            return amis, copied

        outcomes = fan_out(others, one_region, parallelism=self.config.aws.parallel_regions)
        for outcome in outcomes:
            if outcome.ok and outcome.value is not None:
                amis, copied = outcome.value
                self.amis.extend(amis)
                self.copies["snapshot"] += int(copied)
        best_effort = set(self.config.aws.best_effort_regions)
        self.failed_regions = [o.region for o in outcomes if not o.ok]
        error = failed_regions_error(outcomes, best_effort=best_effort)
        if error is not None:
            raise error

    def publish(self) -> None:
        if not self.config.aws.make_public:
            log.info("make_public is off: AMIs stay private")
            return

        def one_region(region: str) -> None:
            ec2 = self.s.clients.ec2(region)
            for ami in [a for a in self.amis if a.region == region]:
                make_public(ec2, region=region, ami_id=ami.ami_id, snapshot_id=ami.snapshot_id)
                self.public.add(ami.ami_id)
                self.s.catalog.update_ami(
                    region=region, ami_id=ami.ami_id, public=True, state="public"
                )
                self.emit_for_ami("publish", "completed", ami)

        regions = list(dict.fromkeys(a.region for a in self.amis))
        outcomes = fan_out(regions, one_region, parallelism=self.config.aws.parallel_regions)
        error = failed_regions_error(outcomes, best_effort=set())
        if error is not None:
            raise error

    # --- the end ---------------------------------------------------------------------------

    def fail(self, exc: FedimgError) -> PublishResult:
        log.error("job %s failed: %s", self.job_id, exc)
        if self.step == "upload":
            self.emit_for_flavours("upload", "failed", self.base, data=str(exc))
        elif self.step in ("copy", "publish"):
            for region in self.failed_regions or [self.base]:
                self.emit_for_flavours(self.step, "failed", region, data=str(exc))
        keep = not self.config.general.clean_up_on_failure or (
            isinstance(exc, EC2TestException) and not self.config.general.delete_images_on_failure
        )
        if keep:
            for entry in self.ledger.active:
                self.ledger.release(entry.resource_id, state="kept")
            self.s.catalog.set_amis_state(self.job_id, "kept")
        else:
            leftover = set(self.ledger.cleanup())
            if leftover:
                log.error("could not remove: %s (fedimg gc will find them)", ", ".join(leftover))
            self.amis = [a for a in self.amis if a.ami_id in leftover]
            self.s.catalog.set_amis_state(self.job_id, "deleted", keep_ids=leftover)
        status = "interrupted" if isinstance(exc, Interrupted) else "failed"
        self.s.catalog.update_job(self.job_id, status=status, error=str(exc))
        self.finish(status, error=str(exc))
        return self.result(status=status, error=str(exc), exit_code=exc.exit_code or EXIT_FAILED)

    def finish(self, status: str, error: str | None = None) -> None:
        primary: dict[str, str] = {}
        for ami in self.amis:
            primary.setdefault(ami.region, ami.ami_id)
        self.s.messenger.emit(
            JobFinished(
                job_id=self.job_id,
                image=self.image,
                status=status,  # type: ignore[arg-type]
                regions=primary,
                error=error,
            )
        )

    def result(self, *, status: str, error: str | None, exit_code: int) -> PublishResult:
        amis = tuple(
            AmiResult(
                region=a.region,
                id=a.ami_id,
                name=a.name,
                flavour=a.flavour.name,
                virtualization=a.flavour.virtualization,
                storage=a.flavour.storage,
                volume_type=a.flavour.volume_type,
                encrypted=a.flavour.encrypted,
                public=a.ami_id in self.public,
                snapshot_id=a.snapshot_id,
            )
            for a in self.amis
        )
        return PublishResult(
            job_id=self.job_id,
            status=status,
            image=self.image,
            amis=amis,
            copies=dict(self.copies),
            failed_regions=tuple(self.failed_regions),
            upload=self.upload,
            error=error,
            exit_code=exit_code,
        )


def _fingerprint(source: ImageSource) -> str:
    """A cheap identity of an image whose checksum is not known yet (name, size, mtime)."""
    if source.path is not None:
        stat = source.path.stat()
        key = f"{source.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    else:
        key = source.url
    return hashlib.sha256(key.encode()).hexdigest()


__all__ = [
    "AmiResult",
    "EC2Service",
    "PublishRequest",
    "PublishResult",
    "resolve_regions",
]

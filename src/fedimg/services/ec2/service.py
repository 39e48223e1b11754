"""The EC2 service, the orchestrator: the only place that knows the order of the steps.

    1. resolve the regions and the AMI matrix (bad config fails here, before any AWS resource)
    2. get the image bytes into one EBS snapshot in the base region      (upload_direct,
       or upload_utility with upload_method = "utility")
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

import datetime as dt
import hashlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from fedimg.aws import ClientFactory
from fedimg.catalog import AmiFilter, Catalog
from fedimg.checkpoints import checkpoint
from fedimg.config import Config
from fedimg.errors import EXIT_FAILED, EXIT_OK, ConfigError, FedimgError, InputError, Interrupted
from fedimg.events import ImageInfo, JobFinished, Step, StepEvent
from fedimg.messages import Messenger
from fedimg.progress import CallbackProgress, FanOutProgress, NullProgress, Progress
from fedimg.services.ec2.errors import EC2TestException, aws_call
from fedimg.services.ec2.flavours import (
    AmiAttributes,
    Flavour,
    MatrixContext,
    attributes_for,
    choose_flavours,
    parse_flavour,
)
from fedimg.services.ec2.gc import LIVE_WINDOW
from fedimg.services.ec2.instance_store import (
    BuiltBundle,
    bucket_for,
    ensure_bucket,
    make_bundle,
    missing_bundle_settings,
    upload_bundle,
)
from fedimg.services.ec2.preflight import preflight
from fedimg.services.ec2.register import RegisteredAmi, RegisterRequest, register_flavours
from fedimg.services.ec2.replicate import (
    CopyRequest,
    copy_snapshot,
    failed_regions_error,
    fan_out,
    make_public,
    share,
)
from fedimg.services.ec2.resources import (
    TAG_COMPOSE,
    TAG_JOB,
    TAG_ROLE,
    TAG_SHA256,
    TEMPORARY_KINDS,
    ResourceLedger,
    snapshot_completed,
    tag_list,
)
from fedimg.services.ec2.ssh import InstanceSeam, default_seam
from fedimg.services.ec2.testing import TestRunner, TestTarget
from fedimg.services.ec2.upload_direct import (
    DirectUploadRequest,
    DirectUploadResult,
    upload_direct,
)
from fedimg.services.ec2.upload_utility import (
    UtilityUploadRequest,
    upload_utility,
    utility_entry,
)
from fedimg.source import ImageSource, resolve_source

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
    shared_with: tuple[str, ...] = ()


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
                    "shared_with": list(a.shared_with),
                    "snapshot_id": a.snapshot_id or None,
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
        seam: InstanceSeam | None = None,
        gate: TestRunner | None = None,
    ) -> None:
        self.config = config
        self.clients = clients
        self.catalog = catalog
        self.messenger = messenger
        self.runner = runner
        #: Tests the source image before upload (``test_before_upload``): the qemu runner.
        self.gate = gate
        self.progress = progress or NullProgress()
        self.endpoint_url = endpoint_url
        #: Set it (e.g. from a SIGTERM handler) to stop starting new regions; the job then
        #: ends as ``interrupted`` and can be resumed.
        self.stop = threading.Event()
        # Where the utility instance is dialled (tests map it to a local sshd).
        self.seam = seam or default_seam(config.aws)

    # --- planning --------------------------------------------------------------------------

    def available_regions(self) -> list[str]:
        """Every region the target offers."""
        base = self.config.base_region()
        with aws_call("DescribeRegions", base):
            regions = self.clients.ec2(base).describe_regions()["Regions"]
        # AWS lists only enabled regions here; an emulator may list the rest too.
        return sorted(r["RegionName"] for r in regions if r.get("OptInStatus") != "not-opted-in")

    def plan(self, request: PublishRequest) -> tuple[list[str], list[Flavour]]:
        """(regions, flavours) the request would publish; raises ConfigError if impossible."""
        regions = resolve_regions(self.config, request.regions, self.available_regions())
        arch = request.source.arch
        context = MatrixContext(
            arch=arch,
            regions=tuple(regions),
            akis={r: self.config.aki_for(r, arch) for r in regions},
            bundle_missing=missing_bundle_settings(self.config.aws.bundle),
        )
        configured = list(request.flavours) if request.flavours else self.config.aws.flavours
        flavours = choose_flavours(
            configured,
            self.config.aws.volume_types,
            context,
            lambda flavour: self.attributes(flavour, arch),
        )
        if self.config.aws.upload_method == "import":
            raise ConfigError(
                "[aws] upload_method: 'import' is not available in this version "
                "(use 'direct' or 'utility')"
            )
        if self.config.aws.upload_method == "utility":
            utility_entry(self.config, regions[0])
        return regions, flavours

    def check_preflight(self, regions: list[str], flavours: list[Flavour], arch: str) -> None:
        """Raise :class:`ConfigError` naming every region whose pre-flight found a problem."""
        checks = preflight(
            clients=self.clients, config=self.config, regions=regions, flavours=flavours, arch=arch
        )
        bad = [c for c in checks if not c.ok]
        if bad:
            details = "; ".join(f"{c.region}: {', '.join(c.problems)}" for c in bad)
            raise ConfigError(f"pre-flight failed in {len(bad)} region(s): {details}")

    def attributes(self, flavour: Flavour, arch: str) -> AmiAttributes:
        """The attributes ``flavour`` is registered with (config globals and overrides)."""
        return attributes_for(
            flavour,
            arch=arch,
            common=self.config.aws.attributes,
            overrides=self.config.aws.flavour_attributes,
        )

    # --- the job ---------------------------------------------------------------------------

    def publish(self, request: PublishRequest) -> PublishResult:
        """Run the whole service for one image. Never raises for a job failure: the result says.

        Raises only for programming errors; every :class:`FedimgError` becomes a failed result
        with its exit code, after cleanup and a ``failed`` message.
        """
        source = request.source
        image = _image_info(request, sha256=request.expected_sha256)
        try:
            regions, flavours = self.plan(request)
            if self.config.aws.preflight:
                self.check_preflight(regions, flavours, source.arch)
        except FedimgError as exc:
            return self.reject(image, exc)
        fingerprint = config_fingerprint(self.config)
        unfinished = self.find_unfinished(request, fingerprint)
        if unfinished is not None:
            log.info("resuming unfinished job %s of %s", unfinished, source.name)
            return self.resume(unfinished)
        job = self.catalog.create_job(
            image_name=source.name,
            image_url=source.url,
            arch=source.arch,
            image_sha256=request.expected_sha256,
            compose_id=request.compose_id,
            release=request.release,
            config_fingerprint=fingerprint,
        )
        self.catalog.update_job(
            job.id,
            state={
                "regions": regions,
                "flavours": [f.name for f in flavours],
                "request": _request_state(request),
                "identity": _identity(request),
            },
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

    def find_unfinished(self, request: PublishRequest, fingerprint: str) -> str | None:
        """An earlier job of the same image and configuration that can be resumed, if any.

        Resumable: interrupted, failed for a reason other than bad input or a failed test, or
        ``running`` but silent for :data:`STALE_AFTER` (its process died).
        """
        identity = _identity(request)
        for job in self.catalog.jobs(limit=200):
            if job.config_fingerprint != fingerprint or job.state.get("identity") != identity:
                continue
            if _resumable(job.status, job.state, job.updated_at):
                return job.id
        return None

    def resume(self, job_id: str, *, only_failed_regions: bool = False) -> PublishResult:
        """Continue a job from where it stopped; ``only_failed_regions`` redoes only the regions
        a partial job missed. Every step is idempotent, so work already done is found, not redone.

        Raises :class:`InputError` for an unknown job or one whose source is gone.
        """
        job = self.catalog.get_job(job_id)
        if job is None:
            raise InputError(f"no job {job_id!r} in the catalog")
        stored = job.state.get("request")
        if not stored:
            raise InputError(f"job {job.id} was rejected before it started; nothing to resume")
        if job.status == "published":
            raise InputError(f"job {job.id} is already published")
        source = resolve_source(stored["location"], arch=stored.get("arch"))
        request = PublishRequest(
            source=source,
            compose_id=stored.get("compose_id"),
            release=stored.get("release"),
            subvariant=stored.get("subvariant"),
            regions=tuple(stored["regions"]) if stored.get("regions") else None,
            flavours=tuple(stored["flavours"]) if stored.get("flavours") else None,
            expected_sha256=stored.get("expected_sha256"),
            workers=stored.get("workers"),
        )
        flavours = [parse_flavour(name) for name in job.state["flavours"]]
        regions = list(job.state["regions"])
        self.catalog.update_job(job.id, status="running", error=None)
        image = _image_info(request, sha256=job.image_sha256 or request.expected_sha256)
        run = _JobRun(
            service=self,
            job_id=job.id,
            request=request,
            image=image,
            regions=regions,
            flavours=flavours,
        )
        return run.execute(resume_state=job.state, only_failed_regions=only_failed_regions)

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
        self.shared: dict[str, tuple[str, ...]] = {}
        self.done_regions: set[str] = set()
        self.published: set[str] = set()
        self.prior_amis: list[RegisteredAmi] = []
        self.bundle: BuiltBundle | None = None
        self.lock = threading.Lock()
        # Set by the CLI's signal handler: regions not yet started are not started.
        self.stop = service.stop
        self.step: Step = "upload"
        self.copies = {"snapshot": 0, "image": 0}
        self.upload: DirectUploadResult | None = None
        self.failed_regions: list[str] = []
        #: The source image passed the boot test before upload (this run or a resumed one).
        self.pretested = False

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
        self.s.catalog.update_job(self.job_id, step=name)
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

    def execute(
        self, *, resume_state: dict[str, Any] | None = None, only_failed_regions: bool = False
    ) -> PublishResult:
        state = resume_state or {}
        try:
            if state:
                self.restore(state, only_failed_regions=only_failed_regions)
            self.step = "upload"
            if self.upload is None and self.s.gate is not None and not state.get("pretested"):
                # Before anything exists in AWS: a failure here leaves nothing to clean up.
                self.timed_step("boot-test", self.base, self.test_source)
                self.pretested = True
                self.s.catalog.update_job(self.job_id, state={"pretested": True})
            if self.upload is None:
                self.emit_for_flavours("upload", "started", self.base)
                self.upload = self.timed_step("upload", self.base, self.upload_image)
                checkpoint("after-upload")
                self.amis = self.timed_step("register", self.base, self.register_base)
                for ami in self.amis:
                    self.emit_for_ami("upload", "completed", ami)
            else:
                self.amis = self.timed_step("register", self.base, self.register_base)
            checkpoint("after-register")
            self.step = "test"
            if not state.get("tested"):
                self.timed_step("test", self.base, self.test)
                self.s.catalog.update_job(self.job_id, state={"tested": True})
            checkpoint("after-test")
            self.step = "copy"
            self.timed_step("replicate", None, self.replicate)
            checkpoint("after-replicate")
            self.step = "publish"
            self.timed_step("publish", None, self.publish)
            checkpoint("after-publish")
        except FedimgError as exc:
            return self.fail(exc)
        except KeyboardInterrupt:
            return self.fail(Interrupted("interrupted; the job can be resumed (fedimg resume)"))
        finally:
            if self.bundle is not None:
                self.bundle.close()
        for entry in self.ledger.active:
            self.ledger.release(entry.resource_id, state="kept")
        status = "partial" if self.failed_regions else "published"
        self.s.catalog.update_job(
            self.job_id, status=status, step="done", error=None, state={"resumable": False}
        )
        self.finish(status)
        return self.result(status=status, error=None, exit_code=EXIT_OK)

    def restore(self, state: dict[str, Any], *, only_failed_regions: bool) -> None:
        """Pick a stopped job up: clear what its dead process left half-made, reload its work."""
        self.ledger.adopt_previous()
        upload = state.get("upload")
        if upload and self.snapshot_usable(upload["snapshot_id"]):
            self.upload = DirectUploadResult(**upload)
            self.image = replace(self.image, sha256=upload["sha256_compressed"])
        done = set(state.get("done_regions", []))
        if only_failed_regions:
            failed = set(state.get("failed_regions", []))
            done |= {r for r in self.regions[1:] if r not in failed}
        self.done_regions = done
        self.published = set(state.get("published", []))
        self.pretested = bool(state.get("pretested"))
        for row in self.s.catalog.amis(AmiFilter(job_id=self.job_id)):
            if row.state == "deleted" or row.region not in done:
                continue
            self.prior_amis.append(
                RegisteredAmi(
                    region=row.region,
                    ami_id=row.ami_id,
                    name=row.name,
                    flavour=parse_flavour(row.flavour),
                    snapshot_id=row.snapshot_id or "",
                    reused=True,
                )
            )

    def snapshot_usable(self, snapshot_id: str) -> bool:
        """True if the uploaded snapshot still exists and is complete."""
        return snapshot_completed(self.s.clients, self.base, snapshot_id)

    def upload_image(self) -> DirectUploadResult:
        source = self.request.source
        identity = self.request.expected_sha256 or _fingerprint(source)
        # One token per upload attempt: botocore's retries of StartSnapshot reuse it (no second
        # snapshot), while a resumed job whose pending snapshot was discarded gets a fresh one.
        job = self.s.catalog.get_job(self.job_id)
        attempt = int((job.state if job else {}).get("upload_attempts", 0)) + 1
        self.s.catalog.update_job(self.job_id, state={"upload_attempts": attempt})
        token = hashlib.sha256(f"{identity}:{self.job_id}:{attempt}".encode()).hexdigest()[:64]
        tags = {**self.base_tags(), TAG_ROLE: "root-snapshot", "Name": source.name}
        if self.config.aws.upload_method == "utility":
            result = self.upload_with_utility(token=token, tags=tags)
        else:
            result = self.upload_with_direct(token=token, tags=tags)
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
            state={"snapshot_id": result.snapshot_id, "upload": asdict(result)},
        )
        return result

    def upload_with_direct(self, *, token: str, tags: dict[str, str]) -> DirectUploadResult:
        return upload_direct(
            request=DirectUploadRequest(
                source=self.request.source,
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
            # The CLI's progress, and the catalog's for the dashboard's live view.
            progress=FanOutProgress(
                self.s.progress,
                CallbackProgress(lambda p: self.s.catalog.set_progress(self.job_id, p)),
            ),
        )

    def upload_with_utility(self, *, token: str, tags: dict[str, str]) -> DirectUploadResult:
        aws = self.config.aws
        entry = utility_entry(self.config, self.base)
        return upload_utility(
            request=UtilityUploadRequest(
                source=self.request.source,
                region=self.base,
                utility_ami=entry.ami,
                utility_aki=entry.aki,
                client_token=token,
                name=f"fedimg-{self.job_id}-utility",
                tags=tags,
                description=self.description(),
                settings=aws,
                endpoint_url=self.s.endpoint_url,
                volume_size_gib=aws.util_volume_size or aws.volume_size,
                expected_sha256=self.request.expected_sha256,
                require_disk_label=True,
            ),
            ec2=self.s.clients.ec2(self.base),
            tracker=self.ledger,
            seam=self.s.seam,
            progress=self.s.progress,
        )

    def needs(self, storage: str) -> bool:
        """True if some row of the job has this storage."""
        return any(f.storage == storage for f in self.flavours)

    def register_in(
        self, region: str, snapshots: dict[str, str], image_location: str | None
    ) -> list[RegisteredAmi]:
        assert self.upload is not None
        arch = self.image.arch
        return register_flavours(
            request=RegisterRequest(
                region=region,
                snapshots=snapshots,
                flavours=tuple(self.flavours),
                image_name=self.config.aws.name_prefix or self.image.name,
                image_sha256=self.upload.sha256_compressed,
                arch=arch,
                volume_size_gib=self.upload.volume_size_gib,
                kernel_id=self.config.aki_for(region, arch),
                description=self.description(),
                tags=self.base_tags(),
                attributes=lambda flavour: self.s.attributes(flavour, arch),
                image_location=image_location,
            ),
            ec2=self.s.clients.ec2(region),
            # Only AMIs this job registers are its own to clean up; one found from an earlier
            # job of the same image (perhaps already public) is never deregistered by this one.
            on_registered=lambda ami: (
                None
                if ami.reused
                else self.ledger.record(region=region, kind="image", resource_id=ami.ami_id)
            ),
        )

    def copy_into(self, region: str, *, encrypted: bool) -> tuple[str, bool]:
        """The base snapshot copied into ``region`` (encrypted with the region's KMS key if
        asked), found again if an earlier run made it. Returns (snapshot id, copied now)."""
        assert self.upload is not None
        upload = self.upload
        extra_tags = self.config.aws.attributes.tags
        return copy_snapshot(
            request=CopyRequest(
                source_region=self.base,
                snapshot_id=upload.snapshot_id,
                region=region,
                image_sha256=upload.sha256_compressed,
                description=self.description(),
                tags={**extra_tags, **self.base_tags(), "Name": self.image.name},
                encrypted=encrypted,
                kms_key_id=self.config.aws.kms_keys.get(region) if encrypted else None,
            ),
            ec2=self.s.clients.ec2(region),
            on_created=lambda sid: self.ledger.record(
                region=region, kind="snapshot", resource_id=sid
            ),
        )

    def bundle_location(self, region: str) -> str:
        """Upload the instance-store bundle (built once) into ``region``'s bucket."""
        settings = self.config.aws.bundle
        if self.bundle is None:
            self.bundle = make_bundle(
                source=self.request.source,
                settings=settings,
                name=self.image.name,
                arch=self.image.arch,
            )
        s3 = self.s.clients.s3(region)
        bucket = bucket_for(settings, region)
        ensure_bucket(s3, region=region, bucket=bucket, create=settings.create_bucket)
        prefix = f"{settings.prefix}/{self.image.name}/{self.job_id}"
        return upload_bundle(
            s3=s3,
            region=region,
            bucket=bucket,
            prefix=prefix,
            bundle=self.bundle.bundle,
            tags={**self.base_tags(), TAG_ROLE: "bundle"},
            on_object=lambda key: self.ledger.record(
                region=region, kind="s3-object", resource_id=key
            ),
        )

    def prepare_region(self, region: str, plain_snapshot: str | None) -> list[RegisteredAmi]:
        """Everything a region's rows are registered from, then the registrations."""
        snapshots: dict[str, str] = {}
        if plain_snapshot is not None and self.needs("ebs"):
            snapshots["ebs"] = plain_snapshot
        if self.needs("ebs-encrypted"):
            encrypted, copied = self.copy_into(region, encrypted=True)
            snapshots["ebs-encrypted"] = encrypted
            self.count_copy(copied)
        location = self.bundle_location(region) if self.needs("instance-store") else None
        return self.register_in(region, snapshots, location)

    def count_copy(self, copied: bool) -> None:
        with self.lock:
            self.copies["snapshot"] += int(copied)

    def register_base(self) -> list[RegisteredAmi]:
        assert self.upload is not None
        amis = self.prepare_region(self.base, self.upload.snapshot_id)
        plain = [a for a in amis if a.flavour.storage == "ebs"]
        earlier = {a.snapshot_id for a in plain if a.reused}
        if plain and all(a.reused for a in plain) and len(earlier) == 1:
            # Every AMI of this image exists already (an earlier job): the snapshot just uploaded
            # is a duplicate. Drop it and continue from the earlier one, so replication finds the
            # earlier copies instead of copying again.
            (snapshot_id,) = earlier
            if snapshot_id != self.upload.snapshot_id:
                self.delete_base_snapshot(self.upload.snapshot_id)
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
            snapshot_id=ami.snapshot_id or None,
            source_ami_id=source_ami_id,
            state="registered",
        )

    def test_target(self, ami: RegisteredAmi | None) -> TestTarget:
        source = self.request.source
        return TestTarget(
            ami=ami,
            image_name=self.image.name,
            image_url=self.image.url,
            image_path=str(source.path) if source.path else None,
            arch=self.image.arch,
            endpoint_url=self.s.endpoint_url,
            job_id=self.job_id,
            tags=self.base_tags(),
            tracker=self.ledger,
        )

    def test_source(self) -> None:
        """The gate before upload: the source image boots and passes the test script.

        No ``image.test`` message: its schema needs an AMI id, and there is none yet. A failure
        fails the job at its upload step (``image.upload failed`` with the test's output).
        """
        assert self.s.gate is not None and self.config.aws.test
        log.info("testing the source image %s before upload", self.image.name)
        outcome = self.s.gate.run(
            target=self.test_target(None),
            script=self.config.aws.test,
            timeout=self.config.aws.test_timeout,
        )
        if not outcome.passed:
            raise EC2TestException(
                f"test of the source image {self.image.name} before upload failed: "
                f"{outcome.reason}; nothing was uploaded",
                output=outcome.output,
            )
        log.info("the source image passed its test in %.1fs; uploading", outcome.seconds)

    def qemu_boots_snapshot(self, ami: RegisteredAmi) -> bool:
        from fedimg.services.ec2.testing_qemu import boots_snapshot

        return boots_snapshot(self.config.aws, ami)

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
        for ami in tested.values():
            if self.pretested and runner.name == "qemu" and not self.qemu_boots_snapshot(ami):
                # The qemu runner would boot the very bytes the gate booted before upload.
                log.info("%s: the source image it boots passed before upload", ami.ami_id)
                continue
            self.emit_for_ami("test", "started", ami)
            outcome = runner.run(
                target=self.test_target(ami),
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
        by_flavour = {ami.flavour.name: ami for ami in self.amis}
        others = self.regions[1:]

        def one_region(region: str) -> list[RegisteredAmi]:
            plain: str | None = None
            if self.needs("ebs"):
                plain, copied = self.copy_into(region, encrypted=False)
                self.count_copy(copied)
            amis = self.prepare_region(region, plain)
            for ami in amis:
                source = by_flavour[ami.flavour.name]
                self.record_ami(ami, source_ami_id=source.ami_id)
                self.emit_for_ami("copy", "completed", ami, source_ami_id=source.ami_id)
            return amis

        # Regions finished by an earlier run of this job keep their AMIs; the rest are done now.
        self.amis.extend(a for a in self.prior_amis if a.region in self.done_regions)
        todo = [r for r in others if r not in self.done_regions]
        outcomes = fan_out(
            todo, one_region, parallelism=self.config.aws.parallel_regions, stop=self.stop
        )
        for outcome in outcomes:
            if outcome.ok and outcome.value is not None:
                self.amis.extend(outcome.value)
                self.done_regions.add(outcome.region)
        if self.stop.is_set():
            raise KeyboardInterrupt
        best_effort = set(self.config.aws.best_effort_regions)
        self.failed_regions = [o.region for o in outcomes if not o.ok]
        self.s.catalog.update_job(
            self.job_id,
            state={
                "done_regions": sorted(self.done_regions),
                "failed_regions": self.failed_regions,
            },
        )
        error = failed_regions_error(outcomes, best_effort=best_effort)
        if error is not None:
            raise error
        self.drop_unused_upload()

    def drop_unused_upload(self) -> None:
        """Delete the uploaded snapshot when no row uses it (only encrypted or instance-store
        rows: it was just the source of their copies)."""
        assert self.upload is not None
        if self.needs("ebs"):
            return
        self.delete_base_snapshot(self.upload.snapshot_id)

    def delete_base_snapshot(self, snapshot_id: str) -> None:
        """Delete a snapshot of the base region this job made, and stop tracking it."""
        with aws_call("DeleteSnapshot", self.base, snapshot_id):
            self.s.clients.ec2(self.base).delete_snapshot(SnapshotId=snapshot_id)
        self.ledger.release(snapshot_id)

    def publish(self) -> None:
        if not self.config.aws.make_public:
            log.info("make_public is off: AMIs stay private")
            return
        accounts = self.config.aws.share_accounts

        def one_region(region: str) -> None:
            ec2 = self.s.clients.ec2(region)
            for ami in [a for a in self.amis if a.region == region]:
                if ami.ami_id in self.published:
                    self.mark_published(ami, announce=False)
                    continue
                if ami.flavour.encrypted:
                    # AWS forbids public encrypted AMIs: share with the configured accounts.
                    share(
                        ec2,
                        region=region,
                        ami_id=ami.ami_id,
                        snapshot_id=ami.snapshot_id,
                        accounts=accounts,
                    )
                    with self.lock:
                        self.shared[ami.ami_id] = tuple(accounts)
                    self.s.catalog.update_ami(
                        region=region, ami_id=ami.ami_id, shared_with=list(accounts), state="shared"
                    )
                else:
                    make_public(
                        ec2, region=region, ami_id=ami.ami_id, snapshot_id=ami.snapshot_id or None
                    )
                    with self.lock:
                        self.public.add(ami.ami_id)
                    self.s.catalog.update_ami(
                        region=region, ami_id=ami.ami_id, public=True, state="public"
                    )
                self.mark_published(ami, announce=True)

        regions = list(dict.fromkeys(a.region for a in self.amis))
        outcomes = fan_out(
            regions, one_region, parallelism=self.config.aws.parallel_regions, stop=self.stop
        )
        self.s.catalog.update_job(self.job_id, state={"published": sorted(self.published)})
        if self.stop.is_set():
            raise KeyboardInterrupt
        error = failed_regions_error(outcomes, best_effort=set())
        if error is not None:
            raise error

    def mark_published(self, ami: RegisteredAmi, *, announce: bool) -> None:
        """Remember that ``ami`` is public (or shared); announce it the first time only."""
        with self.lock:
            self.published.add(ami.ami_id)
            if not ami.flavour.encrypted:
                self.public.add(ami.ami_id)
            elif ami.ami_id not in self.shared:
                self.shared[ami.ami_id] = tuple(self.config.aws.share_accounts)
        if announce:
            self.emit_for_ami("publish", "completed", ami)

    # --- the end ---------------------------------------------------------------------------

    def fail(self, exc: FedimgError) -> PublishResult:
        log.error("job %s failed: %s", self.job_id, exc)
        if self.step == "upload":
            data = str(exc)
            if isinstance(exc, EC2TestException) and exc.output:
                data = f"{exc}\n{exc.output}"  # the gate's test output and console tail
            self.emit_for_flavours("upload", "failed", self.base, data=data)
        elif self.step in ("copy", "publish"):
            for region in self.failed_regions or [self.base]:
                self.emit_for_flavours(self.step, "failed", region, data=str(exc))
        # Bad input and a failed test make the job's products worthless: remove everything.
        # Any other failure (AWS, timeouts, interruption) removes only temporary resources and
        # keeps the snapshots, copies and AMIs made so far, so that `fedimg resume` continues.
        worthless = isinstance(exc, InputError) or (
            isinstance(exc, EC2TestException) and self.config.general.delete_images_on_failure
        )
        resumable = not worthless
        if not self.config.general.clean_up_on_failure:
            for entry in self.ledger.active:
                self.ledger.release(entry.resource_id, state="kept")
            self.s.catalog.set_amis_state(self.job_id, "kept")
        elif worthless:
            leftover = set(self.ledger.cleanup())
            if leftover:
                log.error("could not remove: %s (fedimg gc will find them)", ", ".join(leftover))
            self.amis = [a for a in self.amis if a.ami_id in leftover]
            self.s.catalog.set_amis_state(self.job_id, "deleted", keep_ids=leftover)
        else:
            leftover = set(self.ledger.cleanup(kinds=TEMPORARY_KINDS))
            if leftover:
                log.error("could not remove: %s (fedimg gc will find them)", ", ".join(leftover))
        status = "interrupted" if isinstance(exc, Interrupted) else "failed"
        self.s.catalog.update_job(
            self.job_id,
            status=status,
            error=str(exc),
            state={"resumable": resumable, "failed_step": self.step},
        )
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
                shared_with=self.shared.get(a.ami_id, ()),
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


#: A ``running`` job whose catalog row has not changed for this long lost its process (the
#: same window within which ``fedimg gc`` counts a running job as live).
STALE_AFTER = LIVE_WINDOW


def _image_info(request: PublishRequest, *, sha256: str | None) -> ImageInfo:
    """What the messages and the catalog say of the request's image."""
    source = request.source
    return ImageInfo(
        name=source.name,
        url=source.url,
        arch=source.arch,
        compose_id=request.compose_id,
        sha256=sha256,
        release=request.release,
        subvariant=request.subvariant,
    )


def _request_state(request: PublishRequest) -> dict[str, Any]:
    """What ``fedimg resume`` needs to rebuild the request (no secrets: a location and ids)."""
    source = request.source
    return {
        "location": str(source.path) if source.path else source.url,
        "arch": source.arch,
        "compose_id": request.compose_id,
        "release": request.release,
        "subvariant": request.subvariant,
        "regions": list(request.regions) if request.regions else None,
        "flavours": list(request.flavours) if request.flavours else None,
        "expected_sha256": request.expected_sha256,
        "workers": request.workers,
    }


def _identity(request: PublishRequest) -> str:
    """What makes two requests the same image: its checksum if known, else where it is."""
    return request.expected_sha256 or _fingerprint(request.source)


def _resumable(status: str, state: dict[str, Any], updated_at: dt.datetime) -> bool:
    if status == "interrupted":
        return True
    if status in ("failed", "partial"):
        return bool(state.get("resumable", status == "partial"))
    if status == "running":
        if updated_at.tzinfo is None:
            updated_at = updated_at.replace(tzinfo=dt.UTC)
        return dt.datetime.now(dt.UTC) - updated_at > STALE_AFTER
    return False


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

"""The catalog: jobs, images, AMIs, step timeline, resource ledger and message journal (SQLAlchemy).

SQLite under ``$XDG_STATE_HOME/fedimg/`` by default, any SQLAlchemy URL (PostgreSQL) by config. The
schema is created on first use. Every method is its own transaction, so a crash loses at most the
step in progress; the catalog is safe to share between threads (one engine, short sessions).

Nothing secret is ever stored here: the callers pass ids, names and message bodies only.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    cast,
    create_engine,
    distinct,
    event,
    func,
    or_,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.sql.elements import ColumnElement


def utcnow() -> dt.datetime:
    """Now, timezone-aware UTC."""
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    """Declarative base of the catalog's tables."""


class Job(Base):
    """One run of the EC2 service for one image and one configuration."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    image_name: Mapped[str] = mapped_column(String(255), index=True)
    image_url: Mapped[str] = mapped_column(Text)
    image_sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    sha256_raw: Mapped[str | None] = mapped_column(String(64))
    arch: Mapped[str] = mapped_column(String(16))
    compose_id: Mapped[str | None] = mapped_column(String(255), index=True)
    release: Mapped[str | None] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    step: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    config_fingerprint: Mapped[str | None] = mapped_column(String(64), index=True)
    state: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Ami(Base):
    """An AMI fedimg registered (or copied) in one region for one flavour."""

    __tablename__ = "amis"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    image_name: Mapped[str] = mapped_column(String(255), index=True)
    release: Mapped[str | None] = mapped_column(String(64), index=True)
    arch: Mapped[str] = mapped_column(String(16), index=True)
    region: Mapped[str] = mapped_column(String(32), index=True)
    ami_id: Mapped[str] = mapped_column(String(32), index=True)
    name: Mapped[str] = mapped_column(String(255))
    flavour: Mapped[str] = mapped_column(String(64), index=True)
    virtualization: Mapped[str] = mapped_column(String(16))
    storage: Mapped[str] = mapped_column(String(32))
    volume_type: Mapped[str | None] = mapped_column(String(16))
    encrypted: Mapped[bool] = mapped_column(Boolean, default=False)
    public: Mapped[bool] = mapped_column(Boolean, default=False)
    shared_with: Mapped[list[str]] = mapped_column(JSON, default=list)
    snapshot_id: Mapped[str | None] = mapped_column(String(32))
    source_ami_id: Mapped[str | None] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class StepRecord(Base):
    """One step of a job's timeline (upload, register, test, replicate, publish...)."""

    __tablename__ = "steps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    name: Mapped[str] = mapped_column(String(32))
    region: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class ResourceRecord(Base):
    """The ledger: a temporary AWS resource fedimg created, and whether it was cleaned up."""

    __tablename__ = "resources"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36), index=True)
    region: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(32))
    resource_id: Mapped[str] = mapped_column(String(128), index=True)
    state: Mapped[str] = mapped_column(String(16), default="active")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    released_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class MessageRecord(Base):
    """The journal (and outbox): every message fedimg sent, in order."""

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    msg_id: Mapped[str] = mapped_column(String(64), unique=True)
    topic: Mapped[str] = mapped_column(String(255), index=True)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    headers: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    timestamp: Mapped[float] = mapped_column(Float, index=True)
    job_id: Mapped[str | None] = mapped_column(String(36), index=True)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)


@dataclass(frozen=True)
class AmiFilter:
    """Filters of :meth:`Catalog.amis`; None means any."""

    image_name: str | None = None
    region: str | None = None
    arch: str | None = None
    release: str | None = None
    flavour: str | None = None
    job_id: str | None = None


#: Job statuses whose AMIs are released: :meth:`Catalog.latest_amis` answers from these only.
RELEASED_JOB_STATUSES = ("published", "partial")
#: AMI states that are not for users: gone, or kept for inspection after a failed test.
UNUSABLE_AMI_STATES = ("deleted", "kept")


@dataclass(frozen=True)
class JobFilter:
    """Filters of :meth:`Catalog.find_jobs`; None means any.

    ``region`` and ``flavour`` match the jobs that recorded an AMI in that region or of that flavour.
    """

    image_name: str | None = None
    release: str | None = None
    compose_id: str | None = None
    arch: str | None = None
    status: str | None = None
    region: str | None = None
    flavour: str | None = None


@dataclass(frozen=True)
class MessageQuery:
    """A journal search (:meth:`Catalog.search_messages`), shaped after datagrepper's ``/raw``.

    ``topic_groups``: the topics within a group are OR-ed, the groups AND-ed (datagrepper's topic and
    category filters become one group each; an empty group matches nothing). ``contains``:
    substrings of the JSON body, OR-ed. ``start``/``end``: epoch seconds, inclusive.
    """

    topic_groups: tuple[tuple[str, ...], ...] = ()
    not_topics: tuple[str, ...] = ()
    contains: tuple[str, ...] = ()
    job_id: str | None = None
    start: float | None = None
    end: float | None = None
    newest_first: bool = True
    limit: int = 25
    offset: int = 0


@dataclass(frozen=True)
class ImageSummary:
    """One image as the catalog knows it: its newest job, and its AMIs that are not deleted."""

    image_name: str
    arch: str
    release: str | None
    compose_id: str | None
    jobs: int
    latest_job_id: str
    latest_status: str
    latest_at: dt.datetime
    amis: int
    regions: int


def _ami_conditions(filters: AmiFilter) -> list[ColumnElement[bool]]:
    return [
        column == value
        for column, value in (
            (Ami.image_name, filters.image_name),
            (Ami.region, filters.region),
            (Ami.arch, filters.arch),
            (Ami.release, filters.release),
            (Ami.flavour, filters.flavour),
            (Ami.job_id, filters.job_id),
        )
        if value is not None
    ]


def _count_amis(session: Session, key: Any, keys: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(AMIs, regions) per value of ``key`` (an Ami column) among ``keys``; deleted AMIs not counted."""
    rows = session.execute(
        select(key, func.count(Ami.id), func.count(distinct(Ami.region)))
        .where(key.in_(list(keys)), Ami.state != "deleted")
        .group_by(key)
    )
    return {value: (int(amis), int(regions)) for value, amis, regions in rows}


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the dashboard read while an upload writes; the busy timeout absorbs short locks.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def _with_installed_driver(url: str) -> str:
    """``postgresql://`` means psycopg 3 to SQLAlchemy 2.1; use psycopg2 when only it exists."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


class Catalog:
    """Access to the catalog at ``url``; creates the schema (and SQLite's directory) on first use."""

    def __init__(self, url: str) -> None:
        url = _with_installed_driver(url)
        self.url = url
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(url, future=True, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Release the connection pool."""
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session committed on success, rolled back on error."""
        with self._sessions() as session, session.begin():
            yield session

    # --- jobs ----------------------------------------------------------------------------------

    def create_job(
        self,
        *,
        image_name: str,
        image_url: str,
        arch: str,
        image_sha256: str | None,
        compose_id: str | None,
        release: str | None,
        config_fingerprint: str | None,
    ) -> Job:
        """Record a new running job and return it."""
        job = Job(
            id=str(uuid.uuid4()),
            image_name=image_name,
            image_url=image_url,
            arch=arch,
            image_sha256=image_sha256,
            compose_id=compose_id,
            release=release,
            status="running",
            config_fingerprint=config_fingerprint,
            state={},
            progress={},
        )
        with self.session() as session:
            session.add(job)
        return job

    def get_job(self, job_id: str) -> Job | None:
        """The job with this id (a unique prefix of at least 8 characters works too)."""
        with self.session() as session:
            job = session.get(Job, job_id)
            if job is None and len(job_id) >= 8:
                found = session.scalars(select(Job).where(Job.id.startswith(job_id))).all()
                job = found[0] if len(found) == 1 else None
            return job

    def update_job(self, job_id: str, **changes: Any) -> None:
        """Set fields of a job; ``state`` entries are merged into the stored state."""
        with self.session() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise KeyError(job_id)
            state_update = changes.pop("state", None)
            for key, value in changes.items():
                setattr(job, key, value)
            if state_update:
                job.state = {**(job.state or {}), **state_update}
            job.updated_at = utcnow()

    def set_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        """Store the job's live progress (bytes done, total, rate) for the dashboard."""
        self.update_job(job_id, progress=progress)

    def jobs(self, *, limit: int = 50, offset: int = 0, status: str | None = None) -> list[Job]:
        """Jobs, newest first."""
        with self.session() as session:
            query = select(Job).order_by(Job.created_at.desc(), Job.id)
            if status:
                query = query.where(Job.status == status)
            return list(session.scalars(query.limit(limit).offset(offset)))

    # --- AMIs ----------------------------------------------------------------------------------

    def add_ami(self, **fields: Any) -> Ami:
        """Record an AMI, unless it is recorded already (then the existing row is returned)."""
        with self.session() as session:
            existing = session.scalars(
                select(Ami).where(Ami.ami_id == fields["ami_id"], Ami.region == fields["region"])
            ).first()
            if existing is not None:
                # An AMI's row is written once, by the job that registered it; a later job that
                # finds the AMI again (same image) neither takes it over nor resets its state.
                return existing
            ami = Ami(**fields)
            session.add(ami)
            return ami

    def update_ami(self, *, region: str, ami_id: str, **changes: Any) -> None:
        """Set fields of the AMI ``ami_id`` in ``region``."""
        with self.session() as session:
            for ami in session.scalars(
                select(Ami).where(Ami.ami_id == ami_id, Ami.region == region)
            ):
                for key, value in changes.items():
                    setattr(ami, key, value)

    def set_amis_state(self, job_id: str, state: str, *, keep_ids: set[str] | None = None) -> None:
        """Set the state of every AMI of a job (except ``keep_ids``)."""
        with self.session() as session:
            for ami in session.scalars(select(Ami).where(Ami.job_id == job_id)):
                if keep_ids is None or ami.ami_id not in keep_ids:
                    ami.state = state
                    if state == "deleted":
                        ami.public = False

    def amis(self, filters: AmiFilter | None = None, *, limit: int = 1000) -> list[Ami]:
        """AMIs matching ``filters``, newest first."""
        with self.session() as session:
            query = (
                select(Ami)
                .where(*_ami_conditions(filters or AmiFilter()))
                .order_by(Ami.created_at.desc(), Ami.id.desc())
            )
            return list(session.scalars(query.limit(limit)))

    # --- steps ---------------------------------------------------------------------------------

    def start_step(self, job_id: str, name: str, region: str | None = None) -> int:
        """Record a step as running; returns its id for :meth:`finish_step`."""
        with self.session() as session:
            record = StepRecord(job_id=job_id, name=name, region=region, status="running")
            session.add(record)
            session.flush()
            return record.id

    def finish_step(self, step_id: int, status: str, detail: str | None = None) -> None:
        """Close a step with ``status`` (completed, failed, skipped)."""
        with self.session() as session:
            record = session.get(StepRecord, step_id)
            if record is not None:
                record.status = status
                record.detail = detail
                record.finished_at = utcnow()

    def steps(self, job_id: str) -> list[StepRecord]:
        """A job's steps in the order they started."""
        with self.session() as session:
            query = select(StepRecord).where(StepRecord.job_id == job_id).order_by(StepRecord.id)
            return list(session.scalars(query))

    # --- ledger --------------------------------------------------------------------------------

    def record_resource(self, *, job_id: str, region: str, kind: str, resource_id: str) -> None:
        """Add a temporary resource to the ledger (state ``active``)."""
        with self.session() as session:
            session.add(
                ResourceRecord(job_id=job_id, region=region, kind=kind, resource_id=resource_id)
            )

    def release_resource(self, *, resource_id: str, state: str = "deleted") -> None:
        """Mark a ledger entry as gone (``deleted``) or kept on purpose (``kept``)."""
        with self.session() as session:
            for record in session.scalars(
                select(ResourceRecord).where(
                    ResourceRecord.resource_id == resource_id, ResourceRecord.state == "active"
                )
            ):
                record.state = state
                record.released_at = utcnow()

    def active_resources(self, job_id: str | None = None) -> list[ResourceRecord]:
        """Ledger entries not yet released (of one job, or all), newest first."""
        with self.session() as session:
            query = select(ResourceRecord).where(ResourceRecord.state == "active")
            if job_id is not None:
                query = query.where(ResourceRecord.job_id == job_id)
            return list(session.scalars(query.order_by(ResourceRecord.id.desc())))

    # --- messages ------------------------------------------------------------------------------

    def add_message(
        self,
        *,
        msg_id: str,
        topic: str,
        body: dict[str, Any],
        headers: dict[str, Any],
        timestamp: float,
        job_id: str | None,
        delivered: bool,
    ) -> None:
        """Append a message to the journal; ``delivered=False`` leaves it in the outbox."""
        with self.session() as session:
            session.add(
                MessageRecord(
                    msg_id=msg_id,
                    topic=topic,
                    body=body,
                    headers=headers,
                    timestamp=timestamp,
                    job_id=job_id,
                    delivered_at=utcnow() if delivered else None,
                )
            )

    def mark_delivered(self, msg_id: str) -> None:
        """Take a message out of the outbox."""
        with self.session() as session:
            for record in session.scalars(
                select(MessageRecord).where(MessageRecord.msg_id == msg_id)
            ):
                record.delivered_at = utcnow()
                record.attempts += 1

    def pending_messages(self, limit: int = 1000) -> list[MessageRecord]:
        """Messages waiting in the outbox, oldest first."""
        with self.session() as session:
            query = (
                select(MessageRecord)
                .where(MessageRecord.delivered_at.is_(None))
                .order_by(MessageRecord.id)
                .limit(limit)
            )
            return list(session.scalars(query))

    def messages(
        self,
        *,
        topics: Sequence[str] = (),
        job_id: str | None = None,
        start: float | None = None,
        end: float | None = None,
        newest_first: bool = True,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[list[MessageRecord], int]:
        """Journal messages matching the filters, and how many match in all."""
        with self.session() as session:
            query = select(MessageRecord)
            if topics:
                query = query.where(MessageRecord.topic.in_(list(topics)))
            if job_id:
                query = query.where(MessageRecord.job_id == job_id)
            if start is not None:
                query = query.where(MessageRecord.timestamp >= start)
            if end is not None:
                query = query.where(MessageRecord.timestamp <= end)
            total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
            order = MessageRecord.id.desc() if newest_first else MessageRecord.id.asc()
            rows = list(session.scalars(query.order_by(order).limit(limit).offset(offset)))
            return rows, int(total)

    def message(self, msg_id: str) -> MessageRecord | None:
        """One journal message by its id."""
        with self.session() as session:
            return session.scalars(
                select(MessageRecord).where(MessageRecord.msg_id == msg_id)
            ).first()

    # --- read-only queries (dashboard, JSON API, datagrepper /raw) -----------------------------

    def find_jobs(
        self, filters: JobFilter | None = None, *, limit: int = 50, offset: int = 0
    ) -> tuple[list[Job], int]:
        """Jobs matching ``filters``, newest first, and how many match in all."""
        filters = filters or JobFilter()
        with self.session() as session:
            query = select(Job)
            for column, value in (
                (Job.image_name, filters.image_name),
                (Job.release, filters.release),
                (Job.compose_id, filters.compose_id),
                (Job.arch, filters.arch),
                (Job.status, filters.status),
            ):
                if value is not None:
                    query = query.where(column == value)
            if filters.region is not None or filters.flavour is not None:
                has_ami = select(Ami.id).where(Ami.job_id == Job.id)
                if filters.region is not None:
                    has_ami = has_ami.where(Ami.region == filters.region)
                if filters.flavour is not None:
                    has_ami = has_ami.where(Ami.flavour == filters.flavour)
                query = query.where(has_ami.exists())
            total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
            ordered = query.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
            return list(session.scalars(ordered)), int(total)

    def job_facets(self) -> dict[str, list[str]]:
        """The values each dashboard filter can take: release, compose_id, arch, status (of jobs),
        region and flavour (of AMIs); each list sorted."""
        with self.session() as session:

            def values(column: Any) -> list[str]:
                return sorted({v for v in session.scalars(select(column).distinct()) if v})

            return {
                "release": values(Job.release),
                "compose_id": values(Job.compose_id),
                "arch": values(Job.arch),
                "status": values(Job.status),
                "region": values(Ami.region),
                "flavour": values(Ami.flavour),
            }

    def ami_counts(self, job_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        """(AMIs, regions) of each job, deleted AMIs not counted; jobs without AMIs are absent."""
        if not job_ids:
            return {}
        with self.session() as session:
            return _count_amis(session, Ami.job_id, job_ids)

    def find_amis(
        self,
        filters: AmiFilter | None = None,
        *,
        state: str | None = None,
        public: bool | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[list[Ami], int]:
        """AMIs matching ``filters`` (and ``state``, ``public``), newest first, and the total."""
        with self.session() as session:
            query = select(Ami).where(*_ami_conditions(filters or AmiFilter()))
            if state is not None:
                query = query.where(Ami.state == state)
            if public is not None:
                query = query.where(Ami.public.is_(public))
            total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
            ordered = (
                query.order_by(Ami.created_at.desc(), Ami.id.desc()).limit(limit).offset(offset)
            )
            return list(session.scalars(ordered)), int(total)

    def latest_amis(self, filters: AmiFilter | None = None) -> list[Ami]:
        """The newest released AMI per (arch, region, flavour) among those matching ``filters``.

        Released: from a job that published (fully or partly), and neither deleted nor kept after a
        failed test, so a job still running never answers. Sorted by arch, region, flavour.
        """
        newest_first = func.row_number().over(
            partition_by=(Ami.arch, Ami.region, Ami.flavour),
            order_by=(Ami.created_at.desc(), Ami.id.desc()),
        )
        ranked = (
            select(Ami.id.label("ami_row"), newest_first.label("rank"))
            .join(Job, Job.id == Ami.job_id)
            .where(
                Job.status.in_(RELEASED_JOB_STATUSES),
                Ami.state.not_in(UNUSABLE_AMI_STATES),
                *_ami_conditions(filters or AmiFilter()),
            )
            .subquery()
        )
        query = (
            select(Ami)
            .join(ranked, ranked.c.ami_row == Ami.id)
            .where(ranked.c.rank == 1)
            .order_by(Ami.arch, Ami.region, Ami.flavour)
        )
        with self.session() as session:
            return list(session.scalars(query))

    def images(
        self,
        *,
        image_name: str | None = None,
        release: str | None = None,
        arch: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[ImageSummary], int]:
        """Images (by name) with their newest job, newest first, and how many there are in all."""
        with self.session() as session:
            grouped = select(
                Job.image_name.label("image_name"),
                func.max(Job.created_at).label("latest_at"),
                func.count(Job.id).label("jobs"),
            ).group_by(Job.image_name)
            if image_name is not None:
                grouped = grouped.where(Job.image_name == image_name)
            if release is not None:
                grouped = grouped.where(Job.release == release)
            if arch is not None:
                grouped = grouped.where(Job.arch == arch)
            names_query = grouped.subquery()
            total = session.scalar(select(func.count()).select_from(names_query)) or 0
            page = session.execute(
                select(names_query.c.image_name, names_query.c.jobs)
                .order_by(names_query.c.latest_at.desc(), names_query.c.image_name)
                .limit(limit)
                .offset(offset)
            ).all()
            names = [row.image_name for row in page]
            newest: dict[str, Job] = {}
            for job in session.scalars(
                select(Job).where(Job.image_name.in_(names)).order_by(Job.created_at.desc(), Job.id)
            ):
                newest.setdefault(job.image_name, job)
            counts = _count_amis(session, Ami.image_name, names)
            summaries = []
            for row in page:
                job = newest[row.image_name]
                amis, regions = counts.get(row.image_name, (0, 0))
                summaries.append(
                    ImageSummary(
                        image_name=row.image_name,
                        arch=job.arch,
                        release=job.release,
                        compose_id=job.compose_id,
                        jobs=int(row.jobs),
                        latest_job_id=job.id,
                        latest_status=job.status,
                        latest_at=job.created_at,
                        amis=amis,
                        regions=regions,
                    )
                )
            return summaries, int(total)

    def message_topics(self) -> list[str]:
        """Every distinct topic in the journal, sorted."""
        with self.session() as session:
            return sorted(session.scalars(select(MessageRecord.topic).distinct()))

    def search_messages(self, query: MessageQuery) -> tuple[list[MessageRecord], int]:
        """Journal messages matching ``query`` (by timestamp), and how many match in all."""
        with self.session() as session:
            statement = select(MessageRecord)
            for group in query.topic_groups:
                statement = statement.where(MessageRecord.topic.in_(list(group)))
            if query.not_topics:
                statement = statement.where(MessageRecord.topic.not_in(list(query.not_topics)))
            if query.contains:
                body = cast(MessageRecord.body, Text)
                statement = statement.where(
                    or_(*(body.contains(text, autoescape=True) for text in query.contains))
                )
            if query.job_id is not None:
                statement = statement.where(MessageRecord.job_id == query.job_id)
            if query.start is not None:
                statement = statement.where(MessageRecord.timestamp >= query.start)
            if query.end is not None:
                statement = statement.where(MessageRecord.timestamp <= query.end)
            total = session.scalar(select(func.count()).select_from(statement.subquery())) or 0
            if query.newest_first:
                order = (MessageRecord.timestamp.desc(), MessageRecord.id.desc())
            else:
                order = (MessageRecord.timestamp.asc(), MessageRecord.id.asc())
            rows = session.scalars(
                statement.order_by(*order).limit(query.limit).offset(query.offset)
            )
            return list(rows), int(total)

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
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker


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


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the dashboard read while an upload writes; the busy timeout absorbs short locks.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


class Catalog:
    """Access to the catalog at ``url``; creates the schema (and SQLite's directory) on first use."""

    def __init__(self, url: str) -> None:
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
        """Record an AMI; an existing row for the same AMI id is updated instead."""
        with self.session() as session:
            existing = session.scalars(
                select(Ami).where(Ami.ami_id == fields["ami_id"], Ami.region == fields["region"])
            ).first()
            if existing is not None:
                for key, value in fields.items():
                    setattr(existing, key, value)
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
        filters = filters or AmiFilter()
        with self.session() as session:
            query = select(Ami).order_by(Ami.created_at.desc(), Ami.id.desc())
            for column, value in (
                (Ami.image_name, filters.image_name),
                (Ami.region, filters.region),
                (Ami.arch, filters.arch),
                (Ami.release, filters.release),
                (Ami.flavour, filters.flavour),
                (Ami.job_id, filters.job_id),
            ):
                if value is not None:
                    query = query.where(column == value)
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

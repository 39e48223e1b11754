"""Messages: events become fedimg's legacy bus messages, written to the journal, then delivered.

Every message is first written to the catalog's journal (which doubles as the outbox), then handed
to each configured publisher. A publisher that fails leaves the message in the outbox for a later
delivery; it never fails the upload. The journal alone (the default) needs no broker.

Legacy topics and bodies are exactly those of fedimg 2.x (see ``fedimg_messages``):
``fedimg.image.upload`` / ``.test`` (status started|completed|failed), ``fedimg.image.copy``,
``fedimg.image.publish``. A job that ends published (or partial) also gets the successor's
per-image summary, ``fedora_image_uploader.published.v1.aws.<subvariant>.<release>.<arch>``
(:mod:`fedimg.successor`). The AMQP publisher is :class:`fedimg.bus.AmqpPublisher`.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TextIO

from fedimg.catalog import Catalog
from fedimg.events import Event, JobFinished, StepEvent

log = logging.getLogger(__name__)

SERVICE = "EC2"
#: Test output in a failed message is cut to this many bytes (the tail is kept: it says why).
MAX_DATA_BYTES = 32 * 1024


@dataclass(frozen=True)
class OutgoingMessage:
    """A message ready to send: bare topic (no environment prefix), body, id and time."""

    topic: str
    body: dict[str, Any]
    msg_id: str
    timestamp: float
    job_id: str | None
    summary: str
    #: fedora-messaging schema name; empty: the legacy ``<topic>.v1``.
    schema: str = ""

    @property
    def schema_name(self) -> str:
        """The schema the body follows (``fedimg.image.upload.v1``, ...)."""
        return self.schema or f"{self.topic}.v1"


class Publisher(Protocol):
    """Something that delivers messages (a bus, stdout). Raises to leave a message pending.

    Raising :class:`UndeliverableMessage` says the message can never be delivered as it is: it
    stays in the outbox (for ``fedimg messages --pending``) but no longer holds the others back.
    """

    name: str

    def publish(self, message: OutgoingMessage, *, full_topic: str) -> None:
        """Deliver one message."""


class UndeliverableMessage(Exception):
    """A publisher can never deliver this message as it is (e.g. its body fails its schema)."""


@dataclass(frozen=True)
class FlushResult:
    """What one pass over the outbox did."""

    delivered: int
    pending: int
    undeliverable: int = 0


def cut_data(text: str, limit: int = MAX_DATA_BYTES) -> str:
    """``text`` cut to its last ``limit`` bytes (UTF-8), marked when cut."""
    raw = text.encode("utf-8", errors="replace")
    if len(raw) <= limit:
        return text
    return "[…cut…]\n" + raw[-limit:].decode("utf-8", errors="ignore")


def _extra(event: StepEvent) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if event.ami_id:
        extra["id"] = event.ami_id
    if event.virt_type:
        extra["virt_type"] = event.virt_type
    if event.vol_type:
        extra["vol_type"] = event.vol_type
    if event.storage:
        extra["storage"] = event.storage
    if event.encrypted is not None:
        extra["encrypted"] = event.encrypted
    if event.source_ami_id:
        extra["source_image_id"] = event.source_ami_id
    if event.data:
        extra["data"] = cut_data(event.data)
    return extra


def legacy_body(event: StepEvent) -> tuple[str, dict[str, Any]]:
    """The legacy fedimg (topic, body) for a step event, fields exactly as fedimg 2.x sent them."""
    image = event.image
    if event.step in ("upload", "test"):
        return f"fedimg.image.{event.step}", {
            "image_url": image.url,
            "image_name": image.name,
            "destination": event.region,
            "service": SERVICE,
            "status": event.status,
            "compose": image.compose_id,
            "extra": _extra(event),
        }
    if event.step == "copy":
        return "fedimg.image.copy", {
            "image_name": image.name,
            "destination": event.region,
            "architecture": image.arch,
            "service": SERVICE,
            "compose_id": image.compose_id,
            "extra": _extra(event),
        }
    return "fedimg.image.publish", {
        "image_name": image.name,
        "image_url": image.url,
        "architecture": image.arch,
        "destination": event.region,
        "service": SERVICE,
        "compose": image.compose_id,
        "extra": _extra(event),
    }


def summarise(event: StepEvent) -> str:
    """One line for logs: what happened, where, to which AMI."""
    details = ", ".join(
        str(part) for part in (event.ami_id, event.virt_type, event.vol_type) if part
    )
    suffix = f" ({details})" if details else ""
    return f"{event.image.name} {event.step} {event.status} in {event.region}{suffix}"


def to_message(event: StepEvent) -> OutgoingMessage:
    """The outgoing legacy message for a step event."""
    topic, body = legacy_body(event)
    return OutgoingMessage(
        topic=topic,
        body=body,
        msg_id=str(uuid.uuid4()),
        timestamp=event.timestamp,
        job_id=event.job_id,
        summary=summarise(event),
    )


class StdoutPublisher:
    """JSON lines (topic, msg_id, body) on a stream: for pipes and scripts."""

    name = "stdout"

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stdout
        self._lock = threading.Lock()

    def publish(self, message: OutgoingMessage, *, full_topic: str) -> None:
        """Write the message as one JSON line."""
        line = json.dumps(
            {"topic": full_topic, "msg_id": message.msg_id, "body": message.body},
            sort_keys=True,
        )
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


class Messenger:
    """Turns events into messages: journal first, then every publisher; never raises for delivery.

    The journal is the outbox. With publishers, each message is journaled as pending, delivered to
    every publisher, then marked delivered. When a delivery fails, that message and every later one
    wait in the outbox and are delivered in journal order by :meth:`flush_outbox`: every
    ``flush_interval`` seconds by a background thread (when given), by ``fedimg messages --flush``,
    and once more at :meth:`close`. Delivery is at least once: a message whose confirm was lost is
    sent again, with the same ``msg_id``. With no publisher, messages are journaled as delivered.

    Thread-safe. ``topic_prefix`` (e.g. ``org.fedoraproject.prod``) is prepended to every topic.
    """

    #: Messages read from the outbox per query while flushing.
    FLUSH_BATCH = 500

    def __init__(
        self,
        *,
        catalog: Catalog,
        topic_prefix: str,
        publishers: list[Publisher] | None = None,
        flush_interval: float | None = None,
        successor_summary: bool = True,
    ) -> None:
        self.catalog = catalog
        self.topic_prefix = topic_prefix.rstrip(".")
        self.publishers = list(publishers or [])
        self.flush_interval = flush_interval
        self.successor_summary = successor_summary
        self.sent: list[OutgoingMessage] = []
        self._lock = threading.Lock()
        # Held while delivering, so the outbox is delivered in order and never twice at once.
        self._deliver_lock = threading.Lock()
        # None: unknown whether an earlier run left messages pending; True: messages wait.
        self._backlog: bool | None = None if self.publishers else False
        self._undeliverable: set[str] = set()
        self._closed = threading.Event()
        self._flusher: threading.Thread | None = None

    def full_topic(self, topic: str) -> str:
        """The topic as it goes on the bus."""
        return f"{self.topic_prefix}.{topic}" if self.topic_prefix else topic

    def emit(self, event: Event) -> None:
        """Record and deliver the message(s) an event maps to."""
        if isinstance(event, JobFinished):
            if not self.successor_summary:
                return
            from fedimg.successor import successor_summary

            summary = successor_summary(event)
            if summary is None:
                return
            message = summary
        else:
            message = to_message(event)
        log.info("%s", message.summary)
        self.send(message)

    def send(self, message: OutgoingMessage) -> None:
        """Journal the message, then deliver it (or leave it in the outbox); never raises for delivery."""
        full_topic = self.full_topic(message.topic)
        with self._lock:
            self.catalog.add_message(
                msg_id=message.msg_id,
                topic=full_topic,
                body=message.body,
                headers={"fedora_messaging_schema": message.schema_name},
                timestamp=message.timestamp,
                job_id=message.job_id,
                delivered=not self.publishers,
            )
            self.sent.append(message)
        if not self.publishers or self._backlog:
            return
        with self._deliver_lock:
            if self._backlog is None:
                # The first message of this run: what earlier runs left goes first, in order.
                self._flush_locked()
                return
            if self._backlog:
                return
            record = self.catalog.message(message.msg_id)
            if record is None or record.delivered_at is not None:
                return
            outcome = self._deliver(message, full_topic)
            if outcome == "delivered":
                self.catalog.mark_delivered(message.msg_id)
            elif outcome == "retry":
                self._set_backlog(True)

    def flush_outbox(self) -> FlushResult:
        """Deliver the waiting messages in journal order, stopping at the first that fails.

        Messages a publisher calls undeliverable are skipped (they stay pending). Returns how many
        were delivered and how many still wait.
        """
        if not self.publishers:
            return FlushResult(delivered=0, pending=len(self.catalog.pending_messages(limit=10**6)))
        with self._deliver_lock:
            return self._flush_locked()

    def close(self) -> None:
        """Stop the background flush, try the outbox once more, close the publishers."""
        self._closed.set()
        if self._flusher is not None:
            self._flusher.join(timeout=60)
        if self.publishers and self._backlog:
            result = self.flush_outbox()
            if result.pending:
                log.warning(
                    "%d message(s) wait in the outbox; `fedimg messages --flush` delivers them",
                    result.pending,
                )
        for publisher in self.publishers:
            closer = getattr(publisher, "close", None)
            if callable(closer):
                try:
                    closer()
                except Exception as exc:
                    log.warning("closing publisher %s: %s", publisher.name, exc)

    # --- the outbox ----------------------------------------------------------------------------

    def _deliver(
        self, message: OutgoingMessage, full_topic: str
    ) -> Literal["delivered", "retry", "undeliverable"]:
        for publisher in self.publishers:
            try:
                publisher.publish(message, full_topic=full_topic)
            except UndeliverableMessage as exc:
                log.error(
                    "message %s cannot be delivered: %s: %s", message.msg_id, publisher.name, exc
                )
                return "undeliverable"
            except Exception as exc:  # delivery must never fail the upload
                log.warning(
                    "message %s left in the outbox: %s: %s", message.msg_id, publisher.name, exc
                )
                return "retry"
        return "delivered"

    def _flush_locked(self) -> FlushResult:
        delivered = 0
        stopped = False
        while not stopped:
            batch = [
                record
                for record in self.catalog.pending_messages(limit=self.FLUSH_BATCH)
                if record.msg_id not in self._undeliverable
            ]
            if not batch:
                break
            for record in batch:
                message = OutgoingMessage(
                    topic=self._bare_topic(record.topic),
                    body=record.body,
                    msg_id=record.msg_id,
                    timestamp=record.timestamp,
                    job_id=record.job_id,
                    summary="",
                    schema=str((record.headers or {}).get("fedora_messaging_schema") or ""),
                )
                outcome = self._deliver(message, record.topic)
                if outcome == "delivered":
                    self.catalog.mark_delivered(record.msg_id)
                    delivered += 1
                elif outcome == "undeliverable":
                    self._undeliverable.add(record.msg_id)
                else:
                    stopped = True
                    break
        self._set_backlog(stopped)
        pending = len(self.catalog.pending_messages(limit=10**6))
        if delivered:
            log.info("outbox: %d message(s) delivered, %d waiting", delivered, pending)
        return FlushResult(
            delivered=delivered, pending=pending, undeliverable=len(self._undeliverable)
        )

    def _bare_topic(self, full_topic: str) -> str:
        prefix = f"{self.topic_prefix}." if self.topic_prefix else ""
        return full_topic.removeprefix(prefix) if prefix else full_topic

    def _set_backlog(self, waiting: bool) -> None:
        self._backlog = waiting
        if waiting and self.flush_interval is not None and not self._closed.is_set():
            with self._lock:
                if self._flusher is None:
                    self._flusher = threading.Thread(
                        target=self._flush_periodically, name="fedimg-outbox", daemon=True
                    )
                    self._flusher.start()

    def _flush_periodically(self) -> None:
        interval = self.flush_interval or 30.0
        while not self._closed.wait(interval):
            if not self._backlog:
                continue
            try:
                self.flush_outbox()
            except Exception:  # the catalog or a publisher misbehaved: try again next time
                log.exception("flushing the outbox failed")

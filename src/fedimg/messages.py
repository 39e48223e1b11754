"""Messages: events become fedimg's legacy bus messages, written to the journal, then delivered.

Every message is first written to the catalog's journal (which doubles as the outbox), then handed
to each configured publisher. A publisher that fails leaves the message in the outbox for a later
delivery; it never fails the upload. The journal alone (the default) needs no broker.

Legacy topics and bodies are exactly those of fedimg 2.x (see ``fedimg_messages``):
``fedimg.image.upload`` / ``.test`` (status started|completed|failed), ``fedimg.image.copy``,
``fedimg.image.publish``.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

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


class Publisher(Protocol):
    """Something that delivers messages (a bus, stdout). Raises to leave a message pending."""

    name: str

    def publish(self, message: OutgoingMessage, *, full_topic: str) -> None:
        """Deliver one message."""


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
    what = {"upload": "upload", "test": "test", "copy": "copy", "publish": "publish"}[event.step]
    details = ", ".join(
        str(part) for part in (event.ami_id, event.virt_type, event.vol_type) if part
    )
    suffix = f" ({details})" if details else ""
    return f"{event.image.name} {what} {event.status} in {event.region}{suffix}"


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

    Thread-safe. ``topic_prefix`` (e.g. ``org.fedoraproject.prod``) is prepended to every topic.
    """

    def __init__(
        self,
        *,
        catalog: Catalog,
        topic_prefix: str,
        publishers: list[Publisher] | None = None,
    ) -> None:
        self.catalog = catalog
        self.topic_prefix = topic_prefix.rstrip(".")
        self.publishers = list(publishers or [])
        self.sent: list[OutgoingMessage] = []
        self._lock = threading.Lock()

    def full_topic(self, topic: str) -> str:
        """The topic as it goes on the bus."""
        return f"{self.topic_prefix}.{topic}" if self.topic_prefix else topic

    def emit(self, event: Event) -> None:
        """Record and deliver the message(s) an event maps to."""
        if isinstance(event, JobFinished):
            # The successor's summary message is sent by the bus publisher (fedimg_messages).
            return
        message = to_message(event)
        log.info("%s", message.summary)
        self.send(message)

    def send(self, message: OutgoingMessage) -> None:
        """Journal the message, then try every publisher; failures leave it in the outbox."""
        full_topic = self.full_topic(message.topic)
        with self._lock:
            self.catalog.add_message(
                msg_id=message.msg_id,
                topic=full_topic,
                body=message.body,
                headers={"fedora_messaging_schema": message.topic + ".v1"},
                timestamp=message.timestamp,
                job_id=message.job_id,
                delivered=not self.publishers,
            )
            self.sent.append(message)
        delivered = bool(self.publishers)
        for publisher in self.publishers:
            try:
                publisher.publish(message, full_topic=full_topic)
            except Exception as exc:  # delivery must never fail the upload
                delivered = False
                log.warning(
                    "message %s left in the outbox: %s: %s", message.msg_id, publisher.name, exc
                )
        if delivered and self.publishers:
            self.catalog.mark_delivered(message.msg_id)

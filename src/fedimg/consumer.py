"""The compose trigger: ``fedimg consume`` uploads the images of every compose Pungi finishes.

Pungi announces each state of a compose on ``org.fedoraproject.<env>.pungi.compose.status.change``.
For FINISHED and FINISHED_INCOMPLETE (``[compose] statuses``) the consumer fetches
``<location>/metadata/images.json``, selects the images (``[compose]``), and runs the EC2 service
for each, the metadata's SHA-256 as the expected checksum, ``[general] process_count`` at a time.

Three body layouts reach the bus, and all are read:

- fedora-messaging: the body is Pungi's payload (``compose_id``, ``location``, ``status``, ...);
- the ZMQ→AMQP bridge: the payload is under ``body["msg"]`` (with ``msg_id`` beside it);
- the fedmsg-hub envelope: ``username``, ``i``, ``timestamp``, ``msg_id``, ``topic`` and the
  payload under ``msg``.

Acknowledgement: a message is acknowledged once every job it started has ended and is recorded in
the catalog (published or failed). Messages that are malformed, unsupported, for a compose without
metadata or without selected images are logged and acknowledged; a bug while handling one is logged
and the message dropped. Nothing is redelivered forever, and nothing stops the consumer.
"""

from __future__ import annotations

import logging
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from fedimg.bus import BrokerSettings, Disposition, IncomingMessage, QueueSettings, consume
from fedimg.compose import ComposeError, load_compose
from fedimg.errors import InputError
from fedimg.trigger import ImageJob, JobOutcome, publish_images

if TYPE_CHECKING:
    from fedimg.runtime import Runtime

log = logging.getLogger(__name__)

#: Every status Pungi sends; others make a message malformed.
KNOWN_STATUSES = frozenset({"STARTED", "FINISHED", "FINISHED_INCOMPLETE", "DOOMED", "TERMINATED"})


class MalformedMessage(InputError):
    """A compose message fedimg cannot read."""


@dataclass(frozen=True)
class ComposeStatus:
    """What a ``pungi.compose.status.change`` message says, whatever its layout."""

    compose_id: str
    status: str
    location: str | None
    release_version: str | None = None


def _payload(body: Any) -> Mapping[str, Any]:
    """Pungi's payload: the body itself, or the ``msg`` of a bridge or hub envelope."""
    payload = body
    # An envelope wraps the payload once (bridge, hub); a whole hub message wraps it twice.
    for _ in range(3):
        if not isinstance(payload, Mapping):
            break
        if "status" in payload:
            return payload
        inner = payload.get("msg")
        if inner is None and isinstance(payload.get("body"), Mapping):
            inner = payload["body"]
        payload = inner
    if not isinstance(payload, Mapping):
        raise MalformedMessage("the body is not a Pungi compose message (no status)")
    return payload


def parse_compose_message(body: Any) -> ComposeStatus:
    """Read a compose status message of any of the three layouts; MalformedMessage if it is not."""
    payload = _payload(body)
    status = payload.get("status")
    compose_id = payload.get("compose_id")
    if not isinstance(status, str) or status not in KNOWN_STATUSES:
        raise MalformedMessage(f"unknown compose status {status!r}")
    if not isinstance(compose_id, str) or not compose_id.strip():
        raise MalformedMessage(f"no compose_id (got {compose_id!r})")
    location = payload.get("location")
    if location is not None and not isinstance(location, str):
        raise MalformedMessage(f"location is not a string (got {location!r})")
    version = payload.get("release_version")
    release = (
        str(version) if isinstance(version, str | int) and not isinstance(version, bool) else None
    )
    return ComposeStatus(
        compose_id=compose_id.strip(), status=status, location=location, release_version=release
    )


Action = Literal["ignored", "malformed", "unsupported", "no-metadata", "no-images", "published"]


@dataclass(frozen=True)
class Handled:
    """What the consumer did with one message."""

    action: Action
    detail: str
    compose_id: str | None = None
    outcomes: tuple[JobOutcome, ...] = field(default_factory=tuple)


class ComposeConsumer:
    """Handles compose messages for one runtime; :meth:`handle` is the bus callback."""

    def __init__(self, runtime: Runtime, *, stop: threading.Event | None = None) -> None:
        self.runtime = runtime
        self.settings = runtime.config.compose
        self.stop = stop
        self.history: list[Handled] = []

    def handle(self, message: IncomingMessage) -> Disposition:
        """Process one message and say to acknowledge it (every outcome is logged)."""
        handled = self.process(message.body)
        self.history.append(handled)
        where = f"message {message.msg_id} ({message.topic})"
        if any(outcome.status == "interrupted" for outcome in handled.outcomes):
            # Interrupted jobs are not done: the next run gets the message again (and reuses
            # what these jobs made).
            log.warning("%s: %s; interrupted, returned to the queue", where, handled.detail)
            return "requeue"
        if handled.action in ("ignored", "published"):
            log.info("%s: %s", where, handled.detail)
        else:
            log.warning("%s: %s; acknowledged", where, handled.detail)
        return "ack"

    def process(self, body: Any) -> Handled:
        """Decide on a message body and, for a finished compose, publish its images."""
        try:
            status = parse_compose_message(body)
        except MalformedMessage as exc:
            return Handled(action="malformed", detail=f"malformed compose message: {exc}")
        if status.status not in self.settings.statuses:
            return Handled(
                action="ignored",
                detail=f"compose {status.compose_id} is {status.status}: nothing to do",
                compose_id=status.compose_id,
            )
        location = status.location or ""
        if urllib.parse.urlparse(location).scheme not in ("http", "https"):
            return Handled(
                action="unsupported",
                detail=f"compose {status.compose_id}: location {location!r} is not an http(s) URL",
                compose_id=status.compose_id,
            )
        try:
            compose = load_compose(
                location,
                self.settings,
                compose_id=status.compose_id,
                release=status.release_version,
            )
        except ComposeError as exc:
            return Handled(
                action="no-metadata",
                detail=f"compose {status.compose_id}: {exc}",
                compose_id=status.compose_id,
            )
        if not compose.images:
            return Handled(
                action="no-images",
                detail=f"compose {compose.compose_id}: no image matches [compose] selection",
                compose_id=compose.compose_id,
            )
        log.info(
            "compose %s (%s): publishing %d image(s): %s",
            compose.compose_id,
            status.status,
            len(compose.images),
            ", ".join(image.file_name for image in compose.images),
        )
        jobs = [
            ImageJob.from_compose(image, compose_id=compose.compose_id, release=compose.release)
            for image in compose.images
        ]
        outcomes = tuple(publish_images(self.runtime, jobs, stop=self.stop))
        failed = [o for o in outcomes if o.status not in ("published", "partial")]
        for outcome in failed:
            log.error("compose %s: %s: %s", compose.compose_id, outcome.url, outcome.error)
        return Handled(
            action="published",
            detail=(
                f"compose {compose.compose_id}: {len(outcomes) - len(failed)} of "
                f"{len(outcomes)} image(s) published"
            ),
            compose_id=compose.compose_id,
            outcomes=outcomes,
        )


def run_consumer(
    runtime: Runtime,
    *,
    max_messages: int | None = None,
    timeout: float | None = None,
    stop: threading.Event | None = None,
) -> ComposeConsumer:
    """Consume compose messages with ``runtime``'s configuration until stopped.

    ``max_messages`` stops after that many handled messages (``fedimg consume --once``: 1);
    ``timeout`` raises :class:`fedimg.bus.ConsumerStopped` after that many seconds; ``stop`` is
    handed to the jobs (see :func:`fedimg.trigger.publish_images`). Returns the consumer, whose
    ``history`` says what was done.
    """
    messaging = runtime.config.messaging
    consumer = ComposeConsumer(runtime, stop=stop)
    consume(
        BrokerSettings.from_config(messaging),
        QueueSettings(
            name=messaging.queue,
            topics=tuple(messaging.consume_topics),
            durable=messaging.queue_durable,
        ),
        consumer.handle,
        max_messages=max_messages,
        timeout=timeout,
    )
    return consumer

"""The AMQP bus (RabbitMQ through fedora-messaging): fedimg's publisher and its compose consumer.

This is the only module that talks to fedora-messaging's transport. It does not use the
process-global connection of ``fedora_messaging.api`` (one broker URL per process, never closed):
each :class:`AmqpConnection` owns one ``FedoraMessagingServiceV2`` in crochet's reactor thread, so
the publisher and the consumer each have their own connection, to their own broker, and are closed
when their runtime ends. Everything else is fedora-messaging's: message classes and their schemas
(looked up by schema name in the ``fedora.messages`` entry points), publisher confirms, reconnects,
ack/nack semantics of consumers.

Delivery contract (:class:`AmqpPublisher`): ``publish`` returns once the broker confirmed the
message. It raises :class:`DeliveryError` when the broker did not confirm within
``[messaging] publish_timeout`` (the message stays in the outbox and is retried), and
:class:`RejectedMessage` when the message can never be sent as it is (no schema for it, or the body
fails its schema). The broker URL holds a password: it is never logged nor put in an error; only
:func:`redact_url` forms are.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import crochet
from fedora_messaging import config as fm_config
from fedora_messaging import exceptions as fm_exceptions
from fedora_messaging.message import Message, get_class
from fedora_messaging.twisted.service import FedoraMessagingServiceV2
from twisted.internet import defer

from fedimg.config import MessagingSettings
from fedimg.errors import ConfigError, FedimgError
from fedimg.messages import OutgoingMessage, UndeliverableMessage

log = logging.getLogger(__name__)

#: fedora-messaging's own default: the local broker, guest account, default vhost.
DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/%2F"
#: What the consumer asks the broker for at once. One: an upload runs for minutes, and messages
#: prefetched behind it would wait unacknowledged instead of going to another consumer.
PREFETCH_COUNT = 1

#: Seconds a stopping consumer waits for the message in hand (its jobs clean up their temporary
#: resources); systemd's TimeoutStopSec in contrib/systemd is 300.
SHUTDOWN_TIMEOUT = 280.0

# fedora-messaging reads TLS files and client properties from its global configuration when a
# connection is built; this lock keeps two connections from being built with each other's settings.
_CONFIG_LOCK = threading.Lock()


class DeliveryError(FedimgError):
    """The broker did not take a message (unreachable, no confirm in time): retry later."""


class RejectedMessage(DeliveryError, UndeliverableMessage):
    """A message that can never be sent as it is (unknown schema, body fails its schema)."""


class ConsumerStopped(FedimgError):
    """The consumer stopped for another reason than ``max_messages`` (broker refused, timeout)."""


def redact_url(url: str) -> str:
    """``amqp://user:secret@host:5672/vhost?x=y`` → ``amqp://user:***@host:5672/vhost``."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or "localhost"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparseable broker URL>"
    user = f"{parts.username}:***@" if parts.username else ""
    return f"{parts.scheme}://{user}{host}{port}{parts.path}"


@dataclass(frozen=True)
class BrokerSettings:
    """Where the broker is and how to reach it (``amqp_url`` is secret: never log it)."""

    amqp_url: str
    exchange: str = "amq.topic"
    ca_cert: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    publish_timeout: float = 10.0
    reconnect_max_delay: int = 30

    @classmethod
    def from_config(cls, settings: MessagingSettings) -> BrokerSettings:
        """The broker settings of ``[messaging]``; raises ConfigError for an unusable URL."""
        url = settings.amqp_url.get_secret_value() if settings.amqp_url else DEFAULT_AMQP_URL
        scheme = url.split(":", 1)[0].lower()
        if scheme not in ("amqp", "amqps"):
            raise ConfigError(f"[messaging] amqp_url: {redact_url(url)} is not an amqp(s):// URL")
        return cls(
            amqp_url=url,
            exchange=settings.exchange,
            ca_cert=settings.tls_ca_cert,
            certfile=settings.tls_certfile,
            keyfile=settings.tls_keyfile,
            publish_timeout=settings.publish_timeout,
            reconnect_max_delay=settings.reconnect_max_delay,
        )

    @property
    def where(self) -> str:
        """The broker URL without its password, for logs and errors."""
        return redact_url(self.amqp_url)


def to_fedora_message(message: OutgoingMessage, *, full_topic: str) -> Message:
    """The fedora-messaging message for ``message``, validated against its schema.

    The class comes from the ``fedora.messages`` entry points by schema name (``fedimg.image.*.v1``
    from ``fedimg_messages``, ``fedora_image_uploader.published.v1.aws`` from
    ``fedora-image-uploader-messages``). The AMQP message id is the journal's ``msg_id``, so a
    message delivered again after a failed attempt can be recognised as the same one.
    """
    schema = message.schema_name
    cls = get_class(schema)
    if cls is Message and schema != "base.message":
        raise RejectedMessage(f"message {message.msg_id}: no message class for schema {schema!r}")
    fedora_message = cls(topic=full_topic, body=message.body)
    fedora_message.id = message.msg_id
    try:
        fedora_message.validate()
    except Exception as exc:  # jsonschema's ValidationError or SchemaError: the body cannot go
        reason = getattr(exc, "message", None) or str(exc)
        raise RejectedMessage(
            f"message {message.msg_id} ({schema}) fails its schema: {reason}"
        ) from exc
    return fedora_message


def _prepare_fedora_messaging(settings: BrokerSettings) -> None:
    """Set fedora-messaging's global configuration for a connection about to be built.

    Call with ``_CONFIG_LOCK`` held. Loads fedora-messaging's own file once (as every fedora-messaging
    application does), then sets what fedimg decides: TLS files, client name, prefetch, and no topic
    prefix (fedimg's topics arrive with their prefix already).
    """
    conf = fm_config.conf
    if not conf.loaded:
        try:
            conf.load_config()
        except fm_exceptions.ConfigurationException as exc:
            raise ConfigError(f"fedora-messaging configuration: {exc.message}") from exc
    conf["topic_prefix"] = ""
    conf["qos"] = {"prefetch_size": 0, "prefetch_count": PREFETCH_COUNT}
    conf["tls"] = {
        "ca_cert": str(settings.ca_cert) if settings.ca_cert else None,
        "certfile": str(settings.certfile) if settings.certfile else None,
        "keyfile": str(settings.keyfile) if settings.keyfile else None,
    }
    properties = copy.deepcopy(fm_config.DEFAULTS["client_properties"])
    properties["app"] = "fedimg"
    conf["client_properties"] = properties


@crochet.run_in_reactor
def _start(service: FedoraMessagingServiceV2) -> None:
    service.startService()  # type: ignore[no-untyped-call]


@crochet.run_in_reactor
def _stop(service: FedoraMessagingServiceV2) -> defer.Deferred[Any]:
    return defer.ensureDeferred(_stop_service(service))


async def _stop_service(service: FedoraMessagingServiceV2) -> None:
    if service.running:
        await service.stopService()


@crochet.run_in_reactor
def _publish(service: FedoraMessagingServiceV2, message: Message, exchange: str) -> Any:
    return service.factory.publish(message, exchange)


@crochet.run_in_reactor
@defer.inlineCallbacks
def _consume(
    service: FedoraMessagingServiceV2,
    callback: Callable[[Message], None],
    bindings: list[dict[str, Any]],
    queues: dict[str, dict[str, Any]],
) -> Generator[defer.Deferred[Any], Any, None]:
    consumers = yield service.factory.consume(callback, bindings, queues)  # type: ignore[arg-type]
    try:
        yield defer.gatherResults([c.result for c in consumers], consumeErrors=True)
    except defer.FirstError as exc:
        exc.subFailure.raiseException()


def _cancel(result: crochet.EventualResult[Any]) -> None:
    """Cancel an operation in the reactor and collect its outcome (crochet logs uncollected
    failures as unhandled errors)."""
    result.cancel()
    with contextlib.suppress(Exception):
        result.wait(5)


class AmqpConnection:
    """One connection to the broker, kept open (and re-opened after a loss) until :meth:`close`.

    Thread-safe: ``publish`` may be called from any thread but crochet's reactor thread.
    """

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        crochet.setup()
        with _CONFIG_LOCK:
            _prepare_fedora_messaging(settings)
            try:
                self._service = FedoraMessagingServiceV2(settings.amqp_url)
            except fm_exceptions.ConfigurationException as exc:
                raise ConfigError(f"[messaging] TLS settings: {exc.message}") from exc
        # Twisted's reconnect delay grows to an hour by default; a broker back after a restart
        # should see fedimg again within reconnect_max_delay.
        self._service.factory.maxDelay = settings.reconnect_max_delay
        self._lock = threading.Lock()
        self._started = False
        self._closed = False

    def _ensure_started(self) -> None:
        with self._lock:
            if self._closed:
                raise DeliveryError(f"the connection to {self.settings.where} is closed")
            if not self._started:
                log.info("connecting to the AMQP broker at %s", self.settings.where)
                _start(self._service).wait(10)
                self._started = True

    def publish(self, message: Message, *, timeout: float | None = None) -> None:
        """Publish and wait for the broker's confirm; raises DeliveryError if it does not come."""
        self._ensure_started()
        wait = self.settings.publish_timeout if timeout is None else timeout
        result = _publish(self._service, message, self.settings.exchange)
        try:
            result.wait(wait)
        except crochet.TimeoutError as exc:
            _cancel(result)
            raise DeliveryError(
                f"the broker at {self.settings.where} did not confirm within {wait:g}s"
            ) from exc
        except fm_exceptions.BaseException as exc:
            raise DeliveryError(f"the broker at {self.settings.where} refused it: {exc}") from exc

    def consume(
        self,
        callback: Callable[[Message], None],
        *,
        bindings: list[dict[str, Any]],
        queues: dict[str, dict[str, Any]],
        timeout: float | None = None,
    ) -> None:
        """Consume until the callback raises HaltConsumer, ``timeout`` passes or an error stops it.

        Returns normally after a HaltConsumer; raises ConsumerStopped otherwise.
        """
        self._ensure_started()
        result = _consume(self._service, callback, bindings, queues)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                # Short waits keep the main thread responsive to Ctrl-C.
                step = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
                try:
                    result.wait(step)
                    return
                except crochet.TimeoutError:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise ConsumerStopped(f"no end of consuming within {timeout:g}s") from None
        except fm_exceptions.HaltConsumer:
            return
        except fm_exceptions.BaseException as exc:
            raise ConsumerStopped(f"consuming from {self.settings.where} stopped: {exc}") from exc
        finally:
            _cancel(result)

    def close(self, *, timeout: float = 10.0) -> None:
        """Close the connection (idempotent); a message being handled is finished first (for up
        to ``timeout`` seconds)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            started = self._started
        if started:
            with contextlib.suppress(Exception):
                _stop(self._service).wait(timeout)


class AmqpPublisher:
    """The ``amqp`` publisher: fedimg's messages as fedora-messaging messages on the broker."""

    name = "amqp"

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self._connection: AmqpConnection | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, settings: MessagingSettings) -> AmqpPublisher:
        """The publisher for ``[messaging]``."""
        return cls(BrokerSettings.from_config(settings))

    def _connected(self) -> AmqpConnection:
        with self._lock:
            if self._connection is None:
                self._connection = AmqpConnection(self.settings)
            return self._connection

    def publish(self, message: OutgoingMessage, *, full_topic: str) -> None:
        """Validate, publish and wait for the confirm (see the module's delivery contract)."""
        fedora_message = to_fedora_message(message, full_topic=full_topic)
        self._connected().publish(fedora_message)

    def close(self) -> None:
        """Close the connection, if one was opened."""
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


# --- consuming -------------------------------------------------------------------------------


@dataclass(frozen=True)
class IncomingMessage:
    """A message as the consumer's handler sees it: topic (routing key), body, id."""

    topic: str
    body: Any
    msg_id: str | None


#: What to do with a message once handled: ``ack`` it, ``drop`` it (reject, never redeliver), or
#: ``requeue`` it (its work was interrupted: the next consumer gets it again).
Disposition = Literal["ack", "drop", "requeue"]


@dataclass(frozen=True)
class QueueSettings:
    """The consumer's queue and what it is bound to."""

    name: str
    topics: tuple[str, ...]
    durable: bool = True


def consume(
    settings: BrokerSettings,
    queue: QueueSettings,
    handler: Callable[[IncomingMessage], Disposition],
    *,
    max_messages: int | None = None,
    timeout: float | None = None,
) -> int:
    """Consume ``queue`` and pass each message to ``handler``; returns how many it handled.

    Each message is acknowledged only after ``handler`` returned ``ack`` (``drop`` rejects it
    without requeueing). A handler that raises has its message dropped with the error logged, so a
    message that crashes fedimg is not redelivered forever. Stops after ``max_messages`` (the last
    one acknowledged first), or raises :class:`ConsumerStopped` after ``timeout`` seconds or when the
    broker ends the consumer. Messages that are not JSON objects never reach ``handler``:
    fedora-messaging logs and drops them.
    """
    handled = 0
    lock = threading.Lock()

    def callback(message: Message) -> None:
        nonlocal handled
        incoming = IncomingMessage(topic=message.topic, body=message.body, msg_id=message.id)
        try:
            disposition = handler(incoming)
        except Exception:
            log.exception("message %s (%s) failed; it is dropped", incoming.msg_id, incoming.topic)
            disposition = "drop"
        with lock:
            handled += 1
            last = max_messages is not None and handled >= max_messages
        if last:
            # Settles this message (ack, or requeue), then ends consuming.
            raise fm_exceptions.HaltConsumer(exit_code=0, requeue=disposition == "requeue")
        if disposition == "requeue":
            raise fm_exceptions.Nack()
        if disposition == "drop":
            raise fm_exceptions.Drop()

    bindings = [
        {"exchange": settings.exchange, "queue": queue.name, "routing_keys": list(queue.topics)}
    ]
    queues = {
        queue.name: {
            "durable": queue.durable,
            "auto_delete": not queue.durable,
            "exclusive": False,
            "arguments": {},
        }
    }
    connection = AmqpConnection(settings)
    log.info(
        "consuming %s from %s (queue %s, exchange %s)",
        ", ".join(queue.topics),
        settings.where,
        queue.name,
        settings.exchange,
    )
    try:
        connection.consume(callback, bindings=bindings, queues=queues, timeout=timeout)
    finally:
        # On Ctrl-C or SIGTERM the jobs of the message in hand are stopping: let them clean up.
        connection.close(timeout=SHUTDOWN_TIMEOUT)
    return handled

"""Helpers for the bus, compose and consumer tests: the real broker, a compose tree, a TCP proxy.

The broker is the machine's RabbitMQ (127.0.0.1:5672, guest/guest; ``FEDIMG_TEST_AMQP_URL``
overrides it). Every test uses an exchange and queues of its own, so tests never see each other's
messages. A test that needs the broker calls :func:`require_broker`: it skips when the broker is
unreachable, and fails under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika  # type: ignore[import-untyped]
import productmd.images

from fedimg.config import Config
from tests.conftest import require
from tests.httpfiles import serve_files

BROKER_URL = os.environ.get("FEDIMG_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
PUNGI_TOPIC = "org.fedoraproject.prod.pungi.compose.status.change"
PUNGI_PATTERN = "org.fedoraproject.*.pungi.compose.status.change"
TEST_PREFIX = "org.fedoraproject.test"


def broker_reachable(url: str = BROKER_URL) -> bool:
    """True when something accepts TCP connections at the broker's address."""
    parts = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "localhost", parts.port or 5672), 2):
            return True
    except OSError:
        return False


def require_broker() -> None:
    """Skip (fail under CI=true) when RabbitMQ is unreachable."""
    require(
        broker_reachable(),
        f"RabbitMQ is unreachable at {urllib.parse.urlsplit(BROKER_URL).netloc.split('@')[-1]}",
    )


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def unique(name: str) -> str:
    """``name`` made unique for this test."""
    return f"fedimg-test-{name}-{uuid.uuid4().hex[:10]}"


@contextmanager
def preserved_logging() -> Iterator[None]:
    """Undo what ``fedimg.cli.main`` does to logging (its handler writes to a captured stderr
    that pytest closes, while crochet's thread goes on logging)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    names = ("botocore", "boto3", "urllib3", "werkzeug", "moto", "twisted", "pika")
    levels = {name: logging.getLogger(name).level for name in names}
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, old in levels.items():
            logging.getLogger(name).setLevel(old)


# --- the broker, seen by the test ------------------------------------------------------------


@dataclass
class Received:
    """One message the tap received."""

    topic: str
    body: Any
    headers: dict[str, Any]
    message_id: str | None


class BrokerTap:
    """A test's own topic exchange on the real broker, and a queue bound to all of it.

    ``publish`` puts a message on the exchange as a producer would; ``collect`` reads what reached
    the tap's queue (everything published to the exchange after the tap was made).
    """

    def __init__(self) -> None:
        self.exchange = unique("exchange")
        self._connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
        self._channel = self._connection.channel()
        self._channel.exchange_declare(self.exchange, exchange_type="topic")
        declared = self._channel.queue_declare("", exclusive=True)
        self.queue = str(declared.method.queue)
        self._channel.queue_bind(self.queue, self.exchange, "#")
        self._queues: list[str] = []

    def publish(
        self, topic: str, body: Any = None, *, raw: bytes | None = None, msg_id: str | None = None
    ) -> str:
        """Publish a JSON body (or ``raw`` bytes) with fedora-messaging's headers; returns its id."""
        message_id = msg_id or str(uuid.uuid4())
        properties = pika.BasicProperties(
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=2,
            message_id=message_id,
            headers={"fedora_messaging_schema": "base.message", "fedora_messaging_severity": 20},
        )
        payload = raw if raw is not None else json.dumps(body).encode("utf-8")
        self._channel.basic_publish(self.exchange, topic, payload, properties)
        return message_id

    def collect(
        self, count: int, *, prefix: str = TEST_PREFIX, timeout: float = 30.0
    ) -> list[Received]:
        """The first ``count`` messages whose topic starts with ``prefix``, in arrival order."""
        found: list[Received] = []
        deadline = time.monotonic() + timeout
        while len(found) < count and time.monotonic() < deadline:
            method, properties, body = self._channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                self._connection.sleep(0.05)
                continue
            topic = str(method.routing_key)
            if topic.startswith(prefix):
                found.append(
                    Received(
                        topic=topic,
                        body=json.loads(body),
                        headers=dict(properties.headers or {}),
                        message_id=properties.message_id,
                    )
                )
        return found

    def drain(self, *, prefix: str = TEST_PREFIX, settle: float = 0.5) -> list[Received]:
        """Every message that arrives within ``settle`` seconds of the last one."""
        found: list[Received] = []
        while True:
            more = self.collect(1, prefix=prefix, timeout=settle)
            if not more:
                return found
            found.extend(more)

    def declare_queue(self, topics: tuple[str, ...] = (PUNGI_PATTERN,)) -> str:
        """A durable queue of this test bound to ``topics`` (deleted at close), as a consumer's
        queue is between runs: messages published before the consumer starts wait in it."""
        name = unique("queue")
        self._channel.queue_declare(name, durable=True)
        for topic in topics:
            self._channel.queue_bind(name, self.exchange, topic)
        self._queues.append(name)
        return name

    def queue_depth(self, name: str) -> int:
        """Messages ready in queue ``name``."""
        declared = self._channel.queue_declare(name, passive=True)
        return int(declared.method.message_count)

    def close(self) -> None:
        """Delete what the tap declared."""
        try:
            for name in self._queues:
                self._channel.queue_delete(name)
            self._channel.exchange_delete(self.exchange)
        finally:
            self._connection.close()


def bus_config(
    tmp_path: Path,
    *,
    exchange: str,
    amqp_url: str = BROKER_URL,
    queue: str = "fedimg-unused",
    messaging: dict[str, Any] | None = None,
    compose: dict[str, Any] | None = None,
    **aws: Any,
) -> Config:
    """A Config on the embedded target with the AMQP publisher on ``exchange``, 2 regions, gp2."""
    data: dict[str, Any] = {
        "general": {"catalog_url": f"sqlite:///{tmp_path / 'catalog.sqlite'}", "process_count": 2},
        "aws": {
            "target": "embedded",
            "regions": ["us-east-1", "eu-west-1"],
            "volume_types": ["gp2"],
            **aws,
        },
        "messaging": {
            "publishers": ["journal", "amqp"],
            "amqp_url": amqp_url,
            "exchange": exchange,
            "topic_prefix": TEST_PREFIX,
            "publish_timeout": 5.0,
            "flush_interval": 0.3,
            "reconnect_max_delay": 1,
            "queue": queue,
            "queue_durable": True,
            **(messaging or {}),
        },
        "compose": compose or {},
    }
    return Config.model_validate(data)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        items = (f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None)
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"no TOML for {value!r}")


def write_toml(path: Path, config: Config) -> Path:
    """``config`` as a TOML file (secrets in clear: it is the test's own file)."""
    data = config.model_dump(mode="json", exclude_none=True)
    messaging = data["messaging"]
    if config.messaging.amqp_url is not None:
        messaging["amqp_url"] = config.messaging.amqp_url.get_secret_value()
    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- a compose tree served over HTTP ------------------------------------------------------------


@dataclass(frozen=True)
class TreeImage:
    """One images.json entry; ``source`` is the file to place at ``path`` (None: metadata only)."""

    variant: str
    arch: str
    path: str
    subvariant: str = "Cloud_Base"
    type: str = "raw-xz"
    format: str = "raw.xz"
    source: Path | None = None
    sha256: str | None = None


@dataclass
class ComposeTree:
    """A compose on disk: ``root/<compose_id>/compose/{metadata/images.json, <images>}``."""

    root: Path
    compose_id: str
    images: list[TreeImage] = field(default_factory=list)

    @property
    def compose_dir(self) -> Path:
        """The ``compose/`` directory Pungi announces."""
        return self.root / self.compose_id / "compose"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def build_compose_tree(root: Path, compose_id: str, images: list[TreeImage]) -> ComposeTree:
    """Write the image files and their images.json, made with productmd's ``Images`` API."""
    tree = ComposeTree(root=root, compose_id=compose_id, images=images)
    metadata = productmd.images.Images()
    metadata.compose.id = compose_id
    metadata.compose.type = "production"
    metadata.compose.date = compose_id.rsplit("-", maxsplit=1)[-1].split(".", maxsplit=1)[0]
    metadata.compose.respin = 0
    for spec in images:
        target = tree.compose_dir / spec.path
        size = 1024
        checksum = spec.sha256 or "0" * 64
        if spec.source is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(spec.source, target)
            size = target.stat().st_size
            checksum = spec.sha256 or _sha256(target)
        image = productmd.images.Image(metadata)
        image.path = spec.path
        image.mtime = 1_735_689_600
        image.size = size
        image.volume_id = None
        image.type = spec.type
        image.format = spec.format
        image.arch = spec.arch
        image.disc_number = 1
        image.disc_count = 1
        image.checksums = {}
        image.implant_md5 = None
        image.bootable = False
        image.subvariant = spec.subvariant
        image.add_checksum(None, "sha256", checksum)
        metadata.add(spec.variant, spec.arch, image)
    metadata_path = tree.compose_dir / "metadata" / "images.json"
    metadata_path.parent.mkdir(parents=True, exist_ok=True)
    metadata.dump(str(metadata_path))
    return tree


@contextmanager
def serve_directory(root: Path) -> Iterator[str]:
    """Serve ``root`` over HTTP on 127.0.0.1 (Range requests too); yields the base URL."""
    with serve_files(root) as (base, _faults):
        yield base


# --- a broker that can be taken away ------------------------------------------------------------


class TcpProxy:
    """A TCP forwarder to the broker that can be stopped (connections cut, port refused) and
    started again on the same port: the broker going away and coming back, for one client."""

    def __init__(self, target: str = BROKER_URL) -> None:
        parts = urllib.parse.urlsplit(target)
        self._target = (parts.hostname or "localhost", parts.port or 5672)
        self.port = closed_port()
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def url(self) -> str:
        """The broker URL through the proxy."""
        parts = urllib.parse.urlsplit(BROKER_URL)
        netloc = parts.netloc.rsplit("@", 1)
        credentials = f"{netloc[0]}@" if len(netloc) == 2 else ""
        return f"{parts.scheme}://{credentials}127.0.0.1:{self.port}{parts.path}"

    def start(self) -> None:
        """Accept connections (again)."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Refuse new connections and cut the open ones."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, []
        if listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would not, and the
            # port would stay taken.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target, 5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def schema_valid(received: Received) -> None:
    """Validate a received message against the class its schema header names (raises if not)."""
    from fedora_messaging.message import Message, get_class

    schema = str(received.headers["fedora_messaging_schema"])
    cls = get_class(schema)
    assert cls is not Message, f"no class for schema {schema}"
    cls(topic=received.topic, body=received.body).validate()

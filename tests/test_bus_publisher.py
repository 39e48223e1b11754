"""The AMQP publisher on the real RabbitMQ: schema-valid messages, the journal's ids, no secrets."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedimg.bus import (
    AmqpPublisher,
    BrokerSettings,
    DeliveryError,
    RejectedMessage,
    redact_url,
    to_fedora_message,
)
from fedimg.cli import main
from fedimg.config import Config
from fedimg.events import ImageInfo, JobFinished, StepEvent
from fedimg.messages import OutgoingMessage, to_message
from fedimg.runtime import Runtime
from tests.amqp_support import (
    BROKER_URL,
    TEST_PREFIX,
    BrokerTap,
    bus_config,
    closed_port,
    preserved_logging,
    schema_valid,
    write_toml,
)

IMAGE = ImageInfo(
    name="Fedora-Cloud-Base-AmazonEC2.x86_64-41-1.4",
    url="https://example.test/Fedora-Cloud-Base-AmazonEC2.x86_64-41-1.4.raw.xz",
    arch="x86_64",
    compose_id="Fedora-41-20241020.0",
)
SECRET = "hunter2-not-for-logs"


@pytest.fixture(autouse=True)
def _logging() -> Iterator[None]:
    with preserved_logging():
        yield


def events() -> list[StepEvent]:
    """One of each legacy message, as a job sends them."""
    common = {"job_id": "job-1", "image": IMAGE, "virt_type": "hvm", "vol_type": "gp2"}
    return [
        StepEvent(step="upload", status="started", region="us-east-1", **common),  # type: ignore[arg-type]
        StepEvent(step="upload", status="completed", region="us-east-1", ami_id="ami-1", **common),  # type: ignore[arg-type]
        StepEvent(step="test", status="started", region="us-east-1", ami_id="ami-1", **common),  # type: ignore[arg-type]
        StepEvent(step="test", status="completed", region="us-east-1", ami_id="ami-1", **common),  # type: ignore[arg-type]
        StepEvent(
            step="copy",
            status="completed",
            region="eu-west-1",
            ami_id="ami-2",
            source_ami_id="ami-1",
            **common,  # type: ignore[arg-type]
        ),
        StepEvent(step="publish", status="completed", region="us-east-1", ami_id="ami-1", **common),  # type: ignore[arg-type]
        StepEvent(step="upload", status="failed", region="us-east-1", data="boom", **common),  # type: ignore[arg-type]
    ]


def test_every_legacy_message_and_the_summary_arrive_schema_valid_with_the_journal_id(
    tap: BrokerTap, tmp_path: Path
) -> None:
    config = bus_config(tmp_path, exchange=tap.exchange)
    with Runtime(config=config) as runtime:
        messenger = runtime.messenger
        for event in events():
            messenger.emit(event)
        messenger.emit(
            JobFinished(
                job_id="job-1", image=IMAGE, status="published", regions={"us-east-1": "ami-1"}
            )
        )
        sent = list(messenger.sent)
        assert runtime.catalog.pending_messages() == []
    received = tap.collect(len(sent))
    assert [r.message_id for r in received] == [m.msg_id for m in sent]
    assert [r.topic for r in received] == [f"{TEST_PREFIX}.{m.topic}" for m in sent]
    assert [r.body for r in received] == [m.body for m in sent]
    for message in received:
        schema_valid(message)
    assert received[-1].headers["fedora_messaging_schema"] == (
        "fedora_image_uploader.published.v1.aws"
    )
    assert received[-1].topic == (
        f"{TEST_PREFIX}.fedora_image_uploader.published.v1.aws.Cloud_Base.41.x86_64"
    )


def test_the_publisher_confirms_each_message_before_returning(tap: BrokerTap) -> None:
    publisher = AmqpPublisher(BrokerSettings(amqp_url=BROKER_URL, exchange=tap.exchange))
    try:
        message = to_message(events()[0])
        publisher.publish(message, full_topic=f"{TEST_PREFIX}.fedimg.image.upload")
        # Confirmed means routed: the tap's queue has it now, no waiting needed.
        (received,) = tap.collect(1, timeout=2)
        assert received.message_id == message.msg_id
    finally:
        publisher.close()


def test_a_body_that_fails_its_schema_is_rejected_before_the_broker() -> None:
    message = OutgoingMessage(
        topic="fedimg.image.upload",
        body={"image_name": "x", "status": "exploded"},
        msg_id=str(uuid.uuid4()),
        timestamp=time.time(),
        job_id=None,
        summary="",
    )
    with pytest.raises(RejectedMessage, match="fails its schema"):
        to_fedora_message(message, full_topic="org.test.fedimg.image.upload")


def test_a_message_without_a_schema_class_is_rejected() -> None:
    message = OutgoingMessage(
        topic="fedimg.image.unknown",
        body={},
        msg_id="m-1",
        timestamp=time.time(),
        job_id=None,
        summary="",
    )
    with pytest.raises(
        RejectedMessage, match=r"no message class for schema 'fedimg\.image\.unknown"
    ):
        to_fedora_message(message, full_topic="org.test.fedimg.image.unknown")


def test_an_unreachable_broker_is_a_delivery_error_within_the_timeout_that_hides_the_password() -> (
    None
):
    url = f"amqp://guest:{SECRET}@127.0.0.1:{closed_port()}/%2F"
    publisher = AmqpPublisher(BrokerSettings(amqp_url=url, publish_timeout=0.5))
    started = time.monotonic()
    try:
        with pytest.raises(DeliveryError) as raised:
            publisher.publish(to_message(events()[0]), full_topic="org.test.fedimg.image.upload")
    finally:
        publisher.close()
    assert time.monotonic() - started < 5
    assert SECRET not in str(raised.value)
    assert "guest:***@127.0.0.1" in str(raised.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "amqp://fedimg:s3cret@rabbit.example:5671/%2Fpubsub",
            "amqp://fedimg:***@rabbit.example:5671/%2Fpubsub",
        ),
        ("amqps://rabbit.example/%2F?connection_attempts=3", "amqps://rabbit.example/%2F"),
        ("amqp://", "amqp://localhost"),
    ],
)
def test_redact_url_keeps_the_password_and_query_out(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_an_amqp_url_that_is_not_amqp_is_a_config_error(tmp_path: Path) -> None:
    from fedimg.errors import ConfigError

    config = bus_config(tmp_path, exchange="x", amqp_url=f"http://guest:{SECRET}@host/")
    with pytest.raises(ConfigError) as raised:
        BrokerSettings.from_config(config.messaging)
    assert SECRET not in str(raised.value)


def test_the_broker_password_is_never_logged_printed_or_stored(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"amqp://guest:{SECRET}@127.0.0.1:{closed_port()}/%2F"
    config = bus_config(
        tmp_path, exchange="amq.topic", amqp_url=url, messaging={"publish_timeout": 0.3}
    )
    with caplog.at_level(logging.DEBUG), Runtime(config=config) as runtime:
        for event in events()[:3]:
            runtime.messenger.emit(event)
        rows, _ = runtime.catalog.messages(limit=100)
        stored = json.dumps([(r.topic, r.body, r.headers) for r in rows])
        assert len(runtime.catalog.pending_messages()) == 3
    path = write_toml(tmp_path / "fedimg.toml", config)
    assert main(["messages", "--pending", "--json", "--config", str(path)]) == 0
    assert main(["config", "show", "--config", str(path)]) == 0
    printed = capsys.readouterr()
    assert SECRET not in caplog.text
    assert SECRET not in stored
    assert SECRET not in printed.out + printed.err
    assert "left in the outbox" in caplog.text


def test_messages_wait_while_the_broker_is_unreachable_and_fedimg_messages_flush_sends_them(
    tap: BrokerTap, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    down = bus_config(
        tmp_path,
        exchange=tap.exchange,
        amqp_url=f"amqp://guest:guest@127.0.0.1:{closed_port()}/%2F",
        messaging={"publish_timeout": 0.3},
    )
    with Runtime(config=down) as runtime:
        for event in events():
            runtime.messenger.emit(event)
        sent = [m.msg_id for m in runtime.messenger.sent]
    down_file = write_toml(tmp_path / "down.toml", down)
    assert main(["messages", "--pending", "--json", "--config", str(down_file)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["msg_id"] for m in listed] == sent
    assert main(["messages", "--flush", "--config", str(down_file)]) == 1
    assert capsys.readouterr().out == f"delivered 0, waiting {len(sent)}\n"

    up = bus_config(tmp_path, exchange=tap.exchange)
    up_file = write_toml(tmp_path / "up.toml", up)
    assert main(["messages", "--flush", "--json", "--config", str(up_file)]) == 0
    flushed = json.loads(capsys.readouterr().out)
    assert flushed == {"delivered": len(sent), "pending": 0, "undeliverable": 0}
    received = tap.collect(len(sent))
    assert [r.message_id for r in received] == sent
    for message in received:
        schema_valid(message)
    assert main(["messages", "--pending", "--json", "--config", str(up_file)]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_a_runtime_with_the_journal_only_never_connects(
    tmp_path: Path, runtime_factory: Callable[[Config], Runtime]
) -> None:
    config = bus_config(tmp_path, exchange="x", messaging={"publishers": ["journal"]})
    runtime = runtime_factory(config)
    runtime.messenger.emit(events()[0])
    assert runtime.messenger.publishers == []
    assert runtime.catalog.pending_messages() == []

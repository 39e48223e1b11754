"""Consuming from the real RabbitMQ: ack after the handler, drop on a crash, stop when told."""

from __future__ import annotations

import logging

import pytest

from fedimg.bus import (
    BrokerSettings,
    ConsumerStopped,
    Disposition,
    IncomingMessage,
    QueueSettings,
    consume,
)
from tests.amqp_support import BROKER_URL, PUNGI_PATTERN, PUNGI_TOPIC, BrokerTap


def settings(tap: BrokerTap) -> BrokerSettings:
    return BrokerSettings(amqp_url=BROKER_URL, exchange=tap.exchange, publish_timeout=5)


def test_messages_that_waited_in_the_queue_are_handled_in_order_and_acknowledged(
    tap: BrokerTap,
) -> None:
    queue = tap.declare_queue()
    for n in range(3):
        tap.publish(PUNGI_TOPIC, {"n": n}, msg_id=f"m-{n}")
    seen: list[IncomingMessage] = []

    def handler(message: IncomingMessage) -> Disposition:
        seen.append(message)
        return "ack"

    handled = consume(
        settings(tap), QueueSettings(queue, (PUNGI_PATTERN,)), handler, max_messages=3, timeout=30
    )
    assert handled == 3
    assert [(m.topic, m.body, m.msg_id) for m in seen] == [
        (PUNGI_TOPIC, {"n": n}, f"m-{n}") for n in range(3)
    ]
    assert tap.queue_depth(queue) == 0


def test_a_handler_that_crashes_has_its_message_dropped_not_redelivered(
    tap: BrokerTap, caplog: pytest.LogCaptureFixture
) -> None:
    queue = tap.declare_queue()
    tap.publish(PUNGI_TOPIC, {"n": 0}, msg_id="poison")
    tap.publish(PUNGI_TOPIC, {"n": 1}, msg_id="fine")
    seen: list[str | None] = []

    def handler(message: IncomingMessage) -> Disposition:
        seen.append(message.msg_id)
        if message.msg_id == "poison":
            raise RuntimeError("a bug (test)")
        return "ack"

    with caplog.at_level(logging.ERROR, logger="fedimg.bus"):
        consume(
            settings(tap),
            QueueSettings(queue, (PUNGI_PATTERN,)),
            handler,
            max_messages=2,
            timeout=30,
        )
    assert seen == ["poison", "fine"]
    assert tap.queue_depth(queue) == 0
    assert "message poison (org.fedoraproject.prod.pungi.compose.status.change) failed" in (
        caplog.text
    )


def test_consuming_gives_up_after_its_timeout(tap: BrokerTap) -> None:
    queue = tap.declare_queue()
    with pytest.raises(ConsumerStopped, match="within 1s"):
        consume(settings(tap), QueueSettings(queue, (PUNGI_PATTERN,)), lambda m: "ack", timeout=1)

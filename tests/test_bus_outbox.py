"""The outbox: journal first, then deliver; a failed delivery waits and goes later, in order."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedimg.catalog import Catalog
from fedimg.events import ImageInfo, JobFinished, StepEvent
from fedimg.messages import Messenger, OutgoingMessage, UndeliverableMessage

IMAGE = ImageInfo(
    name="Fedora-Cloud-Base-AmazonEC2.x86_64-41-1.4",
    url="https://example.test/Fedora-Cloud-Base-AmazonEC2.x86_64-41-1.4.raw.xz",
    arch="x86_64",
    compose_id="Fedora-41-20241020.0",
)


class FlakyPublisher:
    """A recording publisher that fails while ``down`` is set (and rejects ``reject`` ids)."""

    name = "flaky"

    def __init__(self) -> None:
        self.down = False
        self.reject: set[str] = set()
        self.delivered: list[str] = []
        self.attempts = 0
        self.closed = False
        self._lock = threading.Lock()

    def publish(self, message: OutgoingMessage, *, full_topic: str) -> None:
        with self._lock:
            self.attempts += 1
            if message.msg_id in self.reject:
                raise UndeliverableMessage("rejected by the test")
            if self.down:
                raise ConnectionError("broker down (test)")
            self.delivered.append(message.msg_id)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    yield catalog
    catalog.close()


def step(n: int) -> StepEvent:
    return StepEvent(
        job_id="job-1",
        step="publish",
        status="completed",
        region=f"region-{n}",
        image=IMAGE,
        ami_id=f"ami-{n:08x}",
        virt_type="hvm",
        vol_type="gp2",
    )


def pending_ids(catalog: Catalog) -> list[str]:
    return [record.msg_id for record in catalog.pending_messages()]


def journal_ids(messenger: Messenger) -> list[str]:
    return [message.msg_id for message in messenger.sent]


def test_a_delivered_message_is_journaled_then_marked_delivered(catalog: Catalog) -> None:
    publisher = FlakyPublisher()
    messenger = Messenger(catalog=catalog, topic_prefix="org.test", publishers=[publisher])
    messenger.emit(step(1))
    assert publisher.delivered == journal_ids(messenger)
    assert pending_ids(catalog) == []
    record = catalog.message(publisher.delivered[0])
    assert record is not None
    assert record.topic == "org.test.fedimg.image.publish"
    assert record.headers == {"fedora_messaging_schema": "fedimg.image.publish.v1"}


def test_without_publishers_messages_are_journaled_as_delivered(catalog: Catalog) -> None:
    messenger = Messenger(catalog=catalog, topic_prefix="org.test")
    messenger.emit(step(1))
    assert pending_ids(catalog) == []
    assert messenger.flush_outbox().pending == 0


def test_a_failed_delivery_leaves_it_and_later_ones_pending_without_retrying_inline(
    catalog: Catalog,
) -> None:
    publisher = FlakyPublisher()
    messenger = Messenger(catalog=catalog, topic_prefix="org.test", publishers=[publisher])
    messenger.emit(step(0))
    publisher.down = True
    for n in range(1, 4):
        messenger.emit(step(n))
    # One attempt failed; the later messages wait behind it instead of each waiting for a timeout.
    assert publisher.attempts == 2
    assert pending_ids(catalog) == journal_ids(messenger)[1:]


def test_flush_delivers_the_waiting_messages_in_journal_order(catalog: Catalog) -> None:
    publisher = FlakyPublisher()
    messenger = Messenger(catalog=catalog, topic_prefix="org.test", publishers=[publisher])
    publisher.down = True
    for n in range(5):
        messenger.emit(step(n))
    assert messenger.flush_outbox().pending == 5
    publisher.down = False
    result = messenger.flush_outbox()
    assert (result.delivered, result.pending) == (5, 0)
    assert publisher.delivered == journal_ids(messenger)
    messenger.emit(step(9))  # back to direct delivery
    assert publisher.delivered[-1] == journal_ids(messenger)[-1]


def test_the_background_flush_delivers_once_the_publisher_is_back(catalog: Catalog) -> None:
    publisher = FlakyPublisher()
    messenger = Messenger(
        catalog=catalog, topic_prefix="org.test", publishers=[publisher], flush_interval=0.05
    )
    messenger.emit(step(0))
    publisher.down = True
    messenger.emit(step(1))
    messenger.emit(step(2))
    publisher.down = False
    deadline = time.monotonic() + 5
    while pending_ids(catalog) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pending_ids(catalog) == []
    assert publisher.delivered == journal_ids(messenger)
    messenger.close()


def test_a_new_messenger_delivers_what_an_earlier_run_left_first(catalog: Catalog) -> None:
    first = FlakyPublisher()
    first.down = True
    earlier = Messenger(catalog=catalog, topic_prefix="org.test", publishers=[first])
    earlier.emit(step(1))
    earlier.emit(step(2))
    second = FlakyPublisher()
    later = Messenger(catalog=catalog, topic_prefix="org.test", publishers=[second])
    later.emit(step(3))
    assert second.delivered == journal_ids(earlier) + journal_ids(later)
    assert pending_ids(catalog) == []


def test_an_undeliverable_message_stays_pending_but_does_not_hold_back_the_others(
    catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    publisher = FlakyPublisher()
    messenger = Messenger(catalog=catalog, topic_prefix="org.test", publishers=[publisher])
    publisher.down = True
    for n in range(3):
        messenger.emit(step(n))
    bad = journal_ids(messenger)[1]
    publisher.reject.add(bad)
    publisher.down = False
    with caplog.at_level(logging.ERROR, logger="fedimg.messages"):
        result = messenger.flush_outbox()
    assert (result.delivered, result.pending, result.undeliverable) == (2, 1, 1)
    assert pending_ids(catalog) == [bad]
    assert bad in caplog.text


def test_close_flushes_once_more_and_closes_the_publishers(catalog: Catalog) -> None:
    publisher = FlakyPublisher()
    messenger = Messenger(catalog=catalog, topic_prefix="org.test", publishers=[publisher])
    publisher.down = True
    messenger.emit(step(1))
    publisher.down = False
    messenger.close()
    assert pending_ids(catalog) == []
    assert publisher.closed


def test_a_published_job_gets_the_successor_summary_once(catalog: Catalog) -> None:
    from fedora_image_uploader_messages import AwsPublishedV1

    messenger = Messenger(catalog=catalog, topic_prefix="org.test")
    regions = {"us-east-1": "ami-00000001", "eu-west-1": "ami-00000002"}
    messenger.emit(JobFinished(job_id="job-1", image=IMAGE, status="published", regions=regions))
    (summary,) = messenger.sent
    assert summary.topic == "fedora_image_uploader.published.v1.aws.Cloud_Base.41.x86_64"
    assert summary.body == {
        "architecture": "x86_64",
        "compose_id": "Fedora-41-20241020.0",
        "image_name": IMAGE.name,
        "regions": {"eu-west-1": "ami-00000002", "us-east-1": "ami-00000001"},
        "release": 41,
        "subvariant": "Cloud_Base",
    }
    AwsPublishedV1(topic=summary.topic, body=summary.body).validate()
    record = catalog.message(summary.msg_id)
    assert record is not None
    assert record.topic == "org.test." + summary.topic
    assert record.headers == {"fedora_messaging_schema": "fedora_image_uploader.published.v1.aws"}


def test_the_summary_names_the_compose_architecture_and_prefers_the_compose_metadata(
    catalog: Catalog,
) -> None:
    image = ImageInfo(
        name="Fedora-Cloud-Base-AmazonEC2.aarch64-41-1.4",
        url="https://example.test/x.raw.xz",
        arch="arm64",
        compose_id="Fedora-41-20241020.0",
        release="42",
        subvariant="Cloud_Base",
    )
    messenger = Messenger(catalog=catalog, topic_prefix="org.test")
    messenger.emit(
        JobFinished(job_id="j", image=image, status="partial", regions={"us-east-1": "ami-1"})
    )
    (summary,) = messenger.sent
    assert summary.topic.endswith(".Cloud_Base.42.aarch64")
    assert summary.body["architecture"] == "aarch64"


@pytest.mark.parametrize("status", ["failed", "interrupted"])
def test_a_job_that_did_not_publish_gets_no_summary(catalog: Catalog, status: str) -> None:
    messenger = Messenger(catalog=catalog, topic_prefix="org.test")
    messenger.emit(JobFinished(job_id="j", image=IMAGE, status=status, regions={}))  # type: ignore[arg-type]
    assert messenger.sent == []


def test_the_summary_is_skipped_with_a_log_line_when_the_release_is_unknown(
    catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    image = ImageInfo(
        name="my-own-image", url="file:///x.raw.xz", arch="x86_64", compose_id="Fedora-41-1"
    )
    messenger = Messenger(catalog=catalog, topic_prefix="org.test")
    with caplog.at_level(logging.INFO, logger="fedimg.successor"):
        messenger.emit(
            JobFinished(job_id="j", image=image, status="published", regions={"us-east-1": "a"})
        )
    assert messenger.sent == []
    assert "no successor summary for my-own-image: unknown release number and subvariant" in (
        caplog.text
    )


def test_the_summary_can_be_switched_off(catalog: Catalog) -> None:
    messenger = Messenger(catalog=catalog, topic_prefix="org.test", successor_summary=False)
    messenger.emit(
        JobFinished(job_id="j", image=IMAGE, status="published", regions={"us-east-1": "a"})
    )
    assert messenger.sent == []


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Fedora-Cloud-Base-AmazonEC2.x86_64-41-1.4", ("41", "Cloud_Base")),
        ("Fedora-Cloud-Base-AmazonEC2.x86_64-41-Prerelease-1.2", ("41", "Cloud_Base")),
        ("Fedora-Cloud-Base-28-1.1.x86_64", ("28", "Cloud_Base")),
        ("Fedora-AtomicHost-28-1.1.aarch64", ("28", "AtomicHost")),
        ("Fedora-Cloud-Base-Rawhide-20240101.n.0.x86_64", ("Rawhide", "Cloud_Base")),
        ("ubuntu-noble-24.04", (None, None)),
    ],
)
def test_release_and_subvariant_come_from_fedora_image_names(
    name: str, expected: tuple[str | None, str | None]
) -> None:
    from fedimg.successor import release_and_subvariant

    assert release_and_subvariant(name) == expected

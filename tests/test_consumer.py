"""The compose trigger: Pungi's message on the real broker → uploads → fedimg's messages on the bus."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedimg.bus import IncomingMessage
from fedimg.catalog import Catalog
from fedimg.cli import main
from fedimg.config import Config
from fedimg.consumer import (
    ComposeConsumer,
    MalformedMessage,
    parse_compose_message,
    run_consumer,
)
from fedimg.runtime import Runtime
from fedimg.sampleimage import SampleImage
from tests.amqp_support import (
    PUNGI_TOPIC,
    TEST_PREFIX,
    BrokerTap,
    ComposeTree,
    Received,
    TcpProxy,
    TreeImage,
    build_compose_tree,
    bus_config,
    closed_port,
    preserved_logging,
    schema_valid,
    serve_directory,
    write_toml,
)

COMPOSE_ID = "Fedora-41-20250101.0"
EC2_X86 = "Cloud/x86_64/images/Fedora-Cloud-Base-AmazonEC2.x86_64-41-20250101.0.raw.xz"
EC2_ARM = "Cloud/aarch64/images/Fedora-Cloud-Base-AmazonEC2.aarch64-41-20250101.0.raw.xz"
#: Per image with 2 regions and 1 flavour: upload started+completed, 1 copy, 2 publish, 1 summary.
MESSAGES_PER_IMAGE = 6


@pytest.fixture(autouse=True)
def _logging() -> Iterator[None]:
    with preserved_logging():
        yield


@pytest.fixture
def compose_tree(tmp_path: Path, sample_image: SampleImage) -> ComposeTree:
    """A compose with the two AWS images (the sample image under both names) and others."""
    return build_compose_tree(
        tmp_path / "composes",
        COMPOSE_ID,
        [
            TreeImage("Cloud", "x86_64", EC2_X86, source=sample_image.path),
            TreeImage("Cloud", "aarch64", EC2_ARM, source=sample_image.path),
            TreeImage(
                "Server",
                "x86_64",
                "Server/x86_64/images/Fedora-Server-41-20250101.0.x86_64.raw.xz",
                subvariant="Server",
            ),
        ],
    )


@pytest.fixture
def compose_url(compose_tree: ComposeTree) -> Iterator[str]:
    with serve_directory(compose_tree.root) as base:
        yield f"{base}/{COMPOSE_ID}/compose"


def pungi_body(status: str, location: str, compose_id: str = COMPOSE_ID) -> dict[str, Any]:
    """A fedora-messaging era pungi.compose.status.change body."""
    return {
        "compose_id": compose_id,
        "compose_date": "20250101",
        "compose_type": "production",
        "compose_respin": 0,
        "compose_label": "RC-1.1",
        "compose_path": "/mnt/koji/compose/41/" + compose_id,
        "location": location,
        "release_short": "Fedora",
        "release_name": "Fedora",
        "release_version": "41",
        "release_type": "ga",
        "release_is_layered": False,
        "status": status,
    }


def consumer_config(tmp_path: Path, tap: BrokerTap, **messaging: Any) -> Config:
    return bus_config(
        tmp_path,
        exchange=tap.exchange,
        queue=tap.declare_queue(),
        messaging={
            "consume_topics": ["org.fedoraproject.*.pungi.compose.status.change"],
            **messaging,
        },
    )


# --- reading the message ---------------------------------------------------------------------


def test_the_three_reference_layouts_are_read(reference_dir: Path) -> None:
    found = {}
    for path in sorted((reference_dir / "pungi-messages").glob("*.json")):
        message = json.loads(path.read_text())["message"]
        found[path.stem] = parse_compose_message(message["body"])
    bridge = found["FINCOMPLETE.zmq-amqp-bridge"]
    assert (bridge.compose_id, bridge.status) == (
        "Fedora-Rawhide-20170206.n.0",
        "FINISHED_INCOMPLETE",
    )
    plain = found["FINISHEDCOMPOSE.fedora-messaging"]
    assert (plain.compose_id, plain.status) == ("Fedora-Atomic-25-20170206.0", "FINISHED")
    assert plain.location == (
        "http://kojipkgs.fedoraproject.org/compose/twoweek/Fedora-Atomic-25-20170206.0/compose"
    )
    hub = found["test_invalid_status"]
    assert (hub.status, hub.release_version) == ("STARTED", "28")


@pytest.mark.parametrize(
    "wrap",
    [
        lambda p: p,
        lambda p: {"msg_id": "2025-1", "msg": p},
        lambda p: {
            "username": "root",
            "i": 1,
            "timestamp": 1.0,
            "msg_id": "x",
            "topic": "t",
            "msg": p,
        },
    ],
    ids=["fedora-messaging", "bridge", "fedmsg-hub"],
)
def test_each_layout_gives_the_same_status(wrap: Callable[[dict[str, Any]], Any]) -> None:
    status = parse_compose_message(wrap(pungi_body("FINISHED", "https://k.test/c/compose")))
    assert (status.compose_id, status.status, status.location, status.release_version) == (
        COMPOSE_ID,
        "FINISHED",
        "https://k.test/c/compose",
        "41",
    )


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ([1, 2], "no status"),
        ({"compose_id": "x"}, "no status"),
        ({"status": "FINISHED_HAPPILY", "compose_id": "x"}, "unknown compose status"),
        ({"status": "FINISHED"}, "no compose_id"),
        ({"status": "FINISHED", "compose_id": "x", "location": 7}, "location is not a string"),
        ({"msg": "FINISHED"}, "no status"),
    ],
)
def test_malformed_bodies_are_refused_with_the_reason(body: Any, reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason):
        parse_compose_message(body)


# --- deciding, without the broker ------------------------------------------------------------


@pytest.mark.parametrize("status", ["STARTED", "DOOMED", "TERMINATED"])
def test_unfinished_composes_start_nothing(tmp_path: Path, status: str) -> None:
    runtime = Runtime(config=bus_config(tmp_path, exchange="x"))
    handled = ComposeConsumer(runtime).process(pungi_body(status, "https://k.test/c/compose"))
    assert handled.action == "ignored"
    assert handled.outcomes == ()
    assert runtime.embedded is None  # nothing was started, let alone uploaded


@pytest.mark.parametrize("location", ["/mnt/koji/compose/x", "ftp://k.test/c/compose", ""])
def test_a_location_that_is_not_http_is_unsupported(tmp_path: Path, location: str) -> None:
    runtime = Runtime(config=bus_config(tmp_path, exchange="x"))
    handled = ComposeConsumer(runtime).process(pungi_body("FINISHED", location))
    assert handled.action == "unsupported"
    assert runtime.embedded is None


def test_a_compose_without_metadata_is_acknowledged_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = Runtime(config=bus_config(tmp_path, exchange="x"))
    consumer = ComposeConsumer(runtime)
    with serve_directory(tmp_path) as base, caplog.at_level(logging.WARNING, "fedimg.consumer"):
        disposition = consumer.handle(
            IncomingMessage(
                topic=PUNGI_TOPIC,
                body=pungi_body("FINISHED", f"{base}/gone/compose"),
                msg_id="m-1",
            )
        )
    assert disposition == "ack"
    assert consumer.history[0].action == "no-metadata"
    assert "the compose has no image metadata; acknowledged" in caplog.text


def test_a_compose_without_matching_images_starts_nothing(tmp_path: Path) -> None:
    tree = build_compose_tree(
        tmp_path,
        COMPOSE_ID,
        [TreeImage("Server", "x86_64", "Server/x86_64/images/S.raw.xz", subvariant="Server")],
    )
    runtime = Runtime(config=bus_config(tmp_path, exchange="x"))
    with serve_directory(tree.root) as base:
        handled = ComposeConsumer(runtime).process(
            pungi_body("FINISHED", f"{base}/{COMPOSE_ID}/compose")
        )
    assert handled.action == "no-images"
    assert handled.outcomes == ()
    assert runtime.embedded is None


@pytest.mark.slow
def test_an_image_that_fails_its_checksum_does_not_stop_the_others(
    tmp_path: Path,
    sample_image: SampleImage,
    runtime_factory: Callable[[Config], Runtime],
) -> None:
    tree = build_compose_tree(
        tmp_path / "composes",
        COMPOSE_ID,
        [
            TreeImage("Cloud", "x86_64", EC2_X86, source=sample_image.path),
            TreeImage("Cloud", "aarch64", EC2_ARM, source=sample_image.path, sha256="0" * 64),
        ],
    )
    config = bus_config(tmp_path, exchange="x", messaging={"publishers": ["journal"]})
    runtime = runtime_factory(config)
    with serve_directory(tree.root) as base:
        handled = ComposeConsumer(runtime).process(
            pungi_body("FINISHED_INCOMPLETE", f"{base}/{COMPOSE_ID}/compose")
        )
    assert handled.action == "published"
    by_name = {o.url.rsplit("/", 1)[1]: o for o in handled.outcomes}
    arm = by_name[EC2_ARM.rsplit("/", 1)[1]]
    x86 = by_name[EC2_X86.rsplit("/", 1)[1]]
    assert x86.status == "published"
    assert arm.status == "failed"
    assert arm.error is not None
    assert "0000000000" in arm.error  # the expected checksum is named
    jobs = {job.image_name: job for job in runtime.catalog.jobs()}
    assert jobs["Fedora-Cloud-Base-AmazonEC2.x86_64-41-20250101.0"].image_sha256 == (
        sample_image.sha256_compressed
    )
    assert jobs["Fedora-Cloud-Base-AmazonEC2.aarch64-41-20250101.0"].status == "failed"


# --- on the real broker ----------------------------------------------------------------------


def proxied_config(tmp_path: Path, tap: BrokerTap, proxy: TcpProxy) -> Config:
    """A config reaching the broker through ``proxy``, quick to notice it is cut."""
    return bus_config(
        tmp_path,
        exchange=tap.exchange,
        amqp_url=proxy.url(),
        messaging={"publish_timeout": 0.5, "flush_interval": 0.2},
    )


def assert_schema_valid_fedimg_messages(received: list[Received]) -> None:
    for message in received:
        schema_valid(message)


@pytest.mark.slow
def test_a_finished_compose_on_the_bus_is_uploaded_and_every_message_arrives_schema_valid(
    tmp_path: Path,
    tap: BrokerTap,
    compose_url: str,
    sample_image: SampleImage,
    runtime_factory: Callable[[Config], Runtime],
) -> None:
    config = consumer_config(tmp_path, tap)
    tap.publish(PUNGI_TOPIC, pungi_body("FINISHED", compose_url))
    runtime = runtime_factory(config)
    consumer = run_consumer(runtime, max_messages=1, timeout=120)

    (handled,) = consumer.history
    assert handled.action == "published", handled.detail
    assert [o.status for o in handled.outcomes] == ["published", "published"]
    jobs = runtime.catalog.jobs()
    assert {(j.compose_id, j.release, j.status) for j in jobs} == {(COMPOSE_ID, "41", "published")}
    assert {j.image_sha256 for j in jobs} == {sample_image.sha256_compressed}
    assert runtime.catalog.pending_messages() == []
    assert tap.queue_depth(config.messaging.queue) == 0  # acknowledged

    received = tap.collect(2 * MESSAGES_PER_IMAGE)
    assert tap.drain() == []
    assert_schema_valid_fedimg_messages(received)
    topics = Counter(r.topic.removeprefix(TEST_PREFIX + ".") for r in received)
    assert topics == {
        "fedimg.image.upload": 4,
        "fedimg.image.copy": 2,
        "fedimg.image.publish": 4,
        "fedora_image_uploader.published.v1.aws.Cloud_Base.41.x86_64": 1,
        "fedora_image_uploader.published.v1.aws.Cloud_Base.41.aarch64": 1,
    }
    summaries = [r.body for r in received if "fedora_image_uploader" in r.topic]
    for summary in summaries:
        assert summary["compose_id"] == COMPOSE_ID
        assert summary["release"] == 41
        assert set(summary["regions"]) == {"us-east-1", "eu-west-1"}
    assert {r.body["compose"] for r in received if r.topic.endswith("image.upload")} == {COMPOSE_ID}
    journal, _ = runtime.catalog.messages(limit=100, newest_first=False)
    assert [r.message_id for r in received] == [m.msg_id for m in journal]


def test_unfinished_and_malformed_messages_are_acknowledged_and_start_nothing(
    tmp_path: Path,
    tap: BrokerTap,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = consumer_config(tmp_path, tap)
    runtime = Runtime(config=config)
    tap.publish(PUNGI_TOPIC, raw=b"{not json")  # fedora-messaging drops it before fedimg
    tap.publish(PUNGI_TOPIC, pungi_body("STARTED", "https://k.test/c/compose"))
    tap.publish(PUNGI_TOPIC.replace(".prod.", ".stg."), pungi_body("DOOMED", "https://k.test/c"))
    tap.publish(PUNGI_TOPIC, {"status": 42})
    tap.publish("org.fedoraproject.prod.other.topic", pungi_body("FINISHED", "https://k.test/c"))
    with caplog.at_level(logging.INFO):
        consumer = run_consumer(runtime, max_messages=3, timeout=60)
    assert [h.action for h in consumer.history] == ["ignored", "ignored", "malformed"]
    assert tap.queue_depth(config.messaging.queue) == 0  # nothing left to be redelivered
    assert runtime.embedded is None
    assert Catalog(config.catalog_url()).jobs() == []
    assert "malformed compose message: unknown compose status 42; acknowledged" in caplog.text
    runtime.close()


def test_fedimg_consume_once_handles_one_message_and_exits(tmp_path: Path, tap: BrokerTap) -> None:
    config = consumer_config(tmp_path, tap)
    tap.publish(PUNGI_TOPIC, pungi_body("STARTED", "https://k.test/c/compose"))
    tap.publish(PUNGI_TOPIC, pungi_body("DOOMED", "https://k.test/c/compose"))
    path = write_toml(tmp_path / "fedimg.toml", config)
    assert main(["consume", "--once", "--config", str(path)]) == 0
    assert tap.queue_depth(config.messaging.queue) == 1  # the second one waits for the next run


@pytest.mark.slow
def test_messages_of_an_upload_while_the_broker_is_away_arrive_once_it_is_back(
    tmp_path: Path,
    tap: BrokerTap,
    compose_tree: ComposeTree,
    runtime_factory: Callable[[Config], Runtime],
) -> None:
    proxy = TcpProxy()
    runtime = runtime_factory(proxied_config(tmp_path, tap, proxy))
    try:
        # The broker is away for the whole upload: the job must not notice.
        from fedimg.trigger import ImageJob, publish_images

        (outcome,) = publish_images(
            runtime, [ImageJob(url=str(compose_tree.compose_dir / EC2_X86), compose_id=COMPOSE_ID)]
        )
        assert outcome.status == "published"
        journal = [m.msg_id for m in runtime.messenger.sent]
        assert len(journal) == MESSAGES_PER_IMAGE
        assert [r.msg_id for r in runtime.catalog.pending_messages()] == journal

        proxy.start()  # back: the background flush delivers, in order
        received = tap.collect(len(journal), timeout=30)
        assert [r.message_id for r in received] == journal
        assert_schema_valid_fedimg_messages(received)
        assert runtime.catalog.pending_messages() == []
    finally:
        runtime.close()
        proxy.stop()


@pytest.mark.slow
def test_a_broker_cut_in_the_middle_of_a_run_loses_nothing(
    tmp_path: Path, tap: BrokerTap, runtime_factory: Callable[[Config], Runtime]
) -> None:
    from fedimg.events import ImageInfo, StepEvent

    proxy = TcpProxy()
    proxy.start()
    runtime = runtime_factory(proxied_config(tmp_path, tap, proxy))
    image = ImageInfo(name="Fedora-Cloud-Base-AmazonEC2.x86_64-41-1.1", url="u", arch="x86_64")

    def emit(n: int) -> None:
        runtime.messenger.emit(
            StepEvent(job_id="j", step="upload", status="started", region=f"r-{n}", image=image)
        )

    try:
        emit(0)
        proxy.stop()
        for n in range(1, 4):
            emit(n)
        proxy.start()
        emit(4)
        received = tap.collect(5, timeout=30)
        assert [r.body["destination"] for r in received] == [f"r-{n}" for n in range(5)]
    finally:
        runtime.close()
        proxy.stop()


# --- manual triggers -------------------------------------------------------------------------


def test_trigger_dry_run_prints_the_plan_and_publishes_nothing(
    tmp_path: Path, compose_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = bus_config(tmp_path, exchange="x", amqp_url=f"amqp://127.0.0.1:{closed_port()}/")
    path = write_toml(tmp_path / "fedimg.toml", config)
    code = main(
        [
            "trigger",
            "--compose",
            compose_url,
            "-v",
            "gp3",
            "--dry-run",
            "--json",
            "--config",
            str(path),
        ]
    )
    assert code == 0
    plans = json.loads(capsys.readouterr().out)
    assert [(p["image"], p["arch"], p["flavours"], p["regions"]) for p in plans] == [
        (
            "Fedora-Cloud-Base-AmazonEC2.aarch64-41-20250101.0",
            "arm64",
            ["hvm-ebs-gp3"],
            ["us-east-1", "eu-west-1"],
        ),
        (
            "Fedora-Cloud-Base-AmazonEC2.x86_64-41-20250101.0",
            "x86_64",
            ["hvm-ebs-gp3"],
            ["us-east-1", "eu-west-1"],
        ),
    ]
    assert all(p["release"] == "41" and p["subvariant"] == "Cloud_Base" for p in plans)
    assert all(p["sha256"] and len(p["sha256"]) == 64 for p in plans)
    assert Catalog(config.catalog_url()).jobs() == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["trigger", "-u", "https://k.test/x.raw.xz"], "give -u URL and -c COMPOSE_ID"),
        (["trigger", "-u", "u", "-c", "c", "-v", "ssd"], "unknown volume type 'ssd'"),
    ],
)
def test_trigger_refuses_incomplete_requests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    path = write_toml(tmp_path / "fedimg.toml", bus_config(tmp_path, exchange="x"))
    assert main([*argv, "--config", str(path)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_trigger_without_p_keeps_the_messages_off_the_bus(
    tmp_path: Path, sample_image: SampleImage, capsys: pytest.CaptureFixture[str]
) -> None:
    # The broker URL is a closed port: any attempt to publish would leave messages pending.
    config = bus_config(
        tmp_path,
        exchange="x",
        amqp_url=f"amqp://127.0.0.1:{closed_port()}/",
        regions=["us-east-1"],
    )
    path = write_toml(tmp_path / "fedimg.toml", config)
    code = main(
        ["trigger", "-u", str(sample_image.path), "-c", COMPOSE_ID, "--json", "--config", str(path)]
    )
    assert code == 0
    (outcome,) = json.loads(capsys.readouterr().out)
    assert outcome["status"] == "published"
    catalog = Catalog(config.catalog_url())
    try:
        assert catalog.pending_messages() == []
        _rows, total = catalog.messages(limit=100)
        assert total > 0
        assert catalog.jobs()[0].compose_id == COMPOSE_ID
    finally:
        catalog.close()


@pytest.mark.slow
def test_trigger_compose_with_p_and_a_volume_type_publishes_only_those_flavours_to_the_bus(
    tmp_path: Path, tap: BrokerTap, compose_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = bus_config(tmp_path, exchange=tap.exchange, volume_types=["standard", "gp2"])
    path = write_toml(tmp_path / "fedimg.toml", config)
    code = main(["trigger", "--compose", compose_url, "-p", "-v", "gp2", "--config", str(path)])
    assert code == 0, capsys.readouterr().err
    received = tap.collect(2 * MESSAGES_PER_IMAGE)
    assert_schema_valid_fedimg_messages(received)
    vol_types = {r.body["extra"]["vol_type"] for r in received if "extra" in r.body}
    assert vol_types == {"gp2"}
    assert tap.drain() == []


# --- stopping --------------------------------------------------------------------------------


def test_a_compose_interrupted_by_a_stop_goes_back_to_the_queue(
    tmp_path: Path, tap: BrokerTap
) -> None:
    import threading

    tree = build_compose_tree(
        tmp_path / "composes",
        COMPOSE_ID,
        [TreeImage("Cloud", "x86_64", EC2_X86), TreeImage("Cloud", "aarch64", EC2_ARM)],
    )
    config = consumer_config(tmp_path, tap)
    stop = threading.Event()
    stop.set()  # SIGTERM arrived: the jobs of this message do not start
    runtime = Runtime(config=config)
    with serve_directory(tree.root) as base:
        tap.publish(PUNGI_TOPIC, pungi_body("FINISHED", f"{base}/{COMPOSE_ID}/compose"))
        consumer = run_consumer(runtime, max_messages=1, timeout=60, stop=stop)
    (handled,) = consumer.history
    assert [o.status for o in handled.outcomes] == ["interrupted", "interrupted"]
    assert tap.queue_depth(config.messaging.queue) == 1  # for the next run
    assert runtime.embedded is None
    runtime.close()

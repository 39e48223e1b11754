"""The EC2 service end to end on the embedded AWS: requests sent, messages, publicity, failures."""

from __future__ import annotations

import re
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from fedimg.aws import ClientFactory
from fedimg.config import Config
from fedimg.runtime import Runtime
from fedimg.sampleimage import SampleImage
from fedimg.services.ec2.service import PublishRequest, PublishResult
from fedimg.source import resolve_source
from tests.conftest import Recorder, leaked, make_config

REGIONS = ("us-east-1", "eu-west-1", "ap-southeast-2")


def script(tmp_path: Path, body: str, name: str = "test.sh") -> str:
    """A test script file that runs ``body`` in sh."""
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def publish(
    runtime_factory: Callable[[Config], Runtime],
    config: Config,
    image: SampleImage,
    **request: object,
) -> tuple[PublishResult, Runtime]:
    runtime = runtime_factory(config)
    result = runtime.service().publish(
        PublishRequest(source=resolve_source(str(image.path)), **request)  # type: ignore[arg-type]
    )
    return result, runtime


def test_publishes_public_amis_in_every_region(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    recorder: Recorder,
    clients: ClientFactory,
) -> None:
    config = make_config(
        tmp_path, regions=list(REGIONS), test=script(tmp_path, 'test -n "$FEDIMG_AMI_ID"')
    )
    result, _ = publish(runtime_factory, config, sample_image, compose_id="Fedora-41-20241025.0")

    assert result.status == "published", result.error
    assert result.exit_code == 0
    assert result.image.sha256 == sample_image.sha256_compressed
    assert {(a.region, a.flavour) for a in result.amis} == {
        (r, f) for r in REGIONS for f in ("hvm-ebs-standard", "hvm-ebs-gp2")
    }
    assert all(a.public for a in result.amis)
    assert result.copies == {"snapshot": 2, "image": 0}
    for ami in result.amis:
        described = clients.ec2(ami.region).describe_images(ImageIds=[ami.id])["Images"][0]
        assert described["Public"] is True
        assert described["Name"] == ami.name
        attribute = clients.ec2(ami.region).describe_snapshot_attribute(
            SnapshotId=ami.snapshot_id, Attribute="createVolumePermission"
        )
        assert {"Group": "all"} in attribute["CreateVolumePermissions"]
    assert leaked(clients, list(REGIONS)) == []


def test_register_image_requests_carry_the_whole_flavour(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    recorder: Recorder,
) -> None:
    config = make_config(tmp_path, regions=list(REGIONS))
    result, _ = publish(runtime_factory, config, sample_image)
    assert result.status == "published", result.error

    registers = recorder.of("RegisterImage")
    assert len(registers) == len(REGIONS) * 2
    snapshots_by_region = {a.region: a.snapshot_id for a in result.amis}
    name = re.compile(
        r"^Fedora-Cloud-Base-Test-41-1\.1\.x86_64-hvm-(?P<region>[a-z0-9-]+)-(?P<vol>standard|gp2)-0$"
    )
    for call in registers:
        params = call.params
        match = name.match(params["Name"])
        assert match, params["Name"]
        region = match["region"]
        assert params["VirtualizationType"] == "hvm"
        assert params["Architecture"] == "x86_64"
        assert params["EnaSupport"] is True
        assert params["SriovNetSupport"] == "simple"
        assert params["RootDeviceName"] == "/dev/sda1"
        (mapping,) = params["BlockDeviceMappings"]
        assert mapping["DeviceName"] == "/dev/sda1"
        assert mapping["Ebs"] == {
            "SnapshotId": snapshots_by_region[region],
            "VolumeSize": 1,
            "VolumeType": match["vol"],
            "DeleteOnTermination": True,
        }
        tags = {t["Key"]: t["Value"] for t in params["TagSpecifications"][0]["Tags"]}
        assert tags["fedimg:image-sha256"] == sample_image.sha256_compressed
        assert tags["fedimg:flavour"] == f"hvm-ebs-{match['vol']}"
        assert tags["fedimg:job"] == result.job_id

    copies = recorder.of("CopySnapshot")
    assert sorted(c.region for c in copies) == sorted(REGIONS[1:])
    base_snapshot = snapshots_by_region["us-east-1"]
    assert all(c.params["SourceSnapshotId"] == base_snapshot for c in copies)
    assert all(c.params["SourceRegion"] == "us-east-1" for c in copies)

    launch = recorder.of("ModifyImageAttribute")
    assert sorted(c.params["ImageId"] for c in launch) == sorted(a.id for a in result.amis)
    assert all(c.params["LaunchPermission"] == {"Add": [{"Group": "all"}]} for c in launch)
    volume = recorder.of("ModifySnapshotAttribute")
    assert {c.params["SnapshotId"] for c in volume} == set(snapshots_by_region.values())
    assert all(
        c.params["Attribute"] == "createVolumePermission"
        and c.params["OperationType"] == "add"
        and c.params["GroupNames"] == ["all"]
        for c in volume
    )


def test_complete_snapshot_and_start_snapshot_parameters(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    recorder: Recorder,
) -> None:
    result, _ = publish(runtime_factory, make_config(tmp_path, regions=["us-east-1"]), sample_image)
    assert result.upload is not None
    (start,) = recorder.of("StartSnapshot")
    assert start.params["VolumeSize"] == 1
    assert len(start.params["ClientToken"]) == 64
    (complete,) = recorder.of("CompleteSnapshot")
    assert complete.params["ChangedBlocksCount"] == result.upload.blocks_written
    assert complete.params["ChecksumAlgorithm"] == "SHA256"
    assert complete.params["ChecksumAggregationMethod"] == "LINEAR"
    assert len(recorder.of("PutSnapshotBlock")) == result.upload.blocks_written
    assert result.upload.blocks_zero > 0


def test_failing_test_stops_copy_and_publishing(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    recorder: Recorder,
    clients: ClientFactory,
) -> None:
    config = make_config(
        tmp_path, regions=list(REGIONS), test=script(tmp_path, "echo broken image >&2; exit 7")
    )
    result, runtime = publish(runtime_factory, config, sample_image)

    assert result.status == "failed"
    assert result.exit_code == 1
    assert "exited 7" in (result.error or "")
    assert recorder.of("CopySnapshot") == []
    assert recorder.of("ModifyImageAttribute") == []
    assert recorder.of("ModifySnapshotAttribute") == []
    failed = [m for m in runtime.messenger.sent if m.body.get("status") == "failed"]
    assert [m.topic for m in failed] == ["fedimg.image.test"]
    assert "broken image" in failed[0].body["extra"]["data"]
    # delete_images_on_failure (the default): the tested AMIs and their snapshot are gone.
    assert leaked(clients, list(REGIONS)) == []
    assert clients.ec2("us-east-1").describe_images(Owners=["self"])["Images"] == []


def test_messages_follow_the_legacy_order_and_fields(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
) -> None:
    config = make_config(
        tmp_path, regions=["us-east-1", "eu-west-1"], test=script(tmp_path, "exit 0")
    )
    result, runtime = publish(runtime_factory, config, sample_image, compose_id="Fedora-41-X")
    assert result.status == "published", result.error
    sent = [m for m in runtime.messenger.sent if m.topic.startswith("fedimg.image.")]
    kinds = [(m.topic.rsplit(".", 1)[1], m.body.get("status")) for m in sent]
    assert kinds[:2] == [("upload", "started")] * 2
    assert kinds[2:4] == [("upload", "completed")] * 2
    # one test per (virtualization, storage): the HVM EBS row
    assert kinds[4:6] == [("test", "started"), ("test", "completed")]
    assert list(kinds[6:8]) == [("copy", None)] * 2
    assert list(kinds[8:]) == [("publish", None)] * 4

    upload_done = sent[2].body
    assert set(upload_done) == {
        "image_url",
        "image_name",
        "destination",
        "service",
        "status",
        "compose",
        "extra",
    }
    assert upload_done["service"] == "EC2"
    assert upload_done["compose"] == "Fedora-41-X"
    assert upload_done["image_name"] == "Fedora-Cloud-Base-Test-41-1.1.x86_64"
    assert upload_done["extra"]["id"].startswith("ami-")
    assert upload_done["extra"]["virt_type"] == "hvm"
    assert upload_done["extra"]["vol_type"] in ("standard", "gp2")
    copy = sent[6].body
    assert copy["compose_id"] == "Fedora-41-X"
    assert copy["destination"] == "eu-west-1"
    assert copy["extra"]["source_image_id"].startswith("ami-")
    publish_body = sent[8].body
    assert {"image_name", "image_url", "architecture", "destination", "service", "compose"} <= set(
        publish_body
    )
    journal, _total = runtime.catalog.messages(newest_first=False, limit=100)
    legacy = [r.topic for r in journal if ".fedimg.image." in r.topic]
    assert legacy == [f"org.fedoraproject.dev.{m.topic}" for m in sent]


def test_rerun_of_a_published_image_reuses_its_amis(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    recorder: Recorder,
) -> None:
    config = make_config(tmp_path, regions=["us-east-1", "eu-west-1"])
    first, _ = publish(runtime_factory, config, sample_image)
    second, _ = publish(runtime_factory, config, sample_image)
    assert first.status == second.status == "published"
    # The snapshot is uploaded again (its checksum is only known after reading), but no AMI and
    # no cross-region copy is made twice.
    assert {a.id for a in first.amis} == {a.id for a in second.amis}
    assert len(recorder.of("RegisterImage")) == 4
    assert len(recorder.of("CopySnapshot")) == 1


def test_pv_rows_use_the_ami_list_kernels(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    recorder: Recorder,
) -> None:
    config = make_config(
        tmp_path,
        amis=[
            {"region": "us-east-1", "arch": "x86_64", "ami": "ami-11111111", "aki": "aki-aaaa1111"},
            {"region": "eu-west-1", "arch": "x86_64", "ami": "ami-22222222", "aki": "aki-bbbb2222"},
        ],
    )
    result, _ = publish(runtime_factory, config, sample_image)
    assert result.status == "published", result.error
    assert {a.flavour for a in result.amis} == {
        "hvm-ebs-standard",
        "hvm-ebs-gp2",
        "pv-ebs-standard",
        "pv-ebs-gp2",
    }
    pv = [
        c for c in recorder.of("RegisterImage") if c.params["VirtualizationType"] == "paravirtual"
    ]
    assert len(pv) == 4
    kernels = {c.params["Name"].split("-paravirtual-")[1][:9]: c.params["KernelId"] for c in pv}
    assert kernels == {"us-east-1": "aki-aaaa1111", "eu-west-1": "aki-bbbb2222"}
    assert all("EnaSupport" not in c.params for c in pv)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"regions": ["us-east-1", "xx-nowhere-9"]}, "unknown region(s) xx-nowhere-9"),
        ({"flavours": ["pv-ebs-gp2"], "regions": ["us-east-1"]}, "paravirtual needs an AKI"),
        ({"flavours": ["hvm-ebs-gp9"]}, "unknown volume type"),
    ],
)
def test_bad_plans_fail_before_any_aws_resource(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    recorder: Recorder,
    settings: dict[str, object],
    message: str,
) -> None:
    result, runtime = publish(runtime_factory, make_config(tmp_path, **settings), sample_image)
    assert result.status == "failed"
    assert result.exit_code == 2
    assert message in (result.error or "")
    assert not {"StartSnapshot", "RegisterImage", "RunInstances"} & set(recorder.operations())
    (failed,) = runtime.messenger.sent
    assert failed.topic == "fedimg.image.upload"
    assert failed.body["status"] == "failed"


def test_a_failed_rerun_never_removes_the_earlier_jobs_public_amis(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    clients: ClientFactory,
) -> None:
    good = make_config(tmp_path, regions=["us-east-1"])
    first, _ = publish(runtime_factory, good, sample_image)
    assert first.status == "published"
    bad = make_config(tmp_path, regions=["us-east-1"], test=script(tmp_path, "exit 1"))
    second, runtime = publish(runtime_factory, bad, sample_image)
    assert second.status == "failed"
    images = clients.ec2("us-east-1").describe_images(Owners=["self"])["Images"]
    assert {i["ImageId"] for i in images} == {a.id for a in first.amis}
    assert all(i["Public"] for i in images)
    rows = runtime.catalog.amis()
    assert {r.job_id for r in rows} == {first.job_id}
    assert all(r.state == "public" for r in rows)

"""The ``utility`` upload for real: a utility instance in the embedded AWS, reached over SSH, runs
``curl | xz -dc | dd`` onto its volume's device.

A real OpenSSH server on 127.0.0.1 stands for the utility instance; the seam maps the instance to
it and the volume's device to a file, whose content the tests hash. Images are served over HTTP
by a local server thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedimg import cli
from fedimg.aws import ClientFactory
from fedimg.config import Config
from fedimg.embedded import EmbeddedAWS
from fedimg.runtime import Runtime
from fedimg.sampleimage import SampleImage
from tests.conftest import Recorder, leaked, make_config, require
from tests.httpfiles import serve_files
from tests.ssh_support import LocalSeam, LocalSshd, running_sshd
from tests.ssh_support import publish_over_ssh as publish

REGION = "us-east-1"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSshd]:
    """An OpenSSH server on 127.0.0.1 for this module's tests (which also need curl)."""
    require(shutil.which("curl") is not None, "curl is not installed (apt-get install curl)")
    with running_sshd(tmp_path_factory.mktemp("sshd-utility")) as server:
        yield server


@pytest.fixture
def utility_ami(clients: ClientFactory) -> str:
    """A base AMI in the embedded AWS standing for the AMI list's first entry."""
    ec2 = clients.ec2(REGION)
    volume = ec2.create_volume(Size=1, AvailabilityZone=f"{REGION}a")["VolumeId"]
    snapshot = ec2.create_snapshot(VolumeId=volume)["SnapshotId"]
    ec2.delete_volume(VolumeId=volume)
    return ec2.register_image(
        Name="Fedora-Cloud-Base-40-utility",
        Architecture="x86_64",
        VirtualizationType="hvm",
        RootDeviceName="/dev/sda1",
        BlockDeviceMappings=[{"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": snapshot}}],
    )["ImageId"]


@pytest.fixture
def images(sample_image: SampleImage) -> Iterator[str]:
    """The sample image's directory over HTTP: the base URL."""
    with serve_files(sample_image.path.parent) as (base, _):
        yield base


def utility_settings(sshd: LocalSshd, utility_ami: str, **aws: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "regions": [REGION],
        "upload_method": "utility",
        "amis": [{"region": REGION, "arch": "x86_64", "ami": utility_ami}],
        "util_username": sshd.user,
        "util_instance_type": "c5.large",
        "ssh_timeout": 20,
        "console_timeout": 10,
        "volume_timeout": 10,
        "util_timeout": 120,
    }
    settings.update(aws)
    return settings


def device_file(tmp_path: Path) -> Path:
    device = tmp_path / "xvdf"
    device.write_bytes(b"")
    return device


def tags_of(call_params: dict[str, Any], resource: str) -> dict[str, str]:
    (spec,) = [s for s in call_params["TagSpecifications"] if s["ResourceType"] == resource]
    return {t["Key"]: t["Value"] for t in spec["Tags"]}


@pytest.mark.slow
def test_cli_upload_method_utility_writes_tests_and_publishes(
    tmp_path: Path,
    aws: EmbeddedAWS,
    sample_image: SampleImage,
    recorder: Recorder,
    clients: ClientFactory,
    sshd: LocalSshd,
    utility_ami: str,
    images: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    device = device_file(tmp_path)
    seam = LocalSeam(address_to=sshd.address, console=sshd.console(), device=device)
    test = tmp_path / "smoke.sh"
    test.write_text('#!/bin/sh\ntest -n "$FEDIMG_AMI_ID"\n')
    test.chmod(test.stat().st_mode | stat.S_IXUSR)
    config_file = tmp_path / "fedimg.toml"
    config_file.write_text(
        f"""
[general]
catalog_url = "sqlite:///{tmp_path / "catalog.sqlite"}"

[aws]
target = "embedded"
regions = ["{REGION}"]
amis = ["{REGION}|x86_64|{utility_ami}|"]
util_username = "{sshd.user}"
util_instance_type = "c5.large"
test = "{test}"
test_runner = "ssh"
test_username = "{sshd.user}"
ssh_timeout = 20
volume_timeout = 10
"""
    )
    made: list[Runtime] = []

    def runtime(config: Config) -> Runtime:
        built = Runtime(config=config, embedded=aws, seam=seam)
        built.hooks.append(("provide-client-params.*.*", recorder.hook))
        built.hooks.append(
            ("provide-client-params.ec2.ImportKeyPair", sshd.authorize_imported_keys)
        )
        made.append(built)
        return built

    monkeypatch.setattr(cli, "_runtime", runtime)
    url = f"{images}/{sample_image.path.name}"
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        argv = ["upload", url, "--method", "utility", "--json", "--progress", "none"]
        code = cli.main([*argv, "-c", str(config_file)])
    finally:
        # main() configures logging onto the captured stderr, which pytest closes.
        root.handlers[:] = handlers
        root.setLevel(level)
    out = json.loads(capsys.readouterr().out)

    assert code == 0, out["error"]
    assert out["status"] == "published"
    assert made[0].config.aws.upload_method == "utility"
    # What the utility instance wrote is the image, byte for byte.
    assert hashlib.sha256(device.read_bytes()).hexdigest() == sample_image.sha256_raw
    assert out["image"]["sha256"] == sample_image.sha256_compressed

    (create_snapshot,) = recorder.of("CreateSnapshot")
    snapshot_tags = tags_of(create_snapshot.params, "snapshot")
    assert snapshot_tags["fedimg:role"] == "root-snapshot"
    assert snapshot_tags["fedimg:job"] == out["job"]
    snapshot_id = clients.ec2(REGION).describe_snapshots(
        Filters=[{"Name": "tag:fedimg:job", "Values": [out["job"]]}]
    )["Snapshots"][0]["SnapshotId"]
    assert {a["snapshot_id"] for a in out["amis"]} == {snapshot_id}
    assert recorder.of("StartSnapshot") == []  # not the direct path

    launches = recorder.of("RunInstances")
    utility, tester = (c.params for c in launches)
    assert utility["ImageId"] == utility_ami
    assert utility["InstanceType"] == "c5.large"
    assert utility["InstanceInitiatedShutdownBehavior"] == "stop"
    assert "KernelId" not in utility  # an HVM utility AMI boots its own kernel
    assert tags_of(utility, "instance")["fedimg:role"] == "utility-instance"
    assert tester["ImageId"] in {a["id"] for a in out["amis"]}
    assert utility["ClientToken"] != tester["ClientToken"]

    (volume,) = recorder.of("CreateVolume")
    assert volume.params["Size"] == 1
    assert volume.params["AvailabilityZone"].startswith(REGION)
    assert len(volume.params["ClientToken"]) == 64
    assert tags_of(volume.params, "volume")["fedimg:role"] == "utility-volume"
    (attach,) = recorder.of("AttachVolume")
    assert attach.params["Device"] == "/dev/sdf"
    assert seam.volumes == [(attach.params["VolumeId"], "/dev/sdf")]
    operations = recorder.operations()
    order = [
        "StopInstances",
        "DetachVolume",
        "TerminateInstances",
        "CreateSnapshot",
        "DeleteVolume",
        "RegisterImage",
    ]
    positions = [operations.index(op) for op in order]
    assert positions == sorted(positions), operations
    assert len(recorder.of("ImportKeyPair")) == 2  # the utility's, then the test's
    assert len(recorder.of("CreateSecurityGroup")) == 2
    assert len(recorder.of("DeleteSecurityGroup")) == 2
    assert leaked(clients, [REGION]) == []
    assert clients.ec2(REGION).describe_key_pairs()["KeyPairs"] == []


def test_local_image_is_streamed_to_the_utility_instance_over_ssh(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    recorder: Recorder,
    clients: ClientFactory,
    sshd: LocalSshd,
    utility_ami: str,
) -> None:
    device = device_file(tmp_path)
    seam = LocalSeam(address_to=sshd.address, console=sshd.console(), device=device)
    config = make_config(tmp_path, **utility_settings(sshd, utility_ami))
    result, _ = publish(
        runtime_factory,
        config,
        str(sample_image.path),
        sshd,
        seam,
        expected_sha256=sample_image.sha256_compressed,
    )

    assert result.status == "published", result.error
    assert hashlib.sha256(device.read_bytes()).hexdigest() == sample_image.sha256_raw
    assert result.upload is not None
    assert result.upload.sha256_raw == sample_image.sha256_raw
    assert result.upload.bytes_raw == sample_image.size_bytes
    assert result.upload.volume_size_gib == 1
    assert leaked(clients, [REGION]) == []


def test_curl_failing_on_the_utility_host_fails_the_upload_with_its_output(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    recorder: Recorder,
    clients: ClientFactory,
    sshd: LocalSshd,
    utility_ami: str,
    images: str,
) -> None:
    device = device_file(tmp_path)
    seam = LocalSeam(address_to=sshd.address, console=sshd.console(), device=device)
    # With util_volume_size set nothing probes the URL here: the utility host meets the 404.
    config = make_config(tmp_path, **utility_settings(sshd, utility_ami, util_volume_size=2))
    result, runtime = publish(
        runtime_factory, config, f"{images}/Fedora-Cloud-Base-Gone-41-1.1.x86_64.raw.xz", sshd, seam
    )

    assert result.status == "failed"
    assert result.exit_code == 1
    assert "failed to write" in (result.error or "")
    assert "404" in (result.error or "")
    failed = [m for m in runtime.messenger.sent if m.body.get("status") == "failed"]
    assert {m.topic for m in failed} == {"fedimg.image.upload"}
    assert "404" in failed[0].body["extra"]["data"]
    assert recorder.of("CreateSnapshot") == []
    assert recorder.of("RegisterImage") == []
    assert len(recorder.of("TerminateInstances")) == 1
    assert len(recorder.of("DeleteVolume")) == 1
    assert leaked(clients, [REGION]) == []
    assert clients.ec2(REGION).describe_key_pairs()["KeyPairs"] == []


def test_checksum_mismatch_on_the_utility_host_is_bad_input(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    clients: ClientFactory,
    sshd: LocalSshd,
    utility_ami: str,
    images: str,
) -> None:
    seam = LocalSeam(address_to=sshd.address, console=sshd.console(), device=device_file(tmp_path))
    config = make_config(tmp_path, **utility_settings(sshd, utility_ami))
    result, _ = publish(
        runtime_factory,
        config,
        f"{images}/{sample_image.path.name}",
        sshd,
        seam,
        expected_sha256="0" * 64,
    )

    assert result.status == "failed"
    assert result.exit_code == 2
    assert "checksum mismatch" in (result.error or "")
    assert leaked(clients, [REGION]) == []


def test_volume_device_that_never_appears_fails_within_volume_timeout(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    clients: ClientFactory,
    sshd: LocalSshd,
    utility_ami: str,
    images: str,
) -> None:
    seam = LocalSeam(address_to=sshd.address, console=sshd.console(), device=None)
    config = make_config(tmp_path, **utility_settings(sshd, utility_ami, volume_timeout=1))
    result, _ = publish(runtime_factory, config, f"{images}/{sample_image.path.name}", sshd, seam)

    assert result.status == "failed"
    assert "found no device for vol-" in (result.error or "")
    assert leaked(clients, [REGION]) == []


def test_utility_instance_that_never_answers_ssh_is_terminated(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    recorder: Recorder,
    clients: ClientFactory,
    sshd: LocalSshd,
    utility_ami: str,
    images: str,
) -> None:
    from tests.ssh_support import silent_port

    with silent_port() as hung:
        seam = LocalSeam(address_to=hung, console=sshd.console(), device=device_file(tmp_path))
        config = make_config(
            tmp_path,
            **utility_settings(sshd, utility_ami, ssh_timeout=2, ssh_connect_timeout=1),
        )
        result, _ = publish(
            runtime_factory, config, f"{images}/{sample_image.path.name}", sshd, seam
        )

    assert result.status == "failed"
    assert "SSH did not answer within 2s" in (result.error or "")
    assert len(recorder.of("TerminateInstances")) == 1
    assert leaked(clients, [REGION]) == []

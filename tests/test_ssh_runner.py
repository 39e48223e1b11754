"""The ``ssh`` test runner for real: a test instance in the embedded AWS, reached over SSH.

A real OpenSSH server on 127.0.0.1 stands for the instances (the emulator's addresses are not
real); the seam maps every instance to it and supplies the console output cloud-init would print.
The key fedimg imports is authorised on that server as the ImportKeyPair request goes out.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedimg.aws import ClientFactory
from fedimg.catalog import Base
from fedimg.config import Config
from fedimg.runtime import Runtime
from fedimg.sampleimage import SampleImage
from fedimg.services.ec2.access import generate_key
from fedimg.services.ec2.service import PublishResult
from fedimg.services.ec2.ssh import Address
from tests.conftest import Recorder, leaked, make_config
from tests.ssh_support import (
    LocalSeam,
    LocalSshd,
    cloud_init_console,
    keygen,
    publish_over_ssh,
    running_sshd,
    silent_port,
)

REGION = "us-east-1"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSshd]:
    """An OpenSSH server on 127.0.0.1 for this module's tests."""
    with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


def script(tmp_path: Path, body: str, name: str = "smoke-test.sh") -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def ssh_config(tmp_path: Path, sshd: LocalSshd, test: str, **aws: Any) -> Config:
    settings: dict[str, Any] = {
        "regions": [REGION],
        "test": test,
        "test_runner": "ssh",
        "test_username": sshd.user,
        "test_instance_type": "t3.small",
        "ssh_timeout": 20,
        "console_timeout": 10,
        "test_timeout": 30,
    }
    settings.update(aws)
    return make_config(tmp_path, **settings)


def publish(
    runtime_factory: Callable[[Config], Runtime],
    config: Config,
    image: SampleImage,
    sshd: LocalSshd,
    seam: LocalSeam,
) -> tuple[PublishResult, Runtime]:
    return publish_over_ssh(runtime_factory, config, str(image.path), sshd, seam)


def test_passing_script_runs_on_the_test_instance_and_everything_is_removed(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    recorder: Recorder,
    clients: ClientFactory,
    sshd: LocalSshd,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="fedimg")
    marker = tmp_path / "ran"
    test = script(
        tmp_path,
        f'echo "$FEDIMG_AMI_ID $FEDIMG_REGION $FEDIMG_FLAVOUR $(dirname "$0") $1" > {marker}',
    )
    seam = LocalSeam(address_to=sshd.address, console=sshd.console())
    config = ssh_config(tmp_path, sshd, f"{test} first-arg")
    result, runtime = publish(runtime_factory, config, sample_image, sshd, seam)

    assert result.status == "published", result.error
    tested = next(a for a in result.amis if a.flavour == "hvm-ebs-standard")
    ami_id, region, flavour, remote_dir, arg = marker.read_text().split()
    assert (ami_id, region, flavour, arg) == (tested.id, REGION, "hvm-ebs-standard", "first-arg")
    assert remote_dir.startswith("/tmp/fedimg-test-")
    assert not Path(remote_dir).exists()  # the copied script is removed after the run

    (key_import,) = recorder.of("ImportKeyPair")
    key_name = key_import.params["KeyName"]
    assert key_name == f"fedimg-{result.job_id}-test-{tested.id}"
    assert key_import.params["PublicKeyMaterial"].startswith("<")  # bytes, as imported
    (key_spec,) = key_import.params["TagSpecifications"]
    assert key_spec["ResourceType"] == "key-pair"
    key_tags = {t["Key"]: t["Value"] for t in key_spec["Tags"]}
    assert key_tags["fedimg:job"] == result.job_id
    assert key_tags["fedimg:role"] == "ssh-key"
    assert key_tags["fedimg:image-sha256"] == sample_image.sha256_compressed

    (group,) = recorder.of("CreateSecurityGroup")
    assert group.params["GroupName"] == key_name
    assert group.params["VpcId"].startswith("vpc-")
    group_tags = {t["Key"]: t["Value"] for t in group.params["TagSpecifications"][0]["Tags"]}
    assert group_tags["fedimg:role"] == "ssh-group"
    assert group_tags["fedimg:job"] == result.job_id

    (ingress,) = recorder.of("AuthorizeSecurityGroupIngress")
    (permission,) = ingress.params["IpPermissions"]
    assert permission["IpProtocol"] == "tcp"
    assert (permission["FromPort"], permission["ToPort"]) == (22, 22)
    assert [r["CidrIp"] for r in permission["IpRanges"]] == ["127.0.0.1/32"]

    (launch,) = recorder.of("RunInstances")
    params = launch.params
    assert params["ImageId"] == tested.id
    assert params["InstanceType"] == "t3.small"
    assert params["KeyName"] == key_name
    assert len(params["SecurityGroupIds"]) == 1
    assert (params["MinCount"], params["MaxCount"]) == (1, 1)
    assert params["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert len(params["ClientToken"]) == 64
    specs = {s["ResourceType"]: s["Tags"] for s in params["TagSpecifications"]}
    assert set(specs) == {"instance", "volume"}
    instance_tags = {t["Key"]: t["Value"] for t in specs["instance"]}
    assert instance_tags["fedimg:role"] == "test-instance"
    assert instance_tags["fedimg:job"] == result.job_id
    assert instance_tags["fedimg:image-sha256"] == sample_image.sha256_compressed

    instance_id = seam.dialled[0]
    assert seam.dialled == [instance_id]
    assert seam.consoles_read == [instance_id]
    assert [c.params["InstanceIds"] for c in recorder.of("TerminateInstances")] == [[instance_id]]
    assert [c.params["GroupId"] for c in recorder.of("DeleteSecurityGroup")] == [
        params["SecurityGroupIds"][0]
    ]
    assert len(recorder.of("DeleteKeyPair")) == 1

    kinds = [(m.topic.rsplit(".", 1)[1], m.body.get("status")) for m in runtime.messenger.sent]
    assert ("test", "started") in kinds
    assert ("test", "completed") in kinds
    assert leaked(clients, [REGION]) == []
    assert clients.ec2(REGION).describe_key_pairs()["KeyPairs"] == []

    # The temporary private key never shows: not in the logs, messages or any catalog row.
    assert "PRIVATE KEY" not in caplog.text
    with runtime.catalog.engine.connect() as connection:
        for table in Base.metadata.sorted_tables:
            for row in connection.execute(table.select()):
                assert "PRIVATE KEY" not in json.dumps([str(v) for v in row])


def test_failing_script_fails_the_job_with_its_output_and_removes_everything(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    recorder: Recorder,
    clients: ClientFactory,
    sshd: LocalSshd,
) -> None:
    seam = LocalSeam(address_to=sshd.address, console=sshd.console())
    config = ssh_config(tmp_path, sshd, script(tmp_path, "echo the image is broken >&2; exit 7"))
    result, runtime = publish(runtime_factory, config, sample_image, sshd, seam)

    assert result.status == "failed"
    assert result.exit_code == 1
    assert "exited 7" in (result.error or "")
    failed = [m for m in runtime.messenger.sent if m.body.get("status") == "failed"]
    assert [m.topic for m in failed] == ["fedimg.image.test"]
    assert "the image is broken" in failed[0].body["extra"]["data"]
    assert recorder.of("CopySnapshot") == []
    assert len(recorder.of("TerminateInstances")) == 1
    assert leaked(clients, [REGION]) == []
    assert clients.ec2(REGION).describe_images(Owners=["self"])["Images"] == []


@pytest.mark.slow
def test_script_past_its_limit_is_killed_and_fails(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    clients: ClientFactory,
    sshd: LocalSshd,
) -> None:
    pid_file, dir_file = tmp_path / "pid", tmp_path / "dir"
    test = script(
        tmp_path, f'echo started; echo $$ > {pid_file}; dirname "$0" > {dir_file}; sleep 300'
    )
    seam = LocalSeam(address_to=sshd.address, console=sshd.console())
    config = ssh_config(tmp_path, sshd, test, test_timeout=2)
    started = time.monotonic()
    result, runtime = publish(runtime_factory, config, sample_image, sshd, seam)

    assert result.status == "failed"
    assert "timed out after 2s" in (result.error or "")
    assert time.monotonic() - started < 30
    failed = [m for m in runtime.messenger.sent if m.body.get("status") == "failed"]
    assert "started" in failed[0].body["extra"]["data"]
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 15
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(pid), "the hung script still runs on the instance"
    assert not Path(dir_file.read_text().strip()).exists()  # the copied script is removed
    assert leaked(clients, [REGION]) == []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_ssh_never_answering_fails_the_test_within_ssh_timeout(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    clients: ClientFactory,
    sshd: LocalSshd,
) -> None:
    with silent_port() as hung:
        seam = LocalSeam(address_to=hung, console=sshd.console())
        config = ssh_config(
            tmp_path, sshd, script(tmp_path, "exit 0"), ssh_timeout=3, ssh_connect_timeout=1
        )
        started = time.monotonic()
        result, _ = publish(runtime_factory, config, sample_image, sshd, seam)
        elapsed = time.monotonic() - started

    assert result.status == "failed"
    assert "SSH did not answer within 3s" in (result.error or "")
    assert elapsed < 20
    assert leaked(clients, [REGION]) == []


def test_wrong_host_key_is_refused_at_once(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    clients: ClientFactory,
    sshd: LocalSshd,
) -> None:
    other = keygen(tmp_path / "impostor")
    seam = LocalSeam(address_to=sshd.address, console=cloud_init_console(keys=[other]))
    config = ssh_config(tmp_path, sshd, script(tmp_path, "exit 0"), ssh_timeout=60)
    started = time.monotonic()
    result, _ = publish(runtime_factory, config, sample_image, sshd, seam)

    assert result.status == "failed"
    assert "is not one its console printed" in (result.error or "")
    assert time.monotonic() - started < 30  # not retried until ssh_timeout
    assert leaked(clients, [REGION]) == []


def test_only_the_key_types_the_console_printed_are_asked_for(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    clients: ClientFactory,
    sshd: LocalSshd,
) -> None:
    # The server also holds an ed25519 key (which SSH clients prefer) that the console did not
    # print: the connection must ask for the ECDSA key it did print, and succeed.
    seam = LocalSeam(
        address_to=sshd.address, console=cloud_init_console(fingerprints=[sshd.ecdsa_fingerprint])
    )
    config = ssh_config(tmp_path, sshd, script(tmp_path, "exit 0"))
    result, _ = publish(runtime_factory, config, sample_image, sshd, seam)

    assert result.status == "published", result.error
    assert leaked(clients, [REGION]) == []


def test_console_without_host_keys_fails_after_console_timeout(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    clients: ClientFactory,
    sshd: LocalSshd,
) -> None:
    seam = LocalSeam(address_to=sshd.address, console=cloud_init_console())
    config = ssh_config(tmp_path, sshd, script(tmp_path, "exit 0"), console_timeout=1)
    result, _ = publish(runtime_factory, config, sample_image, sshd, seam)

    assert result.status == "failed"
    assert "no SSH host keys on its console after 1s" in (result.error or "")
    assert seam.dialled == []
    assert leaked(clients, [REGION]) == []


def test_accept_new_trusts_the_first_key_without_reading_the_console(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    clients: ClientFactory,
    sshd: LocalSshd,
) -> None:
    seam = LocalSeam(address_to=sshd.address, console="")
    config = ssh_config(tmp_path, sshd, script(tmp_path, "exit 0"), host_key_policy="accept-new")
    result, _ = publish(runtime_factory, config, sample_image, sshd, seam)

    assert result.status == "published", result.error
    assert seam.consoles_read == []
    assert leaked(clients, [REGION]) == []


def test_jump_host_is_verified_from_known_hosts_and_carries_the_connection(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    recorder: Recorder,
    clients: ClientFactory,
    sshd: LocalSshd,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{sshd.port} {sshd.host_public}\n")
    monkeypatch.setenv("HOME", str(home))
    marker = tmp_path / "ran"
    seam = LocalSeam(address_to=sshd.address, console=sshd.console())
    config = ssh_config(
        tmp_path,
        sshd,
        script(tmp_path, f"echo $SSH_CLIENT > {marker}"),
        ssh_proxy_jump=f"{sshd.user}@127.0.0.1:{sshd.port}",
    )
    result, _ = publish(runtime_factory, config, sample_image, sshd, seam)

    assert result.status == "published", result.error
    assert marker.read_text().startswith("127.0.0.1 ")
    (ingress,) = recorder.of("AuthorizeSecurityGroupIngress")
    assert ingress.params["IpPermissions"][0]["IpRanges"][0]["CidrIp"] == "127.0.0.1/32"
    assert leaked(clients, [REGION]) == []


def test_jump_host_missing_from_known_hosts_is_refused(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    clients: ClientFactory,
    sshd: LocalSshd,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    seam = LocalSeam(address_to=sshd.address, console=sshd.console())
    config = ssh_config(
        tmp_path,
        sshd,
        script(tmp_path, "exit 0"),
        ssh_proxy_jump=f"127.0.0.1:{sshd.port}",
        ssh_timeout=60,
    )
    started = time.monotonic()
    result, _ = publish(runtime_factory, config, sample_image, sshd, seam)

    assert result.status == "failed"
    assert "not in ~/.ssh/known_hosts" in (result.error or "")
    assert time.monotonic() - started < 30
    assert leaked(clients, [REGION]) == []


def test_configured_key_pair_is_used_and_kept(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    recorder: Recorder,
    clients: ClientFactory,
    sshd: LocalSshd,
) -> None:
    public = keygen(tmp_path / "mine", comment="releng@fedora")
    sshd.authorize(public)
    ec2 = clients.ec2(REGION)
    ec2.import_key_pair(KeyName="releng", PublicKeyMaterial=public.encode())
    seam = LocalSeam(address_to=sshd.address, console=sshd.console())
    config = ssh_config(
        tmp_path,
        sshd,
        script(tmp_path, "exit 0"),
        keyname="releng",
        keypath=str(tmp_path / "mine"),
    )
    result, _ = publish(runtime_factory, config, sample_image, sshd, seam)

    assert result.status == "published", result.error
    assert recorder.of("ImportKeyPair") == []
    assert recorder.of("DeleteKeyPair") == []
    assert recorder.of("RunInstances")[0].params["KeyName"] == "releng"
    assert [k["KeyName"] for k in ec2.describe_key_pairs()["KeyPairs"]] == ["releng"]
    assert leaked(clients, [REGION]) == []


def test_keyname_without_keypath_is_a_config_error_before_any_instance(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    clients: ClientFactory,
    sshd: LocalSshd,
) -> None:
    # keyname without keypath: a configuration error before anything is created.
    seam = LocalSeam(address_to=Address("127.0.0.1", 1), console="")
    config = ssh_config(tmp_path, sshd, script(tmp_path, "exit 0"), keyname="releng")
    result, _ = publish(runtime_factory, config, sample_image, sshd, seam)

    assert result.status == "failed"
    assert result.exit_code == 2
    assert "keyname needs keypath" in (result.error or "")
    assert seam.dialled == []
    assert leaked(clients, [REGION]) == []


def test_generated_keys_are_ed25519() -> None:
    key, public = generate_key()
    assert key.get_name() == "ssh-ed25519"
    assert public.startswith(b"ssh-ed25519 AAAA")

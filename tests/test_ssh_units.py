"""SSH access pieces that need no server: console host keys, devices, waits, CIDRs, the utility's
script (run here with bash against a local HTTP server and a file for the device), config."""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import paramiko
import pytest
from pydantic import ValidationError

from fedimg.config import AwsSettings
from fedimg.errors import ConfigError
from fedimg.runtime import Runtime
from fedimg.sampleimage import SampleImage
from fedimg.services.ec2.access import generate_key, resolve_ssh_cidr
from fedimg.services.ec2.errors import AWSError
from fedimg.services.ec2.instances import wait_instance
from fedimg.services.ec2.resources import LocalTracker
from fedimg.services.ec2.service import PublishRequest
from fedimg.services.ec2.ssh import (
    AwsInstanceSeam,
    ConsoleHostKeys,
    decode_console,
    device_candidates,
    limited_command,
    parse_console_host_keys,
)
from fedimg.services.ec2.testing import CommandRunner
from fedimg.services.ec2.testing_ssh import SshTestRunner
from fedimg.services.ec2.upload_utility import parse_result, write_script
from fedimg.source import resolve_source
from tests.conftest import make_config, require
from tests.httpfiles import serve_files
from tests.ssh_support import cloud_init_console

ED25519_LINE = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ5mQmW5e3K4q2Lh0dFzG1GkV2m3b7eX6n0mQmW5e3K4 root@x"
)


def _fingerprints(key: paramiko.PKey) -> tuple[str, str]:
    blob = key.asbytes()
    sha = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    md5 = ":".join(f"{b:02x}" for b in hashlib.md5(blob, usedforsecurity=False).digest())
    return sha, md5


# --- console host keys ---------------------------------------------------------------------------


def test_console_fingerprints_are_parsed_through_line_prefixes() -> None:
    key, _ = generate_key()
    sha, _md5 = _fingerprints(key)
    console = cloud_init_console(fingerprints=[f"256 {sha} root@ip-10-0-0-1 (ED25519)"])
    found = parse_console_host_keys(console)
    assert found.fingerprints == {sha}
    assert found.matches(key)


def test_console_key_types_become_the_only_host_key_algorithms_asked_for() -> None:
    console = cloud_init_console(
        fingerprints=["256 SHA256:abc root@x (ECDSA)", "3072 SHA256:def root@x (RSA)"],
        keys=[ED25519_LINE],
    )
    assert parse_console_host_keys(console).algorithms == {
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "rsa-sha2-512",
        "rsa-sha2-256",
        "ssh-rsa",
        "ssh-ed25519",
    }


def test_console_legacy_md5_fingerprints_match() -> None:
    key, _ = generate_key()
    _sha, md5 = _fingerprints(key)
    console = cloud_init_console(
        fingerprints=[f"ec2: 256 {md5.upper()} /etc/ssh/key.pub (ED25519)"]
    )
    assert parse_console_host_keys(console).matches(key)


def test_console_host_key_keys_block_matches_the_key_itself() -> None:
    key, public = generate_key()
    console = cloud_init_console(keys=[public.decode()])
    found = parse_console_host_keys(console)
    assert found.fingerprints == frozenset()
    assert found.matches(key)


def test_another_key_does_not_match() -> None:
    key, _ = generate_key()
    other, other_public = generate_key()
    sha, _ = _fingerprints(other)
    found = parse_console_host_keys(
        cloud_init_console(fingerprints=[f"256 {sha} x (ED25519)"], keys=[other_public.decode()])
    )
    assert not found.matches(key)
    assert found.matches(other)


def test_console_without_blocks_has_no_keys() -> None:
    text = cloud_init_console() + ED25519_LINE + "\n256 SHA256:abcdef x (ED25519)\n"
    # Keys outside cloud-init's blocks are not trusted: anything may print on a console.
    assert parse_console_host_keys(text).empty


def test_console_output_is_decoded_from_base64_as_aws_sends_it() -> None:
    text = cloud_init_console(fingerprints=["256 SHA256:abc x (ED25519)"])
    assert decode_console(base64.b64encode(text.encode()).decode()) == text
    assert decode_console(text) == text  # the emulator sends plain text
    assert decode_console("") == ""


def test_console_host_keys_describe_names_the_fingerprints() -> None:
    keys = ConsoleHostKeys(fingerprints=frozenset({"SHA256:b", "SHA256:a"}), keys=frozenset())
    assert keys.describe() == "SHA256:a, SHA256:b"


# --- addresses, devices, commands -----------------------------------------------------------------


def test_default_seam_dials_the_public_address_or_the_private_one_through_a_jump() -> None:
    instance = {"InstanceId": "i-1", "PublicIpAddress": "54.1.2.3", "PrivateIpAddress": "10.0.0.5"}
    assert str(AwsInstanceSeam(port=22).address(instance)) == "54.1.2.3:22"
    assert str(AwsInstanceSeam(port=2222, private=True).address(instance)) == "10.0.0.5:2222"
    assert str(AwsInstanceSeam().address({"PrivateIpAddress": "10.0.0.6"})) == "10.0.0.6:22"


def test_device_candidates_find_the_volume_by_nvme_serial_then_xen_name() -> None:
    assert device_candidates(volume_id="vol-0123abcd", device="/dev/sdf") == [
        "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0123abcd",
        "/dev/xvdf",
        "/dev/sdf",
    ]


def test_limited_command_bounds_the_command_on_the_remote_side() -> None:
    wrapped = limited_command("echo 'a b'; sleep 1", 2.2)
    assert "timeout -k 10 3 sh -c" in wrapped
    done = subprocess.run(["sh", "-c", wrapped], capture_output=True, text=True, check=False)
    assert done.stdout == "a b\n"
    assert done.returncode == 0
    hung = subprocess.run(
        ["sh", "-c", limited_command("sleep 30", 1)], capture_output=True, check=False, timeout=20
    )
    assert hung.returncode == 124


# --- ssh_cidr ------------------------------------------------------------------------------------


def test_ssh_cidr_is_configured_or_this_machines_address() -> None:
    assert resolve_ssh_cidr("10.1.0.0/16", target="aws", endpoint_url=None) == "10.1.0.0/16"
    assert (
        resolve_ssh_cidr(None, target="embedded", endpoint_url="http://127.0.0.1:5000")
        == "127.0.0.1/32"
    )
    assert (
        resolve_ssh_cidr(
            None, target="aws", endpoint_url=None, public_address=lambda: "203.0.113.7"
        )
        == "203.0.113.7/32"
    )
    assert (
        resolve_ssh_cidr(None, target="aws", endpoint_url=None, proxy_jump="me@127.0.0.2:2200")
        == "127.0.0.2/32"
    )


def test_config_validates_the_ssh_keys() -> None:
    settings = AwsSettings.model_validate({"ssh_cidr": "198.51.100.7", "ssh_proxy_jump": "u@h:22"})
    assert settings.ssh_cidr == "198.51.100.7/32"
    assert settings.host_key_policy == "console"
    assert settings.ssh_port == 22
    for bad in ({"ssh_cidr": "not-an-address"}, {"ssh_cidr": "::1/128"}):
        with pytest.raises(ValidationError):
            AwsSettings.model_validate(bad)
    with pytest.raises(ValidationError):
        AwsSettings.model_validate({"ssh_proxy_jump": "a b"})
    with pytest.raises(ValidationError):
        AwsSettings.model_validate({"host_key_policy": "trust-me"})
    with pytest.raises(ValidationError):
        AwsSettings.model_validate({"ssh_timeout": 0})


# --- bounded waits -------------------------------------------------------------------------------


class _PendingForever:
    """A recording fake EC2 client whose instance never leaves ``state``."""

    def __init__(self, state: str) -> None:
        self.state = state
        self.calls = 0

    def describe_instances(self, **_: Any) -> dict[str, Any]:
        self.calls += 1
        return {
            "Reservations": [{"Instances": [{"InstanceId": "i-1", "State": {"Name": self.state}}]}]
        }


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _wait_for_running(
    state: str, **limits: Any
) -> tuple[_PendingForever, pytest.ExceptionInfo[AWSError]]:
    """Wait for ``running`` on an instance stuck in ``state``, on a fake clock: it must fail."""
    ec2, clock = _PendingForever(state), _Clock()
    with pytest.raises(AWSError) as caught:
        wait_instance(
            ec2,  # type: ignore[arg-type]
            region="us-east-1",
            instance_id="i-1",
            state="running",
            sleep=clock.sleep,
            clock=clock,
            **limits,
        )
    return ec2, caught


def test_waiting_for_running_gives_up_at_its_timeout() -> None:
    ec2, caught = _wait_for_running("pending", timeout=60, delay=5)
    assert caught.value.code == "Timeout"
    assert "still pending after 60s" in str(caught.value)
    assert ec2.calls == 13


def test_waiting_for_running_stops_at_once_on_a_terminated_instance() -> None:
    ec2, caught = _wait_for_running("terminated", timeout=600)
    assert caught.value.code == "UnexpectedState"
    assert ec2.calls == 1


# --- the utility instance's script, run here -----------------------------------------------------


def _run_script(script: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", script],
        input=stdin.decode("latin-1") if stdin is not None else "",
        capture_output=True,
        text=True,
        encoding="latin-1",
        check=False,
        timeout=120,
    )


def test_utility_script_writes_the_image_and_reports_its_hashes(
    tmp_path: Path, sample_image: SampleImage
) -> None:
    require(shutil.which("curl") is not None, "curl is not installed")
    device = tmp_path / "volume"
    device.write_bytes(b"")
    with serve_files(sample_image.path.parent) as (base, _):
        script = write_script(
            url=f"{base}/{sample_image.path.name}",
            decompress="xz -dc",
            candidates=["/nonexistent/first", str(device)],
            volume_id="vol-1",
            device_wait=5,
        )
        done = _run_script(script)
    assert done.returncode == 0, done.stdout + done.stderr
    result = parse_result(done.stdout)
    assert result is not None
    assert result["compressed"] == sample_image.sha256_compressed
    assert result["raw"] == sample_image.sha256_raw
    assert result["written"] == sample_image.sha256_raw
    assert int(result["bytes"]) == sample_image.size_bytes
    assert result["label"][:4] == "55aa" or result["label"][4:] == b"EFI PART".hex()
    assert hashlib.sha256(device.read_bytes()).hexdigest() == sample_image.sha256_raw


def test_utility_script_reads_the_image_from_stdin_without_a_url(
    tmp_path: Path, sample_image: SampleImage
) -> None:
    device = tmp_path / "volume"
    device.write_bytes(b"")
    script = write_script(
        url=None, decompress="xz -dc", candidates=[str(device)], volume_id="vol-1", device_wait=5
    )
    done = _run_script(script, stdin=sample_image.path.read_bytes())
    assert done.returncode == 0, done.stderr
    result = parse_result(done.stdout)
    assert result is not None
    assert result["written"] == sample_image.sha256_raw


def test_utility_script_fails_with_curls_message_on_404(tmp_path: Path) -> None:
    require(shutil.which("curl") is not None, "curl is not installed")
    device = tmp_path / "volume"
    device.write_bytes(b"")
    with serve_files(tmp_path) as (base, _):
        done = _run_script(
            write_script(
                url=f"{base}/missing.raw.xz",
                decompress="xz -dc",
                candidates=[str(device)],
                volume_id="vol-1",
                device_wait=5,
            )
        )
    assert done.returncode != 0
    assert "404" in done.stderr
    assert parse_result(done.stdout) is None
    assert not list(tmp_path.glob("tmp.*"))


def test_utility_script_gives_up_when_the_device_never_appears(tmp_path: Path) -> None:
    done = _run_script(
        write_script(
            url=None,
            decompress="xz -dc",
            candidates=[str(tmp_path / "nothing")],
            volume_id="vol-0abc",
            device_wait=1,
        )
    )
    assert done.returncode == 90
    assert "no device for vol-0abc" in done.stderr


def test_parse_result_needs_every_field() -> None:
    assert parse_result("noise\nFEDIMG-RESULT bytes=1 compressed=a raw=b written=b label=00\n") == {
        "bytes": "1",
        "compressed": "a",
        "raw": "b",
        "written": "b",
        "label": "00",
    }
    assert parse_result("FEDIMG-RESULT bytes=1\n") is None
    assert parse_result("") is None


# --- wiring --------------------------------------------------------------------------------------


def test_default_test_runner_is_ssh_on_aws_and_command_elsewhere(tmp_path: Path) -> None:
    embedded = Runtime(config=make_config(tmp_path))
    assert isinstance(embedded.test_runner(), CommandRunner)
    real = Runtime(config=make_config(tmp_path, target="aws"))
    assert isinstance(real.test_runner(), SshTestRunner)
    explicit = Runtime(config=make_config(tmp_path, target="aws", test_runner="command"))
    assert isinstance(explicit.test_runner(), CommandRunner)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({}, "needs an AMI list"),
        (
            {
                "amis": [{"region": "eu-west-1", "arch": "x86_64", "ami": "ami-1"}],
                "base_region": "us-east-1",
            },
            "first AMI-list entry is in eu-west-1",
        ),
    ],
)
def test_utility_method_needs_an_ami_list_entry_in_the_base_region(
    tmp_path: Path,
    runtime_factory: Any,
    sample_image: SampleImage,
    settings: dict[str, Any],
    message: str,
) -> None:
    config = make_config(tmp_path, upload_method="utility", regions=["us-east-1"], **settings)
    result = (
        runtime_factory(config)
        .service()
        .publish(PublishRequest(source=resolve_source(str(sample_image.path))))
    )
    assert result.exit_code == 2
    assert message in (result.error or "")


def test_import_method_is_still_refused(
    tmp_path: Path, runtime_factory: Any, sample_image: SampleImage
) -> None:
    config = make_config(tmp_path, upload_method="import", regions=["us-east-1"])
    service = runtime_factory(config).service()
    with pytest.raises(ConfigError, match="'import' is not available"):
        service.plan(PublishRequest(source=resolve_source(str(sample_image.path))))


def test_local_tracker_records_and_releases() -> None:
    tracker = LocalTracker()
    tracker.record(region="us-east-1", kind="volume", resource_id="vol-1")
    assert tracker.active == {"vol-1": ("us-east-1", "volume")}
    tracker.release("vol-1")
    assert tracker.active == {}

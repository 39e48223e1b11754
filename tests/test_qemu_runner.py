"""The ``qemu`` test runner: the snapshot's bytes boot under QEMU and the test script runs in them.

The bootable sample (tools/bootable-sample: syslinux, a Debian kernel, busybox, dropbear) goes
through the whole ``EC2Service.publish`` on the embedded AWS; the runner reads the registered
AMI's root snapshot back through the EBS direct APIs, boots it with a NoCloud seed, logs in as
root trusting only the host key printed on the console, and runs the script. Needs the packages
of ``tools/bootable-sample/install-deps.sh``: skipped without them, failed under CI=true. The
image is built once into FEDIMG_BOOTABLE_SAMPLE_DIR (default: .cache/bootable-sample).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedimg.aws import ClientFactory
from fedimg.config import Config
from fedimg.runtime import Runtime
from fedimg.sampleimage import SampleImage, write_sample_image
from fedimg.services.ec2 import testing_qemu
from fedimg.services.ec2.service import PublishRequest, PublishResult
from fedimg.services.ec2.testing_qemu import (
    KVM_PROBE_EXIT,
    QemuRunner,
    console_tail,
    run_probe,
    write_snapshot_disk,
)
from fedimg.source import resolve_source
from tests.conftest import Recorder, leaked, make_config, require

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "tools" / "bootable-sample" / "build.py"
REGIONS = ["us-east-1", "eu-west-1"]
BOOT_TIMEOUT = 120.0  # seconds to SSH; the sample needs about 15 s under TCG


def _qemu_processes() -> dict[int, str]:
    """Running QEMU system emulators that this runner started (its temporary directory)."""
    found = subprocess.run(
        ["pgrep", "-a", "-f", "qemu-system"], capture_output=True, text=True, check=False
    )
    pids: dict[int, str] = {}
    for line in found.stdout.splitlines():
        pid, _, cmdline = line.partition(" ")
        if "fedimg-qemu-" in cmdline or "fedimg-kvm-probe-" in cmdline:
            pids[int(pid)] = cmdline
    return pids


@pytest.fixture(autouse=True)
def no_qemu_survives() -> Iterator[None]:
    """Every test: no QEMU of the runner is left running afterwards."""
    before = _qemu_processes()
    yield
    after = {pid: cmd for pid, cmd in _qemu_processes().items() if pid not in before}
    assert after == {}, f"QEMU survived the test: {after}"


@pytest.fixture(scope="module")
def bootable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bootable sample as a Fedora-like ``…x86_64.raw.xz`` (built once, cached)."""
    deps = subprocess.run(
        [sys.executable, str(BUILD), "--check-deps", "--test-deps"],
        capture_output=True,
        text=True,
        check=False,
    )
    require(
        deps.returncode == 0,
        "QEMU or the bootable sample's build tools are missing "
        f"(run tools/bootable-sample/install-deps.sh as root): {deps.stderr.strip()}",
    )
    out = Path(os.environ.get("FEDIMG_BOOTABLE_SAMPLE_DIR") or REPO / ".cache" / "bootable-sample")
    built = subprocess.run(
        [sys.executable, str(BUILD), "--out", str(out), "--format", "xz"],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert built.returncode == 0, f"build.py failed:\n{built.stderr}"
    image = tmp_path_factory.mktemp("bootable") / "Fedora-Cloud-Base-Bootable-41-1.0.x86_64.raw.xz"
    image.symlink_to(Path(built.stdout.split()[-1]))
    return image


def script(tmp_path: Path, body: str, name: str = "in-guest-test") -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def qemu_config(tmp_path: Path, test: str, **aws: Any) -> Config:
    settings: dict[str, Any] = {
        "regions": REGIONS,
        "flavours": ["hvm-ebs-gp3"],
        "test": test,
        "test_runner": "qemu",
        "test_username": "root",
        "qemu_boot_timeout": BOOT_TIMEOUT,
        "test_timeout": 60,
    }
    settings.update(aws)
    return make_config(tmp_path, **settings)


def publish(
    runtime_factory: Callable[[Config], Runtime], config: Config, image: Path
) -> tuple[PublishResult, Runtime]:
    runtime = runtime_factory(config)
    result = runtime.service().publish(PublishRequest(source=resolve_source(str(image))))
    return result, runtime


def aarch64_qemu(monkeypatch: pytest.MonkeyPatch, path: str | None) -> None:
    """Make the runner find ``qemu-system-aarch64`` at ``path`` (None: not installed)."""
    real_tool = testing_qemu._tool
    monkeypatch.setattr(
        testing_qemu,
        "_tool",
        lambda name: path if name == "qemu-system-aarch64" else real_tool(name),
    )


def failed_messages(runtime: Runtime) -> list[Any]:
    return [m for m in runtime.messenger.sent if m.body.get("status") == "failed"]


@pytest.mark.slow
def test_passing_script_runs_in_the_booted_snapshot_and_the_image_is_published(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    bootable: Path,
    recorder: Recorder,
    clients: ClientFactory,
    caplog: pytest.LogCaptureFixture,
    record_property: Callable[[str, object], None],
) -> None:
    test = script(
        tmp_path,
        'set -e\n[ "$(uname -s)" = Linux ]\n[ -b /dev/vda ] && [ -b /dev/vda1 ]\n'
        '[ "$(hostname)" = fedimg-test ]\ngrep -q console=ttyS0 /proc/cmdline\n'
        'case "$FEDIMG_AMI_ID" in ami-*) ;; *) exit 3 ;; esac',
    )
    caplog.set_level(logging.INFO, logger="fedimg.services.ec2.testing_qemu")
    started = time.monotonic()
    result, runtime = publish(runtime_factory, qemu_config(tmp_path, test), bootable)

    assert result.status == "published", result.error
    record_property("publish_seconds", round(time.monotonic() - started, 1))
    (tested,) = [a for a in result.amis if a.region == REGIONS[0]]
    # The disk QEMU booted is the tested AMI's snapshot, read back block by block.
    (listing,) = recorder.of("ListSnapshotBlocks")
    assert listing.params["SnapshotId"] == tested.snapshot_id
    reads = recorder.of("GetSnapshotBlock")
    assert reads and {c.params["SnapshotId"] for c in reads} == {tested.snapshot_id}
    assert len(recorder.of("CopySnapshot")) == 1  # replicated only after the test passed
    assert failed_messages(runtime) == []
    assert leaked(clients, REGIONS) == []
    answered = [r.getMessage() for r in caplog.records if "answered SSH" in r.getMessage()]
    assert len(answered) == 1, answered
    record_property("boot_to_ssh", answered[0])


@pytest.mark.slow
def test_failing_script_fails_the_job_with_its_output_and_nothing_is_copied(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    bootable: Path,
    recorder: Recorder,
    clients: ClientFactory,
) -> None:
    test = script(tmp_path, 'echo "broken in $(uname -s) on $FEDIMG_AMI_ID" >&2; exit 7')
    result, runtime = publish(runtime_factory, qemu_config(tmp_path, test), bootable)

    assert result.status == "failed"
    assert result.exit_code == 1
    assert "test script exited 7 on QEMU guest of ami-" in (result.error or "")
    (failed,) = failed_messages(runtime)
    assert failed.topic == "fedimg.image.test"
    data = failed.body["extra"]["data"]
    assert "broken in Linux on ami-" in data
    assert "--- console of the QEMU guest" in data
    assert "BEGIN SSH HOST KEY FINGERPRINTS" in data  # the console's tail follows the output
    assert recorder.of("CopySnapshot") == []
    assert recorder.of("ModifyImageAttribute") == []
    assert leaked(clients, REGIONS) == []


@pytest.mark.slow
def test_image_that_does_not_boot_fails_within_the_boot_timeout_with_the_console_tail(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    bootable: Path,  # for its dependency check: QEMU must be there
    recorder: Recorder,
) -> None:
    config = qemu_config(tmp_path, script(tmp_path, "exit 0"), qemu_boot_timeout=20)
    started = time.monotonic()
    result, runtime = publish(runtime_factory, config, sample_image.path)
    elapsed = time.monotonic() - started

    assert result.status == "failed"
    assert "no SSH host keys on the console within 20s (qemu_boot_timeout)" in (result.error or "")
    assert elapsed < 20 + 40, f"took {elapsed:.0f}s"
    (failed,) = failed_messages(runtime)
    assert failed.topic == "fedimg.image.test"
    assert "Booting from Hard Disk" in failed.body["extra"]["data"]  # SeaBIOS, then nothing
    assert "\x1b" not in failed.body["extra"]["data"]
    assert recorder.of("CopySnapshot") == []


@pytest.mark.slow
def test_before_upload_a_source_that_fails_its_test_uploads_nothing(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    bootable: Path,
    recorder: Recorder,
    clients: ClientFactory,
) -> None:
    test = script(tmp_path, 'echo "stage=$FEDIMG_TEST_STAGE ami=${FEDIMG_AMI_ID:-none}"; exit 7')
    # The gate boots under QEMU whatever runner tests the AMIs afterwards.
    config = qemu_config(tmp_path, test, test_runner="command", test_before_upload=True)
    result, runtime = publish(runtime_factory, config, bootable)

    assert result.status == "failed"
    assert result.exit_code == 1
    assert "test of the source image" in (result.error or "")
    assert "nothing was uploaded" in (result.error or "")
    for operation in ("StartSnapshot", "ImportSnapshot", "RunInstances", "RegisterImage"):
        assert recorder.of(operation) == [], operation
    failed = failed_messages(runtime)
    assert failed and {m.topic for m in failed} == {"fedimg.image.upload"}
    data = failed[0].body["extra"]["data"]
    assert "stage=source ami=none" in data  # the script ran in the booted source image
    assert "--- console of the QEMU guest" in data
    assert not [m for m in runtime.messenger.sent if m.topic == "fedimg.image.test"]
    assert result.job_id is not None
    steps = {step.name: step.status for step in runtime.catalog.steps(result.job_id)}
    assert steps == {"boot-test": "failed"}
    assert leaked(clients, REGIONS) == []


@pytest.mark.slow
def test_before_upload_a_passing_source_is_published_and_booted_once(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    bootable: Path,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    test = script(tmp_path, '[ "$FEDIMG_TEST_STAGE" = source ] && [ -z "${FEDIMG_AMI_ID:-}" ]')
    caplog.set_level(logging.INFO, logger="fedimg.services.ec2.testing_qemu")
    config = qemu_config(tmp_path, test, qemu_disk="source", test_before_upload=True)
    result, runtime = publish(runtime_factory, config, bootable)

    assert result.status == "published", result.error
    assert len(recorder.of("StartSnapshot")) == 1
    # The AMIs' qemu test would boot the same source bytes again: it is not repeated.
    answered = [r.getMessage() for r in caplog.records if "answered SSH" in r.getMessage()]
    assert len(answered) == 1, answered
    assert recorder.of("GetSnapshotBlock") == []
    assert result.job_id is not None
    names = [step.name for step in runtime.catalog.steps(result.job_id)]
    assert names[:3] == ["boot-test", "upload", "register"]


def test_arm64_boots_on_the_virt_machine_with_uefi_firmware(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = tmp_path / "qemu-system-aarch64"
    binary.write_text("#!/bin/sh\nexit 0\n")
    firmware = tmp_path / "QEMU_EFI.fd"
    firmware.write_bytes(b"\0" * 64)
    aarch64_qemu(monkeypatch, str(binary))
    monkeypatch.setattr(testing_qemu, "_AARCH64_FIRMWARE", ("/nonexistent/AAVMF.fd", str(firmware)))

    machine = testing_qemu.machine_for("arm64", "auto")
    assert machine.binary == str(binary)
    assert machine.args == ("-M", "virt", "-bios", str(firmware), "-cpu", "max")
    # The KVM probe is x86 code: an arm64 guest gets KVM only when asked for.
    assert machine.accel == "tcg"
    assert testing_qemu.machine_for("arm64", "kvm").args[-2:] == ("-cpu", "host")

    monkeypatch.setattr(testing_qemu, "_AARCH64_FIRMWARE", ("/nonexistent/AAVMF.fd",))
    with pytest.raises(testing_qemu.QemuError, match="no UEFI firmware"):
        testing_qemu.machine_for("arm64", "auto")


def test_arm64_image_without_qemu_system_aarch64_fails_clearly(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    image_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    aarch64_qemu(monkeypatch, None)
    image = write_sample_image(
        image_cache / "Fedora-Cloud-Base-Test-41-1.1.aarch64.raw.xz",
        size_bytes=16 * 1024 * 1024,
        fill=0.1,
        seed=2,
    )
    config = qemu_config(tmp_path, script(tmp_path, "exit 0"), regions=["us-east-1"])
    result, runtime = publish(runtime_factory, config, image.path)

    assert result.status == "failed"
    assert "cannot boot arm64 images here: qemu-system-aarch64 is not installed" in (
        result.error or ""
    )
    (failed,) = failed_messages(runtime)
    assert failed.topic == "fedimg.image.test"


def test_snapshot_read_back_is_the_raw_image_and_sparse(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    clients: ClientFactory,
) -> None:
    config = make_config(tmp_path, regions=["us-east-1"], flavours=["hvm-ebs-gp3"])
    result, _ = publish(runtime_factory, config, sample_image.path)
    assert result.status == "published", result.error
    (ami,) = result.amis
    assert ami.snapshot_id is not None
    disk = tmp_path / "disk.raw"
    size = write_snapshot_disk(
        ebs=clients.ebs("us-east-1"),
        size_bytes=sample_image.size_bytes,
        region="us-east-1",
        snapshot_id=ami.snapshot_id,
        path=disk,
    )
    assert size == disk.stat().st_size == sample_image.size_bytes
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == sample_image.sha256_raw
    assert disk.stat().st_blocks * 512 < sample_image.size_bytes  # the zero blocks are holes


def test_console_tail_drops_terminal_escapes_and_keeps_the_last_lines() -> None:
    console = "\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS\r\n" + "".join(f"line {i}\r\n" for i in range(9))
    assert console_tail(console, lines=3) == "line 6\nline 7\nline 8"
    assert console_tail(console, lines=20).splitlines()[0] == "SeaBIOS"


def test_kvm_probe_sector_runs_to_its_exit_port_under_tcg() -> None:
    binary = shutil.which("qemu-system-x86_64")
    require(binary is not None, "qemu-system-x86_64 is not installed (qemu-system-x86)")
    assert binary is not None
    assert run_probe(binary, "tcg", timeout=30) == KVM_PROBE_EXIT


def test_qemu_runner_is_wired_to_test_runner_qemu(
    tmp_path: Path, runtime_factory: Callable[[Config], Runtime]
) -> None:
    runtime = runtime_factory(qemu_config(tmp_path, "true"))
    assert isinstance(runtime.test_runner(), QemuRunner)
    assert runtime.test_runner().name == "qemu"

"""The ``qemu`` test runner: the image boots under QEMU on this machine, the test script runs in it.

    disk   : the AMI's root snapshot read back through the EBS direct APIs into a sparse raw file
             (absent blocks are zeros), so the test proves the snapshot, not the file; or the
             source image, decompressed (``qemu_disk``)
    → NoCloud seed: a vfat disk labelled CIDATA, ``user-data`` with a temporary ed25519 key,
      ``meta-data`` with the instance id and hostname (mkfs.fat + mcopy, no root, no mounts)
    → QEMU: KVM when a probe VM really runs under it, else TCG; the disk with ``snapshot=on``
      (the guest never writes to it); user networking forwards 127.0.0.1:PORT to port 22;
      the serial console goes to a file
    → host keys from the console → SSH answers              (both within ``qemu_boot_timeout``)
    → the test script, by the ``ssh`` runner's code (:func:`run_test_script`) → exit 0 = pass
    → finally: ``poweroff``, QEMU killed by PID after ``qemu_poweroff_grace``; files removed

Nothing is created in AWS. The guest is logged in to as ``test_username``, its host key checked
by ``host_key_policy`` like a test instance's. A failed outcome carries the console's tail.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from fedimg.aws import ClientFactory
from fedimg.config import AwsSettings
from fedimg.errors import ConfigError, FedimgError
from fedimg.services.ec2.access import generate_key
from fedimg.services.ec2.errors import EC2ServiceException, aws_call
from fedimg.services.ec2.register import RegisteredAmi
from fedimg.services.ec2.ssh import (
    Address,
    ConsoleHostKeys,
    SSHError,
    SshOptions,
    SshSession,
    connect,
    parse_console_host_keys,
)
from fedimg.services.ec2.testing import TestOutcome, TestTarget, script_argv
from fedimg.services.ec2.testing_ssh import run_test_script, script_payload
from fedimg.services.ec2.upload_direct import BLOCK_SIZE, ZERO_BLOCK
from fedimg.services.ec2.verify import list_blocks, read_block
from fedimg.source import RawBlocks, resolve_source

if TYPE_CHECKING:
    from mypy_boto3_ebs import EBSClient

log = logging.getLogger(__name__)

#: Console lines put into a failed outcome: enough for a kernel panic or cloud-init's last words.
CONSOLE_TAIL_LINES = 60
#: Seconds the KVM probe may take. Where KVM works it exits in well under a second; where it does
#: not, QEMU usually stops the VM with "KVM internal error" and waits forever.
KVM_PROBE_TIMEOUT = 3.0
#: Seconds between looks at the console while the guest boots.
CONSOLE_POLL = 0.5

#: The KVM probe: a boot sector that does what boot loaders do (real mode → 32-bit protected
#: mode, IRET there, back through 16-bit protected mode to real mode, a BIOS interrupt) and then
#: writes 0x2a to QEMU's isa-debug-exit port, so QEMU exits with (0x2a << 1) | 1 = 85. Where
#: /dev/kvm opens but cannot run such code (nested or paravirtual KVM), QEMU never gets there.
#: Assembled (GNU as --32) from:
#:   cli; xor ax,ax; mov ds,ax; mov ss,ax; mov sp,0x7c00; lgdt [gdtr]; mov eax,cr0; or al,1;
#:   mov cr0,eax; jmp 0x08:pm32 | pm32: mov ax,0x10; mov ds,ax; mov ss,ax; pushfd; push cs;
#:   push pm32b; iretd | pm32b: jmp 0x18:pm16 | pm16: mov ax,0x20; mov ds,ax; mov ss,ax;
#:   mov eax,cr0; and al,0xfe; mov cr0,eax; jmp 0:rm | rm: xor ax,ax; mov ds,ax; mov ss,ax; sti;
#:   int 0x12; mov al,0x2a; out 0xf4,al; hlt loop | gdt: null, code32, data32, code16, data16
_KVM_PROBE_CODE = bytes.fromhex(
    "fa31c08ed88ed0bc007c660f0116887c0f20c00c010f22c066ea207c0000080066b810008ed88ed09c0e6830"
    "7c0000cfea377c00001800b820008ed88ed00f20c024fe0f22c0ea4b7c000031c08ed88ed0fbcd12b02ae6f4"
    "f4ebfd8db40000900000000000000000ffff0000009acf00ffff00000092cf00ffff0000009a0000ffff0000"
    "009200002700607c"
)
KVM_PROBE_EXIT = 85

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\x1bc")
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")

# arm64 guests need UEFI firmware on QEMU's virt machine.
_AARCH64_FIRMWARE = (
    "/usr/share/qemu-efi-aarch64/QEMU_EFI.fd",
    "/usr/share/AAVMF/AAVMF_CODE.fd",
    "/usr/share/edk2/aarch64/QEMU_EFI.fd",
)


class QemuError(EC2ServiceException):
    """The image could not be booted, or did not answer, under QEMU."""


@dataclass(frozen=True)
class Machine:
    """How to start QEMU for one architecture: the binary and the machine-specific arguments."""

    binary: str
    arch: str
    args: tuple[str, ...]
    accel: str


def _tool(name: str) -> str | None:
    """``name`` on PATH or in the sbin directories (mkfs.fat lives in /usr/sbin)."""
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/local/sbin:/usr/sbin:/sbin"])
    return shutil.which(name, path=path)


_kvm_verdicts: dict[str, bool] = {}
_kvm_lock = threading.Lock()


def kvm_works(binary: str) -> bool:
    """True if ``binary`` (an x86 QEMU) really runs a guest under KVM; probed once per process.

    ``/dev/kvm`` existing is not enough: on some hosts it opens and QEMU starts, and the guest
    then stops at its first real-mode instruction. The probe boots a tiny boot sector that must
    reach QEMU's debug-exit port within :data:`KVM_PROBE_TIMEOUT`.
    """
    with _kvm_lock:
        if binary not in _kvm_verdicts:
            _kvm_verdicts[binary] = _probe_kvm(binary)
        return _kvm_verdicts[binary]


def run_probe(binary: str, accel: str, *, timeout: float = KVM_PROBE_TIMEOUT) -> int | None:
    """Boot the probe sector with ``accel``: QEMU's exit status (85 = it ran), None on timeout.

    Raises OSError if QEMU cannot be started.
    """
    with tempfile.TemporaryDirectory(prefix="fedimg-kvm-probe-") as tmp:
        sector = Path(tmp) / "probe.img"
        sector.write_bytes(_KVM_PROBE_CODE.ljust(510, b"\0") + b"\x55\xaa")
        argv = [
            binary,
            *("-accel", accel, "-M", "pc", "-m", "16", "-nodefaults", "-no-user-config"),
            *("-display", "none", "-monitor", "none", "-serial", "none", "-no-reboot"),
            *("-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"),
            *("-drive", f"file={sector},format=raw,if=ide,snapshot=on"),
        ]
        try:
            # subprocess.run kills QEMU (by PID) when the time is up.
            proc = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return None
    return proc.returncode


def _probe_kvm(binary: str) -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        log.info("KVM: /dev/kvm is absent or not accessible; using TCG")
        return False
    try:
        status = run_probe(binary, "kvm")
    except OSError as exc:
        log.info("KVM: cannot run %s: %s; using TCG", binary, exc)
        return False
    if status is None:
        log.info("KVM: the probe VM did not finish in %.0fs; using TCG", KVM_PROBE_TIMEOUT)
        return False
    if status != KVM_PROBE_EXIT:
        log.info("KVM: the probe VM failed (QEMU exited %d); using TCG", status)
        return False
    log.info("KVM: the probe VM ran; using KVM")
    return True


def machine_for(arch: str, accel: str) -> Machine:
    """The QEMU to boot an ``arch`` image with; :class:`QemuError` if this host has none.

    ``accel`` is the ``qemu_accel`` setting; ``auto`` picks KVM only for the host's own
    architecture and only when :func:`kvm_works`.
    """
    host = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower(), platform.machine()
    )
    if arch == "x86_64":
        binary = _tool("qemu-system-x86_64")
        if binary is None:
            raise QemuError(
                "cannot boot x86_64 images here: qemu-system-x86_64 is not installed "
                "(Debian package qemu-system-x86)"
            )
        args: tuple[str, ...] = ()
    elif arch == "arm64":
        binary = _tool("qemu-system-aarch64")
        if binary is None:
            raise QemuError(
                "cannot boot arm64 images here: qemu-system-aarch64 is not installed "
                "(Debian packages qemu-system-arm and qemu-efi-aarch64)"
            )
        firmware = next((f for f in _AARCH64_FIRMWARE if os.path.isfile(f)), None)
        if firmware is None:
            raise QemuError(
                "cannot boot arm64 images here: no UEFI firmware for QEMU's virt machine "
                f"(looked for {', '.join(_AARCH64_FIRMWARE)}; Debian package qemu-efi-aarch64)"
            )
        args = ("-M", "virt", "-bios", firmware)
    else:
        raise QemuError(f"cannot boot {arch} images here: no QEMU for that architecture")
    if accel == "auto":
        # The probe is x86 code; an arm64 host's KVM is only used when asked for (qemu_accel).
        use_kvm = arch == host == "x86_64" and kvm_works(binary)
        accel = "kvm" if use_kvm else "tcg"
    cpu = "host" if accel == "kvm" else "max"
    return Machine(binary=binary, arch=arch, args=(*args, "-cpu", cpu), accel=accel)


# --- the disk ------------------------------------------------------------------------------------


def boots_snapshot(settings: AwsSettings, ami: RegisteredAmi) -> bool:
    """True if the runner boots ``ami``'s root snapshot read back, False if the source image.

    ``qemu_disk = "auto"`` reads the snapshot back on non-AWS targets (the test then proves the
    upload) and boots the source on real AWS (reading 2 GiB back there costs money and time).
    """
    if settings.qemu_disk == "auto":
        return settings.target != "aws" and bool(ami.snapshot_id)
    return settings.qemu_disk == "snapshot"


def write_snapshot_disk(
    *,
    ebs: EBSClient,
    size_bytes: int | None,
    region: str,
    snapshot_id: str,
    path: Path,
    workers: int = 8,
) -> int:
    """Read ``snapshot_id`` back into the raw file ``path``; returns its size in bytes.

    Only the blocks the snapshot lists are read and written; the rest stay holes (zeros), so the
    file is sparse. The size is ``size_bytes`` (the volume size) or, when unknown, the end of the
    last block. Memory is bounded by ``workers`` blocks. Raises AWSError.
    """
    listed = list_blocks(ebs, region=region, snapshot_id=snapshot_id)
    end = (max(listed) + 1) * BLOCK_SIZE if listed else 0
    size = max(size_bytes or 0, end)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)

        def copy(index: int) -> None:
            data = read_block(
                ebs, region=region, snapshot_id=snapshot_id, index=index, token=listed[index]
            )
            if data != ZERO_BLOCK:
                os.pwrite(fd, data, index * BLOCK_SIZE)

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedimg-readback") as pool:
            for future in [pool.submit(copy, index) for index in sorted(listed)]:
                future.result()
    finally:
        os.close(fd)
    return size


def write_source_disk(*, location: str, arch: str, path: Path) -> int:
    """Decompress the source image at ``location`` into the sparse raw file ``path``; its size.

    Raises InputError if the source cannot be read.
    """
    blocks = RawBlocks(resolve_source(location, arch=arch), block_size=BLOCK_SIZE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for index, block in blocks:
            if block != ZERO_BLOCK:
                os.pwrite(fd, block, index * BLOCK_SIZE)
        os.ftruncate(fd, blocks.stats.bytes_raw)
    finally:
        blocks.close()
        os.close(fd)
    return blocks.stats.bytes_raw


# --- the NoCloud seed ----------------------------------------------------------------------------


def make_seed(
    workdir: Path, *, public_key: str, instance_id: str, hostname: str, username: str
) -> Path:
    """A NoCloud seed disk (vfat, label CIDATA) in ``workdir``; raises QemuError on failure.

    ``user-data`` authorises ``public_key`` for the image's default user (cloud-init) and, when
    ``username`` is root, lets root log in with it.
    """
    mkfs, mcopy = _tool("mkfs.fat"), _tool("mcopy")
    if mkfs is None or mcopy is None:
        raise QemuError(
            "cannot make the NoCloud seed: mkfs.fat and mcopy are needed "
            "(Debian packages dosfstools and mtools)"
        )
    user_data = workdir / "user-data"
    meta_data = workdir / "meta-data"
    lines = ["#cloud-config", "ssh_authorized_keys:", f"  - {public_key}"]
    if username == "root":
        lines.append("disable_root: false")
    user_data.write_text("\n".join(lines) + "\n")
    meta_data.write_text(f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n")
    seed = workdir / "seed.img"
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    for argv in (
        [mkfs, "-C", "-n", "CIDATA", str(seed), "1024"],
        [mcopy, "-i", str(seed), str(user_data), str(meta_data), "::/"],
    ):
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise QemuError(
                f"making the NoCloud seed: {Path(argv[0]).name} exited {proc.returncode}: "
                f"{(proc.stderr or proc.stdout).strip()}"
            )
    return seed


# --- the console ---------------------------------------------------------------------------------


def read_console(path: Path) -> str:
    """The serial console so far ("" before QEMU created the file)."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def console_tail(text: str, lines: int = CONSOLE_TAIL_LINES) -> str:
    """The last ``lines`` lines of a console, without terminal escapes and control characters."""
    clean = _UNPRINTABLE.sub("", _ANSI.sub("", text.replace("\r\n", "\n").replace("\r", "\n")))
    kept = [line.rstrip() for line in clean.splitlines()]
    while kept and not kept[-1]:
        kept.pop()
    return "\n".join(kept[-lines:])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- the runner ----------------------------------------------------------------------------------


class QemuRunner:
    """Boots the image under QEMU and runs the test script in it over SSH. Never raises for a
    failed test.

    Anything that keeps the test from passing (no QEMU for the architecture, a disk that cannot be
    read back, a guest that never shows its host keys or never answers SSH within
    ``qemu_boot_timeout``, QEMU exiting, the script failing or running past its limit) is a failed
    :class:`TestOutcome`; its output ends with the console's tail. Only a configuration error
    raises. No QEMU outlives :meth:`run`.
    """

    name = "qemu"

    def __init__(
        self,
        *,
        clients: ClientFactory,
        settings: AwsSettings,
        workdir: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clients = clients
        self.settings = settings
        self.workdir = workdir
        self.clock = clock

    def run(self, *, target: TestTarget, script: str, timeout: float) -> TestOutcome:
        """Boot the image, run the script in it within ``timeout`` seconds, always stop QEMU."""
        argv = script_argv(script)
        payload = script_payload(argv)
        started = self.clock()
        console = ""
        with tempfile.TemporaryDirectory(prefix="fedimg-qemu-", dir=self.workdir) as tmp:
            work = Path(tmp)
            try:
                outcome = self._test_in(
                    work,
                    target=target,
                    argv=argv,
                    payload=payload,
                    timeout=timeout,
                    started=started,
                )
            except ConfigError:
                raise
            except (FedimgError, OSError) as exc:
                log.error("QEMU test of %s: %s", target.subject, exc)
                outcome = TestOutcome(
                    passed=False,
                    exit_code=None,
                    output="",
                    seconds=round(self.clock() - started, 3),
                    reason=str(exc),
                )
            console = read_console(work / "console.log")
        if outcome.passed and outcome.output.strip():
            log.info(
                "test output in the QEMU guest of %s:\n%s", target.subject, outcome.output.rstrip()
            )
        if not outcome.passed and console:
            tail = console_tail(console)
            output = f"{outcome.output.rstrip()}\n" if outcome.output.strip() else ""
            outcome = TestOutcome(
                passed=False,
                exit_code=outcome.exit_code,
                output=f"{output}--- console of the QEMU guest (last lines) ---\n{tail}\n",
                seconds=outcome.seconds,
                reason=outcome.reason,
            )
        return outcome

    def _test_in(
        self,
        work: Path,
        *,
        target: TestTarget,
        argv: list[str],
        payload: bytes | None,
        timeout: float,
        started: float,
    ) -> TestOutcome:
        machine = machine_for(target.arch, self.settings.qemu_accel)
        disk = self._disk(target, work / "disk.raw")
        key, public = generate_key()
        seed = make_seed(
            work,
            public_key=public.decode("ascii"),
            instance_id=f"iid-fedimg-{target.ami.ami_id if target.ami else 'source'}",
            hostname="fedimg-test",
            username=self.settings.test_username,
        )
        return self._boot_and_test(
            machine=machine,
            disk=disk,
            seed=seed,
            work=work,
            options=SshOptions(
                username=self.settings.test_username,
                pkey=key,
                host_keys=None,
                connect_timeout=self.settings.ssh_connect_timeout,
            ),
            target=target,
            argv=argv,
            payload=payload,
            timeout=timeout,
            started=started,
        )

    def _disk(self, target: TestTarget, path: Path) -> Path:
        """The disk to boot: the snapshot read back, or the source image (``qemu_disk``)."""
        ami = target.ami
        started = time.monotonic()
        if ami is not None and boots_snapshot(self.settings, ami):
            if not ami.snapshot_id:
                raise QemuError(
                    f"{ami.ami_id} ({ami.flavour.name}) has no root snapshot to boot "
                    "(qemu_disk = 'snapshot'); use qemu_disk = 'auto' or 'source'"
                )
            size = write_snapshot_disk(
                ebs=self.clients.ebs(ami.region),
                size_bytes=self._volume_size(ami.region, ami.snapshot_id),
                region=ami.region,
                snapshot_id=ami.snapshot_id,
                path=path,
                workers=self.settings.workers,
            )
            what = f"snapshot {ami.snapshot_id} of {ami.ami_id}"
        else:
            size = write_source_disk(
                location=target.image_path or target.image_url, arch=target.arch, path=path
            )
            what = f"source image {target.image_name}"
        log.info(
            "QEMU disk: %s, %.1f MiB, in %.1fs",
            what,
            size / (1024 * 1024),
            time.monotonic() - started,
        )
        return path

    def _volume_size(self, region: str, snapshot_id: str) -> int | None:
        """The snapshot's volume size in bytes (DescribeSnapshots), None if not reported."""
        ec2 = self.clients.ec2(region)
        with aws_call("DescribeSnapshots", region, snapshot_id):
            snapshots = ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"]
        gib = snapshots[0].get("VolumeSize") if snapshots else None
        return gib * 1024**3 if gib else None

    def _boot_and_test(
        self,
        *,
        machine: Machine,
        disk: Path,
        seed: Path,
        work: Path,
        options: SshOptions,
        target: TestTarget,
        argv: list[str],
        payload: bytes | None,
        timeout: float,
        started: float,
    ) -> TestOutcome:
        settings = self.settings
        console = work / "console.log"
        port = _free_port()
        cmd = [
            machine.binary,
            *("-accel", machine.accel, *machine.args),
            *("-m", str(settings.qemu_memory), "-nographic", "-monitor", "none", "-no-reboot"),
            *("-serial", f"file:{console}"),
            *("-drive", f"file={disk},if=virtio,format=raw,snapshot=on"),
            *("-drive", f"file={seed},if=virtio,format=raw"),
            *("-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22"),
            *("-device", "virtio-net-pci,netdev=n0"),
        ]
        qemu_log_path = work / "qemu.log"
        label = f"QEMU guest of {target.subject} ({machine.accel})"
        session: SshSession | None = None
        with qemu_log_path.open("wb") as qemu_log:
            log.info("booting %s: %s", label, " ".join(cmd))
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=qemu_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        booted = self.clock()
        deadline = booted + settings.qemu_boot_timeout

        def alive() -> None:
            if proc.poll() is not None:
                qemu_says = read_console(qemu_log_path).strip()[-2000:]
                raise QemuError(
                    f"{label}: QEMU exited with {proc.returncode} before the test ran"
                    + (f": {qemu_says}" if qemu_says else "")
                )

        def sleep(seconds: float) -> None:
            alive()
            time.sleep(seconds)
            alive()

        try:
            if settings.host_key_policy == "console":
                host_keys = self._console_host_keys(console, deadline, label, sleep)
                options = replace(options, host_keys=host_keys)

            def login() -> SshSession:
                return connect(
                    address=Address(host="127.0.0.1", port=port),
                    options=options,
                    timeout=max(1.0, deadline - self.clock()),
                    label=label,
                    retry_delay=1.0,
                    sleep=sleep,
                    clock=self.clock,
                )

            session = login()
            log.info("%s answered SSH %.1fs after QEMU started", label, self.clock() - booted)
            for attempt in (1, 2):
                try:
                    return run_test_script(
                        session,
                        target=target,
                        argv=argv,
                        payload=payload,
                        timeout=timeout,
                        where=label,
                        started=started,
                    )
                except SSHError as exc:
                    # A guest still settling after boot (TCG is slow) sometimes drops the first
                    # connection ("Unable to open channel", "Channel closed"); the VM is ours
                    # and throw-away, so log in again once and run the script afresh. A script
                    # that fails is not an SSHError and is never retried.
                    if attempt == 2:
                        raise
                    log.warning("%s: %s; logging in again", label, exc)
                    session.close()
                    sleep(2.0)
                    session = login()
            raise AssertionError("unreachable")
        finally:
            self._stop(proc, session, label)

    def _console_host_keys(
        self, console: Path, deadline: float, label: str, sleep: Callable[[float], None]
    ) -> ConsoleHostKeys:
        while True:
            text = read_console(console)
            found = parse_console_host_keys(text)
            if not found.empty:
                log.info("host keys of %s from its console: %s", label, found.describe())
                self._await_boot_finished(console, deadline, label, sleep)
                return found
            if self.clock() >= deadline:
                raise QemuError(
                    f"{label}: no SSH host keys on the console within "
                    f"{self.settings.qemu_boot_timeout:.0f}s (qemu_boot_timeout); the image did "
                    "not boot, or did not run cloud-init with the NoCloud seed"
                )
            sleep(CONSOLE_POLL)

    def _await_boot_finished(
        self, console: Path, deadline: float, label: str, sleep: Callable[[float], None]
    ) -> None:
        """Wait (a little) for cloud-init's "finished" line: the host keys are printed while the
        guest is still bringing its services up, and a login then can be dropped. Images that
        never print the line are given BOOT_SETTLE seconds, then tried anyway."""
        limit = min(deadline, self.clock() + BOOT_SETTLE)
        while self.clock() < limit:
            if FINISHED_LINE.search(read_console(console)):
                return
            sleep(CONSOLE_POLL)
        log.info("%s: no cloud-init 'finished' line yet; trying SSH anyway", label)

    def _stop(self, proc: subprocess.Popen[bytes], session: SshSession | None, label: str) -> None:
        """Power the guest off (if logged in), wait the grace period, then kill QEMU by PID."""
        try:
            if session is not None and proc.poll() is None:
                asked = False
                with contextlib.suppress(SSHError):
                    session.run(
                        'if [ "$(id -u)" = 0 ]; then poweroff; else sudo -n poweroff; fi',
                        timeout=10,
                    )
                    asked = True
                session.close()
                if asked:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=self.settings.qemu_poweroff_grace)
        finally:
            if proc.poll() is None:
                log.info("%s: killing QEMU (pid %d)", label, proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            if session is not None:
                session.close()


#: cloud-init's last console line ("Cloud-init v. 24.1 finished at ...").
FINISHED_LINE = re.compile(r"Cloud-init v\. \S+ finished at")
#: Seconds to wait for that line once the host keys are on the console.
BOOT_SETTLE = 60.0


__all__ = [
    "Machine",
    "QemuError",
    "QemuRunner",
    "boots_snapshot",
    "console_tail",
    "kvm_works",
    "machine_for",
    "make_seed",
    "run_probe",
    "write_snapshot_disk",
    "write_source_disk",
]

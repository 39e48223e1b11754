"""Boot the bootable sample image (tools/bootable-sample, issue 9) under QEMU.

Builds the image with ``tools/bootable-sample/build.py``, makes a NoCloud seed
(vfat labelled CIDATA with ``user-data`` and ``meta-data``) holding a freshly
generated ed25519 public key, boots both disks with QEMU (TCG), waits for
SSH, checks the host key against the one printed on the serial console,
runs ``echo hello; uname -r`` and powers the guest off. QEMU is killed by PID
in a ``finally`` block whatever happens.

Needs the Debian packages of ``tools/bootable-sample/install-deps.sh``; without
them the tests are skipped, except under ``CI=true`` where they fail.
Set FEDIMG_BOOTABLE_SAMPLE_DIR to keep (and reuse) the built image there.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools" / "bootable-sample"
BUILD = TOOLS / "build.py"
IN_CI = os.environ.get("CI") == "true"
SSH_DEADLINE = 120.0  # seconds from QEMU's start to a working SSH login
BUILD_TIMEOUT = 300.0

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# The console prefix that `logger --stderr -t ec2` puts on cloud-init's
# write-ssh-key-fingerprints lines: "<14>Nov 26 12:09:54 ec2: ".
LOGGER_PREFIX = re.compile(r"^<\d+>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d [^:\s]+: ?")
FINISHED = re.compile(r"^Cloud-init v\. \S+ finished at .*Datasource (\S+)", re.MULTILINE)


@dataclass(frozen=True)
class Image:
    raw: Path
    xz: Path
    kernel_release: str
    out: Path


def _missing_deps() -> str | None:
    proc = subprocess.run(
        [sys.executable, str(BUILD), "--check-deps", "--test-deps"],
        capture_output=True,
        text=True,
        check=False,
    )
    return None if proc.returncode == 0 else proc.stderr.strip()


def _build(out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BUILD), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=BUILD_TIMEOUT,
    )


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    missing = _missing_deps()
    if missing is not None:
        reason = (
            "bootable sample image: build/boot dependencies missing "
            f"(run tools/bootable-sample/install-deps.sh as root):\n{missing}"
        )
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    env_dir = os.environ.get("FEDIMG_BOOTABLE_SAMPLE_DIR")
    out = Path(env_dir) if env_dir else tmp_path_factory.mktemp("bootable-sample")
    started = time.monotonic()
    proc = _build(out)
    assert proc.returncode == 0, f"build.py failed:\n{proc.stderr}"
    print(f"\nbootable sample: build.py took {time.monotonic() - started:.1f} s\n{proc.stderr}")
    paths = [Path(line) for line in proc.stdout.split()]
    raw = next(p for p in paths if p.name.endswith(".raw"))
    xz = next(p for p in paths if p.name.endswith(".raw.xz"))
    manifest = json.loads((out / "bootable-sample.json").read_text())
    return Image(raw, xz, str(manifest["kernel_release"]), out)


def test_build_outputs_and_cache(image: Image) -> None:
    raw = image.raw.read_bytes()
    assert len(raw) % (1024 * 1024) == 0
    assert raw[510:512] == b"\x55\xaa", "no MBR signature"
    status, ptype, start = raw[446], raw[450], int.from_bytes(raw[454:458], "little")
    assert (status, ptype, start) == (0x80, 0x0E, 2048), "partition 1 not active FAT16 at 1 MiB"
    boot_sector = raw[2048 * 512 : 2049 * 512]
    assert boot_sector[3:11] == b"SYSLINUX", "syslinux not installed in the FAT boot sector"
    assert boot_sector[54:59] == b"FAT16"
    assert raw[:440] == Path("/usr/lib/syslinux/mbr/mbr.bin").read_bytes()[:440]
    assert image.xz.read_bytes()[:6] == b"\xfd7zXZ\x00"

    started = time.monotonic()
    again = _build(image.out)
    assert again.returncode == 0, again.stderr
    assert "reusing" in again.stderr
    assert [Path(p) for p in again.stdout.split()] == [image.raw, image.xz]
    assert time.monotonic() - started < 30


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _make_seed(workdir: Path, public_key: str) -> Path:
    (workdir / "user-data").write_text(f"#cloud-config\nssh_authorized_keys:\n  - {public_key}\n")
    (workdir / "meta-data").write_text(
        "instance-id: iid-fedimg-bootable-sample\nlocal-hostname: fedimg-sample\n"
    )
    seed = workdir / "seed.img"
    subprocess.run(
        ["mkfs.fat", "-C", "-n", "CIDATA", str(seed), "1024"], check=True, capture_output=True
    )
    subprocess.run(
        ["mcopy", "-i", str(seed), str(workdir / "user-data"), str(workdir / "meta-data"), "::/"],
        check=True,
        capture_output=True,
        env={**os.environ, "MTOOLS_SKIP_CHECK": "1"},
    )
    return seed


def _console_block(console: str, begin: str, end: str) -> list[str]:
    lines = [LOGGER_PREFIX.sub("", line.rstrip("\r")) for line in console.splitlines()]
    start = lines.index(f"-----BEGIN {begin}-----")
    stop = lines.index(f"-----END {end}-----", start)
    return [line for line in lines[start + 1 : stop] if line]


def _sha256_fingerprint(public_key_line: str) -> str:
    blob = base64.b64decode(public_key_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@dataclass
class Guest:
    proc: subprocess.Popen[bytes]
    console: Path
    port: int
    key: Path
    known_hosts: Path
    started: float  # time.monotonic() when QEMU was started

    def ssh(
        self, command: str, known_hosts: Path | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "ssh",
                "-F",
                "/dev/null",
                "-p",
                str(self.port),
                "-i",
                str(self.key),
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                f"UserKnownHostsFile={known_hosts or self.known_hosts}",
                "-o",
                "GlobalKnownHostsFile=/dev/null",
                "-o",
                "HostKeyAlgorithms=ssh-ed25519",
                "-o",
                "ConnectTimeout=10",
                "-o",
                "LogLevel=ERROR",
                "root@127.0.0.1",
                command,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )

    def qemu_exited(self) -> str:
        log = self.console.with_name("qemu.log").read_text(errors="replace")
        return f"QEMU exited with {self.proc.returncode}: {log}"

    def read_console(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@pytest.fixture
def guest(image: Image, tmp_path: Path) -> Iterator[Guest]:
    key = tmp_path / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fedimg-test", "-f", str(key)],
        check=True,
    )
    seed = _make_seed(tmp_path, key.with_suffix(".pub").read_text().strip())
    disk = tmp_path / "disk.raw"
    disk.write_bytes(image.raw.read_bytes())  # the guest must not write to the build
    console = tmp_path / "console.log"
    port = _free_port()
    cmd = [
        "qemu-system-x86_64",
        "-machine",
        "accel=tcg",
        "-m",
        "512",
        "-nographic",
        "-monitor",
        "none",
        "-no-reboot",
        "-serial",
        f"file:{console}",
        "-drive",
        f"file={disk},if=virtio,format=raw",
        "-drive",
        f"file={seed},if=virtio,format=raw",
        "-netdev",
        f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device",
        "virtio-net-pci,netdev=n0",
    ]
    qemu_log = (tmp_path / "qemu.log").open("wb")
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=qemu_log)
    vm = Guest(proc, console, port, key, tmp_path / "known_hosts", started)
    try:
        yield vm
    finally:
        if proc.poll() is None:
            proc.kill()  # SIGKILL to QEMU's own PID
        proc.wait(timeout=30)
        qemu_log.close()
        print(f"\n--- console.log (tail) ---\n{vm.read_console()[-6000:]}")


def test_boots_and_offers_ssh(
    image: Image, guest: Guest, record_property: Callable[[str, object], None]
) -> None:
    started = guest.started
    deadline = started + SSH_DEADLINE

    # 1. The console says cloud-init finished and shows the host key.
    console = ""
    while True:
        console = guest.read_console()
        if FINISHED.search(console):
            break
        assert guest.proc.poll() is None, guest.qemu_exited()
        assert time.monotonic() < deadline, "no 'Cloud-init ... finished' line on the console"
        time.sleep(0.5)
    finished = FINISHED.search(console)
    assert finished is not None
    assert finished.group(1) == "DataSourceNoCloud"
    fingerprints = _console_block(console, "SSH HOST KEY FINGERPRINTS", "SSH HOST KEY FINGERPRINTS")
    keys = _console_block(console, "SSH HOST KEY KEYS", "SSH HOST KEY KEYS")
    assert len(keys) == 1, keys
    assert keys[0].startswith("ssh-ed25519 "), keys
    assert len(fingerprints) == 1, fingerprints
    bits, fingerprint, *_, kind = fingerprints[0].split()
    assert (bits, kind) == ("256", "(ED25519)")
    assert fingerprint == _sha256_fingerprint(keys[0]), "console key and fingerprint differ"

    # 2. Log in, trusting only the host key from the console.
    key_type, key_blob = keys[0].split()[:2]
    guest.known_hosts.write_text(f"[127.0.0.1]:{guest.port} {key_type} {key_blob}\n")
    result: subprocess.CompletedProcess[str] | None = None
    while time.monotonic() < deadline:
        assert guest.proc.poll() is None, guest.qemu_exited()
        result = guest.ssh("echo hello; uname -r", timeout=20)
        if result.returncode == 0:
            break
        time.sleep(1)
    assert result is not None
    assert result.returncode == 0, f"no SSH login within {SSH_DEADLINE:.0f} s: {result.stderr}"
    boot_to_ssh = time.monotonic() - started
    record_property("boot_to_ssh_seconds", round(boot_to_ssh, 1))
    print(f"\nbootable sample: boot to SSH in {boot_to_ssh:.1f} s (TCG)")
    assert result.stdout.split() == ["hello", image.kernel_release]

    # 3. The host key verification is real: another key is refused.
    other = guest.known_hosts.with_name("other_known_hosts")
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other.with_suffix(".key"))],
        check=True,
    )
    wrong = other.with_suffix(".key.pub").read_text().split()[:2]
    other.write_text(f"[127.0.0.1]:{guest.port} {wrong[0]} {wrong[1]}\n")
    refused = guest.ssh("true", known_hosts=other)
    assert refused.returncode != 0
    assert "verification failed" in refused.stderr

    # 4. A POSIX shell and busybox applets, the seed's hostname, sftp-server.
    probe = guest.ssh(
        "sh -c 'hostname; cat /etc/ssh/ssh_host_ed25519_key.pub; "
        "test -x /usr/lib/sftp-server && echo sftp-ok; wc -l < /root/.ssh/authorized_keys'"
    )
    assert probe.returncode == 0, probe.stderr
    lines = probe.stdout.splitlines()
    assert lines[0] == "fedimg-sample"
    assert lines[1].split()[:2] == [key_type, key_blob]
    assert lines[2:] == ["sftp-ok", "1"]

    # 5. Clean power-off: QEMU exits by itself.
    guest.ssh("poweroff", timeout=20)
    try:
        guest.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the guest did not power off within 60 s")

"""A real OpenSSH server on 127.0.0.1 standing for the instances of the embedded AWS, and the seam
that points fedimg at it.

The server has its own config, a fresh ed25519 host key and an authorized_keys file; the key
fedimg imports (ImportKeyPair) is added to that file by a botocore hook as the request is made,
just as cloud-init would install it on a real instance.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedimg.services.ec2.service import PublishRequest, PublishResult
from fedimg.services.ec2.ssh import Address
from fedimg.source import resolve_source

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

    from fedimg.config import Config
    from fedimg.runtime import Runtime


def sshd_binary() -> str | None:
    """The sshd to run (it lives in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("sshd")
    if found:
        return found
    return "/usr/sbin/sshd" if os.access("/usr/sbin/sshd", os.X_OK) else None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def keygen(path: Path, comment: str = "root@ip-172-31-7-9", kind: str = "ed25519") -> str:
    """A new key (ed25519 by default) at ``path``; its public line."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", comment, "-f", str(path)],
        check=True,
    )
    return path.with_suffix(".pub").read_text().strip()


def fingerprint_line(public_key_file: Path) -> str:
    """``ssh-keygen -l``: ``256 SHA256:… comment (ED25519)``, as cloud-init prints it."""
    done = subprocess.run(
        ["ssh-keygen", "-l", "-f", str(public_key_file)], check=True, capture_output=True, text=True
    )
    return done.stdout.strip()


def cloud_init_console(*, fingerprints: Sequence[str] = (), keys: Sequence[str] = ()) -> str:
    """Console output as a Fedora instance prints it: kernel noise, then cloud-init's blocks."""
    lines = [
        "[    0.000000] Linux version 6.11.4-301.fc41.x86_64 (mockbuild@...)",
        "[    3.141592] cloud-init[812]: Cloud-init v. 24.1.4 running 'init' at ...",
        "ci-info: no authorized SSH keys fingerprints found for user fedora.",
    ]
    if fingerprints:
        lines += ["<14>Oct 25 12:00:00 cloud-init: ############################################"]
        lines += ["<14>Oct 25 12:00:00 cloud-init: -----BEGIN SSH HOST KEY FINGERPRINTS-----"]
        lines += [f"<14>Oct 25 12:00:00 cloud-init: {line}" for line in fingerprints]
        lines += ["<14>Oct 25 12:00:00 cloud-init: -----END SSH HOST KEY FINGERPRINTS-----"]
    if keys:
        lines += ["-----BEGIN SSH HOST KEY KEYS-----", *keys, "-----END SSH HOST KEY KEYS-----"]
    lines += ["[   12.000000] cloud-init[901]: Cloud-init v. 24.1.4 finished"]
    return "\r\n".join(lines) + "\r\n"


class LocalSshd:
    """sshd on 127.0.0.1:``port``, logging in ``user`` with the keys in ``authorized_keys``."""

    def __init__(self, root: Path, binary: str) -> None:
        self.root = root
        self.binary = binary
        self.port = free_port()
        self.user = getpass.getuser()
        self.host_key = root / "host_ed25519"
        self.host_public = keygen(self.host_key)
        self.host_fingerprint = fingerprint_line(self.host_key.with_suffix(".pub"))
        # A second host key, as instances have several (cloud-init prints them all).
        self.ecdsa_key = root / "host_ecdsa"
        self.ecdsa_public = keygen(self.ecdsa_key, kind="ecdsa")
        self.ecdsa_fingerprint = fingerprint_line(self.ecdsa_key.with_suffix(".pub"))
        self.authorized_keys = root / "authorized_keys"
        self.authorized_keys.write_text("")
        self.log = root / "sshd.log"
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> Address:
        """Where it listens."""
        return Address(host="127.0.0.1", port=self.port)

    def start(self) -> None:
        """Run it in the foreground (-D) of a child process; wait until it says its banner."""
        config = self.root / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self.host_key}",
                    f"HostKey {self.ecdsa_key}",
                    f"PidFile {self.root / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.authorized_keys}",
                    "StrictModes no",
                    "UsePAM no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "PermitRootLogin prohibit-password",
                    "AllowTcpForwarding yes",
                    "MaxStartups 100",
                    "Subsystem sftp internal-sftp",
                    "LogLevel VERBOSE",
                    "",
                ]
            )
        )
        if os.geteuid() == 0:
            # sshd's privilege separation directory (a package's tmpfiles.d makes it at boot).
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                [self.binary, "-D", "-e", "-f", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"sshd exited {self._process.returncode}: {self.log.read_text()}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as probe,
            ):
                if probe.recv(64).startswith(b"SSH-2.0"):
                    return
            time.sleep(0.1)
        raise RuntimeError(f"sshd did not answer on port {self.port}: {self.log.read_text()}")

    def stop(self) -> None:
        """Stop it (and wait)."""
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None

    def authorize(self, public_line: str) -> None:
        """Let the holder of this key log in (appended; sshd reads the file at each login)."""
        with self._lock, self.authorized_keys.open("a") as handle:
            handle.write(public_line.strip() + "\n")

    def authorize_imported_keys(self, params: dict[str, Any], **_: Any) -> None:
        """A botocore ``provide-client-params`` hook: authorise every key fedimg imports."""
        material = params.get("PublicKeyMaterial")
        if material:
            text = material.decode() if isinstance(material, bytes | bytearray) else str(material)
            self.authorize(text)

    def console(self) -> str:
        """Console output carrying this server's host key fingerprints (cloud-init's block)."""
        return cloud_init_console(fingerprints=[self.ecdsa_fingerprint, self.host_fingerprint])


@contextlib.contextmanager
def running_sshd(directory: Path) -> Iterator[LocalSshd]:
    """An OpenSSH server on 127.0.0.1 with its files in ``directory``, stopped on exit.

    Skipped (failed under CI=true) when sshd or ssh-keygen is not installed.
    """
    from tests.conftest import require

    binary = sshd_binary()
    require(
        binary is not None and shutil.which("ssh-keygen") is not None,
        "OpenSSH's sshd is not installed (apt-get install openssh-server)",
    )
    assert binary is not None
    server = LocalSshd(directory, binary)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class LocalSeam:
    """The seam: every instance is this sshd; its console says ``console``; volumes are files.

    ``devices`` maps nothing: every volume's device is ``device`` (a file standing for it).
    Records what fedimg asked.
    """

    address_to: Address
    console: str
    device: Path | None = None
    dialled: list[str] = field(default_factory=list)
    consoles_read: list[str] = field(default_factory=list)
    volumes: list[tuple[str, str]] = field(default_factory=list)

    def address(self, instance: Mapping[str, Any]) -> Address:
        self.dialled.append(str(instance["InstanceId"]))
        return self.address_to

    def console_output(self, ec2: EC2Client, *, region: str, instance_id: str) -> str:
        # The real call still goes out (the recorder sees it); its answer is moto's fixed text.
        ec2.get_console_output(InstanceId=instance_id)
        self.consoles_read.append(instance_id)
        return self.console

    def device_candidates(self, *, volume_id: str, device: str) -> list[str]:
        self.volumes.append((volume_id, device))
        return [str(self.device)] if self.device is not None else ["/nonexistent/fedimg-device"]


@contextlib.contextmanager
def silent_port() -> Iterator[Address]:
    """A port that accepts connections and never says a word (an sshd that hangs)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield Address(host="127.0.0.1", port=int(server.getsockname()[1]))
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def publish_over_ssh(
    runtime_factory: Callable[[Config], Runtime],
    config: Config,
    source: str,
    sshd: LocalSshd,
    seam: LocalSeam,
    **request: Any,
) -> tuple[PublishResult, Runtime]:
    """Publish ``source`` with ``seam`` routing instances to ``sshd``, which authorises the keys
    fedimg imports as the ImportKeyPair request goes out."""
    runtime = runtime_factory(config)
    runtime.seam = seam
    runtime.hooks.append(("provide-client-params.ec2.ImportKeyPair", sshd.authorize_imported_keys))
    result = runtime.service().publish(PublishRequest(source=resolve_source(source), **request))
    return result, runtime

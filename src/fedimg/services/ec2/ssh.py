"""SSH to the instances fedimg starts: bounded connects, commands with a time limit, SFTP.

Host keys are verified, never assumed. With ``host_key_policy = "console"`` the only keys trusted
are the ones cloud-init prints on the instance's console (between ``-----BEGIN SSH HOST KEY
FINGERPRINTS-----`` and its END line, or the keys themselves between ``-----BEGIN SSH HOST KEY
KEYS-----`` and its END line), read with GetConsoleOutput; any other key fails the connection at
once, without retrying. ``"accept-new"`` trusts the first key offered (the instance is new, and
the key is never stored).

Every wait is bounded: a connection attempt by ``connect_timeout``, the retries until SSH answers
by ``timeout``, a command by its own limit (enforced on the remote side with ``timeout(1)`` and on
this side by closing the channel).

The :class:`InstanceSeam` is where an instance becomes something to dial: its address, its console
output, and the device names its attached volumes may have. The default reads them from EC2; tests
replace it to reach a local sshd that stands for the emulator's instances.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import hashlib
import io
import logging
import math
import re
import select
import shlex
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import paramiko

from fedimg.config import AwsSettings
from fedimg.services.ec2.errors import AWSError, EC2ServiceException, aws_call

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

log = logging.getLogger(__name__)

HostKeyPolicy = Literal["console", "accept-new"]

FINGERPRINTS_BEGIN = "-----BEGIN SSH HOST KEY FINGERPRINTS-----"
FINGERPRINTS_END = "-----END SSH HOST KEY FINGERPRINTS-----"
KEYS_BEGIN = "-----BEGIN SSH HOST KEY KEYS-----"
KEYS_END = "-----END SSH HOST KEY KEYS-----"

#: Output kept per command: the tail, where the errors are. Messages cut it further (32 KiB).
OUTPUT_LIMIT = 1024 * 1024
#: Seconds past a command's limit before this side gives up on it (the remote timeout(1) sends
#: TERM at the limit and KILL 10 s later).
COMMAND_GRACE = 15.0
#: Seconds between attempts to connect while an instance boots.
RETRY_DELAY = 5.0

_FINGERPRINT = re.compile(
    r"\b\d+\s+(SHA256:[A-Za-z0-9+/]+=*|MD5:(?:[0-9a-fA-F]{2}:){15}[0-9a-fA-F]{2}"
    r"|(?:[0-9a-fA-F]{2}:){15}[0-9a-fA-F]{2})(?=\s|$)"
)
_KEY_TYPE = re.compile(r"\(([A-Z0-9-]+)\)\s*$")
#: Host key algorithms for each key type cloud-init names, so that the connection asks only for
#: keys the console vouches for (an instance may hold other keys that it did not print).
_ALGORITHMS = {
    "ED25519": ("ssh-ed25519",),
    "ECDSA": ("ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521"),
    "RSA": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"),
    "DSA": ("ssh-dss",),
}
_ALGORITHMS_OF_KEY = {
    "ssh-ed25519": _ALGORITHMS["ED25519"],
    "ecdsa-sha2-nistp256": ("ecdsa-sha2-nistp256",),
    "ecdsa-sha2-nistp384": ("ecdsa-sha2-nistp384",),
    "ecdsa-sha2-nistp521": ("ecdsa-sha2-nistp521",),
    "ssh-rsa": _ALGORITHMS["RSA"],
    "ssh-dss": _ALGORITHMS["DSA"],
}
ALL_HOST_KEY_ALGORITHMS = tuple(a for group in _ALGORITHMS.values() for a in group)
_KEY = re.compile(
    r"\b(ssh-ed25519|ssh-rsa|ssh-dss|ecdsa-sha2-nistp(?:256|384|521)"
    r"|sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com)\s+(AAAA[A-Za-z0-9+/]+=*)"
)


class SSHError(EC2ServiceException):
    """SSH to an instance failed."""


class HostKeyError(SSHError):
    """The host key offered is not one the policy trusts (never retried)."""


class SSHTimeout(SSHError):
    """An instance did not answer SSH, or print its host keys, in time."""


@dataclass(frozen=True)
class Address:
    """Where to dial."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class InstanceSeam(Protocol):
    """Maps an instance to what SSH needs of it. The default asks EC2; tests map to a local sshd."""

    def address(self, instance: Mapping[str, Any]) -> Address:
        """The address to dial for ``instance`` (a DescribeInstances entry)."""

    def console_output(self, ec2: EC2Client, *, region: str, instance_id: str) -> str:
        """The instance's console output, decoded."""

    def device_candidates(self, *, volume_id: str, device: str) -> list[str]:
        """Paths the volume attached as ``device`` may have inside the instance, best first."""


class AwsInstanceSeam:
    """The real mapping: the public (or, through a jump host, private) IP and GetConsoleOutput."""

    def __init__(self, *, port: int = 22, private: bool = False) -> None:
        self.port = port
        self.private = private

    def address(self, instance: Mapping[str, Any]) -> Address:
        """The public IP, or the private one (through a jump host, or when there is no public)."""
        public = instance.get("PublicIpAddress")
        private = instance.get("PrivateIpAddress")
        host = (private or public) if self.private else (public or private)
        if not host:
            raise SSHError(f"{instance.get('InstanceId')} has no IP address to connect to")
        return Address(host=str(host), port=self.port)

    def console_output(self, ec2: EC2Client, *, region: str, instance_id: str) -> str:
        """GetConsoleOutput, the newest output where the instance type supports it."""
        texts: list[str] = []
        for latest in (False, True):
            try:
                with aws_call("GetConsoleOutput", region, instance_id):
                    if latest:
                        response = ec2.get_console_output(InstanceId=instance_id, Latest=True)
                    else:
                        response = ec2.get_console_output(InstanceId=instance_id)
            except AWSError:
                # Latest is for Nitro instances only; the buffered output is still there.
                if latest:
                    continue
                raise
            texts.append(decode_console(response.get("Output", "")))
        return "\n".join(texts)

    def device_candidates(self, *, volume_id: str, device: str) -> list[str]:
        """NVMe (the volume id is the serial), then the Xen names of ``device``."""
        return device_candidates(volume_id=volume_id, device=device)


def default_seam(settings: AwsSettings) -> AwsInstanceSeam:
    """The seam for real instances under ``settings`` (private addresses through a jump host)."""
    return AwsInstanceSeam(port=settings.ssh_port, private=bool(settings.ssh_proxy_jump))


def device_candidates(*, volume_id: str, device: str) -> list[str]:
    """Where a volume attached as ``device`` (``/dev/sdf``) appears inside an instance.

    Nitro instances show EBS volumes as NVMe devices whose serial is the volume id without its
    dash (udev links it as ``/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0123…``); Xen
    instances show ``/dev/sdf`` as ``/dev/xvdf`` (or keep the name).
    """
    serial = volume_id.replace("-", "")
    name = device.rsplit("/", 1)[-1]
    candidates = [f"/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_{serial}"]
    if name.startswith("sd"):
        candidates.append(f"/dev/xvd{name[2:]}")
    candidates.append(f"/dev/{name}")
    return candidates


def decode_console(output: str) -> str:
    """GetConsoleOutput's ``Output``: base64 on AWS (decoded here); plain text is kept."""
    if not output:
        return ""
    try:
        raw = base64.b64decode(output, validate=True)
    except ValueError:
        return output
    return raw.decode("utf-8", errors="replace")


# --- host keys from the console ------------------------------------------------------------------


@dataclass(frozen=True)
class ConsoleHostKeys:
    """The host keys an instance printed on its console: fingerprints and/or whole keys."""

    fingerprints: frozenset[str]
    keys: frozenset[str]
    algorithms: frozenset[str] = frozenset()

    @property
    def empty(self) -> bool:
        """True when the console showed no host key at all."""
        return not self.fingerprints and not self.keys

    def matches(self, key: paramiko.PKey) -> bool:
        """True if ``key`` is one of the printed keys (by its SHA-256 or MD5 fingerprint)."""
        blob = key.asbytes()
        sha256 = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
        md5 = "MD5:" + ":".join(
            f"{b:02x}" for b in hashlib.md5(blob, usedforsecurity=False).digest()
        )
        return (
            sha256 in self.fingerprints or md5 in self.fingerprints or key.get_base64() in self.keys
        )

    def describe(self) -> str:
        """The trusted fingerprints, for error messages."""
        return ", ".join(sorted(self.fingerprints)) or f"{len(self.keys)} key(s)"


def parse_console_host_keys(text: str) -> ConsoleHostKeys:
    """The host keys cloud-init printed in ``text`` (console output, any line prefixes).

    Blocks from every boot in the output count; a block without its END line (output cut off)
    counts as far as it goes.
    """
    fingerprints: set[str] = set()
    keys: set[str] = set()
    algorithms: set[str] = set()
    section: str | None = None
    for line in text.splitlines():
        if FINGERPRINTS_BEGIN in line:
            section = "fingerprints"
            continue
        if KEYS_BEGIN in line:
            section = "keys"
            continue
        if FINGERPRINTS_END in line or KEYS_END in line:
            section = None
            continue
        if section == "fingerprints":
            found = _FINGERPRINT.search(line)
            if found:
                fingerprints.add(_normalise_fingerprint(found.group(1)))
                kind = _KEY_TYPE.search(line)
                algorithms.update(_ALGORITHMS.get(kind.group(1), ()) if kind else ())
        elif section == "keys":
            for match in _KEY.finditer(line):
                keys.add(match.group(2))
                algorithms.update(_ALGORITHMS_OF_KEY.get(match.group(1), ()))
    return ConsoleHostKeys(
        fingerprints=frozenset(fingerprints),
        keys=frozenset(keys),
        algorithms=frozenset(algorithms),
    )


def _normalise_fingerprint(value: str) -> str:
    if value.startswith("SHA256:"):
        return value.rstrip("=")
    if value.startswith("MD5:"):
        return "MD5:" + value[4:].lower()
    return "MD5:" + value.lower()


def wait_console_host_keys(
    *,
    seam: InstanceSeam,
    ec2: EC2Client,
    region: str,
    instance_id: str,
    timeout: float,
    delay: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> ConsoleHostKeys:
    """Poll the console until cloud-init's host keys appear; :class:`SSHTimeout` after ``timeout``."""
    deadline = clock() + timeout
    while True:
        found = parse_console_host_keys(
            seam.console_output(ec2, region=region, instance_id=instance_id)
        )
        if not found.empty:
            log.info("host keys of %s from its console: %s", instance_id, found.describe())
            return found
        remaining = deadline - clock()
        if remaining <= 0:
            raise SSHTimeout(
                f"{instance_id} in {region}: no SSH host keys on its console after "
                f"{timeout:.0f}s (cloud-init prints them; for images without it, set "
                "host_key_policy = 'accept-new')"
            )
        sleep(min(delay, remaining))


# --- connecting ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JumpHost:
    """A jump host: ``[user@]host[:port]``."""

    host: str
    port: int = 22
    user: str | None = None

    @classmethod
    def parse(cls, spec: str) -> JumpHost:
        """Parse ``[user@]host[:port]``."""
        user, _, rest = spec.rpartition("@")
        host, _, port = rest.partition(":")
        return cls(host=host, port=int(port) if port else 22, user=user or None)


@dataclass(frozen=True)
class SshOptions:
    """How to log in. ``host_keys`` None means accept-new."""

    username: str
    pkey: paramiko.PKey
    host_keys: ConsoleHostKeys | None
    connect_timeout: float = 15.0
    proxy_jump: str | None = None


class _ConsolePolicy(paramiko.MissingHostKeyPolicy):
    def __init__(self, expected: ConsoleHostKeys, label: str) -> None:
        self.expected = expected
        self.label = label

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        if not self.expected.matches(key):
            raise HostKeyError(
                f"{self.label} at {hostname}: host key {key.get_name()} {key.fingerprint} is not "
                f"one its console printed ({self.expected.describe()}); refusing to connect"
            )


class _KnownHostsOnly(paramiko.MissingHostKeyPolicy):
    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        raise HostKeyError(
            f"jump host {hostname}: host key {key.get_name()} {key.fingerprint} is not in "
            "~/.ssh/known_hosts"
        )


def connect(
    *,
    address: Address,
    options: SshOptions,
    timeout: float,
    label: str,
    retry_delay: float = RETRY_DELAY,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> SshSession:
    """Log in to ``address``, retrying until it answers or ``timeout`` seconds have passed.

    Refused or unanswered connections, banners that never come and rejected keys (cloud-init may
    not have installed it yet) are retried; a host key the policy does not trust is not. Raises
    :class:`SSHTimeout` naming the last error, or :class:`HostKeyError`.
    """
    deadline = clock() + timeout
    attempts = 0
    last = "no attempt"
    while True:
        attempts += 1
        per_try = max(0.5, min(options.connect_timeout, deadline - clock()))
        try:
            return _connect_once(address, options, per_try, label)
        except HostKeyError:
            raise
        except paramiko.BadHostKeyException as exc:
            raise HostKeyError(f"{label} at {address}: {exc}") from exc
        except (OSError, EOFError, paramiko.SSHException) as exc:
            last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            log.debug("SSH to %s (%s), attempt %d: %s", label, address, attempts, last)
        remaining = deadline - clock()
        if remaining <= 0:
            raise SSHTimeout(
                f"{label} at {address}: SSH did not answer within {timeout:.0f}s "
                f"({attempts} attempts; last: {last})"
            )
        sleep(min(retry_delay, remaining))


def _connect_once(address: Address, options: SshOptions, per_try: float, label: str) -> SshSession:
    client = paramiko.SSHClient()
    policy: paramiko.MissingHostKeyPolicy
    if options.host_keys is None:
        policy = paramiko.AutoAddPolicy()
    else:
        policy = _ConsolePolicy(options.host_keys, label)
    client.set_missing_host_key_policy(policy)
    disabled: dict[str, list[str]] | None = None
    if options.host_keys is not None and options.host_keys.algorithms:
        allowed = options.host_keys.algorithms
        disabled = {"keys": [a for a in ALL_HOST_KEY_ALGORITHMS if a not in allowed]}
    jump: paramiko.SSHClient | None = None
    try:
        sock: paramiko.Channel | None = None
        if options.proxy_jump:
            jump, sock = _open_jump(options, address, per_try)
        client.connect(
            address.host,
            port=address.port,
            username=options.username,
            pkey=options.pkey,
            timeout=per_try,
            banner_timeout=per_try,
            auth_timeout=per_try,
            channel_timeout=per_try,
            allow_agent=False,
            look_for_keys=False,
            sock=sock,
            disabled_algorithms=disabled,
        )
    except BaseException:
        client.close()
        if jump is not None:
            jump.close()
        raise
    return SshSession(client=client, jump=jump, address=address, label=label)


def _open_jump(
    options: SshOptions, address: Address, per_try: float
) -> tuple[paramiko.SSHClient, paramiko.Channel]:
    assert options.proxy_jump is not None
    spec = JumpHost.parse(options.proxy_jump)
    jump = paramiko.SSHClient()
    jump.load_system_host_keys()
    system = Path("/etc/ssh/ssh_known_hosts")
    if system.is_file():
        jump.load_host_keys(str(system))
    jump.set_missing_host_key_policy(
        paramiko.AutoAddPolicy() if options.host_keys is None else _KnownHostsOnly()
    )
    try:
        # The job's key first (it may be authorised there), then the agent and ~/.ssh keys.
        jump.connect(
            spec.host,
            port=spec.port,
            username=spec.user or getpass.getuser(),
            pkey=options.pkey,
            timeout=per_try,
            banner_timeout=per_try,
            auth_timeout=per_try,
            channel_timeout=per_try,
        )
        transport = jump.get_transport()
        if transport is None:
            raise SSHError(f"jump host {options.proxy_jump}: no transport")
        channel = transport.open_channel(
            "direct-tcpip", (address.host, address.port), ("127.0.0.1", 0), timeout=per_try
        )
    except BaseException:
        jump.close()
        raise
    return jump, channel


# --- a session -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommandResult:
    """What a remote command did. ``exit_code`` is None when it was cut off at its limit."""

    exit_code: int | None
    output: str
    seconds: float
    timed_out: bool


def limited_command(command: str, seconds: float) -> str:
    """``command`` under the remote ``timeout(1)``: TERM at ``seconds``, KILL 10 s later.

    timeout(1) signals the command's whole process group, so a script's children go too. Without
    timeout(1) on the host the command runs unbounded there, and this side still gives up. ``-k``,
    not ``--kill-after``: busybox's timeout (small images) knows only the short option.
    """
    limit = max(1, math.ceil(seconds))
    inner = shlex.quote(command)
    return (
        "if command -v timeout >/dev/null 2>&1; then "
        f"exec timeout -k 10 {limit} sh -c {inner}; "
        f"else exec sh -c {inner}; fi"
    )


class _Tail:
    """The last ``limit`` bytes written."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buffer = bytearray()
        self.dropped = 0

    def add(self, data: bytes) -> None:
        self.buffer += data
        excess = len(self.buffer) - self.limit
        if excess > 0:
            del self.buffer[:excess]
            self.dropped += excess

    def text(self) -> str:
        text = self.buffer.decode("utf-8", errors="replace")
        if self.dropped:
            return f"[{self.dropped} bytes of earlier output dropped]\n{text}"
        return text


class SshSession:
    """A logged-in SSH connection (and its jump host, if any). Use as a context manager."""

    def __init__(
        self,
        *,
        client: paramiko.SSHClient,
        jump: paramiko.SSHClient | None,
        address: Address,
        label: str,
    ) -> None:
        self._client = client
        self._jump = jump
        self.address = address
        self.label = label

    def __enter__(self) -> SshSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        self._client.close()
        if self._jump is not None:
            self._jump.close()

    def _transport(self) -> paramiko.Transport:
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise SSHError(f"{self.label} at {self.address}: the SSH connection is closed")
        return transport

    def run(
        self,
        command: str,
        *,
        timeout: float,
        stdin: Iterable[bytes] | None = None,
        on_sent: Callable[[int], None] = lambda _n: None,
        output_limit: int = OUTPUT_LIMIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> CommandResult:
        """Run ``command`` (by the login shell) for at most ``timeout`` seconds.

        stdout and stderr come back interleaved (the last ``output_limit`` bytes). ``stdin``,
        when given, is streamed to the command (``on_sent`` counts the bytes); otherwise the
        command reads an empty stdin. A command still running at its limit is killed
        (``timed_out``). Raises :class:`SSHError` if the connection fails.
        """
        started = clock()
        deadline = started + timeout + COMMAND_GRACE
        out = _Tail(output_limit)
        sender: threading.Thread | None = None
        send_error: list[BaseException] = []
        try:
            transport = self._transport()
            channel = self._open_session()
            channel.set_combine_stderr(True)
            channel.exec_command(limited_command(command, timeout))
            if stdin is None:
                channel.shutdown_write()
            else:
                sender = threading.Thread(
                    target=_send_all,
                    args=(channel, stdin, on_sent, send_error),
                    name="fedimg-ssh-stdin",
                    daemon=True,
                )
                sender.start()
            timed_out = False
            while True:
                if channel.recv_ready():
                    out.add(channel.recv(65536))
                    continue
                if channel.exit_status_ready():
                    while channel.recv_ready():
                        out.add(channel.recv(65536))
                    break
                if channel.closed or not transport.is_active():
                    # Closed without an exit status: killed by a signal, or the connection (or
                    # the instance) went away.
                    raise SSHError(
                        f"{self.label} at {self.address}: the command ended without an exit "
                        f"status (killed, or the connection was lost); its output: "
                        f"{out.text()[-2000:]}"
                    )
                remaining = deadline - clock()
                if remaining <= 0:
                    timed_out = True
                    break
                select.select([channel], [], [], min(0.1, remaining))
            exit_code: int | None = None
            if timed_out:
                channel.close()
            else:
                exit_code = channel.recv_exit_status()
                channel.close()
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise SSHError(
                f"{self.label} at {self.address}: SSH failed running a command: {exc}"
            ) from exc
        finally:
            if sender is not None:
                sender.join(timeout=30)
        seconds = round(clock() - started, 3)
        # 124: timeout(1) stopped it with TERM; 137: with KILL.
        if exit_code in (124, 137) and seconds >= timeout - 1:
            timed_out = True
            exit_code = None
        if send_error and not timed_out and exit_code == 0:
            error = send_error[0]
            raise SSHError(f"{self.label}: sending input failed: {error}") from error
        return CommandResult(
            exit_code=exit_code, output=out.text(), seconds=seconds, timed_out=timed_out
        )

    def _open_session(self, attempts: int = 5) -> paramiko.Channel:
        """A session channel; refusals ("Unable to open channel", seen from small SSH daemons
        while a previous channel is still being torn down) get a few more tries."""
        transport = self._transport()
        for attempt in range(1, attempts + 1):
            try:
                return transport.open_session(timeout=30)
            except paramiko.ChannelException:
                if attempt == attempts:
                    raise
                time.sleep(attempt)
        raise AssertionError("unreachable")

    def _open_sftp(self, attempts: int = 5) -> paramiko.SFTPClient:
        """An SFTP session; a server that refuses the channel just after boot (a busy or
        still-starting SSH daemon says "Unable to open channel") gets a few more tries."""
        for attempt in range(1, attempts + 1):
            try:
                return self._client.open_sftp()
            except paramiko.ChannelException as exc:
                if attempt == attempts:
                    raise SSHError(f"{self.label} at {self.address}: SFTP failed: {exc}") from exc
                time.sleep(attempt)
            except (OSError, EOFError, paramiko.SSHException) as exc:
                raise SSHError(f"{self.label} at {self.address}: SFTP failed: {exc}") from exc
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def files(self, *, timeout: float = 120.0) -> Iterator[RemoteFiles]:
        """One SFTP session for several file operations, closed on leaving the block.

        Keep it open while other commands run: some SSH daemons (dropbear) end the whole
        connection when its last channel closes, and under load that can happen between one
        channel's close and the next one's open. One long-lived SFTP channel also saves a
        subsystem start per operation.
        """
        sftp = self._open_sftp()
        try:
            channel = sftp.get_channel()
            if channel is not None:
                channel.settimeout(timeout)
            yield RemoteFiles(sftp, label=f"{self.label} at {self.address}")
        finally:
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                sftp.close()


class RemoteFiles:
    """File operations over one open SFTP session (:meth:`SshSession.files`); each raises
    :class:`SSHError` naming the path on failure."""

    def __init__(self, sftp: paramiko.SFTPClient, *, label: str) -> None:
        self._sftp = sftp
        self.label = label

    @contextlib.contextmanager
    def _failing_as(self, what: str) -> Iterator[None]:
        try:
            yield
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise SSHError(f"{self.label}: SFTP {what} failed: {exc}") from exc

    def mkdir(self, remote_path: str, *, mode: int = 0o700) -> None:
        """Create the directory ``remote_path`` with ``mode``."""
        with self._failing_as(f"mkdir {remote_path}"):
            self._sftp.mkdir(remote_path, mode)

    def put(self, data: bytes, remote_path: str, *, mode: int = 0o700) -> None:
        """Write ``data`` to ``remote_path`` (its size confirmed) with ``mode``."""
        with self._failing_as(f"upload to {remote_path}"):
            self._sftp.putfo(io.BytesIO(data), remote_path, file_size=len(data), confirm=True)
            self._sftp.chmod(remote_path, mode)

    def remove_tree(self, remote_path: str) -> None:
        """Remove ``remote_path`` and everything under it (a missing path is not an error)."""
        with self._failing_as(f"removing {remote_path}"):
            self._remove_tree(remote_path)

    def _remove_tree(self, path: str) -> None:
        try:
            attrs = self._sftp.lstat(path)
        except FileNotFoundError:
            return
        if attrs.st_mode is not None and stat.S_ISDIR(attrs.st_mode):
            for name in self._sftp.listdir(path):
                self._remove_tree(f"{path.rstrip('/')}/{name}")
            self._sftp.rmdir(path)
        else:
            self._sftp.remove(path)


def _send_all(
    channel: paramiko.Channel,
    chunks: Iterable[bytes],
    on_sent: Callable[[int], None],
    errors: list[BaseException],
) -> None:
    try:
        for chunk in chunks:
            channel.sendall(chunk)
            on_sent(len(chunk))
    except BaseException as exc:
        errors.append(exc)
    finally:
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            channel.shutdown_write()


__all__ = [
    "Address",
    "AwsInstanceSeam",
    "CommandResult",
    "ConsoleHostKeys",
    "HostKeyError",
    "InstanceSeam",
    "RemoteFiles",
    "SSHError",
    "SSHTimeout",
    "SshOptions",
    "SshSession",
    "connect",
    "default_seam",
    "device_candidates",
    "parse_console_host_keys",
    "wait_console_host_keys",
]

"""fedimg's configuration: typed models, and the loaders for TOML and the legacy INI.

The configuration is looked up in this order (the first that exists wins):
``--config FILE``, ``$FEDIMG_CONFIG``, ``./fedimg.toml``, ``~/.config/fedimg/fedimg.toml``,
``/etc/fedimg/fedimg.toml``, and the legacy ``/etc/fedimg.cfg``. With none of them, the defaults
apply: the embedded AWS endpoint, every region it reports, the seed's HVM rows.

Two file formats load into the same :class:`Config`:

- TOML (fedimg 2.x and later): sections ``[general]``, ``[aws]``, ``[messaging]``;
- the legacy INI of fedimg 0.x (``/etc/fedimg.cfg``), loaded as it is, including its AMI list and the
  sections of services fedimg no longer has (``[rackspace]``, ``[gce]``, ``[hp]``, ``[koji]``), which are
  ignored.

Every model forbids unknown keys, so a typo fails early. Every error is a :class:`ConfigError` whose
message names the file, the key and, for the AMI list, the line.
"""

from __future__ import annotations

import configparser
import ipaddress
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from fedimg.errors import ConfigError

REGION_PATTERN = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
LEGACY_PATH = Path("/etc/fedimg.cfg")

#: Legacy INI sections of services that fedimg no longer has; loaded and ignored.
LEGACY_IGNORED_SECTIONS = frozenset({"koji", "rackspace", "gce", "hp"})

#: AWS's names for architectures; Fedora's file names say aarch64 where AWS says arm64.
ARCH_ALIASES = {"x86_64": "x86_64", "aarch64": "arm64", "arm64": "arm64", "i386": "i386"}


def aws_arch(arch: str | None) -> str | None:
    """AWS's name for ``arch`` (aarch64 → arm64); unknown names pass unchanged (and match nothing)."""
    return ARCH_ALIASES.get(arch, arch) if arch else None


def default_search_path() -> list[Path]:
    """The configuration files looked up, in order, when neither ``--config`` nor the env says."""
    return [
        Path("fedimg.toml"),
        Path.home() / ".config" / "fedimg" / "fedimg.toml",
        Path("/etc/fedimg/fedimg.toml"),
        LEGACY_PATH,
    ]


def state_dir() -> Path:
    """Where fedimg keeps its catalog and caches: ``$XDG_STATE_HOME/fedimg``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fedimg"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AmiListEntry(_Model):
    """One line of the legacy AMI list: a base AMI (and AKI, for paravirtual) per region and arch.

    The first entry is where the seed's utility instance is started; the AKIs are the kernels that
    paravirtual AMIs boot in each region.
    """

    region: str = Field(description="EC2 region of this entry")
    arch: str = Field(description="Architecture, in AWS's spelling (x86_64, arm64, i386)")
    ami: str = Field(description="A base AMI in the region (the utility instance's image)")
    aki: str | None = Field(default=None, description="The region's kernel image for PV AMIs")
    os: str | None = Field(default=None, description="OS name (6-field form only)")
    version: str | None = Field(default=None, description="OS version (6-field form only)")
    line: int | None = Field(default=None, description="Line of the config file it came from")


AmiList = list[AmiListEntry]


class GeneralSettings(_Model):
    """``[general]``: where state goes and how failures are handled."""

    catalog_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the catalog; default SQLite under $XDG_STATE_HOME/fedimg",
    )
    clean_up_on_failure: bool = Field(
        default=True, description="Remove temporary resources when a job fails"
    )
    delete_images_on_failure: bool = Field(
        default=True, description="Deregister the AMIs of a job whose test failed"
    )
    process_count: int = Field(default=1, ge=1, description="Images processed in parallel")
    active_services: list[str] = Field(
        default_factory=lambda: ["aws"], description="Services to publish to; only 'aws' exists"
    )

    @field_validator("active_services")
    @classmethod
    def _only_aws(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - {"aws"})
        if unknown:
            raise ValueError(f"unsupported services {unknown}; fedimg publishes to 'aws' only")
        return value


class AmiAttributeSettings(_Model):
    """AMI attributes; in ``[aws.attributes]`` for all rows, or per row in ``[aws.flavour_attributes.NAME]``.

    Unset fields take the defaults (or, per row, the global value).
    """

    boot_mode: Literal["legacy-bios", "uefi", "uefi-preferred"] | None = Field(
        default=None, description="Boot mode; default: uefi on arm64, AWS's default on x86_64"
    )
    uefi_data: str | None = Field(default=None, description="Base64 UEFI variable store")
    tpm_support: Literal["v2.0"] | None = Field(default=None, description="NitroTPM (needs uefi)")
    imds_support: Literal["v2.0"] | None = Field(
        default=None, description="v2.0: instances require IMDSv2"
    )
    ena_support: bool | None = Field(default=None, description="ENA (HVM; default true)")
    sriov_net_support: bool | None = Field(
        default=None, description="Intel SR-IOV 'simple' (HVM; default true)"
    )
    root_device_name: str | None = Field(default=None, description="Default /dev/sda1")
    root_volume_size: int | None = Field(
        default=None, ge=1, description="Root volume GiB; default: the image size"
    )
    delete_on_termination: bool | None = Field(default=None, description="Default true")
    iops: int | None = Field(default=None, ge=100, description="gp3/io1/io2 IOPS")
    throughput: int | None = Field(default=None, ge=125, description="gp3 MiB/s")
    tags: dict[str, str] = Field(
        default_factory=dict, description="Extra tags on AMIs and their snapshots"
    )


class BundleSettings(_Model):
    """``[aws.bundle]``: what instance-store rows need (the ec2-bundle-image inputs)."""

    ec2_cert: Path | None = Field(default=None, description="EC2's public X.509 certificate")
    user_cert: Path | None = Field(default=None, description="Your X.509 certificate")
    user_key: Path | None = Field(default=None, description="Your RSA private key (a secret)")
    account_id: str | None = Field(
        default=None, pattern=r"^\d{12}$", description="Your 12-digit AWS account id"
    )
    bucket: str | None = Field(
        default=None,
        description="S3 bucket per region; '{region}' is replaced, e.g. 'fedimg-bundles-{region}'",
    )
    create_bucket: bool = Field(default=False, description="Create missing buckets")
    prefix: str = Field(default="fedimg", description="Key prefix of bundle parts")


class AwsSettings(_Model):
    """``[aws]``: the target, the regions, the AMI matrix, the instances and the test."""

    target: Literal["embedded", "endpoint", "aws"] = Field(
        default="embedded",
        description="embedded: moto's server on 127.0.0.1; endpoint: endpoint_url; aws: real AWS",
    )
    endpoint_url: str | None = Field(
        default=None, description="AWS-compatible endpoint (target = 'endpoint')"
    )
    access_id: SecretStr | None = Field(default=None, description="AWS access key id")
    secret_key: SecretStr | None = Field(default=None, description="AWS secret access key")
    profile: str | None = Field(default=None, description="boto3 profile name")
    base_region: str | None = Field(
        default=None,
        description="Region the image is uploaded to and tested in; default: the AMI list's first",
    )
    regions: list[str] | Literal["all"] | None = Field(
        default=None,
        description="Regions to publish to; 'all' = every region the endpoint reports; "
        "default: the AMI list's regions, or 'all' without an AMI list",
    )
    exclude_regions: list[str] = Field(
        default_factory=list, description="Regions left out of 'all'"
    )
    best_effort_regions: list[str] = Field(
        default_factory=list, description="Regions whose failure does not fail the job"
    )
    amis: AmiList = Field(default_factory=list, description="The legacy AMI list")
    flavours: list[str] | None = Field(
        default=None,
        description="AMI rows, e.g. 'hvm-ebs-gp2'; default: the seed's EBS rows that can exist",
    )
    volume_types: list[str] = Field(
        default_factory=lambda: ["standard", "gp2"],
        description="Volume types of the default rows (fedimg 2.x key)",
    )
    upload_method: Literal["direct", "utility", "import"] = Field(
        default="direct", description="How the image becomes a snapshot"
    )
    parallel_regions: int = Field(
        default=8, ge=1, le=64, description="Regions replicated and published at once"
    )
    workers: int = Field(default=8, ge=1, le=64, description="PutSnapshotBlock workers")
    volume_size: int | None = Field(
        default=None, ge=1, description="Root volume size in GiB; default: image size rounded up"
    )
    util_volume_size: int | None = Field(default=None, ge=1, description="Utility volume GiB")
    test_volume_size: int | None = Field(default=None, ge=1, description="Test volume GiB")
    util_username: str = Field(default="ec2-user", description="SSH user of the utility AMI")
    test_username: str = Field(default="fedora", description="SSH user of the tested AMI")
    util_instance_type: str = Field(default="t3.micro", description="Utility instance type")
    test_instance_type: str = Field(default="t3.micro", description="Test instance type")
    keyname: str | None = Field(default=None, description="Existing EC2 key pair name")
    keypath: Path | None = Field(default=None, description="Private key of keyname")
    pubkeypath: Path | None = Field(default=None, description="Public key of keyname")
    iam_profile: str | None = Field(default=None, description="Instance profile (legacy)")
    bucket_name: str | None = Field(default=None, description="S3 bucket (import method)")
    test: str | None = Field(
        default=None, description="Test script; exit 0 = the AMI passed. None: no test step"
    )
    test_runner: Literal["command", "ssh", "qemu"] | None = Field(
        default=None,
        description="Where the test script runs; default: 'ssh' (a test instance) on real AWS, "
        "'command' (this machine) on other targets",
    )
    test_timeout: float = Field(default=600.0, gt=0, description="Seconds the test may run")
    test_before_upload: bool = Field(
        default=False,
        description="Boot the source image under QEMU and run the test script in it before "
        "anything is uploaded (a cheap gate, whatever test_runner is); a failure stops the job "
        "with nothing created in AWS",
    )
    qemu_disk: Literal["auto", "snapshot", "source"] = Field(
        default="auto",
        description="qemu runner: the disk it boots; snapshot: the AMI's root snapshot read back "
        "with the EBS direct APIs; source: the source image, decompressed; auto: snapshot on "
        "non-AWS targets, source on real AWS (and for rows without a snapshot)",
    )
    qemu_accel: Literal["auto", "kvm", "tcg"] = Field(
        default="auto",
        description="qemu runner: KVM, TCG (emulation), or auto: KVM when a probe VM really runs "
        "under it, else TCG",
    )
    qemu_memory: int = Field(default=512, ge=128, description="qemu runner: guest memory in MiB")
    qemu_boot_timeout: float = Field(
        default=300.0,
        gt=0,
        description="qemu runner: seconds from QEMU's start until the guest shows its host keys "
        "and answers SSH (as test_username, with a key given in the NoCloud seed)",
    )
    qemu_poweroff_grace: float = Field(
        default=15.0,
        ge=0,
        description="qemu runner: seconds the guest has to power off before QEMU is killed",
    )
    ssh_cidr: str | None = Field(
        default=None,
        description="Addresses the temporary security group lets reach port 22; default: this "
        "machine's address/32 (its public address on real AWS, the jump host's with "
        "ssh_proxy_jump)",
    )
    ssh_port: int = Field(default=22, ge=1, le=65535, description="SSH port of the instances")
    host_key_policy: Literal["console", "accept-new"] = Field(
        default="console",
        description="console: trust only the host keys cloud-init prints on the instance console; "
        "accept-new: trust the first key offered (the instances are new)",
    )
    ssh_proxy_jump: str | None = Field(
        default=None,
        description="Jump host '[user@]host[:port]' to reach instances through (their private "
        "address is dialled); its host key must be in ~/.ssh/known_hosts unless "
        "host_key_policy = 'accept-new'",
    )
    ssh_connect_timeout: float = Field(
        default=15.0, gt=0, description="Seconds one SSH connection attempt may take"
    )
    ssh_timeout: float = Field(
        default=600.0, gt=0, description="Seconds a running instance has to answer SSH"
    )
    console_timeout: float = Field(
        default=900.0,
        gt=0,
        description="Seconds to wait for the host keys on the console (host_key_policy = console)",
    )
    instance_running_timeout: float = Field(
        default=600.0, gt=0, description="Seconds an instance has to reach 'running'"
    )
    instance_stop_timeout: float = Field(
        default=600.0, gt=0, description="Seconds an instance has to stop, or to terminate"
    )
    volume_timeout: float = Field(
        default=300.0, gt=0, description="Seconds a volume has to become available or attached"
    )
    snapshot_timeout: float = Field(
        default=3600.0, gt=0, description="Seconds the utility volume's snapshot may take"
    )
    util_timeout: float = Field(
        default=3600.0,
        gt=0,
        description="Seconds the utility instance may take to download and write the image",
    )
    make_public: bool = Field(
        default=True, description="Make AMIs and snapshots public after the test passed"
    )
    preflight: bool = Field(
        default=True, description="Check every region before a job creates anything"
    )
    attributes: AmiAttributeSettings = Field(
        default_factory=AmiAttributeSettings,
        description="AMI attributes for every flavour ([aws.attributes])",
    )
    flavour_attributes: dict[str, AmiAttributeSettings] = Field(
        default_factory=dict,
        description="Per-flavour overrides of [aws.attributes], e.g. [aws.flavour_attributes.hvm-ebs-gp3]",
    )
    kms_keys: dict[str, str] = Field(
        default_factory=dict,
        description="KMS key per region for encrypted rows; default: the account's EBS key",
    )
    share_accounts: list[str] = Field(
        default_factory=list,
        description="Accounts encrypted AMIs are shared with (they can never be public)",
    )
    bundle: BundleSettings = Field(
        default_factory=BundleSettings,
        description="Instance-store bundles: certificates, key, account, buckets ([aws.bundle])",
    )
    name_prefix: str | None = Field(
        default=None, description="Prefix of AMI names; default: the image name"
    )

    @model_validator(mode="after")
    def _endpoint_needs_url(self) -> AwsSettings:
        if self.target == "endpoint" and not self.endpoint_url:
            raise ValueError("endpoint_url: required when target = 'endpoint'")
        if self.test_before_upload and not self.test:
            raise ValueError("test_before_upload: needs a test script ([aws] test)")
        return self

    @field_validator("base_region")
    @classmethod
    def _region_shape(cls, value: str | None) -> str | None:
        if value is not None:
            _check_region(value)
        return value

    @field_validator("regions")
    @classmethod
    def _regions_shape(cls, value: list[str] | str | None) -> list[str] | str | None:
        if isinstance(value, list):
            for region in value:
                _check_region(region)
        return value

    @field_validator("exclude_regions", "best_effort_regions")
    @classmethod
    def _region_list_shape(cls, value: list[str]) -> list[str]:
        for region in value:
            _check_region(region)
        return value

    @field_validator("volume_types")
    @classmethod
    def _known_volume_types(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - {"standard", "gp2", "gp3", "io1", "io2"})
        if unknown:
            raise ValueError(f"unknown volume types {unknown}")
        return value

    @field_validator("ssh_cidr")
    @classmethod
    def _cidr_shape(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            network = ipaddress.ip_network(value, strict=False)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not an address or CIDR block") from exc
        if network.version != 4:
            raise ValueError(f"{value!r}: only IPv4 blocks are supported")
        return str(network)

    @field_validator("ssh_proxy_jump")
    @classmethod
    def _jump_shape(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"(?:[^@\s:]+@)?[^@\s:]+(?::\d{1,5})?", value):
            raise ValueError(f"{value!r} is not '[user@]host[:port]'")
        return value


PublisherName = Literal["journal", "amqp", "stdout"]


def _default_publishers() -> list[PublisherName]:
    return ["journal"]


class MessagingSettings(_Model):
    """``[messaging]``: where fedimg's messages go besides the catalog's journal."""

    publishers: list[PublisherName] = Field(
        default_factory=_default_publishers, description="Message publishers"
    )
    topic_prefix: str = Field(
        default="org.fedoraproject.dev", description="Prefix of every topic sent"
    )
    amqp_url: SecretStr | None = Field(
        default=None,
        description="AMQP broker URL (amqp:// or amqps://; a secret, never logged); "
        "default: the local broker as guest",
    )
    exchange: str = Field(
        default="amq.topic",
        description="Exchange messages are published to, and the one `fedimg consume` binds to",
    )
    tls_ca_cert: Path | None = Field(
        default=None, description="CA bundle for the broker's certificate (amqps://)"
    )
    tls_certfile: Path | None = Field(
        default=None, description="Client certificate for x509 authentication (amqps://)"
    )
    tls_keyfile: Path | None = Field(default=None, description="Private key of tls_certfile")
    publish_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds to wait for the broker's confirm before a message is left in the "
        "outbox (the upload goes on)",
    )
    flush_interval: float = Field(
        default=30.0,
        gt=0,
        description="Seconds between retries of the outbox while messages wait for the broker",
    )
    reconnect_max_delay: int = Field(
        default=30, ge=1, description="Longest pause, in seconds, between reconnects to the broker"
    )
    successor_summary: bool = Field(
        default=True,
        description="Also send the successor's per-image summary "
        "(fedora_image_uploader.published.v1.aws.<subvariant>.<release>.<arch>)",
    )
    consume_topics: list[str] = Field(
        default_factory=lambda: ["org.fedoraproject.*.pungi.compose.status.change"],
        min_length=1,
        description="Topics `fedimg consume` binds its queue to (AMQP patterns)",
    )
    queue: str = Field(default="fedimg", min_length=1, description="Queue `fedimg consume` reads")
    queue_durable: bool = Field(
        default=True,
        description="Keep the queue and its messages while no consumer runs and across broker "
        "restarts (false: the queue goes with the consumer)",
    )

    @model_validator(mode="after")
    def _key_with_cert(self) -> MessagingSettings:
        if (self.tls_keyfile is None) != (self.tls_certfile is None):
            raise ValueError("tls_certfile and tls_keyfile go together")
        return self


ComposeStatusName = Literal["FINISHED", "FINISHED_INCOMPLETE", "STARTED", "DOOMED", "TERMINATED"]


def _finished_statuses() -> list[ComposeStatusName]:
    return ["FINISHED", "FINISHED_INCOMPLETE"]


class ComposeSettings(_Model):
    """``[compose]``: which images of a Pungi compose are published (consumer and trigger)."""

    statuses: list[ComposeStatusName] = Field(
        default_factory=_finished_statuses,
        description="Compose statuses that start uploads (pungi.compose.status.change)",
    )
    image_types: list[str] = Field(
        default_factory=lambda: ["raw-xz"], min_length=1, description="images.json `type`s"
    )
    subvariants: list[str] = Field(
        default_factory=lambda: ["Cloud_Base", "AtomicHost"],
        min_length=1,
        description="images.json `subvariant`s",
    )
    arches: list[str] = Field(
        default_factory=lambda: ["x86_64", "aarch64"],
        min_length=1,
        description="Compose architectures (x86_64, aarch64)",
    )
    variants: list[str] | None = Field(
        default=None,
        description="Compose variants to look in (CloudImages, Cloud, AtomicHost); default: all",
    )
    metadata_timeout: float = Field(
        default=30.0, gt=0, description="Seconds to wait for the compose's images.json"
    )
    metadata_attempts: int = Field(
        default=3, ge=1, le=10, description="Tries to fetch images.json (a 404 is not retried)"
    )


class Config(_Model):
    """The whole configuration; ``source`` says which file it came from (None: defaults)."""

    general: GeneralSettings = Field(default_factory=GeneralSettings)
    aws: AwsSettings = Field(default_factory=AwsSettings)
    messaging: MessagingSettings = Field(default_factory=MessagingSettings)
    compose: ComposeSettings = Field(default_factory=ComposeSettings)
    source: Annotated[Path | None, Field(exclude=True)] = None

    def catalog_url(self) -> str:
        """The catalog's SQLAlchemy URL: configured, or SQLite in the state directory."""
        if self.general.catalog_url:
            return self.general.catalog_url
        return f"sqlite:///{state_dir() / 'catalog.sqlite'}"

    def base_region(self) -> str:
        """The region the image is uploaded to first."""
        if self.aws.base_region:
            return self.aws.base_region
        if self.aws.amis:
            return self.aws.amis[0].region
        if isinstance(self.aws.regions, list) and self.aws.regions:
            return self.aws.regions[0]
        return "us-east-1"

    def aki_for(self, region: str, arch: str) -> str | None:
        """The AKI the AMI list gives for ``region`` and ``arch``, or None."""
        for entry in self.aws.amis:
            if entry.region == region and entry.arch == arch and entry.aki:
                return entry.aki
        return None

    def masked(self) -> dict[str, Any]:
        """The configuration as plain data with every secret replaced by ``'***'``."""
        data = self.model_dump(mode="json")
        for section, key in (
            ("aws", "access_id"),
            ("aws", "secret_key"),
            ("messaging", "amqp_url"),
        ):
            if data[section].get(key) is not None:
                data[section][key] = "***"
        return data


def _check_region(value: str) -> None:
    if not REGION_PATTERN.match(value):
        raise ValueError(f"{value!r} is not a region name (like us-east-1)")


def find_config_file(explicit: Path | None, environ: Mapping[str, str]) -> Path | None:
    """The configuration file to load, by the documented lookup order; None if there is none.

    An explicit path (``--config``) or ``$FEDIMG_CONFIG`` must exist: naming a missing file is an error,
    not a silent fall back to the defaults.
    """
    for named, origin in ((explicit, "--config"), (environ.get("FEDIMG_CONFIG"), "FEDIMG_CONFIG")):
        if named:
            path = Path(named)
            if not path.is_file():
                raise ConfigError(f"{path}: no such config file (from {origin})")
            return path
    for candidate in default_search_path():
        if candidate.is_file():
            return candidate
    return None


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Load the configuration by the lookup order; defaults when no file exists.

    Raises :class:`ConfigError` for an unreadable or invalid file.
    """
    found = find_config_file(path, os.environ if environ is None else environ)
    if found is None:
        return Config()
    return load_config_file(found)


def fallback_config(
    explicit: str | Path | None, environ: Mapping[str, str] | None = None
) -> Config:
    """Where to record a failure when the configuration itself is invalid.

    Reads only ``[general] catalog_url`` and ``[messaging] topic_prefix`` from the file, leniently,
    so that a broken config still gets its ``failed`` message in the right journal; anything
    unreadable falls back to the defaults. Never raises.
    """
    env = os.environ if environ is None else environ
    named = explicit or env.get("FEDIMG_CONFIG")
    candidates = [Path(named)] if named else default_search_path()
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return Config()
    data: dict[str, Any] = {}
    try:
        text = path.read_text(encoding="utf-8")
        try:
            raw: dict[str, Any] = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            parser = configparser.ConfigParser(interpolation=None)
            parser.read_string(text)
            raw = {section: dict(parser.items(section)) for section in parser.sections()}
        url = raw.get("general", {}).get("catalog_url")
        prefix = raw.get("messaging", {}).get("topic_prefix")
        if isinstance(url, str):
            data["general"] = {"catalog_url": url}
        if isinstance(prefix, str):
            data["messaging"] = {"topic_prefix": prefix}
        return Config.model_validate(data)
    except (OSError, ValueError, configparser.Error, ValidationError):
        return Config()


def load_config_file(path: Path) -> Config:
    """Load one file, TOML or legacy INI (told apart by its content, not its name)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    if _looks_like_legacy_ini(text):
        data = _legacy_ini_to_data(path, text)
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        data = _normalise_toml(path, text, data)
    return _validate(path, data)


def _looks_like_legacy_ini(text: str) -> bool:
    # The 0.x INI has unquoted values and a multi-line `amis` list that TOML cannot parse; a file
    # that parses as TOML is TOML.
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return True
    return False


def _validate(path: Path, data: dict[str, Any]) -> Config:
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = _key_name(first["loc"])
        raise ConfigError(f"{path}: {key}: {_plain(first['msg'])}") from exc
    return config.model_copy(update={"source": path})


def _key_name(loc: Iterable[int | str]) -> str:
    parts = [str(p) for p in loc]
    if not parts:
        return "(top level)"
    if len(parts) == 1:
        return parts[0]
    section, rest = parts[0], parts[1:]
    return f"[{section}] " + ".".join(rest)


def _plain(message: str) -> str:
    return message.replace("Value error, ", "").replace("Extra inputs", "Unknown key")


def parse_ami_list(
    path: Path, text: str, entries: Iterable[str], *, first_line: int | None = None
) -> list[dict[str, Any]]:
    """Parse AMI-list entries (``region|arch|ami|aki`` or ``region|os|ver|arch|ami|aki``).

    ``text`` is the whole file, used to find each entry's line for error messages.
    """
    parsed: list[dict[str, Any]] = []
    for raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        line = _line_of(text, entry, first_line)
        where = f"{path}:{line}" if line else str(path)
        fields = [f.strip() for f in entry.split("|")]
        if len(fields) == 4:
            region, arch, ami, aki = fields
            extra: dict[str, Any] = {}
        elif len(fields) == 6:
            region, os_name, version, arch, ami, aki = fields
            extra = {"os": os_name, "version": version}
        else:
            raise ConfigError(
                f"{where}: [aws] amis: malformed entry {entry!r}: expected "
                f"region|arch|ami|aki or region|os|ver|arch|ami|aki, got {len(fields)} fields"
            )
        if not all([region, arch, ami]):
            raise ConfigError(f"{where}: [aws] amis: entry {entry!r} has an empty field")
        if not REGION_PATTERN.match(region):
            raise ConfigError(f"{where}: [aws] amis: {region!r} is not a region name")
        if arch not in ARCH_ALIASES:
            raise ConfigError(f"{where}: [aws] amis: unknown architecture {arch!r}")
        if not ami.startswith("ami-"):
            raise ConfigError(f"{where}: [aws] amis: {ami!r} is not an AMI id")
        if aki and not aki.startswith("aki-"):
            raise ConfigError(f"{where}: [aws] amis: {aki!r} is not an AKI id")
        parsed.append(
            {
                "region": region,
                "arch": ARCH_ALIASES[arch],
                "ami": ami,
                "aki": aki or None,
                "line": line,
                **extra,
            }
        )
    return parsed


def _line_of(text: str, entry: str, after: int | None) -> int | None:
    for number, line in enumerate(text.splitlines(), start=1):
        if after is not None and number < after:
            continue
        if entry in line:
            return number
    return None


def _legacy_ini_to_data(path: Path, text: str) -> dict[str, Any]:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as exc:
        raise ConfigError(f"{path}: not valid TOML or INI: {str(exc).splitlines()[0]}") from exc
    data: dict[str, Any] = {}
    for section in parser.sections():
        if section in LEGACY_IGNORED_SECTIONS:
            continue
        values: dict[str, Any] = dict(parser.items(section))
        data[section] = values
    aws = data.get("aws", {})
    if "amis" in aws:
        aws["amis"] = parse_ami_list(path, text, str(aws["amis"]).splitlines())
    for key in ("util_volume_size", "test_volume_size", "volume_size"):
        if key in aws:
            aws[key] = _int_value(path, "aws", key, aws[key])
    # fedimg 0.x kept these in the INI and the AWS SDK ignored them when empty.
    for key in ("keyname", "keypath", "pubkeypath", "iam_profile"):
        if key in aws and not str(aws[key]).strip():
            del aws[key]
    general = data.get("general", {})
    for key in ("clean_up_on_failure", "delete_images_on_failure"):
        if key in general:
            general[key] = _bool_value(path, "general", key, general[key])
    return data


def _int_value(path: Path, section: str, key: str, value: Any) -> int:
    try:
        return int(str(value).strip())
    except ValueError as exc:
        raise ConfigError(f"{path}: [{section}] {key}: {value!r} is not a whole number") from exc


def _bool_value(path: Path, section: str, key: str, value: Any) -> bool:
    text = str(value).strip().lower()
    if text in {"1", "yes", "true", "on"}:
        return True
    if text in {"0", "no", "false", "off"}:
        return False
    raise ConfigError(f"{path}: [{section}] {key}: {value!r} is not true or false")


def _normalise_toml(path: Path, text: str, data: dict[str, Any]) -> dict[str, Any]:
    aws = data.get("aws")
    if isinstance(aws, dict) and "amis" in aws:
        amis = aws["amis"]
        if isinstance(amis, str):
            amis = amis.splitlines()
        if isinstance(amis, list) and all(isinstance(a, str) for a in amis):
            aws["amis"] = parse_ami_list(path, text, amis)
    return data

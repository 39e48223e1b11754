"""The AMI matrix as data: which flavours exist, and the RegisterImage parameters of each.

A flavour is virtualization × storage × volume type, named like ``hvm-ebs-gp3``,
``pv-ebs-standard``, ``hvm-ebs-encrypted-gp3`` or ``pv-instance-store``. The orchestrator never
looks inside a flavour: it asks this module for names, parameters and whether a row can exist.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from fedimg.config import AmiAttributeSettings
from fedimg.errors import ConfigError

Virtualization = Literal["hvm", "paravirtual"]
Storage = Literal["ebs", "ebs-encrypted", "instance-store"]

VOLUME_TYPES = ("standard", "gp2", "gp3", "io1", "io2")
_NAME = re.compile(
    r"^(?P<virt>hvm|pv)-(?P<storage>ebs-encrypted|ebs|instance-store)(?:-(?P<vol>[a-z0-9]+))?$"
)
ROOT_DEVICE = "/dev/sda1"


@dataclass(frozen=True)
class Flavour:
    """One row of the AMI matrix."""

    virtualization: Virtualization
    storage: Storage
    volume_type: str | None = None
    iops: int | None = None
    throughput: int | None = None

    @property
    def name(self) -> str:
        """The row's name, as written in the config (``hvm-ebs-gp2``)."""
        virt = "pv" if self.virtualization == "paravirtual" else "hvm"
        base = f"{virt}-{self.storage}"
        return f"{base}-{self.volume_type}" if self.volume_type else base

    @property
    def encrypted(self) -> bool:
        """True for encrypted EBS rows (never public: shared with accounts instead)."""
        return self.storage == "ebs-encrypted"

    @property
    def is_ebs(self) -> bool:
        """True for rows registered from an EBS snapshot."""
        return self.storage in ("ebs", "ebs-encrypted")

    @property
    def virt_type(self) -> str:
        """The legacy messages' ``virt_type``."""
        return self.virtualization

    @property
    def vol_type(self) -> str:
        """The legacy messages' ``vol_type`` (instance-store rows say ``instance-store``)."""
        return self.volume_type or self.storage

    def ami_name(self, *, image_name: str, region: str, index: int) -> str:
        """fedimg's AMI name: ``<image>-<virt>-<region>-[encrypted-]<voltype>-<n>``."""
        kind = self.volume_type or self.storage
        if self.encrypted:
            kind = f"encrypted-{kind}"
        return f"{image_name}-{self.virtualization}-{region}-{kind}-{index}"


def parse_flavour(name: str) -> Flavour:
    """``hvm-ebs-gp3`` → Flavour; raises ValueError with the reason for a malformed name."""
    match = _NAME.match(name.strip())
    if not match:
        raise ValueError(
            f"{name!r} is not a flavour (like hvm-ebs-gp2, pv-ebs-standard, "
            "hvm-ebs-encrypted-gp3, pv-instance-store)"
        )
    virt: Virtualization = "paravirtual" if match["virt"] == "pv" else "hvm"
    storage: Storage = match["storage"]  # type: ignore[assignment]  # the regex allows only these
    volume = match["vol"]
    if storage == "instance-store":
        if volume:
            raise ValueError(f"{name!r}: instance-store rows have no volume type")
        return Flavour(virtualization=virt, storage=storage)
    if not volume:
        raise ValueError(f"{name!r}: EBS rows need a volume type ({', '.join(VOLUME_TYPES)})")
    if volume not in VOLUME_TYPES:
        raise ValueError(f"{name!r}: unknown volume type {volume!r}")
    iops = 3000 if volume in ("io1", "io2") else None
    return Flavour(virtualization=virt, storage=storage, volume_type=volume, iops=iops)


@dataclass(frozen=True)
class AmiAttributes:
    """The attributes one row is registered with (globals merged with the row's overrides)."""

    boot_mode: str | None = None
    uefi_data: str | None = None
    tpm_support: str | None = None
    imds_support: str | None = None
    ena_support: bool = True
    sriov_net_support: bool = True
    root_device_name: str = ROOT_DEVICE
    root_volume_size: int | None = None
    delete_on_termination: bool = True
    iops: int | None = None
    throughput: int | None = None
    tags: dict[str, str] = field(default_factory=dict)


def attributes_for(
    flavour: Flavour,
    *,
    arch: str,
    common: AmiAttributeSettings | None = None,
    overrides: dict[str, AmiAttributeSettings] | None = None,
) -> AmiAttributes:
    """The row's attributes: its overrides, else the common settings, else the defaults.

    arm64 boots only with UEFI, so its default boot mode is ``uefi``; io1/io2 rows default to
    3000 IOPS (their minimum useful provisioned rate), gp3 to AWS's baseline.
    """
    layers = [o for o in ((overrides or {}).get(flavour.name), common) if o is not None]

    def pick(name: str) -> Any:
        for layer in layers:
            value = getattr(layer, name)
            if value is not None:
                return value
        return None

    tags: dict[str, str] = {}
    for layer in reversed(layers):
        tags.update(layer.tags)
    boot_mode = pick("boot_mode") or ("uefi" if arch == "arm64" else None)
    iops = pick("iops") or flavour.iops
    throughput = pick("throughput") or flavour.throughput
    return AmiAttributes(
        boot_mode=boot_mode,
        uefi_data=pick("uefi_data"),
        tpm_support=pick("tpm_support"),
        imds_support=pick("imds_support"),
        ena_support=_default(pick("ena_support"), True),
        sriov_net_support=_default(pick("sriov_net_support"), True),
        root_device_name=pick("root_device_name") or ROOT_DEVICE,
        root_volume_size=pick("root_volume_size"),
        delete_on_termination=_default(pick("delete_on_termination"), True),
        iops=iops if flavour.volume_type in ("gp3", "io1", "io2") else None,
        throughput=throughput if flavour.volume_type == "gp3" else None,
        tags=tags,
    )


def _default(value: bool | None, default: bool) -> bool:
    return default if value is None else value


@dataclass(frozen=True)
class MatrixContext:
    """What decides whether a row can exist: architecture, per-region AKIs, bundle inputs."""

    arch: str
    regions: tuple[str, ...]
    akis: dict[str, str | None] = field(default_factory=dict)
    bundle_missing: tuple[str, ...] = ()


def refusal(flavour: Flavour, context: MatrixContext, attributes: AmiAttributes) -> str | None:
    """Why ``flavour`` cannot exist in ``context`` with ``attributes``, or None if it can."""
    boot_mode = attributes.boot_mode
    if flavour.virtualization == "paravirtual":
        if context.arch not in {"x86_64", "i386"}:
            return f"{flavour.name}: paravirtual AMIs exist only for x86 (not {context.arch})"
        missing = [r for r in context.regions if not context.akis.get(r)]
        if missing:
            return (
                f"{flavour.name}: paravirtual needs an AKI, and the AMI list gives none for "
                f"{context.arch} in {', '.join(missing)}"
            )
        if boot_mode in ("uefi", "uefi-preferred"):
            return f"{flavour.name}: paravirtual AMIs cannot boot with {boot_mode}"
        if attributes.tpm_support:
            return f"{flavour.name}: paravirtual AMIs cannot have a TPM"
    if context.arch == "arm64" and boot_mode == "legacy-bios":
        return f"{flavour.name}: arm64 AMIs boot only with uefi"
    if attributes.tpm_support and boot_mode != "uefi":
        return f"{flavour.name}: tpm_support needs boot_mode = 'uefi'"
    if attributes.uefi_data and boot_mode not in ("uefi", "uefi-preferred"):
        return f"{flavour.name}: uefi_data needs boot_mode = 'uefi' or 'uefi-preferred'"
    if flavour.storage == "instance-store":
        if context.arch == "arm64":
            return f"{flavour.name}: instance-store AMIs are not offered for arm64"
        if context.bundle_missing:
            return (
                f"{flavour.name}: instance-store rows need [aws.bundle] "
                f"{', '.join(context.bundle_missing)}"
            )
    if flavour.volume_type in ("io1", "io2") and not attributes.iops:
        return f"{flavour.name}: {flavour.volume_type} needs iops"
    return None


def choose_flavours(
    configured: list[str] | None,
    volume_types: list[str],
    context: MatrixContext,
    attributes: Callable[[Flavour], AmiAttributes],
) -> list[Flavour]:
    """The rows to publish: the configured ones (each must be able to exist), or the defaults.

    Defaults are the seed's EBS rows: HVM with each of ``volume_types``, and paravirtual with each
    where the AMI list gives an AKI in every region. Raises :class:`ConfigError` with the reason for
    a configured row that cannot exist.
    """
    if configured is not None:
        rows: list[Flavour] = []
        for name in configured:
            try:
                flavour = parse_flavour(name)
            except ValueError as exc:
                raise ConfigError(f"[aws] flavours: {exc}") from exc
            reason = refusal(flavour, context, attributes(flavour))
            if reason:
                raise ConfigError(f"[aws] flavours: {reason}")
            if flavour not in rows:
                rows.append(flavour)
        if not rows:
            raise ConfigError("[aws] flavours: the list is empty")
        return rows
    rows = [Flavour(virtualization="hvm", storage="ebs", volume_type=v) for v in volume_types]
    pv = [Flavour(virtualization="paravirtual", storage="ebs", volume_type=v) for v in volume_types]
    rows.extend(f for f in pv if refusal(f, context, attributes(f)) is None)
    return rows


def register_image_params(
    *,
    flavour: Flavour,
    name: str,
    description: str,
    arch: str,
    volume_size_gib: int,
    kernel_id: str | None,
    tags: dict[str, str],
    attributes: AmiAttributes,
    snapshot_id: str | None = None,
    image_location: str | None = None,
) -> dict[str, Any]:
    """The RegisterImage parameters of one row: EBS rows from ``snapshot_id``, instance-store rows
    from the bundle manifest at ``image_location``."""
    root = attributes.root_device_name
    params: dict[str, Any] = {
        "Name": name,
        "Description": description,
        "Architecture": arch,
        "RootDeviceName": root,
        "VirtualizationType": flavour.virtualization,
        "TagSpecifications": [
            {"ResourceType": "image", "Tags": _tags({**attributes.tags, **tags})}
        ],
    }
    if flavour.is_ebs:
        if snapshot_id is None:
            raise ValueError(f"{flavour.name}: an EBS row needs a snapshot")
        ebs: dict[str, Any] = {
            "SnapshotId": snapshot_id,
            "VolumeSize": max(volume_size_gib, attributes.root_volume_size or 0),
            "VolumeType": flavour.volume_type,
            "DeleteOnTermination": attributes.delete_on_termination,
        }
        if attributes.iops:
            ebs["Iops"] = attributes.iops
        if attributes.throughput:
            ebs["Throughput"] = attributes.throughput
        params["BlockDeviceMappings"] = [{"DeviceName": root, "Ebs": ebs}]
    else:
        if image_location is None:
            raise ValueError(f"{flavour.name}: an instance-store row needs a bundle manifest")
        params["ImageLocation"] = image_location
        params["BlockDeviceMappings"] = [{"DeviceName": "/dev/sdb", "VirtualName": "ephemeral0"}]
    if flavour.virtualization == "hvm":
        if attributes.ena_support:
            params["EnaSupport"] = True
        if attributes.sriov_net_support:
            params["SriovNetSupport"] = "simple"
        if attributes.boot_mode:
            params["BootMode"] = attributes.boot_mode
        if attributes.uefi_data:
            params["UefiData"] = attributes.uefi_data
        if attributes.tpm_support:
            params["TpmSupport"] = attributes.tpm_support
    elif kernel_id:
        params["KernelId"] = kernel_id
    if attributes.imds_support:
        params["ImdsSupport"] = attributes.imds_support
    return params


def _tags(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": key, "Value": value} for key, value in tags.items()]

"""The AMI matrix as data: which flavours exist, and the RegisterImage parameters of each.

A flavour is virtualization × storage × volume type, named like ``hvm-ebs-gp3``,
``pv-ebs-standard``, ``hvm-ebs-encrypted-gp3`` or ``pv-instance-store``. The orchestrator never
looks inside a flavour: it asks this module for names, parameters and whether a row can exist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

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
class MatrixContext:
    """What decides whether a row can exist: architecture and, per region, the AKI."""

    arch: str
    regions: tuple[str, ...]
    akis: dict[str, str | None] = field(default_factory=dict)
    boot_mode: str | None = None
    tpm_support: str | None = None


def refusal(flavour: Flavour, context: MatrixContext) -> str | None:
    """Why ``flavour`` cannot exist in ``context``, or None if it can."""
    if flavour.virtualization == "paravirtual":
        if context.arch not in {"x86_64", "i386"}:
            return f"{flavour.name}: paravirtual AMIs exist only for x86 (not {context.arch})"
        missing = [r for r in context.regions if not context.akis.get(r)]
        if missing:
            return (
                f"{flavour.name}: paravirtual needs an AKI, and the AMI list gives none for "
                f"{context.arch} in {', '.join(missing)}"
            )
        if context.boot_mode in ("uefi", "uefi-preferred"):
            return f"{flavour.name}: paravirtual AMIs cannot boot with {context.boot_mode}"
    if context.tpm_support and context.boot_mode not in ("uefi",):
        return f"{flavour.name}: tpm_support needs boot_mode = 'uefi'"
    if flavour.storage == "instance-store" and context.arch == "arm64":
        return f"{flavour.name}: instance-store AMIs are not offered for arm64"
    return None


def choose_flavours(
    configured: list[str] | None, volume_types: list[str], context: MatrixContext
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
            reason = refusal(flavour, context)
            if reason:
                raise ConfigError(f"[aws] flavours: {reason}")
            if flavour not in rows:
                rows.append(flavour)
        if not rows:
            raise ConfigError("[aws] flavours: the list is empty")
        return rows
    rows = [Flavour(virtualization="hvm", storage="ebs", volume_type=v) for v in volume_types]
    pv = [Flavour(virtualization="paravirtual", storage="ebs", volume_type=v) for v in volume_types]
    rows.extend(f for f in pv if refusal(f, context) is None)
    return rows


def register_image_params(
    *,
    flavour: Flavour,
    name: str,
    description: str,
    arch: str,
    snapshot_id: str,
    volume_size_gib: int,
    kernel_id: str | None,
    tags: dict[str, str],
    boot_mode: str | None = None,
) -> dict[str, Any]:
    """The RegisterImage parameters for an EBS flavour (instance-store rows use ImageLocation)."""
    ebs: dict[str, Any] = {
        "SnapshotId": snapshot_id,
        "VolumeSize": volume_size_gib,
        "VolumeType": flavour.volume_type,
        "DeleteOnTermination": True,
    }
    if flavour.iops:
        ebs["Iops"] = flavour.iops
    if flavour.throughput:
        ebs["Throughput"] = flavour.throughput
    params: dict[str, Any] = {
        "Name": name,
        "Description": description,
        "Architecture": arch,
        "RootDeviceName": ROOT_DEVICE,
        "BlockDeviceMappings": [{"DeviceName": ROOT_DEVICE, "Ebs": ebs}],
        "VirtualizationType": flavour.virtualization,
        "TagSpecifications": [{"ResourceType": "image", "Tags": _tags(tags)}],
    }
    if flavour.virtualization == "hvm":
        params["EnaSupport"] = True
        params["SriovNetSupport"] = "simple"
        mode = boot_mode or ("uefi" if arch == "arm64" else None)
        if mode:
            params["BootMode"] = mode
    elif kernel_id:
        params["KernelId"] = kernel_id
    return params


def _tags(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": key, "Value": value} for key, value in tags.items()]

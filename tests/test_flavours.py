"""Every AMI type of the seed's table, modern attributes, and one copy per region."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedimg.aws import ClientFactory
from fedimg.config import AmiAttributeSettings, Config
from fedimg.errors import ConfigError
from fedimg.runtime import Runtime
from fedimg.sampleimage import SampleImage
from fedimg.services.ec2.bundle import unbundle
from fedimg.services.ec2.flavours import (
    Flavour,
    MatrixContext,
    attributes_for,
    choose_flavours,
    parse_flavour,
    refusal,
)
from fedimg.services.ec2.service import PublishRequest, PublishResult
from fedimg.source import resolve_source
from tests.certs import make_identity
from tests.conftest import Recorder, leaked, make_config

REGIONS = ["us-east-1", "eu-west-1", "ap-northeast-1"]
AMIS = [
    {"region": r, "arch": "x86_64", "ami": f"ami-0000000{i}", "aki": f"aki-0000000{i}"}
    for i, r in enumerate(REGIONS)
]
SIX = [
    "hvm-ebs-gp2",
    "pv-ebs-standard",
    "hvm-ebs-encrypted-gp3",
    "pv-ebs-encrypted-gp2",
    "hvm-instance-store",
    "pv-instance-store",
]
SHARE = ["210987654321"]


def _identity(tmp_path: Path, name: str) -> tuple[Path, Path, bytes]:
    identity = make_identity(name)
    cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_path.write_bytes(identity.cert_pem)
    key_path.write_bytes(identity.key_pem)
    return cert_path, key_path, identity.key_pem


@pytest.fixture
def bundle_settings(tmp_path: Path) -> dict[str, Any]:
    ec2_cert, _, _ = _identity(tmp_path, "ec2")
    user_cert, user_key, _ = _identity(tmp_path, "user")
    return {
        "ec2_cert": str(ec2_cert),
        "user_cert": str(user_cert),
        "user_key": str(user_key),
        "account_id": "123456789012",
        "bucket": "fedimg-bundles-{region}",
        "create_bucket": True,
    }


def run(
    runtime_factory: Callable[[Config], Runtime],
    config: Config,
    image: SampleImage,
) -> PublishResult:
    runtime = runtime_factory(config)
    return runtime.service().publish(PublishRequest(source=resolve_source(str(image.path))))


def six_config(tmp_path: Path, bundle_settings: dict[str, Any], **aws: Any) -> Config:
    return make_config(
        tmp_path,
        amis=AMIS,
        flavours=SIX,
        share_accounts=SHARE,
        kms_keys={"eu-west-1": "arn:aws:kms:eu-west-1:123456789012:key/test-key"},
        bundle=bundle_settings,
        **aws,
    )


@pytest.mark.slow
def test_all_six_types_publish_in_every_region(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    recorder: Recorder,
    clients: ClientFactory,
    bundle_settings: dict[str, Any],
) -> None:
    result = run(runtime_factory, six_config(tmp_path, bundle_settings), sample_image)
    assert result.status == "published", result.error
    assert {(a.region, a.flavour) for a in result.amis} == {(r, f) for r in REGIONS for f in SIX}
    for ami in result.amis:
        if "encrypted" in ami.flavour:
            assert (ami.public, ami.shared_with, ami.encrypted) == (False, tuple(SHARE), True)
        else:
            assert ami.public and ami.shared_with == ()

    # One plain copy and one encrypted copy per region, whatever the number of rows: plain
    # copies go to the other regions, encrypted copies to every region (the base one too).
    copies = recorder.of("CopySnapshot")
    plain = [c for c in copies if not c.params.get("Encrypted")]
    encrypted = [c for c in copies if c.params.get("Encrypted")]
    assert sorted(c.region for c in plain) == sorted(REGIONS[1:])
    assert sorted(c.region for c in encrypted) == sorted(REGIONS)
    assert result.copies == {"snapshot": 5, "image": 0}
    assert recorder.of("CopyImage") == []
    kms = {c.region: c.params.get("KmsKeyId") for c in encrypted}
    assert kms == {
        "us-east-1": None,
        "eu-west-1": "arn:aws:kms:eu-west-1:123456789012:key/test-key",
        "ap-northeast-1": None,
    }

    registers = {c.params["Name"]: c.params for c in recorder.of("RegisterImage")}
    assert len(registers) == 18
    by_region_row: dict[tuple[str, str], dict[str, Any]] = {}
    for params in registers.values():
        tags = {t["Key"]: t["Value"] for t in params["TagSpecifications"][0]["Tags"]}
        region = next(r for r in REGIONS if f"-{r}-" in params["Name"])
        by_region_row[(region, tags["fedimg:flavour"])] = params

    for region in REGIONS:
        index = REGIONS.index(region)
        gp2 = by_region_row[(region, "hvm-ebs-gp2")]
        assert gp2["Name"].endswith(f"-hvm-{region}-gp2-0")
        assert gp2["BlockDeviceMappings"][0]["Ebs"]["VolumeType"] == "gp2"
        assert gp2["EnaSupport"] is True and "KernelId" not in gp2

        pv = by_region_row[(region, "pv-ebs-standard")]
        assert pv["Name"].endswith(f"-paravirtual-{region}-standard-0")
        assert pv["VirtualizationType"] == "paravirtual"
        assert pv["KernelId"] == f"aki-0000000{index}"
        assert "EnaSupport" not in pv and "BootMode" not in pv

        enc = by_region_row[(region, "hvm-ebs-encrypted-gp3")]
        assert enc["Name"].endswith(f"-hvm-{region}-encrypted-gp3-0")
        enc_snapshot = enc["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
        assert enc_snapshot != gp2["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
        assert (
            enc_snapshot
            == by_region_row[(region, "pv-ebs-encrypted-gp2")]["BlockDeviceMappings"][0]["Ebs"][
                "SnapshotId"
            ]
        )

        for row in ("hvm-instance-store", "pv-instance-store"):
            store = by_region_row[(region, row)]
            virt = "hvm" if row.startswith("hvm") else "paravirtual"
            assert store["Name"].endswith(f"-{virt}-{region}-instance-store-0")
            assert store["ImageLocation"].startswith(f"fedimg-bundles-{region}/fedimg/")
            assert store["ImageLocation"].endswith(".manifest.xml")
            assert all("Ebs" not in m for m in store["BlockDeviceMappings"])

    # Encrypted AMIs are never made public: they are shared with the accounts only.
    encrypted_ids = {a.id for a in result.amis if a.encrypted}
    for call in recorder.of("ModifyImageAttribute"):
        added = call.params["LaunchPermission"]["Add"]
        if call.params["ImageId"] in encrypted_ids:
            assert added == [{"UserId": "210987654321"}]
        else:
            assert added == [{"Group": "all"}]
    encrypted_snapshots = {a.snapshot_id for a in result.amis if a.encrypted}
    assert encrypted_snapshots
    assert encrypted_snapshots <= {
        c.params["SnapshotId"] for c in recorder.of("ModifySnapshotAttribute")
    }
    for call in recorder.of("ModifySnapshotAttribute"):
        if call.params["SnapshotId"] in encrypted_snapshots:
            assert call.params.get("UserIds") == SHARE
            assert "GroupNames" not in call.params

    # Bundles: uploaded once per region, each object with the ACL EC2 needs.
    puts = recorder.of("PutObject")
    manifests = [p for p in puts if p.params["Key"].endswith(".manifest.xml")]
    assert sorted(p.params["Bucket"] for p in manifests) == sorted(
        f"fedimg-bundles-{r}" for r in REGIONS
    )
    assert all(p.params["ACL"] == "aws-exec-read" for p in puts)
    assert leaked(clients, REGIONS) == []


@pytest.mark.slow
def test_the_uploaded_bundle_unbundles_to_the_image(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    clients: ClientFactory,
    bundle_settings: dict[str, Any],
) -> None:
    config = make_config(
        tmp_path,
        regions=["us-east-1"],
        flavours=["hvm-instance-store"],
        bundle=bundle_settings,
    )
    result = run(runtime_factory, config, sample_image)
    assert result.status == "published", result.error
    s3 = clients.s3("us-east-1")
    bucket = "fedimg-bundles-us-east-1"
    download = tmp_path / "download"
    download.mkdir()
    manifest = None
    for item in s3.list_objects_v2(Bucket=bucket)["Contents"]:
        target = download / Path(item["Key"]).name
        target.write_bytes(s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read())
        if target.name.endswith(".manifest.xml"):
            manifest = target
    assert manifest is not None
    restored = unbundle(
        manifest_path=manifest,
        parts_dir=download,
        user_key_pem=Path(bundle_settings["user_key"]).read_bytes(),
        out_path=tmp_path / "restored.raw",
    )
    import hashlib

    assert hashlib.sha256(restored.read_bytes()).hexdigest() == sample_image.sha256_raw


def test_modern_attributes_reach_register_image(
    tmp_path: Path,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    recorder: Recorder,
) -> None:
    config = make_config(
        tmp_path,
        regions=["us-east-1"],
        flavours=["hvm-ebs-gp3", "hvm-ebs-io2"],
        attributes={
            "boot_mode": "uefi",
            "tpm_support": "v2.0",
            "imds_support": "v2.0",
            "uefi_data": "QU1aTlVFRkk=",
            "root_volume_size": 5,
            "tags": {"Project": "Fedora"},
        },
        flavour_attributes={"hvm-ebs-gp3": {"iops": 4000, "throughput": 250}},
    )
    result = run(runtime_factory, config, sample_image)
    assert result.status == "published", result.error
    params = {c.params["Name"].rsplit("-", 2)[1]: c.params for c in recorder.of("RegisterImage")}
    for volume in ("gp3", "io2"):
        p = params[volume]
        assert p["BootMode"] == "uefi"
        assert p["TpmSupport"] == "v2.0"
        assert p["ImdsSupport"] == "v2.0"
        assert p["UefiData"] == "QU1aTlVFRkk="
        assert p["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] == 5
        tags = {t["Key"]: t["Value"] for t in p["TagSpecifications"][0]["Tags"]}
        assert tags["Project"] == "Fedora"
    assert params["gp3"]["BlockDeviceMappings"][0]["Ebs"]["Iops"] == 4000
    assert params["gp3"]["BlockDeviceMappings"][0]["Ebs"]["Throughput"] == 250
    assert params["io2"]["BlockDeviceMappings"][0]["Ebs"]["Iops"] == 3000
    assert "Throughput" not in params["io2"]["BlockDeviceMappings"][0]["Ebs"]


def _context(arch: str = "x86_64", **fields: Any) -> MatrixContext:
    return MatrixContext(arch=arch, regions=("us-east-1",), akis={"us-east-1": "aki-1"}, **fields)


@pytest.mark.parametrize(
    ("row", "arch", "attributes", "context_fields", "reason"),
    [
        ("pv-ebs-gp2", "arm64", {}, {}, "paravirtual AMIs exist only for x86"),
        ("pv-ebs-gp2", "x86_64", {"boot_mode": "uefi"}, {}, "cannot boot with uefi"),
        ("hvm-ebs-gp3", "x86_64", {"tpm_support": "v2.0"}, {}, "tpm_support needs boot_mode"),
        ("hvm-ebs-gp3", "arm64", {"boot_mode": "legacy-bios"}, {}, "arm64 AMIs boot only"),
        ("hvm-instance-store", "arm64", {}, {}, "not offered for arm64"),
        (
            "hvm-instance-store",
            "x86_64",
            {},
            {"bundle_missing": ("ec2_cert", "bucket")},
            "need [aws.bundle] ec2_cert, bucket",
        ),
        ("hvm-ebs-gp3", "x86_64", {"uefi_data": "x"}, {}, "uefi_data needs boot_mode"),
    ],
)
def test_rows_that_cannot_exist_are_refused_with_a_reason(
    row: str,
    arch: str,
    attributes: dict[str, Any],
    context_fields: dict[str, Any],
    reason: str,
) -> None:
    flavour = parse_flavour(row)
    merged = attributes_for(flavour, arch=arch, common=AmiAttributeSettings(**attributes))
    refused = refusal(flavour, _context(arch, **context_fields), merged)
    assert refused is not None and reason in refused
    with pytest.raises(ConfigError, match=reason.replace("[", r"\[")):
        choose_flavours([row], ["gp2"], _context(arch, **context_fields), lambda _f: merged)


def test_pv_without_an_aki_is_refused_and_dropped_from_the_defaults() -> None:
    context = MatrixContext(
        arch="x86_64", regions=("us-east-1", "eu-west-1"), akis={"us-east-1": "aki-1"}
    )

    def plain(flavour: Flavour) -> Any:
        return attributes_for(flavour, arch="x86_64")

    with pytest.raises(ConfigError, match="gives none for x86_64 in eu-west-1"):
        choose_flavours(["pv-ebs-gp2"], ["gp2"], context, plain)
    defaults = choose_flavours(None, ["standard", "gp2"], context, plain)
    assert [f.name for f in defaults] == ["hvm-ebs-standard", "hvm-ebs-gp2"]


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("hvm-ebs", "need a volume type"),
        ("hvm-ebs-gp9", "unknown volume type"),
        ("pv-instance-store-gp2", "have no volume type"),
        ("xen-ebs-gp2", "is not a flavour"),
    ],
)
def test_malformed_row_names(name: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_flavour(name)

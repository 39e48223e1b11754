"""``fedimg upload`` through main(): the JSON contract, exit codes, bad input, nothing leaked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedimg.aws import ClientFactory
from fedimg.catalog import Catalog
from fedimg.cli import main
from fedimg.embedded import EmbeddedAWS
from fedimg.sampleimage import SampleImage
from tests.conftest import leaked
from tests.httpfiles import serve_files

REGIONS = ["us-east-1", "eu-west-1", "ap-south-1"]


def config_file(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "fedimg.toml"
    path.write_text(
        f"[general]\ncatalog_url = 'sqlite:///{tmp_path / 'catalog.sqlite'}'\n"
        f"[aws]\nregions = {json.dumps(REGIONS)}\n{extra}"
    )
    return path


def failed_messages(tmp_path: Path) -> list[dict[str, object]]:
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    try:
        rows, _ = catalog.messages(limit=100)
        return [r.body for r in rows if r.body.get("status") == "failed"]
    finally:
        catalog.close()


def test_upload_prints_the_json_contract(
    tmp_path: Path,
    aws: EmbeddedAWS,
    clients: ClientFactory,
    sample_image: SampleImage,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        [
            "upload",
            str(sample_image.path),
            "--config",
            str(config_file(tmp_path)),
            "--compose-id",
            "Fedora-41-20241025.0",
            "--sha256",
            sample_image.sha256_compressed,
            "--json",
            "--progress",
            "none",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert set(result) >= {"job", "status", "image", "amis", "error"}
    assert result["status"] == "published"
    assert result["error"] is None
    assert result["image"] == {
        "name": "Fedora-Cloud-Base-Test-41-1.1.x86_64",
        "url": sample_image.path.resolve().as_uri(),
        "sha256": sample_image.sha256_compressed,
        "arch": "x86_64",
    }
    assert len(result["amis"]) == 6
    for ami in result["amis"]:
        assert set(ami) >= {
            "region",
            "id",
            "name",
            "virtualization",
            "storage",
            "volume_type",
            "encrypted",
            "public",
            "snapshot_id",
        }
        assert ami["public"] is True
    assert "target: embedded AWS endpoint at http://127.0.0.1:" in captured.err


def test_amis_and_messages_read_the_catalog(
    tmp_path: Path,
    aws: EmbeddedAWS,
    sample_image: SampleImage,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = str(config_file(tmp_path))
    assert (
        main(
            [
                "upload",
                str(sample_image.path),
                "-c",
                config,
                "--release",
                "41",
                "--progress",
                "none",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "hvm-ebs-gp2" in table and "ap-south-1" in table
    assert main(["amis", "-c", config, "--region", "eu-west-1", "--json"]) == 0
    amis = json.loads(capsys.readouterr().out)
    assert {a["flavour"] for a in amis} == {"hvm-ebs-standard", "hvm-ebs-gp2"}
    assert all(a["region"] == "eu-west-1" and a["release"] == "41" for a in amis)
    assert main(["messages", "-c", config, "--topic", "fedimg.image.copy", "--json"]) == 0
    copies = json.loads(capsys.readouterr().out)
    assert len(copies) == 4
    assert all(m["topic"] == "org.fedoraproject.dev.fedimg.image.copy" for m in copies)
    assert main(["jobs", "-c", config, "--json"]) == 0
    (job,) = json.loads(capsys.readouterr().out)
    assert job["status"] == "published"


def _corrupt(image: Path, target: Path) -> Path:
    data = bytearray(image.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(4096)
    target.write_bytes(bytes(data))
    return target


def _truncated(image: Path, target: Path) -> Path:
    target.write_bytes(image.read_bytes()[: image.stat().st_size * 2 // 3])
    return target


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "exit_code", "words"),
    [
        ("missing-file", 2, "no such file"),
        ("404-url", 2, "HTTP 404"),
        ("refused-url", 2, "cannot connect"),
        ("corrupt-xz", 2, "corrupt"),
        ("truncated-xz", 2, "corrupt or truncated"),
        ("not-an-image", 2, "not a disk image"),
        ("checksum-mismatch", 2, "checksum mismatch"),
        ("unknown-region", 2, "unknown region(s) mars-north-1"),
        ("malformed-ami-line", 2, "malformed entry"),
        ("pv-without-aki", 2, "paravirtual needs an AKI"),
        ("failing-test", 1, "exited 3"),
        ("empty-file", 2, "not an xz file"),
        ("gzip-named-xz", 2, "not an xz file"),
        ("directory", 2, "not a regular file"),
        ("tiny-xz", 2, "corrupt or truncated xz file"),
        ("bad-sha256-value", 2, "is not a SHA-256"),
        ("checksum-file-without-image", 2, "no SHA256 line"),
        ("unknown-arch", 2, "unknown architecture"),
        ("name-without-arch", 2, "pass --arch"),
        ("ftp-scheme", 2, "unsupported URL scheme"),
        ("config-unknown-key", 2, "Unknown key"),
        ("config-bad-target", 2, "[aws] target"),
        ("config-bad-region-name", 2, "is not a region name"),
        ("config-zero-workers", 2, "[aws] workers"),
        ("config-missing-file", 2, "no such config file"),
        ("endpoint-without-url", 2, "endpoint_url"),
        ("unknown-flavour", 2, "is not a flavour"),
        ("pv-on-arm64", 2, "paravirtual AMIs exist only for x86"),
        ("instance-store-without-bundle", 2, "need [aws.bundle]"),
        ("ami-line-bad-id", 2, "is not an AMI id"),
        ("preflight-block-public-access", 2, "image block public access is on"),
        ("before-upload-without-test", 2, "--before-upload: no test script is configured"),
        ("config-before-upload-without-test", 2, "test_before_upload: needs a test script"),
    ],
)
def test_bad_input_gives_one_line_exit_code_failed_message_and_no_leak(
    tmp_path: Path,
    aws: EmbeddedAWS,
    clients: ClientFactory,
    sample_image: SampleImage,
    capsys: pytest.CaptureFixture[str],
    case: str,
    exit_code: int,
    words: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A config that cannot be read still records its failure: in the default state directory.
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    name = sample_image.path.name
    source = str(sample_image.path)
    args: list[str] = []
    extra = ""
    if case == "missing-file":
        source = str(tmp_path / name)
    elif case == "corrupt-xz":
        source = str(_corrupt(sample_image.path, tmp_path / name))
    elif case == "truncated-xz":
        source = str(_truncated(sample_image.path, tmp_path / name))
    elif case == "not-an-image":
        text = tmp_path / "notes.x86_64.raw"
        text.write_text("these are notes, not a disk\n" * 40000)
        source = str(text)
    elif case == "checksum-mismatch":
        args = ["--sha256", "ab" * 32]
    elif case == "unknown-region":
        args = ["--regions", "us-east-1,mars-north-1"]
    elif case == "malformed-ami-line":
        extra = "amis = ['us-east-1|x86_64|ami-12345678|aki-12345678', 'eu-west-1|x86_64']\n"
    elif case == "pv-without-aki":
        extra = "flavours = ['hvm-ebs-gp2', 'pv-ebs-gp2']\n"
    elif case == "failing-test":
        script = tmp_path / "test.sh"
        script.write_text("#!/bin/sh\necho 'kernel panic' ; exit 3\n")
        script.chmod(0o755)
        extra = f"test = '{script}'\n"
    elif case == "empty-file":
        empty = tmp_path / name
        empty.write_bytes(b"")
        source = str(empty)
    elif case == "gzip-named-xz":
        import gzip

        fake = tmp_path / name
        fake.write_bytes(gzip.compress(b"\0" * 100_000))
        source = str(fake)
    elif case == "directory":
        folder = tmp_path / name
        folder.mkdir()
        source = str(folder)
    elif case == "tiny-xz":
        tiny = tmp_path / name
        tiny.write_bytes(sample_image.path.read_bytes()[:100])
        source = str(tiny)
    elif case == "bad-sha256-value":
        args = ["--sha256", "not-a-checksum"]
    elif case == "checksum-file-without-image":
        checksum = tmp_path / "CHECKSUM"
        checksum.write_text("SHA256 (other.raw.xz) = " + "ab" * 32 + "\n")
        args = ["--checksum-file", str(checksum)]
    elif case == "unknown-arch":
        args = ["--arch", "sparc"]
    elif case == "name-without-arch":
        plain = tmp_path / "disk.raw.xz"
        plain.write_bytes(sample_image.path.read_bytes())
        source = str(plain)
    elif case == "ftp-scheme":
        source = f"ftp://127.0.0.1/{name}"
    elif case == "config-unknown-key":
        extra = "regoins = ['us-east-1']\n"
    elif case == "config-bad-target":
        extra = "target = 'azure'\n"
    elif case == "config-bad-region-name":
        extra = "exclude_regions = ['Europe']\n"
    elif case == "config-zero-workers":
        extra = "workers = 0\n"
    elif case == "endpoint-without-url":
        extra = "target = 'endpoint'\n"
    elif case == "unknown-flavour":
        extra = "flavours = ['hvm-ssd-gp2']\n"
    elif case == "pv-on-arm64":
        extra = "flavours = ['pv-ebs-gp2']\n"
        args = ["--arch", "aarch64"]
    elif case == "instance-store-without-bundle":
        extra = "flavours = ['hvm-instance-store']\n"
    elif case == "ami-line-bad-id":
        extra = "amis = ['us-east-1|x86_64|image-12345678|aki-12345678']\n"
    elif case == "before-upload-without-test":
        args = ["--before-upload"]
    elif case == "config-before-upload-without-test":
        extra = "test_before_upload = true\n"
    elif case == "preflight-block-public-access":
        clients.ec2("eu-west-1").enable_image_block_public_access(
            ImageBlockPublicAccessState="block-new-sharing"
        )
    config = config_file(tmp_path, extra)
    if case == "config-missing-file":
        config = tmp_path / "missing.toml"

    def run() -> int:
        return main(["upload", source, "-c", str(config), "--progress", "none", *args])

    if case.endswith("-url"):
        if case == "404-url":
            with serve_files(tmp_path) as (base, _):
                source = f"{base}/gone/{name}"
                code = run()
        else:
            source = f"http://127.0.0.1:9/{name}"
            code = run()
    else:
        code = run()

    err = capsys.readouterr().err
    last = [line for line in err.splitlines() if line.startswith("fedimg: ")]
    assert code == exit_code, err
    assert len(last) == 1, err
    assert words in last[0]
    journal = tmp_path / "state" / "fedimg" if case == "config-missing-file" else tmp_path
    failed = failed_messages(journal)
    assert failed, "no failed message"
    assert all(m["status"] == "failed" for m in failed)
    assert leaked(clients, REGIONS) == []
    for region in REGIONS:
        assert clients.ec2(region).describe_images(Owners=["self"])["Images"] == []


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["upload"]) == 2
    assert main([]) == 2
    assert main(["no-such-command"]) == 2
    assert main(["--version"]) == 0
    capsys.readouterr()


def test_python_dash_m_and_console_script_exist() -> None:
    script = Path(sys.executable).parent / "fedimg"
    assert script.is_file()
    for argv in ([str(script), "--version"], [sys.executable, "-m", "fedimg", "--version"]):
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("fedimg ")

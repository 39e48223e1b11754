"""The command line for scripts: ``fedimg amis --latest`` and ``fedimg serve``, over the catalog of
real uploads."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from fedimg.cli import main
from fedimg.errors import EXIT_BAD_INPUT, EXIT_OK
from tests.web_support import Published, clone_catalog

SECRET_ID = "AKIAFEDIMGSECRETID00"
SECRET_KEY = "fedimg-secret-key-never-shown"


@pytest.fixture
def config_file(published: Published, tmp_path: Path) -> Path:
    """A config on a copy of the published catalog, with credentials that must never show."""
    path = tmp_path / "fedimg.toml"
    path.write_text(
        f"""
[general]
catalog_url = "{clone_catalog(published, tmp_path / "state")}"

[aws]
target = "aws"
access_id = "{SECRET_ID}"
secret_key = "{SECRET_KEY}"

[messaging]
topic_prefix = "org.fedoraproject.dev"
"""
    )
    return path


def amis_json(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> list[dict[str, Any]]:
    capsys.readouterr()
    assert main(["amis", "--config", str(config), "--json", *args]) == EXIT_OK
    data: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    return data


def test_amis_latest_answers_one_ami(
    capsys: pytest.CaptureFixture[str], config_file: Path, published: Published
) -> None:
    rows = amis_json(
        capsys,
        config_file,
        "--latest",
        "--release",
        "41",
        "--arch",
        "x86_64",
        "--region",
        "us-east-1",
        "--flavour",
        "hvm-ebs-gp2",
    )
    assert [r["id"] for r in rows] == [published.ami("f41_respin", "us-east-1", "hvm-ebs-gp2")]
    assert rows[0]["created_at"].endswith("+00:00")
    assert (rows[0]["public"], rows[0]["state"], rows[0]["job"]) == (
        True,
        "public",
        published.job("f41_respin"),
    )


def test_amis_latest_is_per_arch_region_and_flavour(
    capsys: pytest.CaptureFixture[str], config_file: Path, published: Published
) -> None:
    rows = amis_json(capsys, config_file, "--latest")
    cells = {(r["arch"], r["region"], r["flavour"]): r["id"] for r in rows}
    assert len(rows) == len(cells) == 8
    assert cells[("arm64", "us-east-1", "hvm-ebs-gp3")] == published.ami(
        "f42_arm", "us-east-1", "hvm-ebs-gp3"
    )
    assert cells[("x86_64", "eu-west-1", "hvm-ebs-gp2")] == published.ami(
        "f41", "eu-west-1", "hvm-ebs-gp2"
    )
    deleted = {a["id"] for a in amis_json(capsys, config_file) if a["state"] == "deleted"}
    assert deleted == set()
    aarch64 = amis_json(capsys, config_file, "--latest", "--arch", "aarch64")
    assert {r["arch"] for r in aarch64} == {"arm64"}


def test_amis_latest_agrees_with_the_web_api(
    capsys: pytest.CaptureFixture[str], config_file: Path, published: Published
) -> None:
    from fedimg.catalog import Catalog
    from tests.web_support import serving

    cli = amis_json(capsys, config_file, "--latest", "--release", "41")
    text = config_file.read_text()
    url = text.split('catalog_url = "')[1].split('"')[0]
    catalog = Catalog(url)
    try:
        with serving(catalog) as base:
            api = httpx.get(f"{base}/api/v1/amis/latest", params={"release": "41"}).json()
    finally:
        catalog.close()
    assert sorted(r["id"] for r in cli) == sorted(a["id"] for a in api["amis"])


def test_amis_table_lists_the_ids(
    capsys: pytest.CaptureFixture[str], config_file: Path, published: Published
) -> None:
    assert main(["amis", "--config", str(config_file), "--latest", "--arch", "aarch64"]) == 0
    out = capsys.readouterr().out
    for ami in published.results["f42_arm"].amis:
        assert ami.id in out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_serve_answers_on_loopback_and_shows_no_secret(
    config_file: Path, published: Published, tmp_path: Path
) -> None:
    port = free_port()
    env = {**os.environ, "HOME": str(tmp_path)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedimg",
            "serve",
            "--config",
            str(config_file),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    bodies: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(base + "/api/v1/jobs", timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline, "fedimg serve did not start"
                time.sleep(0.2)
        latest = httpx.get(base + "/api/v1/amis/latest", params={"arch": "aarch64"}).json()
        assert {a["id"] for a in latest["amis"]} == {
            a.id for a in published.results["f42_arm"].amis
        }
        for path in (
            "/",
            "/amis",
            "/images",
            f"/jobs/{published.job('f41')}",
            "/raw",
            "/openapi.json",
        ):
            response = httpx.get(base + path)
            assert response.status_code == 200, path
            bodies.append(response.text)
        with socket.socket() as probe:  # loopback only: nothing listens on other addresses
            probe.settimeout(1)
            outside = socket.gethostbyname(socket.gethostname())
            if not outside.startswith("127."):
                assert probe.connect_ex((outside, port)) != 0
    finally:
        process.send_signal(signal.SIGINT)
        _out, err = process.communicate(timeout=20)
    assert process.returncode == EXIT_OK, err
    assert f"dashboard on http://127.0.0.1:{port}/ (read-only)" in err
    for text in [*bodies, err]:
        assert SECRET_ID not in text
        assert SECRET_KEY not in text


def test_serve_refuses_a_bad_port(config_file: Path) -> None:
    assert main(["serve", "--config", str(config_file), "--port", "70000"]) == EXIT_BAD_INPUT

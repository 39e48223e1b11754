"""Nothing lost, nothing leaked: faults on the wire, crashes at every step, signals, secrets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedimg.aws import ClientFactory, TargetSpec
from fedimg.catalog import Base, Catalog
from fedimg.config import Config
from fedimg.embedded import EmbeddedAWS
from fedimg.runtime import Runtime
from fedimg.sampleimage import SampleImage
from fedimg.services.ec2.service import PublishRequest
from fedimg.services.ec2.verify import verify_snapshot
from fedimg.source import resolve_source
from tests.conftest import leaked
from tests.faultproxy import FaultPlan, fault_proxy

REGIONS = ["us-east-1", "eu-west-1", "ap-south-1"]
FEDIMG = [sys.executable, "-m", "fedimg"]


@pytest.mark.slow
def test_jobs_complete_through_throttling_errors_and_drops(
    tmp_path: Path, aws: EmbeddedAWS, sample_image: SampleImage
) -> None:
    plan = FaultPlan(throttle=0.10, server_error=0.02, drop=0.02, seed=11)
    results = []
    with fault_proxy(aws.endpoint.url, plan) as proxy:
        for _attempt in range(2):
            config = Config.model_validate(
                {
                    "general": {"catalog_url": f"sqlite:///{tmp_path / 'catalog.sqlite'}"},
                    "aws": {
                        "target": "endpoint",
                        "endpoint_url": proxy,
                        "regions": REGIONS,
                        "workers": 4,
                    },
                }
            )
            with Runtime(config=config) as runtime:
                result = runtime.service().publish(
                    PublishRequest(source=resolve_source(str(sample_image.path)))
                )
            results.append(result)
    assert plan.counts["throttled"] > 10
    assert plan.counts["5xx"] > 0
    assert plan.counts["dropped"] > 0
    clean = ClientFactory(TargetSpec(target="embedded", endpoint_url=aws.endpoint.url))
    for result in results:
        assert result.status == "published", result.error
        assert len(result.amis) == 6
        assert result.upload is not None
        verified = verify_snapshot(
            ebs=clean.ebs("us-east-1"),
            region="us-east-1",
            snapshot_id=result.upload.snapshot_id,
            source=resolve_source(str(sample_image.path)),
        )
        assert verified.identical
    # Retried creates never doubled anything, and the second job of the same image found the
    # first one's AMIs instead of registering again: one AMI per (region, flavour).
    assert {a.id for a in results[0].amis} == {a.id for a in results[1].amis}
    for region in REGIONS:
        names = [i["Name"] for i in clean.ec2(region).describe_images(Owners=["self"])["Images"]]
        assert len(names) == len(set(names)) == 2
    assert leaked(clean, REGIONS) == []
    print(f"fault proxy: {plan.counts} over {len(results)} jobs")


# --- the crash harness ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def endpoint_process() -> Iterator[str]:
    """``fedimg embedded serve`` in its own process: its state outlives a killed fedimg."""
    port = _free_port()
    proc = subprocess.Popen(
        [*FEDIMG, "embedded", "serve", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("fedimg embedded serve did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _reset(url: str) -> None:
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST")).close()


def _config(tmp_path: Path, url: str, extra: str = "") -> Path:
    path = tmp_path / "fedimg.toml"
    path.write_text(
        f"[general]\ncatalog_url = 'sqlite:///{tmp_path / 'catalog.sqlite'}'\n"
        f"[aws]\ntarget = 'endpoint'\nendpoint_url = '{url}'\nregions = {json.dumps(REGIONS)}\n"
        f"workers = 2\n{extra}"
    )
    return path


def _fedimg(
    args: list[str], config: Path, env: dict[str, str] | None = None, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FEDIMG, *args, "-c", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
        check=False,
        **kwargs,
    )


def _one_ami_per_row(url: str) -> dict[str, int]:
    clients = ClientFactory(
        TargetSpec(target="endpoint", endpoint_url=url, access_key="x", secret_key="x")
    )
    counts: dict[str, int] = {}
    for region in REGIONS:
        for image in clients.ec2(region).describe_images(Owners=["self"])["Images"]:
            tags = {t["Key"]: t["Value"] for t in image.get("Tags", [])}
            key = f"{region}/{tags['fedimg:flavour']}"
            counts[key] = counts.get(key, 0) + 1
            assert image["Public"] is True, key
    return counts


@pytest.mark.slow
@pytest.mark.parametrize(
    "crash_at",
    [
        "mid-upload",
        "after-upload",
        "after-register",
        "after-test",
        "after-replicate",
        "after-publish",
    ],
)
def test_killed_at_any_step_resume_finishes_exactly_once(
    tmp_path: Path, endpoint_process: str, sample_image: SampleImage, crash_at: str
) -> None:
    _reset(endpoint_process)
    script = tmp_path / "test.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    config = _config(tmp_path, endpoint_process, f"test = '{script}'\n")
    killed = _fedimg(
        ["upload", str(sample_image.path), "--progress", "none"],
        config,
        env={"FEDIMG_CRASH_AT": crash_at},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    jobs = json.loads(_fedimg(["jobs", "--json"], config).stdout)
    (job,) = jobs
    assert job["status"] == "running"  # the process died without a word

    resumed = _fedimg(["resume", job["job"], "--json"], config)
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(resumed.stdout)
    assert result["status"] == "published"
    assert len(result["amis"]) == 6
    assert all(a["public"] for a in result["amis"])
    assert _one_ami_per_row(endpoint_process) == {
        f"{r}/{f}": 1 for r in REGIONS for f in ("hvm-ebs-standard", "hvm-ebs-gp2")
    }
    gc = _fedimg(["gc", "--dry-run", "--older-than", "0s", "--json"], config)
    assert gc.returncode == 0, gc.stderr
    assert json.loads(gc.stdout)["orphans"] == []


@pytest.mark.slow
def test_sigterm_interrupts_cleans_up_and_upload_resumes_the_job(
    tmp_path: Path, endpoint_process: str, sample_image: SampleImage
) -> None:
    _reset(endpoint_process)
    marker = tmp_path / "testing"
    script = tmp_path / "slow-test.sh"
    script.write_text(f"#!/bin/sh\ntouch {marker}\nsleep 60\n")
    script.chmod(0o755)
    config = _config(tmp_path, endpoint_process, f"test = '{script}'\n")
    proc = subprocess.Popen(
        [*FEDIMG, "upload", str(sample_image.path), "-c", str(config), "--progress", "none"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert time.monotonic() < deadline, "the test step never started"
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    (job,) = json.loads(_fedimg(["jobs", "--json"], config).stdout)
    assert job["status"] == "interrupted"

    script.write_text("#!/bin/sh\nexit 0\n")
    again = _fedimg(["upload", str(sample_image.path), "--json", "--progress", "none"], config)
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["job"] == job["job"]  # the same job, resumed
    assert len(result["amis"]) == 6
    gc = _fedimg(["gc", "--dry-run", "--older-than", "0s", "--json"], config)
    assert json.loads(gc.stdout)["orphans"] == []


@pytest.mark.slow
def test_partial_success_and_resume_of_failed_regions(
    tmp_path: Path,
    aws: EmbeddedAWS,
    runtime_factory: Callable[[Config], Runtime],
    sample_image: SampleImage,
    clients: ClientFactory,
) -> None:
    config = Config.model_validate(
        {
            "general": {"catalog_url": f"sqlite:///{tmp_path / 'catalog.sqlite'}"},
            "aws": {"regions": REGIONS, "best_effort_regions": ["ap-south-1"]},
        }
    )
    runtime = runtime_factory(config)
    broken = {"on": True}

    def fail_in_ap_south(**kwargs: Any) -> None:
        context = kwargs.get("context") or {}
        if broken["on"] and context.get("client_region") == "ap-south-1":
            raise RuntimeError("injected: ap-south-1 is down")

    runtime.clients.add_hook("before-call.ec2.CopySnapshot", fail_in_ap_south)
    service = runtime.service()
    first = service.publish(PublishRequest(source=resolve_source(str(sample_image.path))))
    assert first.status == "partial"
    assert first.failed_regions == ("ap-south-1",)
    assert {a.region for a in first.amis} == {"us-east-1", "eu-west-1"}
    broken["on"] = False
    assert first.job_id is not None
    second = service.resume(first.job_id, only_failed_regions=True)
    assert second.status == "published", second.error
    assert {a.region for a in second.amis} == set(REGIONS)
    assert len(second.amis) == 6


def test_no_secret_in_output_logs_messages_or_catalog(
    tmp_path: Path,
    aws: EmbeddedAWS,
    sample_image: SampleImage,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from fedimg.cli import main

    access, secret = "AKIAFEDIMGSECRETID01", "fedimg/Secret+Key/ThatMustNeverLeak0001"
    config = tmp_path / "fedimg.toml"
    config.write_text(
        f"[general]\ncatalog_url = 'sqlite:///{tmp_path / 'catalog.sqlite'}'\n"
        f"[aws]\ntarget = 'endpoint'\nendpoint_url = '{aws.endpoint.url}'\n"
        f"access_id = '{access}'\nsecret_key = '{secret}'\nregions = ['us-east-1', 'eu-west-1']\n"
    )
    assert (
        main(
            [
                "upload",
                str(sample_image.path),
                "-c",
                str(config),
                "-v",
                "--json",
                "--progress",
                "json",
            ]
        )
        == 0
    )
    assert main(["config", "show", "-c", str(config)]) == 0
    assert main(["messages", "-c", str(config), "--json"]) == 0
    assert main(["amis", "-c", str(config), "--json"]) == 0
    assert main(["jobs", "-c", str(config), "--json"]) == 0
    out, err = capfd.readouterr()
    for text in (out, err):
        assert secret not in text
        assert access not in text
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    try:
        with catalog.engine.connect() as connection:
            for table in Base.metadata.sorted_tables:
                for row in connection.execute(table.select()):
                    dumped = json.dumps([str(v) for v in row])
                    assert secret not in dumped
                    assert access not in dumped
    finally:
        catalog.close()

#!/usr/bin/env python3
"""Benchmark: fedimg's streaming upload against the limit (decompression) and the peer way.

Usage: bench/upload.py [--size 2G] [--fill 0.3] [--workers N] [--rounds 3]

It makes (and caches in .cache/bench/) a sample image, starts the embedded endpoint as a separate
process (``fedimg embedded serve``), and measures on the same image, ``--rounds`` times each:

- limit: ``xz -dc -T0 image > /dev/null`` (nothing can be faster than unpacking);
- ours:  ``fedimg snapshot image`` (stream → skip zeros → parallel PutSnapshotBlock);
- peer:  what coldsnap and NixOS upload-ami do: unpack to a raw file, then upload every 512 KiB
         block (zeros included) with a thread pool.

It prints median wall times, the ratios ours/limit and peer/ours, blocks written, and fedimg's
peak RSS (of the ``fedimg snapshot`` process, not the endpoint's). Results are also written as
JSON with ``--json FILE``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config as BotoConfig

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 512 * 1024
FEDIMG = [sys.executable, "-m", "fedimg"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_timed(argv: list[str], **kwargs: Any) -> tuple[float, int, bytes]:
    """Run a command; (wall seconds, peak RSS KiB of that process, stdout)."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=kwargs.pop("stdout", subprocess.PIPE), **kwargs)
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed with status {status}")
    return elapsed, int(usage.ru_maxrss), out


class Endpoint:
    """``fedimg embedded serve`` in its own process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [*FEDIMG, "embedded", "serve", "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("the embedded endpoint did not start")

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        urllib.request.urlopen(request, timeout=30).close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def peer_upload(raw: Path, endpoint: str, workers: int) -> int:
    """coldsnap / upload-ami style: every block of an unpacked raw file, zeros included."""
    config = BotoConfig(max_pool_connections=workers + 4, retries={"mode": "standard"})
    ebs = boto3.client(
        "ebs",
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        config=config,
    )
    size = raw.stat().st_size
    blocks = -(-size // BLOCK)
    gib = max(1, -(-size // 1024**3))
    snapshot = ebs.start_snapshot(VolumeSize=gib)["SnapshotId"]

    def put(index: int) -> bytes:
        with raw.open("rb") as handle:
            handle.seek(index * BLOCK)
            data = handle.read(BLOCK).ljust(BLOCK, b"\0")
        digest = hashlib.sha256(data).digest()
        ebs.put_snapshot_block(
            SnapshotId=snapshot,
            BlockIndex=index,
            BlockData=data,
            DataLength=BLOCK,
            Checksum=base64.b64encode(digest).decode(),
            ChecksumAlgorithm="SHA256",
        )
        return digest

    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = list(pool.map(put, range(blocks)))
    aggregate = base64.b64encode(hashlib.sha256(b"".join(digests)).digest()).decode()
    ebs.complete_snapshot(
        SnapshotId=snapshot,
        ChangedBlocksCount=blocks,
        Checksum=aggregate,
        ChecksumAlgorithm="SHA256",
        ChecksumAggregationMethod="LINEAR",
    )
    return blocks


def ensure_image(size: str, fill: float) -> Path:
    cache = ROOT / ".cache" / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    image = cache / f"Fedora-Cloud-Base-Bench-{size}-{fill}.x86_64.raw.xz"
    if not image.exists():
        print(f"making {image.name} (cached for later runs)...", file=sys.stderr)
        subprocess.run(
            [*FEDIMG, "sample-image", str(image), "--size", size, "--fill", str(fill)], check=True
        )
    return image


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", default="2G")
    parser.add_argument("--fill", type=float, default=0.3)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-peer", action="store_true", help="measure limit and ours only")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    image = ensure_image(args.size, args.fill)
    endpoint = Endpoint()
    times: dict[str, list[float]] = {"limit": [], "ours": [], "peer": []}
    rss: list[int] = []
    ours_result: dict[str, Any] = {}
    peer_blocks = 0
    with tempfile.TemporaryDirectory(prefix="fedimg-bench-") as tmp:
        config = Path(tmp) / "bench.toml"
        config.write_text(
            f"[aws]\ntarget = 'endpoint'\nendpoint_url = '{endpoint.url}'\n"
            f"[general]\ncatalog_url = 'sqlite:///{tmp}/catalog.sqlite'\n"
        )
        env = {**os.environ, "FEDIMG_CONFIG": str(config)}
        try:
            for round_ in range(1, args.rounds + 1):
                with open(os.devnull, "wb") as null:
                    seconds, _, _ = run_timed(["xz", "-dc", "-T0", str(image)], stdout=null)
                times["limit"].append(seconds)

                endpoint.reset()
                argv = [*FEDIMG, "snapshot", str(image), "--json", "--progress", "none"]
                argv += ["--workers", str(args.workers), "--quiet"]
                seconds, peak, out = run_timed(argv, env=env)
                times["ours"].append(seconds)
                rss.append(peak)
                ours_result = json.loads(out)

                if not args.skip_peer:
                    endpoint.reset()
                    raw = Path(tmp) / "image.raw"
                    started = time.perf_counter()
                    with raw.open("wb") as handle:
                        subprocess.run(["xz", "-dc", "-T0", str(image)], stdout=handle, check=True)
                    peer_blocks = peer_upload(raw, endpoint.url, args.workers)
                    times["peer"].append(time.perf_counter() - started)
                    raw.unlink()
                    endpoint.reset()
                print(
                    f"round {round_}: limit {times['limit'][-1]:.2f}s  ours {times['ours'][-1]:.2f}s"
                    + (f"  peer {times['peer'][-1]:.2f}s" if times["peer"] else ""),
                    file=sys.stderr,
                )
        finally:
            endpoint.stop()

    median = {k: statistics.median(v) for k, v in times.items() if v}
    results: dict[str, Any] = {
        "image": image.name,
        "size": args.size,
        "fill": args.fill,
        "workers": args.workers,
        "rounds": args.rounds,
        "median_seconds": {k: round(v, 3) for k, v in median.items()},
        "ours_over_limit": round(median["ours"] / median["limit"], 3),
        "peer_over_ours": round(median["peer"] / median["ours"], 3) if "peer" in median else None,
        "blocks_written_ours": ours_result.get("blocks_written"),
        "blocks_zero_skipped_ours": ours_result.get("blocks_zero"),
        "blocks_written_peer": peer_blocks or None,
        "fedimg_peak_rss_mib": round(max(rss) / 1024, 1),
    }
    print(f"image                 {image.name}")
    print(f"limit (xz -dc -T0)    {median['limit']:.2f}s")
    print(f"ours (fedimg)         {median['ours']:.2f}s")
    if "peer" in median:
        print(f"peer (unpack+all)     {median['peer']:.2f}s")
    print(f"ours / limit          {results['ours_over_limit']:.2f}   (target <= 1.25)")
    if results["peer_over_ours"] is not None:
        print(f"peer / ours           {results['peer_over_ours']:.2f}   (target >= 3)")
    print(
        f"blocks written        ours {results['blocks_written_ours']} "
        f"(+{results['blocks_zero_skipped_ours']} zero blocks skipped), "
        f"peer {results['blocks_written_peer']}"
    )
    print(f"fedimg peak RSS       {results['fedimg_peak_rss_mib']} MiB   (target <= 200)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

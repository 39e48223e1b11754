"""CLI commands that operate on jobs and on what they left: ``resume``, ``gc``, ``preflight``.

Kept apart from :mod:`fedimg.cli` (the parser and the publishing commands); ``cli`` registers
these through :func:`add_commands`. Same contract: results on stdout (``--json``), logs on stderr,
exit codes 0 / 1 / 2 / 130.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedimg.config import Config, load_config
from fedimg.errors import EXIT_FAILED, EXIT_OK, InputError

Handler = Callable[[argparse.Namespace], int]
Adder = Callable[[str, Handler, str], argparse.ArgumentParser]


def parse_age(text: str) -> dt.timedelta:
    """``90s``, ``30m``, ``2h``, ``1d`` → timedelta; InputError otherwise."""
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if not match:
        raise InputError(f"--older-than: {text!r} is not an age like 30m, 2h or 1d")
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match[2]]
    return dt.timedelta(**{unit: int(match[1])})


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C: ``stop`` is set (no new regions start) and the main thread
    gets KeyboardInterrupt, so the job cleans up and ends ``interrupted`` (exit 130)."""

    def handler(signum: int, _frame: Any) -> None:
        stop.set()
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _config(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config) if args.config else None)


def _emit(data: Any, as_json: bool, lines: list[str]) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        for line in lines:
            print(line)


def cmd_resume(args: argparse.Namespace) -> int:
    """Continue an unfinished job."""
    from fedimg.runtime import Runtime

    config = _config(args)
    with Runtime(config=config) as runtime:
        print(runtime.spec.describe(), file=sys.stderr)
        service = runtime.service()
        with stop_on_signals(service.stop):
            result = service.resume(args.job, only_failed_regions=args.regions == "failed")
    data = result.to_json()
    _emit(
        data,
        args.json,
        [f"{a['region']:16} {a['flavour']:24} {a['id']}  {a['name']}" for a in data["amis"]]
        + [
            f"job {result.job_id}: {result.status}" + (f" ({result.error})" if result.error else "")
        ],
    )
    return int(result.exit_code)


def cmd_gc(args: argparse.Namespace) -> int:
    """Find (and unless --dry-run, delete) what killed processes left behind."""
    from fedimg.runtime import Runtime
    from fedimg.services.ec2.gc import find_orphans, sweep

    config = _config(args)
    older_than = parse_age(args.older_than)
    with Runtime(config=config) as runtime:
        print(runtime.spec.describe(), file=sys.stderr)
        service = runtime.service()
        regions = args.regions.split(",") if args.regions else service.available_regions()
        orphans = find_orphans(
            clients=runtime.clients,
            catalog=runtime.catalog,
            regions=regions,
            older_than=older_than,
            parallelism=config.aws.parallel_regions,
        )
        failed = (
            []
            if args.dry_run
            else sweep(clients=runtime.clients, catalog=runtime.catalog, orphans=orphans)
        )
    data = {
        "dry_run": args.dry_run,
        "regions": len(regions),
        "orphans": [
            {
                "region": o.region,
                "kind": o.kind,
                "id": o.resource_id,
                "job": o.job_id,
                "age_seconds": o.age_seconds,
                "reason": o.reason,
            }
            for o in orphans
        ],
        "failed": failed,
    }
    verb = "would delete" if args.dry_run else "deleted"
    _emit(
        data,
        args.json,
        [f"{verb} {o.kind} {o.resource_id} in {o.region} ({o.reason})" for o in orphans]
        + [f"{len(orphans)} orphan(s) in {len(regions)} region(s)"],
    )
    return EXIT_FAILED if failed else EXIT_OK


def cmd_preflight(args: argparse.Namespace) -> int:
    """Check every region of the configuration for what would stop a job."""
    from fedimg.runtime import Runtime
    from fedimg.services.ec2.preflight import preflight
    from fedimg.services.ec2.service import PublishRequest
    from fedimg.source import ImageSource

    config = _config(args)
    arch = {"aarch64": "arm64"}.get(args.arch, args.arch)
    probe = ImageSource(
        location="preflight", name="preflight", arch=arch, compression="none", path=None, url=""
    )
    with Runtime(config=config) as runtime:
        print(runtime.spec.describe(), file=sys.stderr)
        service = runtime.service()
        regions_arg = tuple(args.regions.split(",")) if args.regions else None
        regions, flavours = service.plan(PublishRequest(source=probe, regions=regions_arg))
        checks = preflight(
            clients=runtime.clients, config=config, regions=regions, flavours=flavours, arch=arch
        )
    data = [
        {
            "region": c.region,
            "opt_in": c.opt_in,
            "block_public_access": c.block_public_access,
            "encryption_by_default": c.encryption_by_default,
            "aki": c.aki,
            "bucket": c.bucket,
            "problems": list(c.problems),
        }
        for c in checks
    ]
    header = f"{'region':16} {'opt-in':22} {'block public':18} {'ebs encryption':15} problems"
    rows = [
        f"{c.region:16} {c.opt_in:22} {c.block_public_access:18} "
        f"{c.encryption_by_default:15} {'; '.join(c.problems) or 'ok'}"
        for c in checks
    ]
    _emit(data, args.json, [header, *rows])
    return EXIT_OK if all(c.ok for c in checks) else EXIT_FAILED


def add_commands(add: Adder) -> None:
    """Register ``resume``, ``gc`` and ``preflight`` on the CLI's parser."""
    resume = add("resume", cmd_resume, "continue an unfinished job (nothing done is redone)")
    resume.add_argument("job", help="job id (or a unique prefix of 8+ characters)")
    resume.add_argument(
        "--regions", choices=["failed"], help="'failed': redo only the regions a partial job missed"
    )
    resume.add_argument("--json", action="store_true")

    gc = add("gc", cmd_gc, "remove fedimg-tagged resources that killed processes left behind")
    gc.add_argument("--older-than", default="2h", help="minimum age (default 2h; 30m, 1d...)")
    gc.add_argument("--dry-run", action="store_true", help="list, delete nothing")
    gc.add_argument("--regions", help="comma-separated regions (default: every region)")
    gc.add_argument("--json", action="store_true")

    check = add("preflight", cmd_preflight, "check every region before publishing")
    check.add_argument("--regions", help="comma-separated regions (default: from the config)")
    check.add_argument("--arch", default="x86_64", help="architecture of the image (x86_64)")
    check.add_argument("--json", action="store_true")

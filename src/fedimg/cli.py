"""The ``fedimg`` command line: ``main(argv) -> int``, the only place that configures logging.

Exit codes: 0 ok; 1 the work failed; 2 bad input or configuration; 130 interrupted.
Results go to stdout (a table, or one JSON object with ``--json``); progress and logs to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedimg import __version__
from fedimg.cli_jobs import add_commands, stop_on_signals
from fedimg.config import Config, aws_arch, fallback_config, load_config, load_config_file
from fedimg.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    ConfigError,
    FedimgError,
    InputError,
)
from fedimg.progress import JsonLinesProgress, NullProgress, Progress, RichProgress

if TYPE_CHECKING:
    from fedimg.runtime import Runtime

log = logging.getLogger("fedimg")

Handler = Callable[[argparse.Namespace], int]


def _progress(choice: str) -> Progress:
    if choice == "json":
        return JsonLinesProgress()
    if choice == "rich" or (choice == "auto" and sys.stderr.isatty()):
        return RichProgress()
    return NullProgress()


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def _load(args: argparse.Namespace) -> Config:
    config = load_config(Path(args.config) if args.config else None)
    origin = str(config.source) if config.source else "built-in defaults"
    log.debug("configuration: %s", origin)
    return config


def _runtime(config: Config) -> Runtime:
    from fedimg.runtime import Runtime

    runtime = Runtime(config=config)
    print(runtime.spec.describe(), file=sys.stderr)
    return runtime


# --- commands ------------------------------------------------------------------------------------


def cmd_upload(args: argparse.Namespace) -> int:
    """Publish an image: upload, register, test, replicate, make public."""
    from fedimg.services.ec2.service import PublishRequest
    from fedimg.source import resolve_source

    try:
        config = _load(args)
    except ConfigError as exc:
        _announce_rejection(args, fallback_config(args.config), exc)
        raise
    overrides: dict[str, Any] = {}
    if args.method:
        overrides["upload_method"] = args.method
    if args.before_upload:
        if not config.aws.test:
            error = ConfigError("--before-upload: no test script is configured ([aws] test)")
            _announce_rejection(args, config, error)
            raise error
        overrides["test_before_upload"] = True
    if overrides:
        config = config.model_copy(update={"aws": config.aws.model_copy(update=overrides)})
    try:
        source = resolve_source(args.source, arch=args.arch)
        expected = _expected_sha256(args, source.location)
    except FedimgError as exc:
        _announce_rejection(args, config, exc)
        raise
    regions = _split(args.regions)
    flavours = _split(args.flavours)
    with _runtime(config) as runtime:
        service = runtime.service(progress=_progress(args.progress))
        with stop_on_signals(service.stop):
            result = service.publish(
                PublishRequest(
                    source=source,
                    compose_id=args.compose_id,
                    release=args.release,
                    regions=regions,
                    flavours=flavours,
                    expected_sha256=expected,
                    workers=args.workers,
                )
            )
    if args.json:
        _print_json(result.to_json())
    else:
        _print_ami_table(result.to_json()["amis"])
        if result.error:
            print(f"fedimg: {result.error}", file=sys.stderr)
        else:
            print(
                f"published {len(result.amis)} AMIs in "
                f"{len({a.region for a in result.amis})} regions (job {result.job_id})",
                file=sys.stderr,
            )
    return int(result.exit_code)


def _split(value: str | None) -> tuple[str, ...] | None:
    if not value:
        return None
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _expected_sha256(args: argparse.Namespace, location: str) -> str | None:
    from fedimg.source import normalise_sha256, parse_checksum_file

    expected = normalise_sha256(args.sha256) if args.sha256 else None
    if args.checksum_file:
        try:
            text = Path(args.checksum_file).read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise InputError(f"{args.checksum_file}: cannot read: {exc.strerror}") from exc
        file_name = Path(location).name
        found = parse_checksum_file(text, file_name)
        if found is None:
            raise InputError(f"{args.checksum_file}: no SHA256 line for {file_name}")
        if expected and expected != found:
            raise InputError(f"--sha256 and {args.checksum_file} disagree for {file_name}")
        expected = found
    return expected


def _announce_rejection(args: argparse.Namespace, config: Config, error: FedimgError) -> None:
    """Bad input still gets a ``failed`` message and a failed job in the catalog (no AWS needed)."""
    from fedimg.catalog import Catalog
    from fedimg.events import ImageInfo
    from fedimg.messages import Messenger
    from fedimg.services.ec2.service import record_rejection

    name = Path(args.source.rstrip("/")).name
    for suffix in (".raw.xz", ".raw.gz", ".raw.zst", ".raw"):
        name = name.removesuffix(suffix)
    image = ImageInfo(
        name=name or args.source,
        url=args.source,
        arch=args.arch or "unknown",
        compose_id=args.compose_id,
        release=args.release,
    )
    try:
        catalog = Catalog(config.catalog_url())
    except Exception as exc:  # the catalog itself is unusable: the error line is all we can give
        log.warning("cannot record the failure in the catalog: %s", exc)
        return
    try:
        messenger = Messenger(catalog=catalog, topic_prefix=config.messaging.topic_prefix)
        record_rejection(
            catalog=catalog, messenger=messenger, config=config, image=image, error=error
        )
    finally:
        catalog.close()


def _print_ami_table(amis: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=None, box=None)
    for column in ("region", "flavour", "id", "name", "public", "snapshot_id"):
        table.add_column(column)
    for ami in amis:
        table.add_row(
            ami["region"],
            ami.get("flavour") or "",
            ami["id"],
            ami["name"],
            "public" if ami["public"] else ("shared" if ami.get("encrypted") else "private"),
            ami.get("snapshot_id") or "",
        )
    Console(file=sys.stdout, width=200).print(table)


def cmd_snapshot(args: argparse.Namespace) -> int:
    """Upload an image into one snapshot only."""
    import hashlib

    from fedimg.services.ec2.upload_direct import DirectUploadRequest, upload_direct
    from fedimg.source import normalise_sha256, resolve_source

    config = _load(args)
    source = resolve_source(args.source, arch=args.arch or "x86_64")
    region = args.region or config.base_region()
    expected = normalise_sha256(args.sha256) if args.sha256 else None
    with _runtime(config) as runtime:
        clients = runtime.clients
        token = hashlib.sha256(f"snapshot:{source.url}:{os.getpid()}".encode()).hexdigest()[:64]
        result = upload_direct(
            request=DirectUploadRequest(
                source=source,
                region=region,
                client_token=token,
                tags={"fedimg:role": "snapshot", "Name": source.name},
                description=f"{source.name}, uploaded by fedimg",
                workers=args.workers or config.aws.workers,
                volume_size_gib=config.aws.volume_size,
                expected_sha256=expected,
            ),
            ebs=clients.ebs(region),
            ec2=clients.ec2(region),
            progress=_progress(args.progress),
        )
    data = {
        "snapshot_id": result.snapshot_id,
        "region": result.region,
        "volume_size_gib": result.volume_size_gib,
        "blocks_total": result.blocks_total,
        "blocks_written": result.blocks_written,
        "blocks_zero": result.blocks_zero,
        "bytes_raw": result.bytes_raw,
        "sha256_raw": result.sha256_raw,
        "sha256_compressed": result.sha256_compressed,
        "seconds": result.seconds,
    }
    if args.json:
        _print_json(data)
    else:
        for key, value in data.items():
            print(f"{key:18} {value}")
    return EXIT_OK


def cmd_verify_snapshot(args: argparse.Namespace) -> int:
    """Compare a snapshot with an image, block by block."""
    from fedimg.services.ec2.verify import verify_snapshot
    from fedimg.source import resolve_source

    config = _load(args)
    source = resolve_source(args.source, arch=args.arch or "x86_64")
    region = args.region or config.base_region()
    with _runtime(config) as runtime:
        result = verify_snapshot(
            ebs=runtime.clients.ebs(region),
            region=region,
            snapshot_id=args.snapshot_id,
            source=source,
        )
    data = {
        "snapshot_id": result.snapshot_id,
        "region": result.region,
        "identical": result.identical,
        "blocks_compared": result.blocks_compared,
        "blocks_in_snapshot": result.blocks_in_snapshot,
        "mismatched_blocks": list(result.mismatched_blocks[:100]),
        "extra_blocks": list(result.extra_blocks[:100]),
        "sha256_raw": result.sha256_raw,
    }
    if args.json:
        _print_json(data)
    else:
        verdict = "identical" if result.identical else "DIFFERENT"
        print(f"{result.snapshot_id}: {verdict} ({result.blocks_compared} blocks compared)")
    return EXIT_OK if result.identical else EXIT_FAILED


def cmd_amis(args: argparse.Namespace) -> int:
    """List AMIs from the catalog, newest first; with --latest, the newest released AMI per arch,
    region and flavour (the same answer as the web API's /api/v1/amis/latest)."""
    import datetime as dt

    from fedimg.catalog import AmiFilter, Catalog

    config = _load(args)
    catalog = Catalog(config.catalog_url())
    filters = AmiFilter(
        image_name=args.image,
        region=args.region,
        arch=aws_arch(args.arch),
        release=args.release,
        flavour=args.flavour,
    )
    try:
        if args.latest:
            # Only published jobs' AMIs, neither deleted nor kept after a failed test.
            rows = catalog.latest_amis(filters)
        else:
            rows = [r for r in catalog.amis(filters) if r.state != "deleted"]
    finally:
        catalog.close()
    data = [
        {
            "region": r.region,
            "id": r.ami_id,
            "name": r.name,
            "image": r.image_name,
            "release": r.release,
            "arch": r.arch,
            "flavour": r.flavour,
            "virtualization": r.virtualization,
            "storage": r.storage,
            "volume_type": r.volume_type,
            "encrypted": r.encrypted,
            "public": r.public,
            "snapshot_id": r.snapshot_id,
            "state": r.state,
            "job": r.job_id,
            # SQLite hands back naive datetimes; they were written as UTC.
            "created_at": r.created_at.replace(tzinfo=r.created_at.tzinfo or dt.UTC).isoformat(),
        }
        for r in rows
    ]
    if args.json:
        _print_json(data)
    else:
        _print_ami_table(data)
    return EXIT_OK


def cmd_messages(args: argparse.Namespace) -> int:
    """List journal messages, newest first (or the outbox with --pending; deliver it with --flush)."""
    from fedimg.catalog import Catalog

    config = _load(args)
    if args.flush:
        return _flush_outbox(config, as_json=args.json)
    catalog = Catalog(config.catalog_url())
    try:
        if args.pending:
            rows = catalog.pending_messages(limit=args.limit)
        else:
            topics = list(args.topic or [])
            prefix = config.messaging.topic_prefix
            topics = [t if t.startswith(prefix) else f"{prefix}.{t}" for t in topics]
            rows, _total = catalog.messages(topics=topics, limit=args.limit)
    finally:
        catalog.close()
    data: list[dict[str, Any]] = [
        {
            "msg_id": r.msg_id,
            "topic": r.topic,
            "timestamp": r.timestamp,
            "delivered": r.delivered_at is not None,
            "body": r.body,
        }
        for r in rows
    ]
    if args.json:
        _print_json(data)
    else:
        for item in data:
            body = item["body"]
            status = body.get("status", "")
            extra = body.get("extra", {})
            print(
                f"{item['timestamp']:.3f} {item['topic']} {status} "
                f"{body.get('destination', '')} {extra.get('id', '')}".rstrip()
            )
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    """List jobs, newest first."""
    from fedimg.catalog import Catalog

    config = _load(args)
    catalog = Catalog(config.catalog_url())
    try:
        jobs = catalog.jobs(limit=args.limit, status=args.status)
    finally:
        catalog.close()
    data = [
        {
            "job": j.id,
            "image": j.image_name,
            "status": j.status,
            "step": j.step,
            "compose_id": j.compose_id,
            "created_at": j.created_at.isoformat(),
            "error": j.error,
        }
        for j in jobs
    ]
    if args.json:
        _print_json(data)
    else:
        for item in data:
            print(f"{item['job']}  {item['status']:11} {item['image']}  {item['created_at']}")
    return EXIT_OK


def cmd_sample_image(args: argparse.Namespace) -> int:
    """Write a realistic sample disk image."""
    from fedimg.sampleimage import parse_size, write_sample_image

    try:
        size = parse_size(args.size)
    except ValueError as exc:
        print(f"fedimg: --size: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    image = write_sample_image(Path(args.path), size_bytes=size, fill=args.fill, seed=args.seed)
    data = {
        "path": str(image.path),
        "size_bytes": image.size_bytes,
        "sha256_raw": image.sha256_raw,
        "sha256_compressed": image.sha256_compressed,
        "data_bytes": image.data_bytes,
    }
    if args.json:
        _print_json(data)
    else:
        print(image.path)
    return EXIT_OK


def cmd_config_show(args: argparse.Namespace) -> int:
    """Show the effective configuration, secrets masked."""
    config = _load(args)
    data = {"source": str(config.source) if config.source else None, **config.masked()}
    _print_json(data)
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    """Validate a configuration file."""
    config = load_config_file(Path(args.file))
    print(f"{args.file}: ok ({len(config.aws.amis)} AMI-list entries, target {config.aws.target})")
    return EXIT_OK


def cmd_embedded_serve(args: argparse.Namespace) -> int:
    """Run the embedded AWS endpoint in the foreground."""
    from fedimg.embedded import serve_forever

    serve_forever(host=args.host, port=args.port)
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the dashboard, the JSON API and the datagrepper-compatible /raw (read-only)."""
    from fedimg.web.server import serve

    if not 0 <= args.port <= 65535:
        raise InputError(f"--port {args.port}: not a port number")
    config = _load(args)
    serve(config, host=args.host, port=args.port, root_path=args.root_path.rstrip("/"))
    return EXIT_OK


def _flush_outbox(config: Config, *, as_json: bool) -> int:
    from fedimg.runtime import Runtime

    with Runtime(config=config) as runtime:
        messenger = runtime.messenger
        if not messenger.publishers:
            print("fedimg: no publisher besides the journal is configured", file=sys.stderr)
        result = messenger.flush_outbox()
    data = {
        "delivered": result.delivered,
        "pending": result.pending,
        "undeliverable": result.undeliverable,
    }
    if as_json:
        _print_json(data)
    else:
        print(f"delivered {result.delivered}, waiting {result.pending}")
    return EXIT_OK if result.pending == 0 else EXIT_FAILED


def cmd_consume(args: argparse.Namespace) -> int:
    """Upload the images of every compose Pungi announces as finished (the AMQP trigger)."""
    import threading

    from fedimg.consumer import run_consumer

    config = _load(args)
    stop = threading.Event()
    with _runtime(config) as runtime, stop_on_signals(stop):
        consumer = run_consumer(runtime, max_messages=1 if args.once else None, stop=stop)
    failed = [
        outcome
        for handled in consumer.history
        for outcome in handled.outcomes
        if outcome.status not in ("published", "partial")
    ]
    return EXIT_FAILED if failed else EXIT_OK


def cmd_trigger(args: argparse.Namespace) -> int:
    """Publish one image (-u URL -c COMPOSE_ID) or a compose's images (--compose), like fedimg's
    trigger_upload/partial_upload scripts."""
    import threading

    from fedimg.compose import load_compose
    from fedimg.trigger import ImageJob, plan_images, publish_images, restrict_volume_type

    config = _load(args)
    if args.volume:
        config = restrict_volume_type(config, args.volume)
    if not args.push_notifications:
        # fedimg's scripts sent to the bus only with -p; the journal records the messages anyway.
        journal_only = config.messaging.model_copy(update={"publishers": ["journal"]})
        config = config.model_copy(update={"messaging": journal_only})
    if args.compose:
        compose = load_compose(args.compose, config.compose, compose_id=args.compose_id)
        if not compose.images:
            raise InputError(f"{args.compose}: no image matches the [compose] selection")
        jobs = [
            ImageJob.from_compose(image, compose_id=compose.compose_id, release=compose.release)
            for image in compose.images
        ]
    elif args.url and args.compose_id:
        jobs = [ImageJob(url=args.url, compose_id=args.compose_id)]
    else:
        raise InputError("give -u URL and -c COMPOSE_ID, or --compose URL_OR_PATH")
    stop = threading.Event()
    with _runtime(config) as runtime:
        if args.dry_run:
            plans = plan_images(runtime, jobs)
        else:
            with stop_on_signals(stop):
                outcomes = publish_images(runtime, jobs, stop=stop)
    if args.dry_run:
        if args.json:
            _print_json(plans)
        for plan in [] if args.json else plans:
            if "error" in plan:
                print(f"{plan['url']}: {plan['error']}")
                continue
            print(
                f"{plan['image']} ({plan['arch']}, compose {plan['compose_id']}): "
                f"{', '.join(plan['flavours'])} in {len(plan['regions'])} regions "
                f"({', '.join(plan['regions'])})"
            )
        return EXIT_BAD_INPUT if any("error" in plan for plan in plans) else EXIT_OK
    if args.json:
        _print_json([outcome.to_json() for outcome in outcomes])
    else:
        for outcome in outcomes:
            print(f"{outcome.status:9} {outcome.job_id or '-'} {outcome.url} {outcome.error or ''}")
    return next((o.exit_code for o in outcomes if o.exit_code), EXIT_OK)


# --- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", help="configuration file (TOML or legacy INI)")
    common.add_argument("--verbose", "-v", action="count", default=0, help="more logging")
    common.add_argument("--quiet", "-q", action="store_true", help="errors only")

    parser = argparse.ArgumentParser(
        prog="fedimg",
        description="Turn a cloud image into tested, public AMIs in every EC2 region.",
        epilog="Exit codes: 0 ok, 1 failed, 2 bad input or config, 130 interrupted.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"fedimg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        command.set_defaults(handler=handler)
        return command

    def progress_option(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--progress",
            choices=["auto", "rich", "json", "none"],
            default="auto",
            help="progress on stderr: a bar on terminals (auto), JSON lines, or none",
        )

    upload = add("upload", cmd_upload, "publish an image to EC2 (upload, test, copy, publish)")
    upload.add_argument("source", help="path or http(s) URL of a .raw.xz (or .raw) image")
    upload.add_argument("--compose-id", help="compose id, for messages and the catalog")
    upload.add_argument("--release", help="release (e.g. 41), for the catalog")
    upload.add_argument("--regions", help="comma-separated regions (default: from the config)")
    upload.add_argument("--flavours", help="comma-separated AMI rows, e.g. hvm-ebs-gp3")
    upload.add_argument("--sha256", help="expected SHA-256 of the file as stored")
    upload.add_argument("--checksum-file", help="pungi CHECKSUM file to verify against")
    upload.add_argument("--arch", help="architecture (default: from the file name)")
    upload.add_argument("--workers", type=int, help="PutSnapshotBlock workers")
    upload.add_argument(
        "--method",
        choices=["direct", "utility"],
        help="how the image becomes a snapshot: EBS direct APIs, or a utility instance that "
        "writes it onto a volume (default: [aws] upload_method)",
    )
    upload.add_argument(
        "--before-upload",
        action="store_true",
        help="boot the source image under QEMU and run the test script in it first; upload "
        "only if it passes (default: [aws] test_before_upload)",
    )
    upload.add_argument("--json", action="store_true", help="print one JSON object")
    progress_option(upload)

    snapshot = add("snapshot", cmd_snapshot, "upload an image into one EBS snapshot only")
    snapshot.add_argument("source", help="path or URL of the image")
    snapshot.add_argument("--region", help="region (default: the base region)")
    snapshot.add_argument("--workers", type=int, help="PutSnapshotBlock workers")
    snapshot.add_argument("--sha256", help="expected SHA-256 of the file as stored")
    snapshot.add_argument("--arch", help="architecture tag (default x86_64)")
    snapshot.add_argument("--json", action="store_true", help="print one JSON object")
    progress_option(snapshot)

    verify = add("verify-snapshot", cmd_verify_snapshot, "compare a snapshot with an image")
    verify.add_argument("snapshot_id")
    verify.add_argument("source", help="path or URL of the image")
    verify.add_argument("--region", help="region (default: the base region)")
    verify.add_argument("--arch", help=argparse.SUPPRESS)
    verify.add_argument("--json", action="store_true", help="print one JSON object")

    amis = add("amis", cmd_amis, "list AMIs from the catalog, newest first")
    amis.add_argument("--image", help="image name")
    amis.add_argument("--region")
    amis.add_argument("--release")
    amis.add_argument("--arch")
    amis.add_argument("--flavour")
    amis.add_argument("--latest", action="store_true", help="only the newest per region+flavour")
    amis.add_argument("--json", action="store_true")

    messages = add("messages", cmd_messages, "list journal messages, newest first")
    messages.add_argument("--topic", action="append", help="topic (repeatable)")
    messages.add_argument("--pending", action="store_true", help="only messages not delivered")
    messages.add_argument(
        "--flush", action="store_true", help="deliver the outbox now, in order (1: some wait)"
    )
    messages.add_argument("--limit", type=int, default=100)
    messages.add_argument("--json", action="store_true")

    consume = add("consume", cmd_consume, "upload every compose Pungi announces as finished")
    consume.add_argument("--once", action="store_true", help="handle one message, then exit")

    # `trigger` keeps the short options of fedimg's trigger scripts (-c compose id, -v volume).
    common_long = argparse.ArgumentParser(add_help=False)
    common_long.add_argument("--config", help="configuration file (TOML or legacy INI)")
    common_long.add_argument("--verbose", action="count", default=0, help="more logging")
    common_long.add_argument("--quiet", "-q", action="store_true", help="errors only")
    trigger_help = "publish one image by URL, or every selected image of a compose"
    trigger = sub.add_parser(
        "trigger", parents=[common_long], help=trigger_help, description=trigger_help
    )
    trigger.set_defaults(handler=cmd_trigger)
    trigger.add_argument("-u", "--url", help="URL (or path) of one .raw.xz image")
    trigger.add_argument("-c", "--compose-id", help="compose id of the image")
    trigger.add_argument(
        "--compose", metavar="URL_OR_PATH", help="a compose (its compose/ dir or images.json)"
    )
    trigger.add_argument(
        "-p",
        "--push-notifications",
        action="store_true",
        help="send the messages to the configured publishers (without: journal only)",
    )
    trigger.add_argument(
        "-v",
        "--volume",
        "--volume-type",
        dest="volume",
        metavar="VOLUME_TYPE",
        help="partial upload: only the flavours with this volume type",
    )
    trigger.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    trigger.add_argument("--json", action="store_true", help="print JSON")

    jobs = add("jobs", cmd_jobs, "list jobs, newest first")
    jobs.add_argument("--status")
    jobs.add_argument("--limit", type=int, default=50)
    jobs.add_argument("--json", action="store_true")

    add_commands(add)

    sample = add("sample-image", cmd_sample_image, "write a realistic sample disk image")
    sample.add_argument("path", help="output path (.raw.xz compresses, .raw does not)")
    sample.add_argument("--size", default="2G", help="disk size (default 2G)")
    sample.add_argument("--fill", type=float, default=0.3, help="fraction of real data (0.3)")
    sample.add_argument("--seed", type=int, default=0, help="seed for the file selection")
    sample.add_argument("--json", action="store_true")

    config = sub.add_parser("config", help="show or check the configuration")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION")
    show = config_sub.add_parser("show", parents=[common], help="effective config, secrets masked")
    show.set_defaults(handler=cmd_config_show)
    check = config_sub.add_parser("check", parents=[common], help="validate a config file")
    check.add_argument("file")
    check.set_defaults(handler=cmd_config_check)

    embedded = sub.add_parser("embedded", help="the embedded AWS endpoint")
    embedded_sub = embedded.add_subparsers(dest="embedded_command", metavar="ACTION")
    serve = embedded_sub.add_parser("serve", parents=[common], help="run it in the foreground")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=5000)
    serve.set_defaults(handler=cmd_embedded_serve)

    web = add("serve", cmd_serve, "serve the dashboard, JSON API and /raw (read-only)")
    web.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    web.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    web.add_argument(
        "--root-path", default="", help="URL prefix when served behind a proxy, e.g. /fedimg"
    )
    return parser


def configure_logging(verbose: int, quiet: bool) -> None:
    """Logs to stderr (the journal picks them up under systemd)."""
    level = logging.ERROR if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries' chatter stays out unless asked for.
    for noisy in ("botocore", "boto3", "urllib3", "werkzeug", "moto", "twisted", "pika"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose > 1 else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if exc.code in (0, None) else EXIT_BAD_INPUT
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    configure_logging(getattr(args, "verbose", 0), getattr(args, "quiet", False))
    try:
        return handler(args)
    except FedimgError as exc:
        print(f"fedimg: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fedimg: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

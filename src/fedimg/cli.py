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
from fedimg.config import Config, fallback_config, load_config, load_config_file
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
    """List AMIs from the catalog, newest first."""
    from fedimg.catalog import AmiFilter, Catalog

    config = _load(args)
    catalog = Catalog(config.catalog_url())
    try:
        rows = catalog.amis(
            AmiFilter(
                image_name=args.image,
                region=args.region,
                arch=_aws_arch(args.arch),
                release=args.release,
                flavour=args.flavour,
            )
        )
    finally:
        catalog.close()
    rows = [r for r in rows if r.state != "deleted"]
    if args.latest:
        latest: dict[tuple[str, str], Any] = {}
        for row in rows:
            latest.setdefault((row.region, row.flavour), row)
        rows = list(latest.values())
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
            "created_at": r.created_at.isoformat(),
        }
        for r in rows
    ]
    if args.json:
        _print_json(data)
    else:
        _print_ami_table(data)
    return EXIT_OK


def _aws_arch(arch: str | None) -> str | None:
    return {"aarch64": "arm64"}.get(arch, arch) if arch else None


def cmd_messages(args: argparse.Namespace) -> int:
    """List journal messages, newest first (or the outbox with --pending)."""
    from fedimg.catalog import Catalog

    config = _load(args)
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
    messages.add_argument("--limit", type=int, default=100)
    messages.add_argument("--json", action="store_true")

    jobs = add("jobs", cmd_jobs, "list jobs, newest first")
    jobs.add_argument("--status")
    jobs.add_argument("--limit", type=int, default=50)
    jobs.add_argument("--json", action="store_true")

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
    for noisy in ("botocore", "boto3", "urllib3", "werkzeug", "moto"):
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

"""Pungi composes: find a compose's images.json, read it with productmd, pick the images to publish.

A compose location is the URL (or local path) of its ``compose/`` directory, as Pungi's
``pungi.compose.status.change`` message gives it; its images are listed in
``<location>/metadata/images.json`` (``payload.images.<Variant>.<arch>[]``). Where the AWS images
live changed over the years, and selection does not depend on it: images are picked by ``type``,
``subvariant`` and architecture in every variant (``CloudImages`` up to F27, ``Cloud`` and
``AtomicHost`` in F28, ``Cloud`` since), optionally restricted to named variants.

Every problem (unreachable, missing, not productmd metadata) is a :class:`ComposeError` whose
message names the URL or path.
"""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedimg.config import ComposeSettings
from fedimg.errors import InputError

log = logging.getLogger(__name__)

METADATA_PATH = "metadata/images.json"
#: ``Fedora-40-20240414.0``, ``Fedora-Cloud-40-20240414.0``, ``Fedora-Rawhide-20240101.n.0``
_COMPOSE_RELEASE = re.compile(r"^[A-Za-z]+(?:-[A-Za-z]+)*?-(?P<release>\d+|Rawhide)-\d{8}")


class ComposeError(InputError):
    """The compose's metadata cannot be had or read."""


@dataclass(frozen=True)
class ComposeImage:
    """One image of a compose, as images.json describes it; ``url`` is where to read it."""

    variant: str
    arch: str
    subvariant: str
    type: str
    format: str
    path: str
    url: str
    sha256: str | None
    size: int | None

    @property
    def file_name(self) -> str:
        """The image's file name."""
        return self.path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Compose:
    """A compose's identity and the images selected from it."""

    compose_id: str
    location: str
    release: str | None
    images: tuple[ComposeImage, ...]


def release_from_compose_id(compose_id: str) -> str | None:
    """``Fedora-40-20240414.0`` → ``"40"``; ``Fedora-Rawhide-20240101.n.0`` → ``"Rawhide"``."""
    match = _COMPOSE_RELEASE.match(compose_id)
    return match["release"] if match else None


def _is_url(location: str) -> bool:
    return urllib.parse.urlparse(location).scheme in ("http", "https")


def _join(location: str, relative: str) -> str:
    if _is_url(location):
        return location.rstrip("/") + "/" + relative
    return str(Path(location) / relative)


def _local_path(location: str) -> Path:
    parsed = urllib.parse.urlparse(location)
    return Path(urllib.parse.unquote(parsed.path)) if parsed.scheme == "file" else Path(location)


def _read_local(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ComposeError(f"{path}: cannot read: {exc.strerror}") from exc


def _read_url(
    url: str, *, timeout: float, attempts: int, sleep: Callable[[float], None]
) -> str | None:
    """The body at ``url``; None for a 404. Other failures are retried ``attempts`` times."""
    delay = 1.0
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                data: bytes = response.read()
                return data.decode("utf-8")
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 410):
                return None
            reason = f"HTTP {exc.code}"
            if 400 <= exc.code < 500:
                raise ComposeError(f"{url}: {reason}") from exc
        except (urllib.error.URLError, OSError, UnicodeDecodeError) as exc:
            reason = str(getattr(exc, "reason", exc))
        if attempt == attempts:
            raise ComposeError(f"{url}: {reason} (after {attempts} attempts)")
        log.warning("%s: %s; trying again in %.0fs", url, reason, delay)
        sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")  # pragma: no cover


def _read(target: str, settings: ComposeSettings, sleep: Callable[[float], None]) -> str | None:
    """The text at a URL or path; None when there is nothing there."""
    if _is_url(target):
        return _read_url(
            target,
            timeout=settings.metadata_timeout,
            attempts=settings.metadata_attempts,
            sleep=sleep,
        )
    return _read_local(_local_path(target))


def find_metadata(
    location: str, settings: ComposeSettings, *, sleep: Callable[[float], None] = time.sleep
) -> tuple[str, str]:
    """(compose location, images.json text) for a location a user or a message gave.

    ``location`` is the compose's ``compose/`` directory (what Pungi announces), the compose's top
    directory (``compose/`` is tried under it), or the images.json file itself.
    """
    if location.endswith(".json"):
        text = _read(location, settings, sleep)
        if text is None:
            raise ComposeError(f"{location}: no such compose metadata")
        if _is_url(location):
            return location.rsplit("/", 2)[0], text
        return str(_local_path(location).parent.parent), text
    location = location.rstrip("/") or "/"
    for candidate in (location, _join(location, "compose")):
        text = _read(_join(candidate, METADATA_PATH), settings, sleep)
        if text is not None:
            return candidate, text
    raise ComposeError(f"{_join(location, METADATA_PATH)}: the compose has no image metadata")


def parse_images(text: str, *, origin: str) -> Any:
    """The productmd ``Images`` of an images.json text; ComposeError if it is not one."""
    import productmd.images

    images = productmd.images.Images()
    try:
        images.deserialize(json.loads(text))
    except Exception as exc:  # productmd raises ValueError, KeyError, TypeError, ... for bad input
        raise ComposeError(f"{origin}: not productmd image metadata: {exc}") from exc
    return images


def select_images(images: Any, *, location: str, settings: ComposeSettings) -> list[ComposeImage]:
    """The images ``settings`` asks for, ordered by variant, arch and path; each path once."""
    selected: dict[str, ComposeImage] = {}
    for variant in sorted(images.images):
        if settings.variants is not None and variant not in settings.variants:
            continue
        for arch in sorted(images.images[variant]):
            for image in sorted(images.images[variant][arch], key=lambda i: str(i.path)):
                found = _describe(image, variant=variant, location=location)
                if (
                    found.type in settings.image_types
                    and found.subvariant in settings.subvariants
                    and found.arch in settings.arches
                ):
                    selected.setdefault(found.path, found)
    return list(selected.values())


def _describe(image: Any, *, variant: str, location: str) -> ComposeImage:
    checksums = image.checksums if isinstance(image.checksums, dict) else {}
    sha256 = checksums.get("sha256")
    return ComposeImage(
        variant=variant,
        arch=str(image.arch),
        subvariant=str(image.subvariant or ""),
        type=str(image.type),
        format=str(image.format),
        path=str(image.path),
        url=_join(location, str(image.path)),
        sha256=str(sha256).lower() if sha256 else None,
        size=image.size if isinstance(image.size, int) else None,
    )


def load_compose(
    location: str,
    settings: ComposeSettings,
    *,
    compose_id: str | None = None,
    release: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Compose:
    """Fetch and read a compose's metadata and select its images.

    ``compose_id`` and ``release`` (from the Pungi message, when there is one) win over what the
    metadata says; the release otherwise comes from the compose id.
    """
    base, text = find_metadata(location, settings, sleep=sleep)
    images = parse_images(text, origin=_join(base, METADATA_PATH))
    metadata_id = str(images.compose.id or "")
    if compose_id and metadata_id and compose_id != metadata_id:
        log.warning(
            "%s: the message says compose %s, the metadata %s", base, compose_id, metadata_id
        )
    the_id = compose_id or metadata_id
    if not the_id:
        raise ComposeError(f"{_join(base, METADATA_PATH)}: no compose id")
    the_release = release if release and (release.isdigit() or release == "Rawhide") else None
    return Compose(
        compose_id=the_id,
        location=base,
        release=the_release or release_from_compose_id(the_id),
        images=tuple(select_images(images, location=base, settings=settings)),
    )

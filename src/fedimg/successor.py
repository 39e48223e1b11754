"""The successor's per-image summary message, and what it needs: release and subvariant.

Fedora's successor to fedimg announces each published image once, with every region's AMI:
``fedora_image_uploader.published.v1.aws.<subvariant>.<release>.<arch>`` (schema
``AwsPublishedV1`` of ``fedora-image-uploader-messages``). fedimg sends the same message when a job
ends published or partial, so scripts written for either tool find fedimg's AMIs.

Its body needs the release as a number and the compose subvariant. The consumer knows both from the
compose metadata; for a manual upload they are read from the image name (Fedora's names carry
them: ``Fedora-Cloud-Base-AmazonEC2.x86_64-41-1.4``, ``Fedora-AtomicHost-28-1.1.x86_64``). When
neither says, the summary is skipped with a log line: a guessed release would mislead scripts.
"""

from __future__ import annotations

import logging
import re
import uuid

from fedimg.events import JobFinished
from fedimg.messages import OutgoingMessage

log = logging.getLogger(__name__)

#: The schema name fedora-messaging registers ``AwsPublishedV1`` under.
SUCCESSOR_SCHEMA = "fedora_image_uploader.published.v1.aws"

#: ``Fedora-<Subvariant words>[-AmazonEC2][.<arch>]-<release>-...``
_FEDORA_NAME = re.compile(
    r"^Fedora-(?P<subvariant>[A-Za-z][A-Za-z0-9_-]*?)(?:-AmazonEC2)?"
    r"(?:\.(?:x86_64|aarch64|ppc64le|s390x))?-(?P<release>\d+|Rawhide)-"
)

#: AWS's architecture names → the compose's (the successor reports the compose's).
_COMPOSE_ARCH = {"arm64": "aarch64", "x86_64": "x86_64", "aarch64": "aarch64"}


def release_and_subvariant(image_name: str) -> tuple[str | None, str | None]:
    """(release, subvariant) read from a Fedora image name; (None, None) for other names.

    ``Fedora-Cloud-Base-AmazonEC2.x86_64-41-1.4`` → ("41", "Cloud_Base");
    ``Fedora-AtomicHost-28-1.1.x86_64`` → ("28", "AtomicHost"); Rawhide images give "Rawhide".
    """
    match = _FEDORA_NAME.match(image_name)
    if not match:
        return None, None
    return match["release"], match["subvariant"].replace("-", "_")


def successor_summary(event: JobFinished) -> OutgoingMessage | None:
    """The summary message for a finished job, or None (with a log line) when there is none.

    Sent only for jobs that ended ``published`` or ``partial`` with at least one region. The body
    is validated against ``AwsPublishedV1`` here, so an invalid one never enters the outbox.
    """
    image = event.image
    if event.status not in ("published", "partial") or not event.regions:
        return None
    named_release, named_subvariant = release_and_subvariant(image.name)
    release = image.release or named_release
    number = int(release) if release and release.isdigit() else None
    subvariant = image.subvariant or named_subvariant
    if image.compose_id is None or number is None or subvariant is None:
        missing = [
            what
            for what, value in (
                ("compose id", image.compose_id),
                ("release number", number),
                ("subvariant", subvariant),
            )
            if value is None
        ]
        log.info("no successor summary for %s: unknown %s", image.name, " and ".join(missing))
        return None
    try:
        from fedimg_messages import successor_aws_message
    except ImportError as exc:  # the schema package is not installed: journal and bus go on
        log.warning("no successor summary for %s: %s", image.name, exc)
        return None
    try:
        message = successor_aws_message(
            architecture=_COMPOSE_ARCH.get(image.arch, image.arch),
            compose_id=image.compose_id,
            image_name=image.name,
            regions=dict(sorted(event.regions.items())),
            release=number,
            subvariant=subvariant,
        )
    except Exception as exc:  # ValueError (topic words), jsonschema.ValidationError (body)
        log.warning("no successor summary for %s: %s", image.name, exc)
        return None
    return OutgoingMessage(
        topic=str(message.topic),
        body=dict(message.body),
        msg_id=str(uuid.uuid4()),
        timestamp=event.timestamp,
        job_id=event.job_id,
        summary=f"{image.name} published in {len(event.regions)} regions ({event.status})",
        schema=SUCCESSOR_SCHEMA,
    )

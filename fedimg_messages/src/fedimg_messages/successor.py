"""Build the successor tool's AWS summary message.

Fedora's successor to fedimg (fedora-image-uploader) announces a finished AWS publication
with one message per image: the ``fedora_image_uploader.published.v1.aws`` schema
(``AwsPublishedV1`` from the ``fedora-image-uploader-messages`` package), its topic
extended with ``.<subvariant>.<release>.<architecture>``, e.g.
``fedora_image_uploader.published.v1.aws.Cloud_Base.41.x86_64`` (the deployment prefix
``org.fedoraproject.prod.`` is added by fedora-messaging's ``topic_prefix`` on publish).
"""

from __future__ import annotations

from typing import cast

from fedora_image_uploader_messages import AwsPublishedV1
from fedora_messaging.message import Message

__all__ = ["successor_aws_message", "successor_aws_topic"]


def successor_aws_topic(*, subvariant: str, release: int, architecture: str) -> str:
    """Return the bare successor topic for one image.

    The result is ``fedora_image_uploader.published.v1.aws.<subvariant>.<release>.<arch>``.

    Raises:
        ValueError: a part is empty or holds a character that would break the AMQP topic
            (``.``, ``*``, ``#`` or whitespace), or ``release`` is not a positive int.
    """
    if isinstance(release, bool) or not isinstance(release, int) or release <= 0:
        raise ValueError(f"release must be a positive int, not {release!r}")
    parts = {"subvariant": subvariant, "architecture": architecture}
    for label, part in parts.items():
        if not part or any(c in part for c in ".*#") or any(c.isspace() for c in part):
            raise ValueError(f"{label} {part!r} cannot be a topic word")
    base = cast(str, AwsPublishedV1.topic)
    return ".".join([base, subvariant, str(release), architecture])


def successor_aws_message(
    *,
    architecture: str,
    compose_id: str,
    image_name: str,
    regions: dict[str, str],
    release: int,
    subvariant: str,
) -> Message:
    """Build and validate the successor's AWS summary message for one image.

    Args:
        architecture: the compose architecture (``x86_64``, ``aarch64``), not AWS's name
            (``arm64``), as the real tool sends it.
        compose_id: the compose id, e.g. ``Fedora-41-20240911.0``.
        image_name: the AMI name, e.g. ``Fedora-Cloud-Base-AmazonEC2.x86_64-41-1.4``.
        regions: AWS region -> AMI id, one entry per region the image is public in.
        release: the Fedora release number, e.g. ``41``.
        subvariant: the compose subvariant, e.g. ``Cloud_Base``.

    Returns:
        An ``AwsPublishedV1`` instance (the real class, registered under the schema name
        ``fedora_image_uploader.published.v1.aws``) whose topic is
        :func:`successor_aws_topic` and whose body holds exactly the six arguments
        (``regions`` copied). It has passed ``validate()``.

    Raises:
        ValueError: see :func:`successor_aws_topic`.
        jsonschema.ValidationError: the body does not match the ``AwsPublishedV1`` schema.
    """
    topic = successor_aws_topic(subvariant=subvariant, release=release, architecture=architecture)
    body = {
        "architecture": architecture,
        "compose_id": compose_id,
        "image_name": image_name,
        "regions": dict(regions),
        "release": release,
        "subvariant": subvariant,
    }
    message = cast(Message, AwsPublishedV1(topic=topic, body=body))
    message.validate()
    return message

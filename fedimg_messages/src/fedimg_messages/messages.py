"""Message schemas for the legacy fedimg topics (``fedimg.image.*``).

Bodies are exactly what Fedora's fedimg sent, 0.x (fedmsg era) through 2.x:

* ``fedimg.image.upload`` / ``fedimg.image.test``: ``image_url``, ``image_name``,
  ``destination``, ``status`` (``started``, ``completed`` or ``failed``), and optionally
  ``service`` (2.x: ``"EC2"``), ``compose`` and ``extra``.
* ``fedimg.image.copy``: ``image_name``, ``destination``, ``service``, ``compose_id`` (sic),
  ``extra`` {``id``, ``virt_type``, ``vol_type``, ``source_image_id``}, optionally
  ``architecture``.
* ``fedimg.image.publish``: ``image_name``, ``image_url`` (may be ``null``), ``destination``,
  ``service``, ``compose``, ``extra`` {``id``, ``virt_type``, ``vol_type``}, optionally
  ``architecture``.

``compose`` was the compose-metadata object ``{"compose_id": ...}`` in fedimg 0.x and the
bare compose id string in 2.x; both validate, and :attr:`FedimgMessage.compose_id` reads
either. ``extra`` always allows additional properties (``storage``, ``encrypted``, ``data``
and whatever later producers add).

Class topics are bare (``fedimg.image.upload``); the deployment prefix
(``org.fedoraproject.prod.``) is added by fedora-messaging's ``topic_prefix`` setting when
the message is published.
"""

from __future__ import annotations

from typing import Any, ClassVar

from fedora_messaging.message import Message

__all__ = [
    "MESSAGE_CLASSES",
    "FedimgMessage",
    "ImageCopyV1",
    "ImagePublishV1",
    "ImageTestV1",
    "ImageUploadV1",
]

_DRAFT_07 = "http://json-schema.org/draft-07/schema#"
_SCHEMA_URL = "http://fedoraproject.org/message-schema/fedimg"
_ICON = "https://apps.fedoraproject.org/img/icons/fedimg.png"

_STATUSES = ["started", "completed", "failed"]

_NON_EMPTY_STRING: dict[str, Any] = {"type": "string", "minLength": 1}

_COMPOSE: dict[str, Any] = {
    "description": (
        "The compose the image came from: the compose id (fedimg 2.x), the compose "
        "metadata object with a compose_id member (fedimg 0.x), or null when unknown."
    ),
    "anyOf": [
        {"type": "string"},
        {"type": "null"},
        {
            "type": "object",
            "properties": {"compose_id": {"type": "string"}},
            "required": ["compose_id"],
        },
    ],
}

_EXTRA_PROPERTIES: dict[str, Any] = {
    "id": {"type": "string", "description": "The AMI id (ami-...)."},
    "virt_type": {"type": "string", "description": "Virtualization type (hvm, HVM, paravirtual)."},
    "vol_type": {"type": "string", "description": "EBS volume type (gp2, gp3, standard, ...)."},
    "source_image_id": {"type": "string", "description": "The AMI a copy was made from."},
    "storage": {"type": "string", "description": "Root device storage flavour."},
    "encrypted": {"type": "boolean", "description": "Whether the root snapshot is encrypted."},
    "data": {"type": "string", "description": "Free text on failure, e.g. command output."},
}


def _extra(*required: str) -> dict[str, Any]:
    """Return the schema of an ``extra`` object that requires the given members."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": _EXTRA_PROPERTIES,
        "additionalProperties": True,
    }
    if required:
        schema["required"] = list(required)
    return schema


def _status_schema(topic: str, description: str, *, extra_always: bool) -> dict[str, Any]:
    """Build the schema shared by ``image.upload`` and ``image.test``.

    ``extra_always`` requires ``extra`` {id, virt_type, vol_type} whatever the status (test
    messages always carried it); otherwise it is required only when ``status`` is
    ``completed`` (upload messages).
    """
    schema: dict[str, Any] = {
        "$id": f"{_SCHEMA_URL}/{topic}.v1.json",
        "$schema": _DRAFT_07,
        "description": description,
        "type": "object",
        "properties": {
            "image_url": {"type": "string", "description": "URL of the source image file."},
            "image_name": _NON_EMPTY_STRING,
            "destination": {
                **_NON_EMPTY_STRING,
                "description": "Region, e.g. eu-west-1 (2.x), EC2-eu-west-1 or EC2 (eu-west-1).",
            },
            "service": {"type": "string", "description": "Cloud service, EC2."},
            "status": {"type": "string", "enum": _STATUSES},
            "compose": _COMPOSE,
            "extra": _extra(),
        },
        "required": ["image_url", "image_name", "destination", "status"],
    }
    full_extra = _extra("id", "virt_type", "vol_type")
    if extra_always:
        schema["properties"]["extra"] = full_extra
        schema["required"].append("extra")
    else:
        schema["if"] = {"properties": {"status": {"const": "completed"}}, "required": ["status"]}
        schema["then"] = {"required": ["extra"], "properties": {"extra": full_extra}}
    return schema


class FedimgMessage(Message):
    """Common behaviour of the fedimg messages; never sent itself.

    Sub-classes set ``topic`` and ``body_schema``. Accessors read the body without
    validating it, and return ``None`` for anything absent.
    """

    @property
    def app_name(self) -> str:
        """The application that sent the message: always ``"fedimg"``."""
        return "fedimg"

    @property
    def app_icon(self) -> str:
        """The fedimg icon Fedora's renderers showed."""
        return _ICON

    @property
    def agent_name(self) -> str | None:
        """fedimg acts on its own, for no user: always ``None``."""
        return None

    @property
    def usernames(self) -> list[str]:
        """No user is affected: always ``[]``."""
        return []

    @property
    def packages(self) -> list[str]:
        """No RPM package is affected: always ``[]``."""
        return []

    @property
    def image_name(self) -> str | None:
        """The ``image_name`` of the body."""
        return self._text(self.body.get("image_name"))

    @property
    def destination(self) -> str | None:
        """The ``destination`` (region) of the body."""
        return self._text(self.body.get("destination"))

    @property
    def status(self) -> str | None:
        """The ``status`` of the body (upload/test only)."""
        return self._text(self.body.get("status"))

    @property
    def compose_id(self) -> str | None:
        """The compose id, from ``compose_id``, ``compose`` or ``compose.compose_id``."""
        if "compose_id" in self.body:
            return self._text(self.body["compose_id"])
        compose = self.body.get("compose")
        if isinstance(compose, dict):
            return self._text(compose.get("compose_id"))
        return self._text(compose)

    @property
    def extra(self) -> dict[str, Any]:
        """The ``extra`` object of the body, ``{}`` when absent or not an object."""
        extra = self.body.get("extra")
        return extra if isinstance(extra, dict) else {}

    @property
    def ami_id(self) -> str | None:
        """The AMI id, ``extra.id``."""
        return self._text(self.extra.get("id"))

    @staticmethod
    def _text(value: object) -> str | None:
        """Return ``value`` if it is a string, else ``None``."""
        return value if isinstance(value, str) else None

    def _ami_details(self) -> str:
        """Return `` (ami, virt, vol)`` as Fedora's renderer showed it; empty if none is set."""
        parts = [
            str(self.extra[key])
            for key in ("id", "virt_type", "vol_type")
            if self.extra.get(key) is not None
        ]
        return f" ({', '.join(parts)})" if parts else ""

    def _describe(self, title: str) -> str:
        """Return ``title`` followed by one tab-indented line per known body field."""
        fields: list[tuple[str, object]] = [
            ("Image name", self.body.get("image_name")),
            ("Image URL", self.body.get("image_url")),
            ("Architecture", self.body.get("architecture")),
            ("Destination", self.body.get("destination")),
            ("Service", self.body.get("service")),
            ("Status", self.body.get("status")),
            ("Compose ID", self.compose_id),
            ("AMI", self.extra.get("id")),
            ("Source AMI", self.extra.get("source_image_id")),
            ("Virtualization type", self.extra.get("virt_type")),
            ("Volume type", self.extra.get("vol_type")),
            ("Storage", self.extra.get("storage")),
            ("Encrypted", self.extra.get("encrypted")),
        ]
        lines = [f"\t{label}: {value}" for label, value in fields if value is not None]
        text = f"{title}\n\n" + "\n".join(lines) + "\n"
        data = self.extra.get("data")
        if data is not None:
            text += f"\nDetails:\n{data}\n"
        return text


class ImageUploadV1(FedimgMessage):
    """``fedimg.image.upload``: an image upload (AMI registration) started, completed or failed.

    ``extra`` {id, virt_type, vol_type} is required when ``status`` is ``completed``; a
    ``failed`` message may carry ``extra.data`` (free text).
    """

    topic = "fedimg.image.upload"
    body_schema: ClassVar[dict[str, Any]] = _status_schema(
        "fedimg.image.upload",
        "An image upload to a cloud service changed state (fedimg).",
        extra_always=False,
    )

    @property
    def summary(self) -> str:
        """Mirror Fedora's renderer: ``<image> finished uploading to <dest> (ami, virt, vol)``."""
        name, dest, status = self.image_name, self.destination, self.status
        if status == "started":
            return f"{name} started uploading to {dest}"
        if status == "completed":
            return f"{name} finished uploading to {dest}{self._ami_details()}"
        if status == "failed":
            return f"{name} failed to upload to {dest}"
        return f"{name} upload to {dest}: {status}"

    def __str__(self) -> str:
        """A multi-line description of the upload and its state."""
        return self._describe(f"Image upload {self.status}:")


class ImageTestV1(FedimgMessage):
    """``fedimg.image.test``: a test of a registered AMI started, completed or failed.

    ``extra`` {id, virt_type, vol_type} is always required; a ``failed`` message may carry
    ``extra.data`` (e.g. the test output).
    """

    topic = "fedimg.image.test"
    body_schema: ClassVar[dict[str, Any]] = _status_schema(
        "fedimg.image.test",
        "A test of a newly registered image changed state (fedimg).",
        extra_always=True,
    )

    @property
    def summary(self) -> str:
        """Mirror Fedora's renderer: ``<image> started testing on <dest> (ami, virt, vol)``."""
        verb = {"started": "started", "completed": "finished", "failed": "failed"}.get(
            self.status or "", str(self.status)
        )
        return f"{self.image_name} {verb} testing on {self.destination}{self._ami_details()}"

    def __str__(self) -> str:
        """A multi-line description of the test and its state."""
        return self._describe(f"Image test {self.status}:")


class ImageCopyV1(FedimgMessage):
    """``fedimg.image.copy``: an AMI was copied from the base region to ``destination``."""

    topic = "fedimg.image.copy"
    body_schema: ClassVar[dict[str, Any]] = {
        "$id": f"{_SCHEMA_URL}/fedimg.image.copy.v1.json",
        "$schema": _DRAFT_07,
        "description": "An AMI was copied to another region (fedimg).",
        "type": "object",
        "properties": {
            "image_name": _NON_EMPTY_STRING,
            "destination": {**_NON_EMPTY_STRING, "description": "The region copied to."},
            "architecture": {"type": "string"},
            "service": {"type": "string", "description": "Cloud service, EC2."},
            "compose_id": {
                "type": ["string", "null"],
                "description": "The compose id (named compose_id here, unlike other topics).",
            },
            "extra": _extra("id", "virt_type", "vol_type", "source_image_id"),
        },
        "required": ["image_name", "destination", "service", "compose_id", "extra"],
    }

    @property
    def summary(self) -> str:
        """Mirror Fedora's renderer: ``<image> copied to <dest> using source image, <src> (...)``.

        ``(...)`` is ``(ami, virt, vol)`` of the copy.
        """
        return (
            f"{self.image_name} copied to {self.destination} using source image, "
            f"{self.extra.get('source_image_id')}{self._ami_details()}"
        )

    def __str__(self) -> str:
        """A multi-line description of the copy."""
        return self._describe("Image copied to another region:")


class ImagePublishV1(FedimgMessage):
    """``fedimg.image.publish``: an AMI and its snapshot were made public in ``destination``."""

    topic = "fedimg.image.publish"
    body_schema: ClassVar[dict[str, Any]] = {
        "$id": f"{_SCHEMA_URL}/fedimg.image.publish.v1.json",
        "$schema": _DRAFT_07,
        "description": "An AMI and its snapshot were made public (fedimg).",
        "type": "object",
        "properties": {
            "image_name": _NON_EMPTY_STRING,
            "image_url": {
                "type": ["string", "null"],
                "description": "URL of the source image file; fedimg 2.x sent null.",
            },
            "architecture": {"type": "string"},
            "destination": {**_NON_EMPTY_STRING, "description": "The region published in."},
            "service": {"type": "string", "description": "Cloud service, EC2."},
            "compose": _COMPOSE,
            "extra": _extra("id", "virt_type", "vol_type"),
        },
        "required": ["image_name", "image_url", "destination", "service", "compose", "extra"],
    }

    @property
    def summary(self) -> str:
        """Mirror Fedora's renderer: ``<image> published in region, <dest> (ami, virt, vol)``."""
        return f"{self.image_name} published in region, {self.destination}{self._ami_details()}"

    def __str__(self) -> str:
        """A multi-line description of the published image."""
        return self._describe("Image published:")


#: Bare topic (no ``org.fedoraproject.<env>.`` prefix) -> message class.
MESSAGE_CLASSES: dict[str, type[Message]] = {
    cls.topic: cls for cls in (ImageUploadV1, ImageTestV1, ImageCopyV1, ImagePublishV1)
}

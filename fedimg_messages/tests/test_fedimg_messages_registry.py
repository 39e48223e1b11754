"""The ``fedora.messages`` entry points (needs ``pip install -e fedimg_messages``)."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
from fedora_messaging import message as fm_message

from fedimg_messages import (
    MESSAGE_CLASSES,
    FedimgMessage,
    ImageCopyV1,
    ImagePublishV1,
    ImageTestV1,
    ImageUploadV1,
)

SCHEMA_NAMES: dict[str, type[FedimgMessage]] = {
    "fedimg.image.upload.v1": ImageUploadV1,
    "fedimg.image.test.v1": ImageTestV1,
    "fedimg.image.copy.v1": ImageCopyV1,
    "fedimg.image.publish.v1": ImagePublishV1,
}

BODY = {
    "image_url": "https://example.org/Fedora-Cloud-Base-AmazonEC2.x86_64-40-1.14.raw.xz",
    "image_name": "Fedora-Cloud-Base-AmazonEC2.x86_64-40-1.14",
    "destination": "us-east-1",
    "service": "EC2",
    "status": "started",
    "compose": "Fedora-40-20240414.0",
}


def test_entry_points_are_declared() -> None:
    declared = {
        ep.name: ep.value
        for ep in entry_points(group="fedora.messages")
        if ep.value.startswith("fedimg_messages")
    }
    assert declared == {
        name: f"fedimg_messages:{cls.__name__}" for name, cls in SCHEMA_NAMES.items()
    }, "install the package: pip install -e fedimg_messages"


@pytest.mark.parametrize(("name", "cls"), SCHEMA_NAMES.items())
def test_fedora_messaging_resolves_the_schema_names(name: str, cls: type[FedimgMessage]) -> None:
    assert fm_message.get_class(name) is cls
    assert fm_message.get_name(cls) == name
    assert MESSAGE_CLASSES[cls.topic] is cls


def test_headers_name_the_schema_and_package() -> None:
    msg = ImageUploadV1(body=BODY)
    headers = msg._headers
    assert headers["fedora_messaging_schema"] == "fedimg.image.upload.v1"
    assert headers["fedora_messaging_schema_package"] == "fedimg_messages"


def test_serialised_message_round_trips_to_the_same_class() -> None:
    sent = ImageUploadV1(body=BODY)
    (received,) = fm_message.loads(fm_message.dumps(sent))
    assert type(received) is ImageUploadV1
    assert received == sent
    received.validate()
    assert received.summary == f"{BODY['image_name']} started uploading to us-east-1"

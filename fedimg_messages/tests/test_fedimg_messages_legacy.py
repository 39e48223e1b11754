"""Schemas, summaries and accessors of the legacy ``fedimg.image.*`` message classes."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped, unused-ignore]  # stubs optional
import pytest

from fedimg_messages import (
    MESSAGE_CLASSES,
    FedimgMessage,
    ImageCopyV1,
    ImagePublishV1,
    ImageTestV1,
    ImageUploadV1,
)

Body = dict[str, Any]

# Bodies shaped like fedimg 2.x sent them (written for these tests, F40-style names).
IMAGE_NAME = "Fedora-Cloud-Base-AmazonEC2.x86_64-40-1.14"
IMAGE_URL = (
    "https://kojipkgs.fedoraproject.org/compose/40/Fedora-40-20240414.0/compose/Cloud/"
    f"x86_64/images/{IMAGE_NAME}.raw.xz"
)
COMPOSE_ID = "Fedora-40-20240414.0"
EXTRA = {"id": "ami-0a1b2c3d4e5f60718", "virt_type": "hvm", "vol_type": "gp3"}


def upload_body(status: str = "completed") -> Body:
    """An ``image.upload`` body; ``extra`` only on ``completed``."""
    body: Body = {
        "image_url": IMAGE_URL,
        "image_name": IMAGE_NAME,
        "destination": "us-east-1",
        "service": "EC2",
        "status": status,
        "compose": COMPOSE_ID,
    }
    if status == "completed":
        body["extra"] = dict(EXTRA)
    return body


def image_test_body(status: str = "completed") -> Body:
    """An ``image.test`` body; ``extra`` is always present."""
    return {**upload_body("started"), "status": status, "extra": dict(EXTRA)}


def copy_body() -> Body:
    """An ``image.copy`` body."""
    return {
        "image_name": IMAGE_NAME,
        "destination": "eu-west-2",
        "architecture": "x86_64",
        "service": "EC2",
        "compose_id": COMPOSE_ID,
        "extra": {**EXTRA, "id": "ami-0f0e0d0c0b0a09080", "source_image_id": EXTRA["id"]},
    }


def publish_body() -> Body:
    """An ``image.publish`` body."""
    return {
        "image_name": IMAGE_NAME,
        "image_url": IMAGE_URL,
        "architecture": "x86_64",
        "destination": "eu-west-2",
        "service": "EC2",
        "compose": COMPOSE_ID,
        "extra": dict(EXTRA),
    }


VALID_BODIES: list[tuple[type[FedimgMessage], Body]] = [
    (ImageUploadV1, upload_body("started")),
    (ImageUploadV1, upload_body("completed")),
    (ImageUploadV1, upload_body("failed")),
    (ImageTestV1, image_test_body("started")),
    (ImageTestV1, image_test_body("completed")),
    (ImageTestV1, image_test_body("failed")),
    (ImageCopyV1, copy_body()),
    (ImagePublishV1, publish_body()),
]

REQUIRED: dict[type[FedimgMessage], list[str]] = {
    ImageUploadV1: ["image_url", "image_name", "destination", "status"],
    ImageTestV1: ["image_url", "image_name", "destination", "status", "extra"],
    ImageCopyV1: ["image_name", "destination", "service", "compose_id", "extra"],
    ImagePublishV1: ["image_name", "image_url", "destination", "service", "compose", "extra"],
}

REQUIRED_EXTRA: dict[type[FedimgMessage], list[str]] = {
    ImageUploadV1: ["id", "virt_type", "vol_type"],  # when status is completed
    ImageTestV1: ["id", "virt_type", "vol_type"],
    ImageCopyV1: ["id", "virt_type", "vol_type", "source_image_id"],
    ImagePublishV1: ["id", "virt_type", "vol_type"],
}

BODY_FACTORIES: dict[type[FedimgMessage], Callable[[], Body]] = {
    ImageUploadV1: upload_body,
    ImageTestV1: image_test_body,
    ImageCopyV1: copy_body,
    ImagePublishV1: publish_body,
}

CLASSES = [ImageUploadV1, ImageTestV1, ImageCopyV1, ImagePublishV1]


def _validate(cls: type[FedimgMessage], body: Body) -> FedimgMessage:
    message = cls(body=body)
    message.validate()
    return message


# --- the classes and their schemas ---------------------------------------------------------


def test_message_classes_maps_bare_topics() -> None:
    expected = {
        "fedimg.image.upload": ImageUploadV1,
        "fedimg.image.test": ImageTestV1,
        "fedimg.image.copy": ImageCopyV1,
        "fedimg.image.publish": ImagePublishV1,
    }
    assert expected == MESSAGE_CLASSES
    for topic, cls in MESSAGE_CLASSES.items():
        assert cls.topic == topic


@pytest.mark.parametrize("cls", CLASSES)
def test_schema_is_a_valid_draft_07_schema(cls: type[FedimgMessage]) -> None:
    assert cls.body_schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(cls.body_schema)


@pytest.mark.parametrize(("cls", "body"), VALID_BODIES)
def test_fedimg_2x_bodies_validate(cls: type[FedimgMessage], body: Body) -> None:
    _validate(cls, body)


@pytest.mark.parametrize("cls", CLASSES)
def test_each_required_field_is_required(cls: type[FedimgMessage]) -> None:
    for field in REQUIRED[cls]:
        body = BODY_FACTORIES[cls]()
        del body[field]
        with pytest.raises(jsonschema.ValidationError):
            _validate(cls, body)


@pytest.mark.parametrize("cls", CLASSES)
def test_each_required_extra_member_is_required(cls: type[FedimgMessage]) -> None:
    for member in REQUIRED_EXTRA[cls]:
        body = BODY_FACTORIES[cls]()
        del body["extra"][member]
        with pytest.raises(jsonschema.ValidationError):
            _validate(cls, body)


def test_completed_upload_needs_extra_but_started_and_failed_do_not() -> None:
    body = upload_body("completed")
    del body["extra"]
    with pytest.raises(jsonschema.ValidationError):
        _validate(ImageUploadV1, body)
    _validate(ImageUploadV1, upload_body("started"))
    _validate(ImageUploadV1, upload_body("failed"))


@pytest.mark.parametrize("cls", [ImageUploadV1, ImageTestV1])
def test_status_must_be_known(cls: type[FedimgMessage]) -> None:
    body = {**BODY_FACTORIES[cls](), "status": "finished"}
    with pytest.raises(jsonschema.ValidationError):
        _validate(cls, body)


@pytest.mark.parametrize("cls", CLASSES)
def test_extra_accepts_newer_members(cls: type[FedimgMessage]) -> None:
    body = BODY_FACTORIES[cls]()
    body["extra"] = {
        **body.get("extra", {}),
        "storage": "ebs",
        "encrypted": True,
        "data": "boot timed out\nconsole: ...",
        "something_later": {"nested": [1, 2]},
    }
    _validate(cls, body)


def test_extra_member_types_are_checked() -> None:
    body = upload_body("completed")
    body["extra"]["encrypted"] = "yes"
    with pytest.raises(jsonschema.ValidationError):
        _validate(ImageUploadV1, body)
    body = upload_body("completed")
    body["extra"]["id"] = 12
    with pytest.raises(jsonschema.ValidationError):
        _validate(ImageUploadV1, body)


@pytest.mark.parametrize(
    "compose",
    [COMPOSE_ID, {"compose_id": COMPOSE_ID, "compose_date": "20240414"}, None],
)
def test_compose_forms(compose: object) -> None:
    _validate(ImageUploadV1, {**upload_body(), "compose": compose})
    _validate(ImagePublishV1, {**publish_body(), "compose": compose})


@pytest.mark.parametrize("compose", [{"id": COMPOSE_ID}, 40, ["Fedora-40-20240414.0"]])
def test_bad_compose_forms_fail(compose: object) -> None:
    with pytest.raises(jsonschema.ValidationError):
        _validate(ImageUploadV1, {**upload_body(), "compose": compose})


def test_old_bodies_without_service_and_compose_validate() -> None:
    body = upload_body("completed")
    del body["service"], body["compose"]
    _validate(ImageUploadV1, body)


def test_publish_image_url_may_be_null_but_upload_url_may_not() -> None:
    _validate(ImagePublishV1, {**publish_body(), "image_url": None})
    with pytest.raises(jsonschema.ValidationError):
        _validate(ImageUploadV1, {**upload_body(), "image_url": None})


def test_failed_messages_carry_data() -> None:
    upload = upload_body("failed")
    upload["extra"] = {"data": "(no data)"}
    _validate(ImageUploadV1, upload)
    tested = image_test_body("failed")
    tested["extra"]["data"] = "Connection refused"
    message = _validate(ImageTestV1, tested)
    assert "Connection refused" in str(message)


# --- summaries, __str__ and accessors ---------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "body", "expected"),
    [
        (ImageUploadV1, upload_body("started"), f"{IMAGE_NAME} started uploading to us-east-1"),
        (
            ImageUploadV1,
            upload_body("completed"),
            f"{IMAGE_NAME} finished uploading to us-east-1 (ami-0a1b2c3d4e5f60718, hvm, gp3)",
        ),
        (ImageUploadV1, upload_body("failed"), f"{IMAGE_NAME} failed to upload to us-east-1"),
        (
            ImageTestV1,
            image_test_body("started"),
            f"{IMAGE_NAME} started testing on us-east-1 (ami-0a1b2c3d4e5f60718, hvm, gp3)",
        ),
        (
            ImageTestV1,
            image_test_body("completed"),
            f"{IMAGE_NAME} finished testing on us-east-1 (ami-0a1b2c3d4e5f60718, hvm, gp3)",
        ),
        (
            ImageTestV1,
            image_test_body("failed"),
            f"{IMAGE_NAME} failed testing on us-east-1 (ami-0a1b2c3d4e5f60718, hvm, gp3)",
        ),
        (
            ImageCopyV1,
            copy_body(),
            f"{IMAGE_NAME} copied to eu-west-2 using source image, ami-0a1b2c3d4e5f60718 "
            "(ami-0f0e0d0c0b0a09080, hvm, gp3)",
        ),
        (
            ImagePublishV1,
            publish_body(),
            f"{IMAGE_NAME} published in region, eu-west-2 (ami-0a1b2c3d4e5f60718, hvm, gp3)",
        ),
    ],
)
def test_summary(cls: type[FedimgMessage], body: Body, expected: str) -> None:
    assert _validate(cls, body).summary == expected


@pytest.mark.parametrize(("cls", "body"), VALID_BODIES)
def test_str_lists_the_body(cls: type[FedimgMessage], body: Body) -> None:
    text = str(cls(body=body))
    assert IMAGE_NAME in text
    assert body["destination"] in text
    assert COMPOSE_ID in text
    if "extra" in body:
        assert body["extra"]["id"] in text


@pytest.mark.parametrize(("cls", "body"), VALID_BODIES)
def test_fixed_properties(cls: type[FedimgMessage], body: Body) -> None:
    message = cls(body=body)
    assert message.app_name == "fedimg"
    assert message.agent_name is None
    assert message.usernames == []
    assert message.packages == []
    assert message.app_icon == "https://apps.fedoraproject.org/img/icons/fedimg.png"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (upload_body(), COMPOSE_ID),
        ({**upload_body(), "compose": {"compose_id": COMPOSE_ID}}, COMPOSE_ID),
        ({**upload_body(), "compose": None}, None),
        ({k: v for k, v in upload_body().items() if k != "compose"}, None),
    ],
)
def test_compose_id_accessor(body: Body, expected: str | None) -> None:
    assert ImageUploadV1(body=body).compose_id == expected


def test_accessors() -> None:
    copied = ImageCopyV1(body=copy_body())
    assert copied.compose_id == COMPOSE_ID
    assert copied.ami_id == "ami-0f0e0d0c0b0a09080"
    assert copied.image_name == IMAGE_NAME
    assert copied.destination == "eu-west-2"
    assert copied.status is None
    upload = ImageUploadV1(body=upload_body("started"))
    assert upload.status == "started"
    assert upload.ami_id is None
    assert upload.extra == {}


# --- Fedora's real messages (optional: ../shared/reference) ------------------------------------

REFERENCE_EXAMPLES = [
    "LegacyTestImageTestStart.json",
    "LegacyTestImageTestStartCompose.json",
    "LegacyTestImageUploadComplete.json",
    "LegacyTestImageUploadCompleteCompose.json",
    "LegacyTestImageUploadStart.json",
    "LegacyTestImageUploadStartCompose.json",
    "TestImageCopy.json",
    "TestImagePublish.json",
    "TestImageUploadComplete.json",
    "TestImageUploadStart.json",
]


def _class_for(topic: str) -> type[FedimgMessage]:
    """The class registered in MESSAGE_CLASSES for a full (prefixed) topic."""
    cls = MESSAGE_CLASSES[_bare_topic(topic)]
    assert issubclass(cls, FedimgMessage)
    return cls


def _bare_topic(topic: str) -> str:
    """``org.fedoraproject.stg.fedimg.image.upload`` -> ``fedimg.image.upload``."""
    prefix, _, bare = topic.partition(".fedimg.")
    assert prefix.startswith("org.fedoraproject."), topic
    return "fedimg." + bare


def test_reference_examples_are_all_listed(reference_dir: Path) -> None:
    found = sorted(path.name for path in (reference_dir / "fedimg-messages").glob("*.json"))
    assert found == REFERENCE_EXAMPLES


@pytest.mark.parametrize("name", REFERENCE_EXAMPLES)
def test_reference_example_validates_and_summarises(
    name: str, load_reference: Callable[[str], Any]
) -> None:
    example = load_reference(f"fedimg-messages/{name}")
    envelope = example["message"]
    cls = _class_for(envelope["topic"])
    message = _validate(cls, copy.deepcopy(envelope["msg"]))

    expected = example["_expected"]
    assert message.summary == expected["expected_subti"]
    assert _bare_topic(envelope["topic"]) == expected["expected_title"]
    assert message.usernames == expected["expected_usernames"]
    assert message.packages == expected["expected_packages"]
    assert message.app_icon == expected["expected_icon"]
    assert message.image_name == envelope["msg"]["image_name"]


@pytest.mark.parametrize("name", REFERENCE_EXAMPLES)
def test_reference_example_missing_a_required_field_fails(
    name: str, load_reference: Callable[[str], Any]
) -> None:
    envelope = load_reference(f"fedimg-messages/{name}")["message"]
    cls = _class_for(envelope["topic"])
    for field in REQUIRED[cls]:
        body = copy.deepcopy(envelope["msg"])
        del body[field]
        with pytest.raises(jsonschema.ValidationError):
            _validate(cls, body)

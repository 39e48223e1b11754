"""The successor's AWS summary message (``fedora_image_uploader.published.v1.aws``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import jsonschema  # type: ignore[import-untyped, unused-ignore]  # stubs optional
import pytest
from fedora_image_uploader_messages import AwsPublishedV1
from fedora_messaging import config
from fedora_messaging.message import get_name

from fedimg_messages import successor_aws_message, successor_aws_topic

REGIONS = {"us-east-1": "ami-0123456789abcdef0", "eu-west-1": "ami-0fedcba9876543210"}
ARGS: dict[str, Any] = {
    "architecture": "aarch64",
    "compose_id": "Fedora-40-20240414.0",
    "image_name": "Fedora-Cloud-Base-AmazonEC2.aarch64-40-1.14",
    "regions": REGIONS,
    "release": 40,
    "subvariant": "Cloud_Base",
}


def test_builds_the_real_class_with_topic_and_body() -> None:
    message = successor_aws_message(**ARGS)
    assert type(message) is AwsPublishedV1
    assert get_name(type(message)) == "fedora_image_uploader.published.v1.aws"
    assert message.topic == "fedora_image_uploader.published.v1.aws.Cloud_Base.40.aarch64"
    assert message.body == ARGS
    message.validate()
    assert message.summary == (
        "fedora-image-uploader published AWS images from compose Fedora-40-20240414.0 as "
        "Fedora-Cloud-Base-AmazonEC2.aarch64-40-1.14 in 2 regions"
    )


def test_regions_are_copied() -> None:
    regions = dict(REGIONS)
    message = successor_aws_message(**{**ARGS, "regions": regions})
    regions["ap-south-1"] = "ami-0000000000000000a"
    assert message.body["regions"] == REGIONS


def test_topic_prefix_is_added_by_fedora_messaging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(config.conf, "topic_prefix", "org.fedoraproject.prod")
    message = successor_aws_message(**ARGS)
    assert message._encoded_routing_key == (
        "org.fedoraproject.prod.fedora_image_uploader.published.v1.aws.Cloud_Base.40.aarch64"
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"subvariant": "Cloud.Base"},
        {"subvariant": ""},
        {"architecture": "x86 64"},
        {"architecture": "#"},
        {"release": 0},
        {"release": True},
        {"release": "40"},
    ],
)
def test_bad_topic_words_are_rejected(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"topic word|release"):
        successor_aws_message(**{**ARGS, **changes})


def test_schema_violations_raise_validation_error() -> None:
    with pytest.raises(jsonschema.ValidationError):
        successor_aws_message(**{**ARGS, "compose_id": cast(Any, 40)})


def test_successor_aws_topic() -> None:
    assert (
        successor_aws_topic(subvariant="Cloud_Base", release=41, architecture="x86_64")
        == "fedora_image_uploader.published.v1.aws.Cloud_Base.41.x86_64"
    )


# --- Fedora's real message (optional: ../shared/reference) -------------------------------------

REFERENCE = "successor-message/AwsPublishedV1.F41-Prerelease-1.2.x86_64.fedora-messaging.json"


def test_matches_the_real_message(load_reference: Callable[[str], Any]) -> None:
    real = load_reference(REFERENCE)
    real_body = real["body"]
    # The topic's last three words are subvariant, release and architecture.
    subvariant, release, architecture = real["topic"].split(".")[-3:]
    assert architecture == real_body["architecture"]

    message = successor_aws_message(
        architecture=real_body["architecture"],
        compose_id=real_body["compose_id"],
        image_name=real_body["image_name"],
        regions=real_body["regions"],
        release=int(release),
        subvariant=subvariant,
    )

    assert real["topic"] == f"org.fedoraproject.prod.{message.topic}"
    assert get_name(type(message)) == real["headers"]["fedora_messaging_schema"]
    # The real message predates release/subvariant in the body (required since
    # fedora-image-uploader-messages 1.2); everything it has, ours has identically.
    assert {k: message.body[k] for k in real_body} == real_body
    assert set(message.body) == set(real_body) | {"release", "subvariant"}
    assert message.body["release"] == 41
    assert message.body["subvariant"] == "Cloud_Base"


def test_real_message_body_lacks_fields_the_current_schema_requires(
    load_reference: Callable[[str], Any],
) -> None:
    real_body = load_reference(REFERENCE)["body"]
    with pytest.raises(jsonschema.ValidationError):
        AwsPublishedV1(body=real_body).validate()

"""fedora-messaging schemas for fedimg.

* :class:`ImageUploadV1`, :class:`ImageTestV1`, :class:`ImageCopyV1`,
  :class:`ImagePublishV1`: the legacy ``fedimg.image.*`` topics, bodies as Fedora's fedimg
  sent them; registered as ``fedora.messages`` entry points ``fedimg.image.<x>.v1``.
* :data:`MESSAGE_CLASSES`: bare topic (``fedimg.image.upload``) -> class.
* :func:`successor_aws_message`: the successor tool's ``AwsPublishedV1`` summary message.

Message classes can only be instantiated once this distribution is installed (fedora-messaging
looks each class's schema name up in the entry points when a message is built).
"""

from fedimg_messages.messages import (
    MESSAGE_CLASSES,
    FedimgMessage,
    ImageCopyV1,
    ImagePublishV1,
    ImageTestV1,
    ImageUploadV1,
)
from fedimg_messages.successor import successor_aws_message, successor_aws_topic

__all__ = [
    "MESSAGE_CLASSES",
    "FedimgMessage",
    "ImageCopyV1",
    "ImagePublishV1",
    "ImageTestV1",
    "ImageUploadV1",
    "successor_aws_message",
    "successor_aws_topic",
]

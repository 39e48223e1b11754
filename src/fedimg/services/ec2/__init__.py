"""The EC2 service: an image becomes tested, public AMIs in every region and flavour.

The exceptions keep the seed's names and are importable from here.
"""

from fedimg.services.ec2.errors import (
    AWSError,
    EC2ServiceException,
    EC2TestException,
    EC2UtilityException,
)

__all__ = ["AWSError", "EC2ServiceException", "EC2TestException", "EC2UtilityException"]

"""The EC2 service's exceptions (the seed's names) and the AWS error wrapper."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from botocore.exceptions import BotoCoreError, ClientError

from fedimg.errors import FedimgError


class EC2ServiceException(FedimgError):
    """Something failed while publishing to EC2."""


class EC2UtilityException(EC2ServiceException):
    """The utility instance failed to write the image onto its volume; ``output`` is what the
    command on it printed."""

    def __init__(self, message: str, *, output: str = "") -> None:
        super().__init__(message)
        self.output = output


class EC2TestException(EC2ServiceException):
    """The test of a new AMI failed; ``output`` is what the test printed."""

    def __init__(self, message: str, *, output: str = "") -> None:
        super().__init__(message)
        self.output = output


class AWSError(EC2ServiceException):
    """An AWS API call failed. Carries the operation, region, resource ids and AWS request id."""

    def __init__(
        self,
        *,
        operation: str,
        region: str,
        resource_ids: Sequence[str] = (),
        code: str | None = None,
        request_id: str | None = None,
        detail: str = "",
    ) -> None:
        self.operation = operation
        self.region = region
        self.resource_ids = tuple(resource_ids)
        self.code = code
        self.request_id = request_id
        where = f" ({', '.join(self.resource_ids)})" if self.resource_ids else ""
        rid = f" [request {request_id}]" if request_id else ""
        super().__init__(f"{operation} failed in {region}{where}: {code or 'error'}: {detail}{rid}")


def error_code(exc: BaseException) -> str | None:
    """The AWS ``Error.Code`` of a ClientError (classify by code, never by message text)."""
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code")
        return str(code) if code else None
    return None


@contextmanager
def aws_call(operation: str, region: str, *resource_ids: str) -> Iterator[None]:
    """Turn a botocore failure inside the block into an :class:`AWSError` naming the call."""
    try:
        yield
    except ClientError as exc:
        meta = exc.response.get("ResponseMetadata", {})
        error = exc.response.get("Error", {})
        raise AWSError(
            operation=operation,
            region=region,
            resource_ids=[r for r in resource_ids if r],
            code=error.get("Code"),
            request_id=meta.get("RequestId"),
            detail=str(error.get("Message", "")).splitlines()[0] if error.get("Message") else "",
        ) from exc
    except BotoCoreError as exc:
        raise AWSError(
            operation=operation,
            region=region,
            resource_ids=[r for r in resource_ids if r],
            code=type(exc).__name__,
            detail=str(exc).splitlines()[0],
        ) from exc

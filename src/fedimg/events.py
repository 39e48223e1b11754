"""Typed events the orchestrator emits; publishers (journal, bus, progress) subscribe to them.

Events say what happened in fedimg's terms. :mod:`fedimg.messages` maps them to the legacy fedimg
topics and bodies and to the successor's summary message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

Step = Literal["upload", "test", "copy", "publish"]
Status = Literal["started", "completed", "failed"]


@dataclass(frozen=True)
class ImageInfo:
    """The image a job publishes, as messages describe it."""

    name: str
    url: str
    arch: str
    compose_id: str | None = None
    sha256: str | None = None
    release: str | None = None
    subvariant: str | None = None


@dataclass(frozen=True)
class StepEvent:
    """A step for one AMI (or, for an upload that failed early, one flavour) in one region."""

    job_id: str
    step: Step
    status: Status
    region: str
    image: ImageInfo
    virt_type: str | None = None
    vol_type: str | None = None
    storage: str | None = None
    encrypted: bool | None = None
    ami_id: str | None = None
    source_ami_id: str | None = None
    data: str | None = None
    timestamp: float = field(default_factory=time.time)


@dataclass(frozen=True)
class JobFinished:
    """A job ended; ``regions`` maps each region to the AMI of the job's primary flavour."""

    job_id: str
    image: ImageInfo
    status: Literal["published", "failed", "partial", "interrupted"]
    regions: dict[str, str]
    error: str | None = None
    timestamp: float = field(default_factory=time.time)


Event = StepEvent | JobFinished

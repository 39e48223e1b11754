"""Fixtures for the fedimg-messages tests.

The optional compatibility tests read Fedora's real messages from the repository's sibling
``../shared/reference`` folder. When it is absent (a user's machine) they skip; under
``CI=true`` they fail instead, so CI can never pass by silently skipping them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

#: <repo>/fedimg_messages/tests/conftest.py -> <repo>/../shared/reference
REFERENCE_DIR = Path(__file__).resolve().parents[3] / "shared" / "reference"


def _unavailable(reason: str) -> None:
    """Skip the calling test, or fail it when running under ``CI=true``."""
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{reason} (CI=true: reference tests must not be skipped)")
    pytest.skip(reason)


@pytest.fixture
def reference_dir() -> Path:
    """The shared reference folder; skips (fails under ``CI=true``) when it is absent."""
    if not REFERENCE_DIR.is_dir():
        _unavailable(f"reference data not found at {REFERENCE_DIR}")
    return REFERENCE_DIR


@pytest.fixture
def load_reference(reference_dir: Path) -> Callable[[str], Any]:
    """A function ``(relative path) -> parsed JSON`` reading from the reference folder.

    A missing file skips the test the same way a missing folder does.
    """

    def load(relative: str) -> Any:
        path = reference_dir / relative
        if not path.is_file():
            _unavailable(f"reference file not found: {path}")
        return json.loads(path.read_text(encoding="utf-8"))

    return load

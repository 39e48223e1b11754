"""What every request handler needs: the catalog and a few settings (no configuration, no secret)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request

from fedimg.catalog import Catalog


@dataclass(frozen=True)
class WebContext:
    """The catalog the web layer reads (never writes), and its settings.

    ``topic_prefix`` tells datagrepper categories apart (the app segment after it);
    ``poll_seconds`` is how often the dashboard polls a running job; ``clock`` is injectable.
    """

    catalog: Catalog
    topic_prefix: str = "org.fedoraproject.dev"
    poll_seconds: float = 2.0
    clock: Callable[[], float] = field(default=time.time)

    def now(self) -> dt.datetime:
        """The clock's now, aware UTC."""
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC)


def web_context(request: Request) -> WebContext:
    """FastAPI dependency: the app's context."""
    context: WebContext = request.app.state.web
    return context

"""fedimg's web layer: the dashboard, the JSON API and the datagrepper-compatible history.

Read-only over the catalog; it never talks to AWS (and never imports boto3). Start it with
``fedimg serve``; build the application with :func:`fedimg.web.app.create_app`.
"""

from __future__ import annotations

from fedimg.web.app import create_app
from fedimg.web.context import WebContext

__all__ = ["WebContext", "create_app"]

"""Running the web application: ``fedimg serve`` in the foreground, or a server in a thread.

uvicorn logs through the standard logging the CLI configured (stderr, hence the journal under
systemd); it installs no logging of its own.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from types import TracebackType

import uvicorn
from fastapi import FastAPI

from fedimg.catalog import Catalog
from fedimg.config import Config
from fedimg.web.app import create_app
from fedimg.web.context import WebContext

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True when ``host`` only listens on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    config: Config,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    root_path: str = "",
    poll_seconds: float = 2.0,
) -> None:
    """Serve the dashboard, the API and ``/raw`` over the configured catalog until interrupted."""
    catalog = Catalog(config.catalog_url())
    try:
        app = create_app(
            WebContext(
                catalog=catalog,
                topic_prefix=config.messaging.topic_prefix,
                poll_seconds=poll_seconds,
            )
        )
        if not is_loopback(host):
            log.warning("listening on %s: the dashboard is reachable from the network", host)
        log.info("dashboard on http://%s:%d%s/ (read-only)", _url_host(host), port, root_path)
        uvicorn.run(
            app,
            host=host,
            port=port,
            root_path=root_path,
            log_config=None,
            server_header=False,
            proxy_headers=False,
        )
    finally:
        catalog.close()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class BackgroundServer:
    """uvicorn serving ``app`` in a daemon thread on ``host`` (port 0: a free port); a context
    manager. ``url`` is known once started. Stops within ``timeout`` seconds."""

    def __init__(
        self,
        app: FastAPI,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        root_path: str = "",
        timeout: float = 10.0,
    ) -> None:
        self.app = app
        self.root_path = root_path
        self.host = host
        self.port = port
        self.timeout = timeout
        self.url = ""
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    def start(self) -> str:
        """Bind, start serving, wait until it accepts requests; returns the base URL."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self._socket = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            root_path=self.root_path,
            log_config=None,
            server_header=False,
            lifespan="off",
            access_log=False,
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="fedimg-web", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self.timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the web server did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        self.url = f"http://{_url_host(self.host)}:{self.port}{self.root_path}"
        return self.url

    def stop(self) -> None:
        """Ask the server to finish, and wait for it (idempotent)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(self.timeout)
            self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> BackgroundServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

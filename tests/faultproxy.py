"""A fault-injecting HTTP proxy in front of the embedded AWS endpoint (a test fixture).

Each request is, by a seeded draw: throttled (the service's own throttling error), answered 5xx,
dropped (connection closed without an answer), or forwarded. Counts what it did.
"""

from __future__ import annotations

import http.client
import http.server
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse


@dataclass
class FaultPlan:
    """Shares of requests to throttle, answer 5xx and drop; what was done."""

    throttle: float = 0.10
    server_error: float = 0.02
    drop: float = 0.02
    seed: int = 7
    counts: dict[str, int] = field(
        default_factory=lambda: {"forwarded": 0, "throttled": 0, "5xx": 0, "dropped": 0}
    )
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def draw(self) -> str:
        with self.lock:
            roll = self.rng.random()
            if roll < self.throttle:
                kind = "throttled"
            elif roll < self.throttle + self.server_error:
                kind = "5xx"
            elif roll < self.throttle + self.server_error + self.drop:
                kind = "dropped"
            else:
                kind = "forwarded"
            self.counts[kind] += 1
            return kind

    @property
    def injected(self) -> int:
        return self.counts["throttled"] + self.counts["5xx"] + self.counts["dropped"]


def _service(headers: Any) -> str:
    auth = headers.get("Authorization", "")
    for service in ("ebs", "s3", "ec2", "sts", "kms"):
        if f"/{service}/aws4_request" in auth:
            return service
    return "ec2"


_EC2_ERROR = (
    "<?xml version='1.0' encoding='UTF-8'?><Response><Errors><Error><Code>{code}</Code>"
    "<Message>{message}</Message></Error></Errors><RequestID>fault-proxy</RequestID></Response>"
)
_S3_ERROR = (
    "<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message>"
    "<RequestId>fault-proxy</RequestId></Error>"
)


class _Handler(http.server.BaseHTTPRequestHandler):
    upstream: str
    plan: FaultPlan
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        return

    def _fault(self, kind: str) -> None:
        service = _service(self.headers)
        if kind == "throttled":
            status = {"ec2": 503, "s3": 503}.get(service, 400)
            code = {"ec2": "RequestLimitExceeded", "s3": "SlowDown"}.get(
                service, "RequestThrottledException"
            )
        else:
            status, code = 500, "InternalError" if service != "ebs" else "InternalServerException"
        message = "injected by the fault proxy"
        if service == "ebs":
            body = b'{"message": "%s"}' % message.encode()
            content_type = "application/json"
        else:
            template = _S3_ERROR if service == "s3" else _EC2_ERROR
            body = template.format(code=code, message=message).encode()
            content_type = "text/xml"
        self.send_response(status)
        if service == "ebs":
            self.send_header("x-amzn-ErrorType", code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        kind = self.plan.draw()
        if kind == "dropped":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if kind != "forwarded":
            self._fault(kind)
            return
        target = urlparse(self.upstream)
        connection = http.client.HTTPConnection(
            target.hostname or "127.0.0.1", target.port, timeout=60
        )
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
        connection.request(self.command, self.path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        connection.close()

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle


@contextmanager
def fault_proxy(upstream: str, plan: FaultPlan) -> Iterator[str]:
    """Run the proxy on 127.0.0.1 at a free port in front of ``upstream``; yields its URL."""
    handler = type("Handler", (_Handler,), {"upstream": upstream, "plan": plan})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()

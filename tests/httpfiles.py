"""A local HTTP file server for tests: Range requests, 404s, and injected connection drops."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Faults:
    """Drop the connection after ``drop_after`` body bytes, ``drops`` times; count requests."""

    drop_after: int | None = None
    drops: int = 0
    ignore_range: bool = False
    requests: list[str] = field(default_factory=list)


class _Handler(http.server.BaseHTTPRequestHandler):
    root: Path
    faults: Faults

    def log_message(self, *args: Any) -> None:
        return

    def _file(self) -> Path | None:
        path = (self.root / self.path.lstrip("/").split("?")[0]).resolve()
        if self.root not in path.parents or not path.is_file():
            return None
        return path

    def do_HEAD(self) -> None:
        path = self._file()
        if path is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self) -> None:
        self.faults.requests.append(self.headers.get("Range", ""))
        path = self._file()
        if path is None:
            self.send_error(404)
            return
        data = path.read_bytes()
        start, end = 0, len(data) - 1
        header = self.headers.get("Range")
        if header and not self.faults.ignore_range:
            spec = header.removeprefix("bytes=")
            first, _, last = spec.partition("-")
            if first == "":
                start = max(0, len(data) - int(last))
            else:
                start = int(first)
                end = int(last) if last else end
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start : end + 1]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.faults.drops > 0 and self.faults.drop_after is not None:
            self.faults.drops -= 1
            self.wfile.write(body[: self.faults.drop_after])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


@contextmanager
def serve_files(root: Path, faults: Faults | None = None) -> Iterator[tuple[str, Faults]]:
    """Serve ``root`` on 127.0.0.1 at a free port; yields (base URL, faults)."""
    faults = faults or Faults()
    handler = type("Handler", (_Handler,), {"root": root.resolve(), "faults": faults})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", faults
    finally:
        server.shutdown()
        server.server_close()

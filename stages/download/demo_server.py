"""A loopback HTTP server for the demo images, so img2dataset downloads them through its real path."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    server: ImageServer.HTTPServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        data = self.server.files.get(self.path.split("?", 1)[0])
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:  # thousands of requests: keep the terminal readable
        pass


class ImageServer:
    """Serve {path: bytes} on 127.0.0.1 (port 0: an ephemeral one) from a background thread."""

    class HTTPServer(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256
        files: dict[str, bytes]

    def __init__(self, files: dict[str, bytes], port: int = 0, host: str = "127.0.0.1"):
        self.httpd = self.HTTPServer((host, port), _Handler)
        self.httpd.files = files
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> ImageServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.server_close()

"""A loopback image server with good, missing, slow and non-image URLs, and shard readers."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

COLOURS = [(200, 30, 30), (30, 160, 40), (40, 60, 220), (230, 200, 20)]


def png(i: int, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), COLOURS[i % len(COLOURS)]).save(buf, format="PNG")
    return buf.getvalue()


def checkerboard(size: int = 64, cell: int = 2) -> Image.Image:
    """Sharp detail everywhere, so a blur shows wherever it was applied."""
    img = Image.new("RGB", (size, size))
    img.putdata([(255, 255, 255) if (x // cell + y // cell) % 2 else (0, 0, 0)
                 for y in range(size) for x in range(size)])
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class Handler(BaseHTTPRequestHandler):
    server: LoopbackImages

    def do_GET(self) -> None:  # noqa: N802
        srv = self.server
        path = self.path
        with srv.lock:
            srv.hits[path] += 1
        if path.startswith("/slow/"):
            time.sleep(srv.slow_s)
        if path.startswith("/redirect/"):  # /redirect/<url-encoded target>
            self.send_response(302)
            self.send_header("Location", urllib.parse.unquote(path.removeprefix("/redirect/")))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path.startswith("/big/") or path.startswith("/drip/"):
            self._stream(path)
            return
        if path.startswith("/face.png"):
            body, ctype = png_bytes(checkerboard()), "image/png"
        elif path.startswith("/img/") or path.startswith("/delayed/"):
            if path.startswith("/delayed/"):
                time.sleep(srv.delay_s)
            body, ctype = png(int(path.rsplit("/", 1)[-1].split(".")[0])), "image/png"
        elif path.startswith("/text/"):
            body, ctype = b"<html><body>not an image</body></html>", "text/html"
        elif path.startswith("/slow/"):
            body, ctype = png(0), "image/png"
        else:
            self.send_error(404)
            return
        try:
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (timeout test, killed download)
            pass

    def _stream(self, path: str) -> None:
        """/big/<n>: n bytes, no Content-Length (chunked); /drip/<s>: a byte every 0.1 s for s seconds."""
        n = int(path.rsplit("/", 1)[-1])
        try:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunks = [b"x" * 65536] * (n // 65536) if path.startswith("/big/") else [b"x"] * (n * 10)
            for chunk in chunks:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                if path.startswith("/drip/"):
                    self.wfile.flush()
                    time.sleep(0.1)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client gave up, as the caps make it
            pass

    def log_message(self, *args) -> None:
        pass


class LoopbackImages(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, slow_s: float = 4.0, delay_s: float = 0.0):
        super().__init__(("127.0.0.1", 0), Handler)
        self.slow_s, self.delay_s = slow_s, delay_s
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join()


def tar_members(data: bytes) -> dict[str, dict[str, bytes]]:
    """key → {ext: bytes} of a webdataset tar."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


def run_download(args: list[str], env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.download", *args], env=env, text=True,
                          capture_output=True, timeout=timeout)


def start_download(args: list[str], env: dict) -> subprocess.Popen:
    """In its own session, so a test can SIGKILL the whole process group like a killed pod."""
    return subprocess.Popen([sys.executable, "-m", "stages.download", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def read_manifest(data_dir: str) -> dict:
    from stages.common import storage

    return json.loads(storage.read_bytes(f"{data_dir}/manifest.json"))


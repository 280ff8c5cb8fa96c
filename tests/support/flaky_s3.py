"""An S3 endpoint on loopback that fails requests the way S3 does, in front of moto's server."""

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class FlakyS3:
    """An S3 endpoint on loopback in front of moto that fails requests the way S3 does: in mode 'flaky'
    the first `burst` requests get 503 SlowDown one after another (more than pyarrow's default of 3
    attempts survives) and then every `every`-th (transient); in mode 'refuse' every request gets 403
    AccessDenied (permanent). `injected` counts the failures it answered. The AWS SDK backs off
    exponentially (about 0.5, 1, 2, 4 s), so a burst of 4 costs about 7 s."""

    def __init__(self, upstream: str, every: int = 10, burst: int = 4):
        self.mode, self.every, self.burst, self.injected, self.requests = "ok", every, burst, 0, 0
        self.lock = threading.Lock()
        target = urlsplit(upstream)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    raw = b""
                    while True:
                        size_line = self.rfile.readline()
                        raw += size_line
                        size = int(size_line.split(b";")[0].strip() or b"0", 16)
                        chunk = self.rfile.read(size + 2)
                        raw += chunk
                        if size == 0:
                            while chunk not in (b"\r\n", b""):  # trailers, then the blank line
                                chunk = self.rfile.readline()
                                raw += chunk
                            return raw
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _fail(self, status: int, code: str, message: str) -> None:
                body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}"
                        f"</Message></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _forward(self) -> None:
                body = self._body()
                with proxy.lock:
                    proxy.requests += 1
                    fail = proxy.mode == "refuse" or (proxy.mode == "flaky" and (
                        proxy.requests <= proxy.burst or proxy.requests % proxy.every == 0))
                    if fail:
                        proxy.injected += 1
                if fail and proxy.mode == "refuse":
                    return self._fail(403, "AccessDenied", "Access Denied")
                if fail:
                    return self._fail(503, "SlowDown", "Please reduce your request rate.")
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                head = self.command == "HEAD"  # a HEAD answer keeps the object's own Content-Length
                for key, value in response.getheaders():
                    skip = ("transfer-encoding", "connection", "date", "server") + (() if head else ("content-length",))
                    if key.lower() not in skip:
                        self.send_header(key, value)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

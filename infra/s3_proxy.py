"""A slow S3: an HTTP proxy that puts cloud-like latency and bandwidth in front of an S3
endpoint (moto or MinIO on this machine), and counts the requests that pass through.

Object storage in a cloud region answers each request after tens of milliseconds and streams
at a bounded rate per connection; a loopback endpoint answers in microseconds. A data path
that is fast on loopback can still stall a cluster on real S3 (one GET per 10 KiB tar record,
no read-ahead). Tests and `bench/data.py` put this proxy in front of the test endpoint to see
such costs here.

    python infra/s3_proxy.py --upstream http://127.0.0.1:5000 --port 5001 \\
        --latency-ms 30 --mbps 200
    AWS_ENDPOINT_URL=http://127.0.0.1:5001 python jobs/pretrain.py ...

Requests are forwarded unchanged (the Host header too, so signed requests still verify), one
upstream connection per client connection. Each request waits `latency` before it is
forwarded; response bodies stream at `mbps` megabytes per second per connection.

`down()` / `up()` make an outage, as a restarted or unreachable endpoint: the port refuses
connections and the open ones are cut mid-request, until `up()` listens on the same port.
"""

from __future__ import annotations

import argparse
import http.client
import socket
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

CHUNK = 64 << 10
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
              "trailer", "upgrade"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):    # a cut connection is no news
            super().handle_error(request, client_address)


class SlowS3Proxy:
    """`with SlowS3Proxy(upstream, latency_s=0.03, mbps=200) as proxy:` -> `proxy.url`;
    `proxy.requests` counts (method, path) pairs, `proxy.sent_bytes` the body bytes served."""

    def __init__(self, upstream: str, latency_s: float = 0.03, mbps: float = 200.0,
                 host: str = "127.0.0.1", port: int = 0):
        up = urlsplit(upstream)
        self.upstream = (up.hostname or "127.0.0.1", up.port or 80)
        self.latency_s, self.bytes_per_s = latency_s, mbps * 1e6
        self.requests: Counter[tuple[str, str]] = Counter()
        self.sent_bytes = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()     # client connections, cut by down()
        self._listen(host, port)
        self.url = f"http://{host}:{self.server.server_address[1]}"

    def _listen(self, host: str, port: int) -> None:
        self.server = _Server((host, port), self._handler())
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> SlowS3Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.down()

    def down(self) -> None:
        """Refuse connections and cut the open ones (requests in flight fail)."""
        self.server.shutdown()
        self.server.server_close()
        self.server = None
        with self._lock:
            open_now, self._open = list(self._open), set()
        for conn in open_now:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def up(self) -> None:
        """Listen again on the same port."""
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        self._listen(host, int(port))
        self._thread.start()

    def count(self, method: str) -> int:
        with self._lock:
            return sum(n for (m, _), n in self.requests.items() if m == method)

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"       # keep-alive, as S3 clients expect
            upstream_conn: http.client.HTTPConnection | None = None

            def log_message(self, *args):       # quiet: the counters are the log
                pass

            def setup(self):
                super().setup()
                with proxy._lock:
                    proxy._open.add(self.connection)

            def finish(self):
                with proxy._lock:
                    proxy._open.discard(self.connection)
                try:
                    super().finish()
                finally:
                    if self.upstream_conn is not None:
                        self.upstream_conn.close()

            def _forward(self):
                with proxy._lock:
                    proxy.requests[(self.command, self.path.split("?")[0])] += 1
                body = self._request_body()
                time.sleep(proxy.latency_s)
                if self.upstream_conn is None:
                    self.upstream_conn = http.client.HTTPConnection(*proxy.upstream,
                                                                    timeout=300)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in HOP_BY_HOP}
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                try:
                    self.upstream_conn.request(self.command, self.path, body=body,
                                               headers=headers)
                    resp = self.upstream_conn.getresponse()
                except (OSError, http.client.HTTPException):
                    self.upstream_conn.close()
                    self.upstream_conn = None
                    self.send_error(502, "upstream unreachable")
                    return
                self.send_response_only(resp.status, resp.reason)
                length = resp.getheader("Content-Length")
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP:
                        self.send_header(k, v)
                chunked = length is None and self.command != "HEAD" and resp.status not in (
                    204, 304)
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                start, sent = time.perf_counter(), 0
                while self.command != "HEAD" and (data := resp.read(CHUNK)):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                    sent += len(data)
                    ahead = sent / proxy.bytes_per_s - (time.perf_counter() - start)
                    if ahead > 0:
                        time.sleep(ahead)
                if chunked:
                    self.wfile.write(b"0\r\n\r\n")
                with proxy._lock:
                    proxy.sent_bytes += sent

            def _request_body(self) -> bytes | None:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    parts = []
                    while (size := int(self.rfile.readline().split(b";")[0], 16)):
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b""):   # trailers
                        pass
                    return b"".join(parts)
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else (b"" if self.command in ("PUT", "POST")
                                                     else None)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        return Handler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--upstream", required=True, help="the S3 endpoint, http://host:port")
    ap.add_argument("--port", type=int, default=5001)
    ap.add_argument("--latency-ms", type=float, default=30.0)
    ap.add_argument("--mbps", type=float, default=200.0, help="MB/s per connection")
    args = ap.parse_args()
    with SlowS3Proxy(args.upstream, args.latency_ms / 1000, args.mbps, port=args.port) as p:
        print(f"slow S3 at {p.url} -> {args.upstream} ({args.latency_ms:g} ms per request, "
              f"{args.mbps:g} MB/s per connection); Ctrl-C stops", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()

"""A fault-injecting HTTP reverse proxy to put between a store and a (moto) S3 server in tests.

Point the store's endpoint at ``proxy.endpoint``. Each request is forwarded unchanged (method,
path and query, headers including the signed ``Host``, body) to the upstream and the response is
relayed, unless a fault set with :meth:`FaultProxy.set_fault` hits it:

``error500``     500 InternalError (S3-style XML body)
``slowdown503``  503 SlowDown
``denied403``    403 AccessDenied (not transient: a store must not retry it)
``reset``        the connection is reset (SO_LINGER 0) without a response
``stall``        no answer until the fault is cleared or expires (then forwarded) or the proxy
                 stops (then reset)
``truncate``     upstream status and headers with the full Content-Length, half the body, close
``down``         every request is reset at once, before its body is read

Faults hit a ``fraction`` of the matching requests, drawn from a seeded RNG (reproducible for a
sequential client), optionally only for ``seconds`` from now and only for some ``methods``.
Counters: :attr:`requests` (all requests seen) and :attr:`faults` (faults injected, per kind).
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = ("error500", "slowdown503", "denied403", "reset", "stall", "truncate", "down")
_ERRORS = {
    "error500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "slowdown503": (503, "SlowDown", "Please reduce your request rate."),
    "denied403": (403, "AccessDenied", "Access Denied"),
}
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                         "te", "trailer", "trailers", "transfer-encoding", "upgrade", "expect",
                         "content-length"})


@dataclass
class _Fault:
    kind: str
    fraction: float
    until: float | None
    methods: frozenset[str] | None

    def matches(self, method: str, now: float) -> bool:
        return ((self.until is None or now < self.until)
                and (self.methods is None or method in self.methods))


class FaultProxy:
    """The proxy; see the module docstring. ``start()``/``stop()`` or use as a context manager."""

    def __init__(self, upstream_endpoint: str, seed: int = 1234,
                 upstream_timeout: float = 60.0) -> None:
        up = urlsplit(upstream_endpoint)
        if up.scheme != "http" or not up.hostname:
            raise ValueError(f"upstream must be http://host:port, not {upstream_endpoint!r}")
        self.upstream = (up.hostname, up.port or 80)
        self.upstream_timeout = upstream_timeout
        self.requests = 0
        self.faults: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._faults: dict[str, _Fault] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("proxy not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def set_fault(self, kind: str, fraction: float = 1.0, seconds: float | None = None,
                  methods: set[str] | frozenset[str] | None = None) -> None:
        """Inject ``kind`` into ``fraction`` of requests (with ``methods``, if given) for
        ``seconds`` from now (forever if None). Replaces an earlier fault of the same kind."""
        if kind not in KINDS:
            raise ValueError(f"unknown fault {kind!r}; known: {', '.join(KINDS)}")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError("fraction must be between 0 and 1")
        until = None if seconds is None else time.monotonic() + seconds
        wanted = None if methods is None else frozenset(m.upper() for m in methods)
        with self._cond:
            self._faults[kind] = _Fault(kind, fraction, until, wanted)
            self._cond.notify_all()

    def clear(self, kind: str | None = None) -> None:
        """Remove one fault, or all; stalled requests then go on."""
        with self._cond:
            if kind is None:
                self._faults.clear()
            else:
                self._faults.pop(kind, None)
            self._cond.notify_all()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, reset open and stalled connections, wait for handler threads (bounded).
        Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        server.shutdown()
        server.server_close()
        with self._cond:
            conns = dict(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for thread in [self._thread, *conns.values()]:
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- used by the handler threads ---------------------------------------------------------

    def _choose(self, method: str) -> str | None:
        """Count the request and pick the fault (if any) that hits it."""
        now = time.monotonic()
        with self._cond:
            self.requests += 1
            for kind, fault in list(self._faults.items()):
                if fault.until is not None and now >= fault.until:
                    del self._faults[kind]
                elif fault.matches(method, now) and self._rng.random() < fault.fraction:
                    return kind
        return None

    def _count(self, kind: str) -> None:
        with self._cond:
            self.faults[kind] += 1

    def _hold(self, method: str) -> bool:
        """Block while a stall fault matches ``method``; False if the proxy is stopping."""
        with self._cond:
            while not self._stopping:
                fault = self._faults.get("stall")
                if fault is None or not fault.matches(method, time.monotonic()):
                    return True
                self._cond.wait(0.05)
            return False

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._cond:
            if add:
                self._conns[conn] = threading.current_thread()
            else:
                self._conns.pop(conn, None)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # idle keep-alive connections must not block server_close()
    proxy: FaultProxy

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hanging up on stalled or faulty requests are expected here


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.proxy._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.proxy._track(self.connection, False)

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _handle(self) -> None:
        proxy = self.server.proxy
        kind = proxy._choose(self.command)
        if kind == "down":
            proxy._count(kind)
            return self._reset()
        body = self._read_body()
        if kind == "reset":
            proxy._count(kind)
            return self._reset()
        if kind in _ERRORS:
            proxy._count(kind)
            return self._send_error(*_ERRORS[kind])
        if kind == "stall":
            proxy._count(kind)
            if not proxy._hold(self.command):
                return self._reset()
        self._forward(body, truncate=kind == "truncate")

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reset(self) -> None:
        """Abort the connection with a TCP RST (the socket really closes in finish())."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _send_error(self, status: int, code: str, message: str) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{message}</Message><RequestId>{uuid.uuid4().hex}</RequestId>"
                "</Error>").encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self, body: bytes, truncate: bool) -> None:
        proxy = self.server.proxy
        conn = http.client.HTTPConnection(*proxy.upstream, timeout=proxy.upstream_timeout)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    conn.putheader(name, value)
            if body or "Content-Length" in self.headers or "Transfer-Encoding" in self.headers:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as e:
            return self._send_error(502, "BadGateway", f"upstream failed: {e}")
        finally:
            conn.close()
        self.send_response_only(resp.status, resp.reason)
        for name, value in resp.getheaders():
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        if self.command == "HEAD" or resp.status in (204, 304):
            length = resp.getheader("Content-Length")
            if length is not None:
                self.send_header("Content-Length", length)
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if truncate and len(data) > 1:
            proxy._count("truncate")
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        self.wfile.write(data)

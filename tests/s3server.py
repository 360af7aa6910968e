"""A real moto S3 server in a subprocess, reached over HTTP on 127.0.0.1 (no in-process mocks)."""

from __future__ import annotations

import atexit
import ctypes
import http.client
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """``moto_server`` (from the virtualenv of the running Python) on 127.0.0.1 and a free port.

    ``start()`` returns once the server answers HTTP (or raises RuntimeError after
    ``start_timeout`` seconds, with the end of its log); ``stop()`` terminates it, then kills it
    after ``stop_timeout`` seconds. Also a context manager.
    """

    def __init__(self, start_timeout: float = 60.0, stop_timeout: float = 5.0) -> None:
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: tempfile._TemporaryFileWrapper[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        exe = Path(sys.executable).parent / "moto_server"
        if not exe.exists():
            raise RuntimeError(f"{exe} not found: install moto[server] in the virtualenv")
        deadline = time.monotonic() + self.start_timeout
        for _ in range(3):  # the free port may be taken between choosing it and binding it
            self._log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log")
            self.port = free_port()
            self.proc = subprocess.Popen(
                [str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent)
            atexit.register(self.stop)
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self._answers():
                    return self
                time.sleep(0.1)
            log = self.log_tail()
            self.stop()
            if time.monotonic() >= deadline:
                break
        raise RuntimeError(f"moto_server did not start within {self.start_timeout}s: {log}")

    def _answers(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1.0)
        try:
            conn.request("GET", "/moto-api/")
            conn.getresponse().read()
            return True
        except OSError:
            return False
        finally:
            conn.close()

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the server's output, for error messages."""
        if self._log is None:
            return ""
        try:
            return Path(self._log.name).read_bytes()[-chars:].decode(errors="replace")
        except OSError:
            return ""

    def reset(self) -> None:
        """Forget all buckets and objects (moto's reset API)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10.0)
        try:
            conn.request("POST", "/moto-api/reset")
            conn.getresponse().read()
        finally:
            conn.close()

    def stop(self) -> None:
        """Terminate the server (kill it if it does not exit in time). Idempotent."""
        atexit.unregister(self.stop)
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(self.stop_timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()



def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM it when the test process dies, even by SIGKILL."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

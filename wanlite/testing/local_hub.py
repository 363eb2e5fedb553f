"""A Hugging Face Hub look-alike on 127.0.0.1 for tests: the endpoints huggingface_hub's download code uses.

`GET /api/models/{repo}[/revision/{rev}]` (model info; siblings with sizes when `blobs=true`),
`GET /api/models/{repo}/tree/{rev}[/{path}]` (listing), `HEAD|GET /{repo}/resolve/{rev}/{path}` (small files
answered directly with ETag / X-Repo-Commit / Content-Length; LFS files redirected to `/cdn/{sha256}` on a second port with
X-Linked-Etag / X-Linked-Size, as the Hub redirects to its CDN) and `GET /cdn/{sha256}` with Range support.
`drop_once` cuts the connection half-way through a file's first GET, as a flaky network would; `hidden`
files are listed but answer 404, as a file deleted after the listing does.
"""
from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".gguf", ".pth", ".ckpt", ".bin", ".model")
COMMIT = "c0ffee" + "0" * 34


@dataclass
class Blob:
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def git_sha(self) -> str:  # the id git gives the file: sha1 over "blob <size>\0" + bytes
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()


@dataclass
class LocalHub:
    """Repos as {repo_id: {path: bytes}}; `requests` records (method, path, Range header) for the tests."""

    repos: dict[str, dict[str, bytes]]
    drop_once: set[str] = field(default_factory=set)  # "repo/path" whose first GET is cut half-way
    hidden: set[str] = field(default_factory=set)  # "repo/path" listed but answering 404
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)

    def __post_init__(self):
        self.blobs = {repo: {p: Blob(b) for p, b in files.items()} for repo, files in self.repos.items()}
        self.by_sha = {b.sha256: b for files in self.blobs.values() for b in files.values()}
        self._lock = threading.Lock()

    def __enter__(self) -> LocalHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        # two ports: the Hub and its "CDN", another origin, so the client stops at the redirect as on the Hub
        self.servers = [ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2)]
        self.threads = []
        for server in self.servers:
            server.daemon_threads = True
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def __exit__(self, *exc) -> None:
        for server, thread in zip(self.servers, self.threads):
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.servers[0].server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self.servers[1].server_address[1]}"

    def take_drop(self, key: str) -> bool:
        with self._lock:
            if key in self.drop_once:
                self.drop_once.discard(key)
                return True
            return False

    @staticmethod
    def from_folder(repo: str, folder: Path, rename: dict[str, str] | None = None) -> dict[str, dict[str, bytes]]:
        """{repo: {path: bytes}} for every file under `folder` (paths relative to it, renamed by `rename`)."""
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
                 if p.is_file()}
        return {repo: {(rename or {}).get(k, k): v for k, v in files.items()}}


RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
CDN = re.compile(r"^/cdn/(?P<sha>[0-9a-f]{64})$")


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = "HTTP/1.1"
    timeout = 10  # a stuck client never holds a server thread past the test

    def log_message(self, *args) -> None:  # quiet: the tests read `hub.requests` instead
        pass

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    def _route(self, body: bool) -> None:
        from urllib.parse import unquote, urlsplit

        url = urlsplit(self.path)
        path = unquote(url.path)
        self.hub.requests.append((self.command, path, self.headers.get("Range")))
        for pattern, handler in ((INFO, self._info), (TREE, self._tree), (RESOLVE, self._resolve), (CDN, self._cdn)):
            m = pattern.match(path)
            if m:
                return handler(m, url.query, body)
        self._send(404, b"", {"X-Error-Code": "RepoNotFound"}, body)

    def _files(self, repo: str) -> dict[str, Blob] | None:
        files = self.hub.blobs.get(repo)
        if files is None:
            self._send(401, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, True)
        return files

    def _info(self, m, query: str, body: bool) -> None:
        files = self._files(m["repo"])
        if files is None:
            return
        siblings = []
        for name, blob in sorted(files.items()):
            entry = {"rfilename": name}
            if "blobs=true" in query:
                entry.update(size=len(blob.data), blobId=blob.git_sha)
                if name.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"size": len(blob.data), "sha256": blob.sha256, "pointerSize": 134}
            siblings.append(entry)
        self._json({"_id": m["repo"], "id": m["repo"], "sha": COMMIT, "private": False, "siblings": siblings}, body)

    def _tree(self, m, query: str, body: bool) -> None:
        files = self._files(m["repo"])
        if files is None:
            return
        prefix = (m["path"] or "").strip("/")
        prefix = prefix + "/" if prefix else ""
        entries, folders = [], set()
        for name, blob in sorted(files.items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            if "/" in rest and "recursive=true" not in query:
                folders.add(prefix + rest.split("/")[0])
                continue
            entry = {"type": "file", "oid": blob.git_sha, "size": len(blob.data), "path": name}
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
        self._json(entries, body)

    def _resolve(self, m, query: str, body: bool) -> None:
        files = self._files(m["repo"])
        if files is None:
            return
        key = f"{m['repo']}/{m['path']}"
        blob = files.get(m["path"])
        if blob is None or key in self.hub.hidden:
            return self._send(404, b'{"error": "Entry not found"}',
                              {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, body)
        if m["path"].endswith(LFS_SUFFIXES):
            return self._send(302, b"", {"Location": f"{self.hub.cdn}/cdn/{blob.sha256}",
                                         "X-Repo-Commit": COMMIT, "X-Linked-Etag": f'"{blob.sha256}"',
                                         "X-Linked-Size": str(len(blob.data)), "ETag": f'"{blob.git_sha}"'}, body)
        self._data(blob, {"X-Repo-Commit": COMMIT, "ETag": f'"{blob.git_sha}"'}, body, key)

    def _cdn(self, m, query: str, body: bool) -> None:
        blob = self.hub.by_sha.get(m["sha"])
        if blob is None:
            return self._send(404, b"", {}, body)
        key = next(f"{r}/{p}" for r, files in self.hub.blobs.items() for p, b in files.items() if b is blob)
        self._data(blob, {"ETag": f'"{blob.sha256}"'}, body, key)

    def _data(self, blob: Blob, headers: dict[str, str], body: bool, key: str) -> None:
        data, status = blob.data, 200
        wanted = re.match(r"^bytes=(\d+)-(\d*)$", self.headers.get("Range") or "")
        if wanted:
            start = int(wanted[1])
            end = int(wanted[2]) if wanted[2] else len(data) - 1
            if start >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, body)
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}
            data, status = data[start:end + 1], 206
        if body and self.hub.take_drop(key):
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(data))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)  # mid-body: the client sees the peer hang up
            return
        self._send(status, data, {**headers, "Accept-Ranges": "bytes"}, body)

    def _json(self, payload, body: bool) -> None:
        self._send(200, json.dumps(payload).encode(), {"Content-Type": "application/json"}, body)

    def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

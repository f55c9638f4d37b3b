"""A small Hugging Face Hub look-alike for tests: standard library only, loopback only, in memory.

It answers the part of the Hub HTTP API that the real ``huggingface_hub`` 2.4 client uses to create a repository,
upload a folder (``preupload`` answers ``uploadMode: "regular"``, so file contents arrive base64-encoded in the NDJSON
commit body, no LFS or Xet), read repository info and trees, and download files (``/{repo}/resolve/{rev}/{path}``,
HEAD and GET, with the ``X-Repo-Commit``, ``ETag`` and ``Content-Length`` headers the client checks). Point the client
at it with ``HfApi(endpoint=server.url)``, the ``endpoint=`` argument, or ``HF_ENDPOINT=server.url`` set before
``huggingface_hub`` is imported (a subprocess).

Every request is recorded in ``server.requests`` (method, path, query, JSON body when there is one). The
Authorization header is never stored: a record only says whether a token was sent (``token_sent``), which user it
authenticated as (``user``, None for an unknown token) and a SHA-256 digest of it (``token_sha256``), so tests can
check the right token was used without holding or printing it. Requests the server does not know are answered 404 and
kept in ``server.unknown_requests``: a test should assert that list is empty.

Private repositories answer 404 ``RepoNotFound`` to anyone but their owner, as the Hub does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional
from urllib.parse import parse_qs, unquote, urlsplit

INITIAL_FILES = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}


def git_blob_oid(content: bytes) -> str:
    """The git object id of a file, which the Hub uses as the ETag and ``oid`` of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    commits: List[str] = field(default_factory=list)  # oldest first; the last one is "main"
    snapshots: Dict[str, Dict[str, bytes]] = field(default_factory=dict)  # commit sha -> {path: content}
    messages: Dict[str, str] = field(default_factory=dict)  # commit sha -> summary

    def commit(self, files: Dict[str, bytes], summary: str) -> str:
        sha = hashlib.sha1(f"{self.repo_id}/{len(self.commits)}/{time.time_ns()}".encode()).hexdigest()
        self.commits.append(sha)
        self.snapshots[sha] = files
        self.messages[sha] = summary
        return sha

    def resolve(self, revision: str) -> Optional[str]:
        if revision == "main":
            return self.commits[-1]
        return revision if revision in self.snapshots else None


class HubServer:
    """The server; use as a context manager or call `start()` / `stop()`.

    Args:
        tokens: valid tokens and the user each one authenticates as, e.g. ``{"hf_xxx": "tester"}``.
        timeout: seconds a connection may stay silent before the server drops it.
    """

    def __init__(self, tokens: Dict[str, str], timeout: float = 30.0):
        self._users_by_digest = {token_digest(t): user for t, user in tokens.items()}
        self.repos: Dict[str, Repo] = {}
        self.requests: List[dict] = []
        self.unknown_requests: List[dict] = []
        self.lock = threading.Lock()
        self.timeout = timeout
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        handler = type("Handler", (_Handler,), {"hub": self, "timeout": self.timeout})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # port 0: a free port
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers for tests
    def files(self, repo_id: str, revision: str = "main") -> Dict[str, bytes]:
        repo = self.repos[repo_id]
        return dict(repo.snapshots[repo.resolve(revision)])

    def requests_to(self, method: str, pattern: str) -> List[dict]:
        return [r for r in self.requests if r["method"] == method and re.search(pattern, r["path"])]

    def user_for(self, authorization: Optional[str]) -> Optional[str]:
        if not authorization or not authorization.startswith("Bearer "):
            return None
        return self._users_by_digest.get(token_digest(authorization[len("Bearer ") :]))


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer  # set on the subclass made in HubServer.start
    server_version = "HubLookAlike/1"

    # Silence the default stderr access log (it would print paths only, but tests keep output clean).
    def log_message(self, format, *args):  # noqa: A002
        pass

    # ------------------------------------------------------------------ dispatch
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        path = unquote(split.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        authorization = self.headers.get("Authorization")
        user = self.hub.user_for(authorization)
        record = {
            "method": method,
            "path": path,
            "query": query,
            "token_sent": bool(authorization),
            "token_sha256": token_digest(authorization[len("Bearer ") :]) if authorization else None,
            "user": user,
        }
        if body and (self.headers.get("Content-Type") or "").startswith("application/json"):
            try:
                record["json"] = json.loads(body)
            except ValueError:
                pass
        with self.hub.lock:
            self.hub.requests.append(record)
        if authorization and user is None:
            return self._error(401, "Invalid credentials in Authorization header", "InvalidCredentials")
        self.user = user
        self.body = body
        self.query = query
        with self.hub.lock:
            for route_method, pattern, handler in _ROUTES:
                if route_method == method or (route_method == "GET" and method == "HEAD"):
                    match = re.fullmatch(pattern, path)
                    if match:
                        return handler(self, **match.groupdict())
            self.hub.unknown_requests.append(record)
        self._error(404, f"Unknown route {method} {path} (tests/hub_server.py)")

    # ------------------------------------------------------------------ responses
    def _send(self, status: int, body: bytes, content_type: str, headers: Optional[dict] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, payload, status: int = 200, headers: Optional[dict] = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers)

    def _error(self, status: int, message: str, code: Optional[str] = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json({"error": message}, status, headers)

    def _repo(self, namespace: str, name: str) -> Optional[Repo]:
        """The repository if it exists and the caller may see it; otherwise answers 404 and returns None."""
        repo = self.hub.repos.get(f"{namespace}/{name}")
        if repo is None or (repo.private and self.user != repo.owner):
            self._error(404, "Repository not found", "RepoNotFound")
            return None
        return repo

    def _writable_repo(self, namespace: str, name: str) -> Optional[Repo]:
        if self.user is None:
            self._error(401, "You must be authenticated to write", "InvalidCredentials")
            return None
        repo = self._repo(namespace, name)
        if repo is not None and repo.owner != self.user:
            self._error(403, "You don't have the rights to write to this repository")
            return None
        return repo

    # ------------------------------------------------------------------ routes
    def whoami(self):
        if self.user is None:
            return self._error(401, "Invalid credentials in Authorization header", "InvalidCredentials")
        self._json({"type": "user", "name": self.user, "orgs": [], "auth": {"type": "access_token"}})

    def create_repo(self):
        if self.user is None:
            return self._error(401, "You must be authenticated to create a repository", "InvalidCredentials")
        payload = json.loads(self.body or b"{}")
        if payload.get("type", "model") != "model":
            return self._error(400, "Only model repositories are supported by this test server")
        namespace = payload.get("organization") or self.user
        if namespace != self.user:
            return self._error(403, f"You cannot create repositories under {namespace}")
        repo_id = f"{namespace}/{payload['name']}"
        if repo_id in self.hub.repos:  # the Hub's 409 body carries the url, which create_repo(exist_ok=True) reads
            message = "You already created this model repo"
            return self._json({"error": message, "url": f"{self.hub.url}/{repo_id}"}, 409, {"X-Error-Message": message})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = Repo(repo_id=repo_id, owner=self.user, private=private)
        repo.commit(dict(INITIAL_FILES), "initial commit")
        self.hub.repos[repo_id] = repo
        self._json({"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def validate_yaml(self):
        self._json({"errors": [], "warnings": []})

    def preupload(self, namespace, name, revision):
        repo = self._writable_repo(namespace, name)
        if repo is None:
            return
        files = json.loads(self.body)["files"]
        self._json(
            {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        )

    def commit(self, namespace, name, revision):
        repo = self._writable_repo(namespace, name)
        if repo is None:
            return
        parent = repo.resolve(revision)
        if parent is None:
            return self._error(404, f"Revision {revision} not found", "RevisionNotFound")
        files = dict(repo.snapshots[parent])
        summary = ""
        for line in self.body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                if value.get("encoding") != "base64":
                    return self._error(400, f"Unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(prefix)}
            else:  # lfsFile, copies: never asked for, since preupload answers "regular"
                return self._error(400, f"Commit operation {key!r} is not supported by this test server")
        sha = repo.commit(files, summary)
        self._json({"success": True, "commitOid": sha, "commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{sha}"})

    def model_info(self, namespace, name, revision="main"):
        repo = self._repo(namespace, name)
        if repo is None:
            return
        sha = repo.resolve(revision)
        if sha is None:
            return self._error(404, f"Revision {revision} not found", "RevisionNotFound")
        self._json(
            {
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.owner,
                "sha": sha,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "library_name": "diffusers",
                "tags": [],
                "siblings": [{"rfilename": p} for p in sorted(repo.snapshots[sha])],
            }
        )

    def tree(self, namespace, name, revision, path=None):
        path = path or ""
        repo = self._repo(namespace, name)
        if repo is None:
            return
        sha = repo.resolve(revision)
        if sha is None:
            return self._error(404, f"Revision {revision} not found", "RevisionNotFound")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        entries, folders = [], set()
        for file_path, content in sorted(repo.snapshots[sha].items()):
            if not file_path.startswith(prefix):
                continue
            rest = file_path[len(prefix) :]
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                folder = prefix + "/".join(parts[:depth])
                if (recursive or depth == 1) and folder not in folders:
                    folders.add(folder)
                    entries.append({"type": "directory", "path": folder, "oid": git_blob_oid(folder.encode()), "size": 0})
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "path": file_path, "size": len(content), "oid": git_blob_oid(content)})
        if prefix and not entries:
            return self._error(404, f"{path} does not exist", "EntryNotFound")
        self._json(entries)

    def resolve(self, namespace, name, revision, path):
        repo = self._repo(namespace, name)
        if repo is None:
            return
        sha = repo.resolve(revision)
        if sha is None:
            return self._error(404, f"Revision {revision} not found", "RevisionNotFound")
        content = repo.snapshots[sha].get(path)
        if content is None:
            self.send_response(404)
            body = json.dumps({"error": "Entry not found"}).encode()
            for key, value in {
                "X-Error-Code": "EntryNotFound",
                "X-Error-Message": "Entry not found",
                "X-Repo-Commit": sha,
                "Content-Type": "application/json",
                "Content-Length": str(len(body)),
            }.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            return
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_oid(content)}"', "Accept-Ranges": "none"}
        self._send(200, content, "application/octet-stream", headers)


_REPO = r"/api/models/(?P<namespace>[^/]+)/(?P<name>[^/]+)"
_ROUTES = [
    ("GET", r"/api/whoami-v2", _Handler.whoami),
    ("POST", r"/api/repos/create", _Handler.create_repo),
    ("POST", r"/api/validate-yaml", _Handler.validate_yaml),
    ("POST", _REPO + r"/preupload/(?P<revision>[^/]+)", _Handler.preupload),
    ("POST", _REPO + r"/commit/(?P<revision>[^/]+)", _Handler.commit),
    ("GET", _REPO, _Handler.model_info),
    ("GET", _REPO + r"/revision/(?P<revision>[^/]+)", _Handler.model_info),
    ("GET", _REPO + r"/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?", _Handler.tree),
    ("GET", r"/(?P<namespace>[^/]+)/(?P<name>[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)", _Handler.resolve),
]

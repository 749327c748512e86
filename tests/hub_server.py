"""A Hugging Face Hub stand-in for the test suite: stdlib-only, in-process, on 127.0.0.1.

Why: grin_peft must prove that adapters round-trip through ``push_to_hub`` / ``from_pretrained``, and CI has no
network and no real token. Rather than mocking ``huggingface_hub`` internals (which change between releases), we
serve the subset of the Hub's HTTP API that its real client uses, so every layer above the socket (huggingface_hub,
transformers, peft) runs unmodified.

What is served (checked against huggingface_hub 2.4):

* ``GET /api/whoami-v2``; ``POST /api/repos/create``; ``DELETE|POST /api/repos/delete``; ``POST /api/repos/move``;
  ``POST /api/validate-yaml`` (called before any commit that touches ``README.md``).
* Per repo, under ``/api/{models,datasets,spaces,kernels}/{repo_id}``: info (``[/revision/{rev}]``),
  ``tree/{rev}[/{path}]``, ``paths-info/{rev}``, ``preupload/{rev}``, ``commit/{rev}`` (NDJSON), ``commits/{rev}``,
  ``refs``, ``branch/{name}``, ``tag/{rev}``, ``settings``.
* Downloads: ``HEAD|GET /[{type}s/]{repo_id}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, a quoted ``ETag``
  (the git blob sha1, as the Hub does for non-LFS files), ``Content-Length`` and ``Range`` support.

Every file is stored as a plain git blob: ``preupload`` answers ``"regular"`` for every path, so the client never
takes the LFS or Xet upload paths (it base64-inlines the bytes into the commit instead). Errors carry the
``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) that ``hf_raise_for_status``
maps to typed exceptions. New repos start with one ``initial commit`` holding ``.gitattributes``, like on the Hub.

huggingface_hub reads ``HF_ENDPOINT``, ``HF_HOME`` and friends into module constants *at import time* (and builds a
module-level ``HfApi()`` whose endpoint is frozen then), so the server has to be running and the environment set
before anything imports huggingface_hub. Patching ``huggingface_hub.constants.ENDPOINT`` afterwards is not enough in
2.4: ``HUGGINGFACE_CO_URL_TEMPLATE``, the trusted-redirect origins in ``utils._http`` and the bound top-level helpers
(``huggingface_hub.create_repo`` etc.) all captured the old value. Hence the conftest snippet, which must run at
conftest import time, before any third-party import::

    # tests/conftest.py -- keep this block above every import that may pull in huggingface_hub
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import hub_server  # noqa: E402  (stdlib only: safe to import first)

    HUB = hub_server.start_session_hub()  # starts the server, sets HF_ENDPOINT/HF_HOME/HF_TOKEN/...

    import pytest  # noqa: E402


    @pytest.fixture(scope="session")
    def hub() -> hub_server.HubServer:
        return HUB

The session server is shared: tests should push to unique names (see ``unique_repo_id``).
"""

from __future__ import annotations

import atexit
import base64
import collections
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

DEFAULT_USER = "test-user"
FAKE_TOKEN = "hf_grin_peft_fake_test_token"

# URL segments that follow a repo id in API routes; used to tell "ns/name" ids from canonical "name" ids.
_REPO_SUBPATHS = frozenset(
    {"revision", "tree", "paths-info", "preupload", "commit", "commits", "refs", "branch", "tag", "settings"}
)
_TYPE_PLURALS = {"models": "model", "datasets": "dataset", "spaces": "space", "kernels": "kernel"}
_TYPE_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}
_HEX40 = re.compile(r"[0-9a-f]{40}")
_HEX_PREFIX = re.compile(r"[0-9a-f]{7,39}")

# What the Hub puts in the initial commit of every new repo (abridged: only the pattern list matters to nobody here).
_GITATTRIBUTES = b"""*.bin filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
"""


def _now() -> str:
    """Hub-style timestamp: the client's ``parse_datetime`` only accepts ``%Y-%m-%dT%H:%M:%S.%fZ``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_oid(data: bytes) -> str:
    """Git's blob sha1; the client compares it with the preupload ``oid`` to skip unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    """An HTTP error answer, with the ``X-Error-Code`` the client maps to an exception class."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


@dataclass(frozen=True)
class Commit:
    """An immutable snapshot: ``files`` maps repo paths to git blob oids held by the blob store."""

    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, str]


@dataclass
class Repo:
    """One repository: commits form a chain per branch; tags and PR refs are just more named pointers."""

    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pull_requests: dict[int, str] = field(default_factory=dict)


class HubState:
    """Repos in memory, file bytes on disk (content-addressed), one lock for everything.

    A single coarse lock is plenty: test traffic is tiny and it makes every handler trivially consistent.
    """

    def __init__(self, root_dir: str | os.PathLike[str], user: str = DEFAULT_USER, token: str | None = None):
        self.root = Path(root_dir)
        self.blob_dir = self.root / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.user = user
        # None: accept any bearer token (the client insists on sending one for writes, its value does not matter).
        self.token = token
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.blob_sizes: dict[str, int] = {}
        self._commit_counter = 0
        # (method, path, status) of every request, and the requests no route matched: handy to debug a new client.
        self.request_log: collections.deque[tuple[str, str, int]] = collections.deque(maxlen=20_000)
        self.unhandled: list[tuple[str, str]] = []

    # -- blobs ---------------------------------------------------------------------------------------------------

    def put_blob(self, data: bytes) -> str:
        oid = git_blob_oid(data)
        with self.lock:
            if oid not in self.blob_sizes:
                tmp = self.blob_dir / f"{oid}.{uuid.uuid4().hex}.tmp"
                tmp.write_bytes(data)
                os.replace(tmp, self.blob_dir / oid)
                self.blob_sizes[oid] = len(data)
        return oid

    def read_blob(self, oid: str) -> bytes:
        return (self.blob_dir / oid).read_bytes()

    # -- repos and revisions -------------------------------------------------------------------------------------

    def get_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def resolve(self, repo: Repo, revision: str) -> Commit:
        """Branch, tag, ``refs/heads|tags|pr/...``, full sha or unique sha prefix -> commit."""
        rev = revision
        for prefix in ("refs/heads/", "refs/tags/"):
            if rev.startswith(prefix):
                rev = rev[len(prefix) :]
        oid: str | None = None
        if rev in repo.branches:
            oid = repo.branches[rev]
        elif rev in repo.tags:
            oid = repo.tags[rev]
        elif (m := re.fullmatch(r"refs/pr/(\d+)", rev)) and int(m.group(1)) in repo.pull_requests:
            oid = repo.pull_requests[int(m.group(1))]
        elif _HEX40.fullmatch(rev) and rev in repo.commits:
            oid = rev
        elif _HEX_PREFIX.fullmatch(rev):
            matches = [c for c in repo.commits if c.startswith(rev)]
            oid = matches[0] if len(matches) == 1 else None
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[oid]

    def new_commit(self, repo: Repo, parent: str | None, title: str, message: str, files: dict[str, str]) -> Commit:
        # The oid only has to be unique and 40-hex; a counter makes it so even for identical trees.
        self._commit_counter += 1
        seed = json.dumps([repo.repo_type, repo.repo_id, parent, title, sorted(files.items()), self._commit_counter])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, title, message, _now(), dict(files))
        repo.commits[commit.oid] = commit
        return commit

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        if (repo_type, repo_id) in self.repos:
            raise HubError(409, f"You already created this {repo_type} repo")
        repo = Repo(repo_type, repo_id, private, _now())
        commit = self.new_commit(repo, None, "initial commit", "", {".gitattributes": self.put_blob(_GITATTRIBUTES)})
        repo.branches["main"] = commit.oid
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def last_commit_touching(self, repo: Repo, start: Commit, path: str) -> Commit:
        """Walk back while ``path`` (file or folder) is unchanged: what the Hub reports as ``lastCommit``."""

        def view(commit: Commit) -> list[tuple[str, str]]:
            return sorted((p, o) for p, o in commit.files.items() if p == path or p.startswith(path + "/"))

        current, wanted = start, view(start)
        while current.parent is not None and view(repo.commits[current.parent]) == wanted:
            current = repo.commits[current.parent]
        return current


def _dirs_of(files: dict[str, str]) -> set[str]:
    """Every folder implied by the file paths (git has no empty folders)."""
    dirs: set[str] = set()
    for path in files:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    return dirs


def _tree_oid(files: dict[str, str], folder: str) -> str:
    entries = sorted((p, o) for p, o in files.items() if p.startswith(folder + "/"))
    return hashlib.sha1(json.dumps(entries).encode()).hexdigest()


class _HubHandler(BaseHTTPRequestHandler):
    """Routes one request to the Hub-like behaviour; every answer carries an explicit Content-Length.

    HTTP/1.1 keep-alive is what httpx expects, so the request body is always drained first (even on errors): a body
    left in the socket would be parsed as the next request and break the connection.
    """

    protocol_version = "HTTP/1.1"
    server: _HubHTTPServer
    timeout = 120  # an idle keep-alive connection must not pin a thread forever

    # -- plumbing -----------------------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default stderr access log; ``HubState.request_log`` keeps the useful part."""

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self._started = True
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json; charset=utf-8")
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            # Header values must be latin-1; messages may echo user paths, so escape anything beyond ASCII.
            self.send_header(key, value.encode("ascii", "backslashreplace").decode())
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        self._status = status

    def _json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _dispatch(self) -> None:
        self._status, self._started = 0, False
        body = self._read_body()
        state = self.server.state
        url = urlsplit(self.path)
        try:
            self._check_token(state)
            with state.lock:
                self._route(state, url.path, parse_qs(url.query), body)
        except HubError as err:
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._json({"error": err.message}, err.status, headers)
        except Exception as err:  # a server bug must surface as a 500 with a message, not a dropped connection
            if self._started:  # too late for an error answer (e.g. the client hung up mid-body): drop the connection
                self.close_connection = True
                return
            self._json({"error": f"test hub server error: {err!r}"}, 500, {"X-Error-Message": repr(err)})
        finally:
            state.request_log.append((self.command, self.path, self._status))

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch

    def _check_token(self, state: HubState) -> None:
        auth = self.headers.get("Authorization")
        self._authenticated = bool(auth)
        if auth and state.token is not None and auth != f"Bearer {state.token}":
            raise HubError(401, "Invalid credentials in Authorization header")

    def _visible(self, repo: Repo) -> Repo:
        """Private repos look missing to anonymous callers, as on the Hub (401 + RepoNotFound)."""
        if repo.private and not self._authenticated:
            raise HubError(401, "Repository not found", "RepoNotFound")
        return repo

    # -- routing ------------------------------------------------------------------------------------------------

    def _route(self, state: HubState, path: str, query: dict[str, list[str]], body: bytes) -> None:
        segs = path.split("/")[1:]  # still percent-encoded: revisions arrive quoted with safe=""
        method = self.command
        if segs[:1] == ["api"]:
            api = segs[1:]
            if api == ["whoami-v2"] and method == "GET":
                return self._whoami(state)
            if api == ["repos", "create"] and method == "POST":
                return self._create_repo(state, body)
            if api == ["repos", "delete"] and method in ("DELETE", "POST"):
                return self._delete_repo(state, body)
            if api == ["repos", "move"] and method == "POST":
                return self._move_repo(state, body)
            if api == ["validate-yaml"] and method == "POST":
                return self._validate_yaml(body)
            if len(api) >= 2 and api[0] in _TYPE_PLURALS:
                return self._repo_api(state, _TYPE_PLURALS[api[0]], api[1:], query, body)
        elif "resolve" in segs and method in ("GET", "HEAD"):
            repo_type = "model"
            if segs[0] in _TYPE_PLURALS and segs[0] != "models":
                repo_type, segs = _TYPE_PLURALS[segs[0]], segs[1:]
            idx = segs.index("resolve")
            if 1 <= idx <= 2 and len(segs) >= idx + 3:
                repo_id = "/".join(unquote(s) for s in segs[:idx])
                return self._resolve(
                    state, repo_type, repo_id, unquote(segs[idx + 1]), unquote("/".join(segs[idx + 2 :]))
                )
        state.unhandled.append((method, self.path))
        raise HubError(404, f"test hub server: no route for {method} {path}")

    def _repo_api(
        self, state: HubState, repo_type: str, rest: list[str], query: dict[str, list[str]], body: bytes
    ) -> None:
        if len(rest) >= 2 and rest[1] not in _REPO_SUBPATHS:
            repo_id, tail = f"{unquote(rest[0])}/{unquote(rest[1])}", rest[2:]
        else:
            repo_id, tail = unquote(rest[0]), rest[1:]
        repo = self._visible(state.get_repo(repo_type, repo_id))
        method, action = self.command, tail[0] if tail else None
        arg = unquote(tail[1]) if len(tail) > 1 else None
        if action is None and method == "GET":
            return self._repo_info(state, repo, "main", query)
        if action == "revision" and arg and method == "GET":
            return self._repo_info(state, repo, arg, query)
        if action == "tree" and arg and method == "GET":
            return self._tree(state, repo, arg, unquote("/".join(tail[2:])), query)
        if action == "paths-info" and arg and method == "POST":
            return self._paths_info(state, repo, arg, body)
        if action == "preupload" and arg and method == "POST":
            return self._preupload(state, repo, arg, body)
        if action == "commit" and arg and method == "POST":
            return self._commit(state, repo, arg, query, body)
        if action == "commits" and arg and method == "GET":
            return self._list_commits(state, repo, arg)
        if action == "refs" and method == "GET":
            return self._refs(state, repo)
        if action == "branch" and arg and method in ("POST", "DELETE"):
            return self._branch(state, repo, arg, body)
        if action == "tag" and arg and method in ("POST", "DELETE"):
            return self._tag(state, repo, arg, body)
        if action == "settings" and method == "PUT":
            return self._settings(repo, body)
        state.unhandled.append((method, self.path))
        raise HubError(404, f"test hub server: no route for {method} {self.path}")

    # -- account and repo lifecycle -----------------------------------------------------------------------------

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.server.base_url}/{_TYPE_URL_PREFIX[repo_type]}{repo_id}"

    def _whoami(self, state: HubState) -> None:
        if not self._authenticated:
            raise HubError(401, "Invalid credentials in Authorization header")
        self._json(
            {
                "type": "user",
                "id": hashlib.sha1(state.user.encode()).hexdigest()[:24],
                "name": state.user,
                "fullname": "Test User",
                "email": f"{state.user}@example.com",
                "emailVerified": True,
                "isPro": False,
                "canPay": False,
                "avatarUrl": "",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            }
        )

    def _create_repo(self, state: HubState, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        repo_type = payload.get("type") or "model"
        if repo_type not in _TYPE_URL_PREFIX:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        repo_id = f"{payload.get('organization') or state.user}/{payload['name']}"
        url = self._repo_url(repo_type, repo_id)
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        try:
            state.create_repo(repo_type, repo_id, private)
        except HubError as err:
            # The client reads the 409 as "exists" and still wants the url; ``exist_ok`` relies on the status only.
            self._json({"error": err.message, "url": url}, 409, {"X-Error-Message": err.message})
            return
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self, state: HubState, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or state.user}/{payload['name']}"
        state.get_repo(repo_type, repo_id)
        del state.repos[(repo_type, repo_id)]
        self._json({})

    def _move_repo(self, state: HubState, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        repo_type = payload.get("type") or "model"
        repo = state.get_repo(repo_type, payload["fromRepo"])
        if (repo_type, payload["toRepo"]) in state.repos:
            raise HubError(409, "A repository with this name already exists")
        del state.repos[(repo_type, repo.repo_id)]
        repo.repo_id = payload["toRepo"]
        state.repos[(repo_type, repo.repo_id)] = repo
        self._json({})

    def _settings(self, repo: Repo, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        if "private" in payload:
            repo.private = bool(payload["private"])
        if "visibility" in payload:
            repo.private = payload["visibility"] == "private"
        self._json({})

    def _validate_yaml(self, body: bytes) -> None:
        """Stdlib has no YAML parser: reject only an unterminated front-matter block; the client parses the rest."""
        content = json.loads(body or b"{}").get("content", "")
        lines = content.splitlines()
        if lines and lines[0].strip() == "---" and not any(line.strip() == "---" for line in lines[1:]):
            self._json({"errors": [{"message": "Unterminated YAML metadata block"}], "warnings": []}, 400)
            return
        self._json({"errors": [], "warnings": []})

    # -- read API -----------------------------------------------------------------------------------------------

    def _repo_info(self, state: HubState, repo: Repo, revision: str, query: dict[str, list[str]]) -> None:
        commit = state.resolve(repo, revision)
        with_blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path in sorted(commit.files):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=state.blob_sizes[commit.files[path]], blobId=commit.files[path])
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "createdAt": repo.created_at,
            "lastModified": commit.date,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(state.blob_sizes[o] for o in set(commit.files.values())),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        elif repo.repo_type == "space":
            info.update(sdk="static", runtime={"stage": "RUNNING", "hardware": {"current": None, "requested": None}})
        self._json(info)

    def _entry(
        self, state: HubState, repo: Repo, commit: Commit, path: str, expand: bool, *, is_dir: bool
    ) -> dict[str, Any]:
        if is_dir:
            entry: dict[str, Any] = {
                "type": "directory",
                "oid": _tree_oid(commit.files, path),
                "size": 0,
                "path": path,
            }
        else:
            oid = commit.files[path]
            entry = {"type": "file", "oid": oid, "size": state.blob_sizes[oid], "path": path}
        if expand:
            last = state.last_commit_touching(repo, commit, path)
            entry["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
        return entry

    def _tree(self, state: HubState, repo: Repo, revision: str, folder: str, query: dict[str, list[str]]) -> None:
        commit = state.resolve(repo, revision)
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        expand = query.get("expand", ["false"])[0].lower() in ("1", "true")
        folder = folder.strip("/")
        dirs = _dirs_of(commit.files)
        if folder and folder not in dirs:
            raise HubError(404, f"Entry not found: {folder}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        prefix = f"{folder}/" if folder else ""

        def wanted(path: str) -> bool:
            return path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :])

        entries = [self._entry(state, repo, commit, d, expand, is_dir=True) for d in sorted(dirs) if wanted(d)]
        entries += [
            self._entry(state, repo, commit, f, expand, is_dir=False) for f in sorted(commit.files) if wanted(f)
        ]
        self._json(entries)

    def _paths_info(self, state: HubState, repo: Repo, revision: str, body: bytes) -> None:
        commit = state.resolve(repo, revision)
        # The client posts a form (``paths=a&paths=b&expand=false``); accept JSON too, it costs nothing.
        if body.lstrip().startswith(b"{"):
            payload = json.loads(body)
            paths, expand = payload.get("paths", []), bool(payload.get("expand"))
        else:
            form = parse_qs(body.decode(), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = form.get("expand", ["false"])[0].lower() in ("1", "true")
        dirs = _dirs_of(commit.files)
        out = []
        for raw in paths:
            path = raw.strip("/")
            if path in commit.files:
                out.append(self._entry(state, repo, commit, path, expand, is_dir=False))
            elif path in dirs:
                out.append(self._entry(state, repo, commit, path, expand, is_dir=True))
        self._json(out)

    def _list_commits(self, state: HubState, repo: Repo, revision: str) -> None:
        commit: Commit | None = state.resolve(repo, revision)
        out = []
        while commit is not None:
            out.append(
                {
                    "id": commit.oid,
                    "title": commit.title,
                    "message": commit.message,
                    "authors": [{"user": state.user}],
                    "date": commit.date,
                }
            )
            commit = repo.commits[commit.parent] if commit.parent else None
        self._json(out)

    def _refs(self, state: HubState, repo: Repo) -> None:
        def ref(name: str, full: str, oid: str) -> dict[str, str]:
            return {"name": name, "ref": full, "targetCommit": oid}

        self._json(
            {
                "branches": [ref(n, f"refs/heads/{n}", o) for n, o in sorted(repo.branches.items())],
                "tags": [ref(n, f"refs/tags/{n}", o) for n, o in sorted(repo.tags.items())],
                "converts": [],
                "pullRequests": [
                    ref(f"refs/pr/{n}", f"refs/pr/{n}", o) for n, o in sorted(repo.pull_requests.items())
                ],
            }
        )

    # -- downloads ----------------------------------------------------------------------------------------------

    def _resolve(self, state: HubState, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._visible(state.get_repo(repo_type, repo_id))
        commit = state.resolve(repo, revision)
        oid = commit.files.get(path)
        if oid is None:
            # X-Repo-Commit on the 404 lets the client cache the file's absence under that commit (.no_exist).
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        size = state.blob_sizes[oid]
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{oid}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}",
        }
        start, end = 0, size - 1
        status = 200
        range_header = self.headers.get("Range")
        if range_header and self.command == "GET":
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip())
            if match is None or (not match.group(1) and not match.group(2)):
                raise HubError(
                    416, f"Unsupported range {range_header!r}", headers={"Content-Range": f"bytes */{size}"}
                )
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            else:  # suffix range: the last N bytes
                start = max(size - int(match.group(2)), 0)
            if start >= size or start > end:
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        if self.command == "HEAD":
            headers["Content-Length"] = str(size)
            self._send(200, b"", headers)
            return
        data = state.read_blob(oid)[start : end + 1]
        self._send(status, data, headers)

    # -- write API ----------------------------------------------------------------------------------------------

    def _preupload(self, state: HubState, repo: Repo, revision: str, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        try:
            commit: Commit | None = state.resolve(repo, revision)
        except HubError:
            commit = None  # committing to a branch created later: nothing to compare against
        files = [
            {
                "path": item["path"],
                "uploadMode": "regular",  # never LFS/Xet: the bytes come inline with the commit
                "shouldIgnore": False,
                "oid": commit.files.get(item["path"]) if commit else None,
            }
            for item in payload.get("files", [])
        ]
        self._json({"files": files, "commitOid": commit.oid if commit else None})

    def _commit(self, state: HubState, repo: Repo, revision: str, query: dict[str, list[str]], body: bytes) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit must be its header")
        header = lines[0]["value"]
        create_pr = query.get("create_pr", ["0"])[0] in ("1", "true")
        branch = revision.removeprefix("refs/heads/")
        pr_match = re.fullmatch(r"refs/pr/(\d+)", branch)
        if pr_match and int(pr_match.group(1)) in repo.pull_requests:
            head = repo.commits[repo.pull_requests[int(pr_match.group(1))]]
        elif branch in repo.branches:
            head = repo.commits[repo.branches[branch]]
        else:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        parent_commit = header.get("parentCommit")
        if parent_commit:
            if not any(oid.startswith(parent_commit) for oid in repo.commits):
                raise HubError(404, f"Invalid parent commit: {parent_commit}", "RevisionNotFound")
            if create_pr:
                head = repo.commits[next(o for o in repo.commits if o.startswith(parent_commit))]
            elif not head.oid.startswith(parent_commit):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")

        files = dict(head.files)
        sha256_index = {hashlib.sha256(state.read_blob(o)).hexdigest(): o for o in set(files.values())}
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = str(value.get("path", "")).strip("/")
            if key == "file":
                content = value.get("content", "")
                data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                files[path] = state.put_blob(data)
            elif key == "lfsFile":
                # Only reachable through CommitOperationCopy of content we already hold: we never ask for LFS.
                oid = sha256_index.get(value.get("oid", ""))
                if oid is None:
                    raise HubError(422, "The test hub server stores no LFS objects; upload regular files")
                files[path] = oid
            elif key == "deletedFile":
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                doomed = [p for p in files if p.startswith(path + "/")]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")

        commit = state.new_commit(repo, head.oid, header.get("summary", ""), header.get("description", ""), files)
        pr_url = None
        if create_pr:
            number = max([0, *repo.pull_requests]) + 1
            repo.pull_requests[number] = commit.oid
            pr_url = f"{self._repo_url(repo.repo_type, repo.repo_id)}/discussions/{number}"
        elif pr_match:
            repo.pull_requests[int(pr_match.group(1))] = commit.oid
        else:
            repo.branches[branch] = commit.oid
        self._json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._repo_url(repo.repo_type, repo.repo_id)}/commit/{commit.oid}",
                "hookOutput": "",
                "pullRequestUrl": pr_url,
            }
        )

    def _branch(self, state: HubState, repo: Repo, name: str, body: bytes) -> None:
        if self.command == "DELETE":
            if name not in repo.branches:
                raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
            if name == "main":
                raise HubError(403, "Cannot delete the default branch")
            del repo.branches[name]
            self._json({})
            return
        if name in repo.branches:
            raise HubError(409, "Reference already exists")
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        repo.branches[name] = state.resolve(repo, start).oid
        self._json({})

    def _tag(self, state: HubState, repo: Repo, arg: str, body: bytes) -> None:
        if self.command == "DELETE":
            if arg not in repo.tags:
                raise HubError(404, f"Invalid rev id: {arg}", "RevisionNotFound")
            del repo.tags[arg]
            self._json({})
            return
        tag = json.loads(body or b"{}")["tag"]
        if tag in repo.tags:
            raise HubError(409, "Tag already exists")
        repo.tags[tag] = state.resolve(repo, arg).oid
        self._json({})


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # snapshot_download opens several connections at once
    block_on_close = False  # keep-alive handler threads may idle in readline(); never wait for them on close
    state: HubState
    base_url: str


class HubServer:
    """A running server: ``url`` for clients, ``state`` for white-box assertions, ``stop()`` to shut down."""

    def __init__(self, root_dir: str | os.PathLike[str], *, user: str = DEFAULT_USER, token: str | None = None):
        self._httpd = _HubHTTPServer(("127.0.0.1", 0), _HubHandler)
        host, port = self._httpd.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._httpd.base_url = self.url
        self._httpd.state = self.state = HubState(root_dir, user=user, token=token)
        self.user = user
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-test-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def reset(self) -> None:
        """Forget every repo (blobs stay on disk; they are content-addressed so reuse is harmless)."""
        with self.state.lock:
            self.state.repos.clear()


def start_hub_server(root_dir: str | os.PathLike[str]) -> tuple[str, Callable[[], None]]:
    """Start a server storing file bytes under ``root_dir``; returns ``(base_url, stop)``."""
    server = HubServer(root_dir)
    return server.url, server.stop


def configure_environment_for(base_url: str, hf_home: str | os.PathLike[str], *, token: str = FAKE_TOKEN) -> None:
    """Point huggingface_hub (and so transformers and peft) at ``base_url`` with a throwaway cache and token.

    Must run before huggingface_hub is imported: it copies these variables into module constants on import, so a
    late call would leave the client talking to huggingface.co. We raise rather than let tests silently go online.
    """
    if "huggingface_hub" in sys.modules:
        raise RuntimeError(
            "huggingface_hub was imported before the test Hub was configured; its endpoint is frozen at import time. "
            "Call configure_environment_for()/start_session_hub() at the very top of conftest.py."
        )
    env = os.environ
    env["HF_ENDPOINT"] = base_url
    env["HF_HOME"] = str(hf_home)
    env["HF_TOKEN"] = token
    env["HF_HUB_DISABLE_XET"] = "1"  # with hf_xet installed uploads/downloads would otherwise go to a CAS service
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    env["HF_HUB_DISABLE_UPDATE_CHECK"] = "1"
    # Anything that would override HF_HOME-derived paths, the token, or force offline/staging mode.
    for name in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HUGGINGFACE_CO_STAGING",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_ASSETS_CACHE",
        "HUGGINGFACE_ASSETS_CACHE",
        "HF_XET_CACHE",
        "HF_TOKEN_PATH",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN",
        "HF_HUB_ENABLE_HF_TRANSFER",
        "TRANSFORMERS_CACHE",
        "HF_MODULES_CACHE",
    ):
        env.pop(name, None)
    # httpx honours *_PROXY from the environment, including for 127.0.0.1 unless NO_PROXY says otherwise.
    for name in ("NO_PROXY", "no_proxy"):
        current = env.get(name, "")
        env[name] = ",".join(filter(None, [current, "127.0.0.1", "localhost"]))


_SESSION: HubServer | None = None


def start_session_hub() -> HubServer:
    """Start (once per process) a server in a fresh temp dir and configure the environment for it.

    Idempotent, so both conftest.py and a standalone ``pytest tests/test_hub_server.py`` can call it. Cleanup is
    registered with atexit because the server must outlive every fixture, session-scoped ones included.
    """
    global _SESSION
    if _SESSION is not None:
        return _SESSION
    tmp = Path(tempfile.mkdtemp(prefix="grin-peft-hub-"))
    server = HubServer(tmp / "store")
    try:
        configure_environment_for(server.url, tmp / "hf_home")
    except Exception:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    def _cleanup() -> None:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    atexit.register(_cleanup)
    _SESSION = server
    return server


def session_hub() -> HubServer | None:
    """The server started by ``start_session_hub`` in this process, if any."""
    return _SESSION


def unique_repo_id(prefix: str = "repo", user: str = DEFAULT_USER) -> str:
    """A fresh ``user/name``: the session server is shared, so tests must not collide on names."""
    return f"{user}/{prefix}-{uuid.uuid4().hex[:10]}"

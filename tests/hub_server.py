"""A fake Hugging Face Hub on 127.0.0.1 (standard library only), for testing downloads and pushes offline.

It speaks what huggingface_hub 2.4 needs for create_repo, repo_exists, model_info, create_branch, upload_folder,
delete_repo, snapshot_download and hf_hub_download. Model repos `namespace/name` only; a revision is a branch
or a commit sha (or a 7+ character prefix of one).

Endpoints served (path segments are URL-unquoted, so `feature%2Fx` is the branch `feature/x`):
    POST   /api/repos/create                        {"name", "organization", "visibility"}; 409 {"url"} if it exists
    DELETE /api/repos/delete                        {"name", "organization"}
    GET    /api/models/{repo}                       model info at main: id, sha, private, siblings
    GET    /api/models/{repo}/revision/{rev}        model info at a revision
    GET    /api/models/{repo}/tree/{rev}[/{path}]   recursive file listing: snapshot_download lists files with it
    POST   /api/models/{repo}/branch/{branch}       new branch at {"startingPoint"} (default main); 409 if it exists
    POST   /api/models/{repo}/preupload/{rev}       answers "uploadMode": "regular" for every file, whatever its size
    POST   /api/models/{repo}/commit/{rev}          NDJSON: header, then file (base64), deletedFile, deletedFolder
    POST   /api/validate-yaml                       README.md metadata check made before a commit: always valid
    GET    /api/agent-harnesses                     user-agent helper (telemetry); empty registry, no auth needed
    HEAD   /{repo}/resolve/{rev}/{path}             X-Repo-Commit, ETag (git blob sha1), Content-Length; and GET with
                                                    the bytes. No X-Linked-* (LFS) nor X-Xet-* headers: plain HTTP

Errors come as the Hub sends them: a JSON {"error": ...} body, X-Error-Message, and for 404s X-Error-Code
RepoNotFound / RevisionNotFound / EntryNotFound. With a token set, a request without `Authorization: Bearer
<token>` gets 401. Commits are atomic: a failed or malformed one (400) leaves the branch as it was.
`hub.requests` holds (method, path with query, headers with lower-case names) for every request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

TEST_TOKEN = "hf_test_secret_token"
USER = "user"
FAIL_KINDS = ("create", "delete", "info", "tree", "branch", "preupload", "commit", "resolve", "validate-yaml")


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1 of `data`: the Hub's oid (and ETag) of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool = False
    branches: dict[str, dict[str, bytes]] = field(default_factory=dict)  # branch -> {path: bytes}
    heads: dict[str, str] = field(default_factory=dict)  # branch -> sha of its head commit
    commits: list[dict] = field(default_factory=list)  # {sha, message, branch, files: the whole tree after it}

    def commit(self, branch: str, files: dict[str, bytes], message: str) -> str:
        sha = secrets.token_hex(20)
        self.branches[branch], self.heads[branch] = dict(files), sha
        self.commits.append({"sha": sha, "message": message, "branch": branch, "files": dict(files)})
        return sha

    def resolve(self, rev: str) -> tuple[str, dict[str, bytes]] | None:
        rev = rev.removeprefix("refs/heads/")
        if rev in self.branches:
            return self.heads[rev], self.branches[rev]
        for c in reversed(self.commits):
            if len(rev) >= 7 and c["sha"].startswith(rev.lower()):
                return c["sha"], c["files"]
        return None


class HubError(Exception):  # an error response, as the Hub would send it
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra
        self.headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {}), **(headers or {})}


class FakeHub:
    """See the module docstring. `with FakeHub(token=...) as hub:` serves at `hub.url` until the block ends."""

    def __init__(self, token: str | None = None):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, headers with lower-case keys)
        self.url = ""
        self._failures: dict[str, list[int]] = {}  # kind -> [status, times left]
        self._lock = threading.RLock()

    def __enter__(self) -> FakeHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()  # returns once serve_forever has stopped
        self._server.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None, branch: str = "main",
                 private: bool = False, message: str = "seed") -> str:
        """Create `repo_id` if needed and commit `files` (added to what `branch` has, or main) on `branch`."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo(private=private))
            if not repo.commits:
                repo.commit("main", {}, "initial commit")
            base = repo.branches.get(branch, repo.branches["main"])
            return repo.commit(branch, {**base, **(files or {})}, message)

    def fail(self, kind: str, status: int = 500, times: int = 1) -> None:
        """Make the next `times` requests of `kind` (one of FAIL_KINDS) fail with `status`."""
        if kind not in FAIL_KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {FAIL_KINDS}")
        with self._lock:
            self._failures[kind] = [status, times]

    def env(self, hf_home: str | os.PathLike) -> dict[str, str]:
        """Environment for a huggingface_hub in a subprocess: merge it over os.environ."""
        home = str(hf_home)
        return {"HF_ENDPOINT": self.url, "HF_TOKEN": self.token or "", "HF_HOME": home,
                "HF_HUB_CACHE": os.path.join(home, "hub"), "HF_TOKEN_PATH": os.path.join(home, "token"),
                "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0",
                "NO_PROXY": "127.0.0.1,localhost"}

    # Request handling: each runs under self._lock, and raises HubError for an error response.
    def _check(self, kind: str, authorization: str | None) -> None:
        if self.token is not None and kind != "agent-harnesses":
            if authorization is None:
                raise HubError(401, "Invalid username or password.")
            if authorization != f"Bearer {self.token}":
                raise HubError(401, "Invalid credentials in Authorization header")
        rule = self._failures.get(kind)
        if rule and rule[1] > 0:
            rule[1] -= 1
            raise HubError(rule[0], f"FakeHub: injected failure of {kind!r}")

    def _repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return self.repos[repo_id]

    def _rev(self, repo_id: str, rev: str) -> tuple[Repo, str, dict[str, bytes]]:
        repo = self._repo(repo_id)
        found = repo.resolve(rev)
        if found is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo, *found

    def _create_or_delete(self, action: str, payload: dict):
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        if payload.get("type", "model") != "model":
            raise HubError(400, "FakeHub only serves model repos")
        if action == "delete":
            self._repo(repo_id)  # 404 if it is missing
            del self.repos[repo_id]
            return 200, {}, {}
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", url=url)
        self.repos[repo_id] = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
        self.repos[repo_id].commit("main", {}, "initial commit")
        return 200, {}, {"url": url, "name": repo_id}

    def _info(self, repo_id: str, rev: str):
        repo, sha, files = self._rev(repo_id, rev)
        siblings = [{"rfilename": p, "size": len(b), "blobId": git_blob_oid(b)} for p, b in sorted(files.items())]
        return 200, {}, {"id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0], "sha": sha,
                         "private": repo.private, "gated": False, "disabled": False, "tags": [], "siblings": siblings}

    def _tree(self, repo_id: str, rev: str, path: str):  # always recursive, files only: what snapshot_download uses
        _, _, files = self._rev(repo_id, rev)
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        return 200, {}, [{"type": "file", "path": p, "size": len(b), "oid": git_blob_oid(b)}
                         for p, b in sorted(files.items()) if p.startswith(prefix)]

    def _branch(self, repo_id: str, branch: str, payload: dict):
        repo = self._repo(repo_id)
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        _, sha, files = self._rev(repo_id, payload.get("startingPoint") or "main")
        repo.branches[branch], repo.heads[branch] = dict(files), sha
        return 200, {}, {}

    def _preupload(self, repo_id: str, rev: str, payload: dict):
        _, sha, files = self._rev(repo_id, rev)
        answers = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                    "oid": git_blob_oid(files[f["path"]]) if f["path"] in files else None} for f in payload["files"]]
        return 200, {}, {"files": answers, "commitOid": sha}

    def _commit(self, repo_id: str, branch: str, body: bytes, query: dict):
        repo = self._repo(repo_id)
        if "create_pr" in query:
            raise HubError(400, "FakeHub does not support pull requests")
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        if header.get("parentCommit") not in (None, repo.heads[branch]):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.branches[branch])  # built aside, swapped in only if every operation is valid
        for op in lines[1:]:
            key, value = op["key"], op["value"]
            if key == "file" and value.get("encoding", "base64") == "base64":
                files[value["path"]] = base64.b64decode(value["content"], validate=True)
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                for p in [p for p in files if p.startswith(value["path"].rstrip("/") + "/")]:
                    del files[p]
            else:
                raise HubError(400, f"FakeHub does not accept {key!r} operations: only inline files and deletions")
        sha = repo.commit(branch, files, header["summary"])
        return 200, {}, {"success": True, "commitOid": sha, "commitUrl": f"{self.url}/{repo_id}/commit/{sha}"}

    def _resolve(self, repo_id: str, rev: str, path: str):
        _, sha, files = self._rev(repo_id, rev)
        if path not in files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": sha})
        data = files[path]
        return 200, {"X-Repo-Commit": sha, "ETag": f'"{git_blob_oid(data)}"',
                     "Content-Type": "application/octet-stream"}, data


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        hub: FakeHub = self.server.hub  # type: ignore[attr-defined]
        split = urlsplit(self.path)
        query = parse_qs(split.query)
        parts = [unquote(p) for p in split.path.strip("/").split("/")]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with hub._lock:
            hub.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
            try:
                kind, handle = self._route(hub, parts, query, body)
                hub._check(kind, self.headers.get("Authorization"))
                try:
                    status, headers, payload = handle()
                except (KeyError, TypeError, ValueError, AttributeError) as e:
                    raise HubError(400, f"Malformed request: {type(e).__name__}") from None
            except HubError as e:
                status, headers, payload = e.status, e.headers, {"error": e.message, **e.extra}
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        if not isinstance(payload, bytes):
            self.send_header("Content-Type", "application/json")
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _route(self, hub: FakeHub, p: list[str], query: dict, body: bytes):
        m, js = self.command, lambda: json.loads(body or b"{}")
        if p[:2] == ["api", "repos"] and len(p) == 3 and p[2] in ("create", "delete"):
            return p[2], lambda: hub._create_or_delete(p[2], js())
        if p == ["api", "validate-yaml"] and m == "POST":
            return "validate-yaml", lambda: (200, {}, {"errors": [], "warnings": []})
        if p == ["api", "agent-harnesses"]:
            return "agent-harnesses", lambda: (200, {}, {"standardEnvVars": [], "harnesses": {}})
        if p[:2] == ["api", "models"] and len(p) >= 4:
            repo_id, (op, *args) = f"{p[2]}/{p[3]}", p[4:] or ["revision", "main"]
            if m == "GET" and op == "revision" and len(args) == 1:
                return "info", lambda: hub._info(repo_id, args[0])
            if m == "GET" and op == "tree" and args:
                return "tree", lambda: hub._tree(repo_id, args[0], "/".join(args[1:]))
            posts = {"branch": lambda: hub._branch(repo_id, args[0], js()),
                     "preupload": lambda: hub._preupload(repo_id, args[0], js()),
                     "commit": lambda: hub._commit(repo_id, args[0], body, query)}
            if m == "POST" and op in posts and len(args) == 1:
                return op, posts[op]
        if len(p) >= 5 and p[2] == "resolve" and m in ("GET", "HEAD"):
            return "resolve", lambda: hub._resolve(f"{p[0]}/{p[1]}", p[3], "/".join(p[4:]))
        raise HubError(404, f"FakeHub does not serve {m} {urlsplit(self.path).path}")


@pytest.fixture(name="fake_hub")  # explicit name: `from hub_server import fake_hub as any_alias` registers it too
def fake_hub(monkeypatch, tmp_path):
    """A started FakeHub(token=TEST_TOKEN) that in-process huggingface_hub calls go to, with a fresh HF_HOME.

    huggingface_hub reads its environment once, at import: the env vars are set (for subprocesses and code that
    reads them at call time) and the `constants` it read are patched, as is the endpoint of the module-level HfApi
    behind `huggingface_hub.create_repo`, `upload_folder`, ... Xet is off, so upload_folder makes one commit and
    does not retry it. Import as `from hub_server import fake_hub as fake_hub_fixture  # noqa: F401` (no F811).
    """
    from huggingface_hub import constants, hf_api

    with FakeHub(token=TEST_TOKEN) as hub:
        env = hub.env(tmp_path / "hf_home")
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        for name in ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_CO_STAGING"):
            monkeypatch.delenv(name, raising=False)
        home = Path(env["HF_HOME"])
        for name, value in {
            "ENDPOINT": hub.url,
            "HUGGINGFACE_CO_URL_TEMPLATE": hub.url + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
            "HF_HOME": str(home), "HF_HUB_CACHE": env["HF_HUB_CACHE"], "HUGGINGFACE_HUB_CACHE": env["HF_HUB_CACHE"],
            "HF_ASSETS_CACHE": str(home / "assets"), "HF_XET_CACHE": str(home / "xet"),
            "HF_TOKEN_PATH": env["HF_TOKEN_PATH"], "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
            "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
            "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_XET": True, "HF_HUB_DISABLE_TELEMETRY": True,
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        }.items():
            monkeypatch.setattr(constants, name, value)
        monkeypatch.setattr(hf_api.api, "endpoint", hub.url)
        yield hub

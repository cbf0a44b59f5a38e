"""A small Hugging Face Hub-compatible server for tests (stdlib only, 127.0.0.1, in-process thread).

It speaks the subset of the Hub HTTP API that huggingface_hub 2.x uses for the plain-HTTP (non-Xet)
path, so the real client can be driven against it offline:

    POST /api/repos/create                               create a repo (409 with its url if it exists)
    GET  /api/whoami-v2                                  who the token belongs to
    POST /api/validate-yaml                              model card metadata check (always accepts)
    GET  /api/{type}s/{repo}[/revision/{rev}]            repo info (sha, private, siblings)
    POST /api/{type}s/{repo}/preupload/{rev}             upload mode per file (lfs / regular) + remote oid
    POST /{repo}.git/info/lfs/objects/batch              LFS batch API: upload actions only for unknown objects
    PUT  /lfs-upload/{oid}?size=..&sig=..                the "presigned" object PUT; body must hash to oid
    POST /{repo}.git/info/lfs/objects/verify             LFS verify
    POST /api/{type}s/{repo}/commit/{rev}                ndjson commit (header, file, lfsFile, deletedFile/Folder)
    POST /api/{type}s/{repo}/branch/{branch}             create a branch
    GET  /api/{type}s/{repo}/tree/{rev}[/{path}]         tree listing (recursive=true supported)
    POST /api/{type}s/{repo}/paths-info/{rev}            paths info
    HEAD/GET /{repo}/resolve/{rev}/{path}                file download, X-Repo-Commit / ETag, Range (206)

Private repos answer 401 (X-Error-Code: RepoNotFound) to requests without a valid token; every write
needs a valid token. Test hooks: `requests` (a log of (method, path)), `lfs_puts` (oids PUT),
`corrupt_next_get` (paths whose next GET serves one flipped byte), `hold_puts_after` (PUTs after the
first N block until `release_puts` is set, to simulate an upload interrupted mid-way), `fail_next`
(handler name -> answer 503 that many times).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

USER = "tester"
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub stores files above 10 MB (or binary ones) in LFS
LFS_SUFFIXES = (".bin", ".safetensors", ".gguf", ".pt", ".npy", ".zst")


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class Entry:
    size: int
    sha256: str
    lfs: bool

    def git_oid(self, store: "Store") -> str:
        if self.lfs:
            return git_blob_oid(lfs_pointer(self.sha256, self.size))
        return git_blob_oid(store.read(self.sha256))


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    files: dict[str, Entry]


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        rev = unquote(rev)
        if rev in self.branches:
            return self.commits[self.branches[rev]]
        return self.commits.get(rev)


class Store:
    """Content-addressed blobs on disk (by sha256)."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, sha: str) -> Path:
        return self.root / sha

    def has(self, sha: str, size: int | None = None) -> bool:
        p = self.path(sha)
        return p.is_file() and (size is None or p.stat().st_size == size)

    def put(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.has(sha):
            tmp = self.path(sha + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(self.path(sha))
        return sha

    def read(self, sha: str) -> bytes:
        return self.path(sha).read_bytes()


class HubState:
    def __init__(self, root: Path, tokens: dict[str, str] | None = None):
        self.store = Store(Path(root) / "objects")
        self.tokens = tokens if tokens is not None else {"hf_test_write_token": USER}
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.RLock()
        self.secret = b"hubserver-test-secret"
        self.requests: list[tuple[str, str]] = []
        self.lfs_puts: list[str] = []
        self.corrupt_next_get: set[str] = set()
        self.hold_puts_after: int | None = None
        self.release_puts = threading.Event()
        self.held_puts = 0
        self.commit_counter = 0
        self.fail_next: dict[str, int] = {}  # handler name (e.g. "h_commit") -> answer 503 this many times

    # ---- helpers used by tests ---------------------------------------------------------------
    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def head_files(self, repo_id: str, rev: str = "main") -> dict[str, Entry]:
        c = self.repo(repo_id).resolve(rev)
        return dict(c.files) if c else {}

    def read_file(self, repo_id: str, path: str, rev: str = "main") -> bytes:
        return self.store.read(self.repo(repo_id).resolve(rev).files[path].sha256)

    # ---- model ---------------------------------------------------------------------------------
    def new_commit(self, repo: Repo, parent: Commit | None, title: str, files: dict[str, Entry]) -> Commit:
        with self.lock:
            self.commit_counter += 1
            body = json.dumps([repo.repo_id, parent.oid if parent else None, title, self.commit_counter,
                               sorted((p, e.sha256) for p, e in files.items())]).encode()
            c = Commit(hashlib.sha1(body).hexdigest(), parent.oid if parent else None, title, files)
            repo.commits[c.oid] = c
            return c

    def create_repo(self, repo_id: str, repo_type: str, private: bool) -> Repo:
        repo = Repo(repo_id, repo_type, private)
        ga = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
        sha = self.store.put(ga)
        c = self.new_commit(repo, None, "initial commit", {".gitattributes": Entry(len(ga), sha, False)})
        repo.branches["main"] = c.oid
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def sign(self, oid: str, size: int) -> str:
        return hmac.new(self.secret, f"{oid}:{size}".encode(), "sha256").hexdigest()


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "HubServer"

    def log_message(self, *args):  # keep test output clean
        pass

    # ---- plumbing ------------------------------------------------------------------------------
    @property
    def state(self) -> HubState:
        return self.server.state

    def body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                line = self.rfile.readline(65537)
                n = int(line.split(b";")[0].strip() or b"0", 16)
                if n == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(n)
                self.rfile.readline(3)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def json_body(self):
        raw = self.body()
        ctype = self.headers.get("Content-Type", "")
        if "application/x-www-form-urlencoded" in ctype:
            q = parse_qs(raw.decode())
            return {k: (v if k == "paths" else v[0]) for k, v in q.items()}
        return json.loads(raw or b"{}")

    def send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None,
             head: bool = False, length: int | None = None) -> None:
        if raw is None:
            raw = b"" if payload is None else json.dumps(payload).encode()
            ctype = "application/json"
        else:
            ctype = "application/octet-stream"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(raw) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(raw)

    def error(self, e: HubError, head: bool = False) -> None:
        h = {"X-Error-Message": e.message}
        if e.code:
            h["X-Error-Code"] = e.code
        self.send(e.status, {"error": e.message}, headers=h, head=head)

    def user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return None
        tok = auth[len("Bearer "):]
        if tok not in self.state.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.state.tokens[tok]

    def need_user(self) -> str:
        u = self.user()
        if u is None:
            raise HubError(401, "You must be authenticated to do this (no token)")
        return u

    def get_repo(self, repo_type: str, repo_id: str, write: bool = False) -> Repo:
        user = self.user()
        repo = self.state.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and user is None):
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if write:
            if user is None:
                raise HubError(401, "You must be authenticated to write", None)
            if repo_id.split("/")[0] != user:
                raise HubError(403, f"{user} cannot write to {repo_id}")
        return repo

    def get_commit(self, repo: Repo, rev: str) -> Commit:
        c = repo.resolve(rev)
        if c is None:
            raise HubError(404, f"Invalid rev id: {unquote(rev)}", "RevisionNotFound")
        return c

    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        self.state.requests.append((method, path))
        head = method == "HEAD"
        try:
            for pattern, handler_name, methods in ROUTES:
                m = re.fullmatch(pattern, path)
                if m and method in methods:
                    with self.state.lock:
                        fail = self.state.fail_next.get(handler_name, 0)
                        if fail:
                            self.state.fail_next[handler_name] = fail - 1
                    if fail:
                        self.body()
                        raise HubError(503, "Service temporarily unavailable (test hook)")
                    getattr(self, handler_name)(method, query, **m.groupdict())
                    return
            raise HubError(404, f"no route for {method} {path}")
        except HubError as e:
            self.error(e, head=head)
        except (ConnectionError, BrokenPipeError):
            pass

    def do_GET(self):
        self.dispatch("GET")

    def do_HEAD(self):
        self.dispatch("HEAD")

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    # ---- API -----------------------------------------------------------------------------------
    def h_whoami(self, method, query):
        u = self.need_user()
        self.send(200, {"type": "user", "name": u, "orgs": [],
                        "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})

    def h_validate_yaml(self, method, query):
        self.body()
        self.send(200, {"errors": [], "warnings": []})

    def h_create(self, method, query):
        u = self.need_user()
        b = self.json_body()
        org = b.get("organization") or u
        if org != u:
            raise HubError(403, f"{u} cannot create repos in {org}")
        repo_type = b.get("type") or "model"
        repo_id = f"{org}/{b['name']}"
        url = f"{self.base_url()}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
        with self.state.lock:
            if (repo_type, repo_id) in self.state.repos:
                self.send(409, {"error": "You already created this model repo", "url": url})
                return
            private = b.get("private") or b.get("visibility") == "private"
            self.state.create_repo(repo_id, repo_type, bool(private))
        self.send(200, {"url": url, "name": repo_id})

    def h_info(self, method, query, rtype, repo, rev=None):
        r = self.get_repo(TYPES[rtype], repo)
        c = self.get_commit(r, rev or "main")
        self.send(200, {"id": repo, "modelId": repo, "sha": c.oid, "private": r.private, "author": repo.split("/")[0],
                        "lastModified": "2026-01-01T00:00:00.000Z", "tags": [], "downloads": 0, "likes": 0,
                        "siblings": [{"rfilename": p} for p in sorted(c.files)]}, head=method == "HEAD")

    def h_preupload(self, method, query, rtype, repo, rev):
        r = self.get_repo(TYPES[rtype], repo, write=True)
        c = r.resolve(rev)
        out = []
        for f in self.json_body()["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["size"] >= LFS_MIN_SIZE or b"\0" in sample or f["path"].endswith(LFS_SUFFIXES)
            e = c.files.get(f["path"]) if c else None
            oid = None
            if e is not None:
                oid = e.sha256 if e.lfs else e.git_oid(self.state.store)
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": oid})
        self.send(200, {"files": out, "commitOid": c.oid if c else None})

    def h_lfs_batch(self, method, query, prefix, repo):
        rtype = TYPES.get((prefix or "").rstrip("/"), "model")
        self.get_repo(rtype, repo, write=True)
        b = json.loads(self.body())
        if b.get("operation") != "upload":
            raise HubError(400, "only uploads are supported")
        objs = []
        for o in b["objects"]:
            oid, size = o["oid"], int(o["size"])
            item = {"oid": oid, "size": size, "authenticated": True}
            if not self.state.store.has(oid, size):
                sig = self.state.sign(oid, size)
                item["actions"] = {
                    "upload": {"href": f"{self.base_url()}/lfs-upload/{oid}?size={size}&sig={sig}"},
                    "verify": {"href": f"{self.base_url()}/{prefix or ''}{repo}.git/info/lfs/objects/verify"},
                }
            objs.append(item)
        self.send(200, {"transfer": "basic", "objects": objs, "hash_algo": "sha256"})

    def h_lfs_put(self, method, query, oid):
        size = int(query.get("size", ["-1"])[0])
        if not hmac.compare_digest(query.get("sig", [""])[0], self.state.sign(oid, size)):
            raise HubError(403, "bad upload signature")
        data = self.body()
        st = self.state
        with st.lock:
            n = len(st.lfs_puts)
            st.lfs_puts.append(oid)
        if st.hold_puts_after is not None and n >= st.hold_puts_after:
            with st.lock:
                st.held_puts += 1
            st.release_puts.wait(timeout=60)  # the client is killed meanwhile; bounded either way
            raise HubError(503, "upload interrupted (test hook)")
        if len(data) != size or hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, f"uploaded content does not match oid {oid} / size {size}")
        st.store.put(data)
        self.send(200, {})

    def h_lfs_verify(self, method, query, prefix, repo):
        rtype = TYPES.get((prefix or "").rstrip("/"), "model")
        self.get_repo(rtype, repo, write=True)
        b = json.loads(self.body())
        if not self.state.store.has(b["oid"], int(b["size"])):
            raise HubError(404, f"object {b['oid']} not found")
        self.send(200, {"message": "Object verified"})

    def h_commit(self, method, query, rtype, repo, rev):
        r = self.get_repo(TYPES[rtype], repo, write=True)
        lines = [json.loads(x) for x in self.body().splitlines() if x.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header")
        header = lines[0]["value"]
        with self.state.lock:
            parent = self.get_commit(r, rev)
            if header.get("parentCommit") and not parent.oid.startswith(header["parentCommit"]):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(parent.files)
            for line in lines[1:]:
                k, v = line["key"], line["value"]
                if k == "file":
                    data = base64.b64decode(v["content"])
                    files[v["path"]] = Entry(len(data), self.state.store.put(data), False)
                elif k == "lfsFile":
                    size = v.get("size")
                    if not self.state.store.has(v["oid"], size):
                        raise HubError(422, f"LFS object {v['oid']} for {v['path']} was never uploaded")
                    files[v["path"]] = Entry(self.state.store.path(v["oid"]).stat().st_size, v["oid"], True)
                elif k == "deletedFile":
                    if v["path"] not in files:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                    del files[v["path"]]
                elif k == "deletedFolder":
                    pre = v["path"].rstrip("/") + "/"
                    files = {p: e for p, e in files.items() if not p.startswith(pre)}
                else:
                    raise HubError(400, f"unsupported commit operation {k}")
            c = self.state.new_commit(r, parent, header.get("summary", ""), files)
            r.branches[unquote(rev)] = c.oid
        self.send(200, {"commitUrl": f"{self.base_url()}/{repo}/commit/{c.oid}", "commitOid": c.oid,
                        "commitMessage": header.get("summary", ""), "pullRequestUrl": None})

    def h_branch(self, method, query, rtype, repo, branch):
        r = self.get_repo(TYPES[rtype], repo, write=True)
        b = self.json_body()
        branch = unquote(branch)
        with self.state.lock:
            if branch in r.branches:
                raise HubError(409, f"Reference already exists: {branch}")
            r.branches[branch] = self.get_commit(r, b.get("startingPoint") or "main").oid
        self.send(200, {})

    def _tree_items(self, c: Commit, prefix: str, recursive: bool) -> list[dict]:
        prefix = prefix.strip("/")
        items, dirs = [], set()
        for p in sorted(c.files):
            if prefix and not p.startswith(prefix + "/"):
                continue
            rest = p[len(prefix) + 1:] if prefix else p
            parts = rest.split("/")
            for i in range(1, len(parts)):
                if recursive or i == 1:
                    dirs.add("/".join(([prefix] if prefix else []) + parts[:i]))
            if recursive or len(parts) == 1:
                items.append(self._file_item(p, c.files[p]))
        items += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                  for d in sorted(dirs)]
        return items

    def _file_item(self, p: str, e: Entry) -> dict:
        item = {"type": "file", "oid": e.git_oid(self.state.store), "size": e.size, "path": p}
        if e.lfs:
            item["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": len(lfs_pointer(e.sha256, e.size))}
        return item

    def h_tree(self, method, query, rtype, repo, rev, path=""):
        r = self.get_repo(TYPES[rtype], repo)
        c = self.get_commit(r, rev)
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        if path and path.strip("/") in c.files:
            raise HubError(404, f"{path} is a file", "EntryNotFound")
        self.send(200, self._tree_items(c, path or "", recursive))

    def h_paths_info(self, method, query, rtype, repo, rev):
        r = self.get_repo(TYPES[rtype], repo)
        c = self.get_commit(r, rev)
        b = self.json_body()
        paths = b.get("paths") or []
        if isinstance(paths, str):
            paths = [paths]
        out = []
        for p in paths:
            p = p.strip("/")
            if p in c.files:
                out.append(self._file_item(p, c.files[p]))
            elif any(f.startswith(p + "/") for f in c.files):
                out.append({"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0, "path": p})
        self.send(200, out)

    def h_resolve(self, method, query, prefix, repo, rev, path):
        rtype = TYPES.get((prefix or "").rstrip("/"), "model")
        r = self.get_repo(rtype, repo)
        c = self.get_commit(r, rev)
        path = unquote(path)
        e = c.files.get(path)
        if e is None:
            raise HubError(404, f"{path} does not exist at {rev}", "EntryNotFound")
        etag = e.sha256 if e.lfs else e.git_oid(self.state.store)
        headers = {"X-Repo-Commit": c.oid, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if method == "HEAD":
            self.send(200, headers=headers, raw=b"", head=True, length=e.size)
            return
        data = self.state.store.read(e.sha256)
        with self.state.lock:
            if path in self.state.corrupt_next_get:
                self.state.corrupt_next_get.discard(path)
                i = len(data) // 2
                data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
        rng = self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if m:
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else len(data) - 1
            if start >= len(data):
                self.send(416, {"error": "range not satisfiable"}, headers={"Content-Range": f"bytes */{len(data)}"})
                return
            end = min(end, len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            self.send(206, raw=data[start:end + 1], headers=headers)
            return
        self.send(200, raw=data, headers=headers)


_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_T = r"(?P<rtype>models|datasets|spaces)"
_P = r"(?P<prefix>(?:datasets/|spaces/)?)"
ROUTES = [
    (r"/api/whoami-v2", "h_whoami", ("GET",)),
    (r"/api/validate-yaml", "h_validate_yaml", ("POST",)),
    (r"/api/repos/create", "h_create", ("POST",)),
    (rf"/api/{_T}/{_REPO}/preupload/(?P<rev>[^/]+)", "h_preupload", ("POST",)),
    (rf"/api/{_T}/{_REPO}/commit/(?P<rev>[^/]+)", "h_commit", ("POST",)),
    (rf"/api/{_T}/{_REPO}/branch/(?P<branch>[^/]+)", "h_branch", ("POST",)),
    (rf"/api/{_T}/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "h_tree", ("GET",)),
    (rf"/api/{_T}/{_REPO}/paths-info/(?P<rev>[^/]+)", "h_paths_info", ("POST",)),
    (rf"/api/{_T}/{_REPO}/revision/(?P<rev>[^/]+)", "h_info", ("GET", "HEAD")),
    (rf"/api/{_T}/{_REPO}", "h_info", ("GET", "HEAD")),
    (rf"/{_P}{_REPO}\.git/info/lfs/objects/batch", "h_lfs_batch", ("POST",)),
    (rf"/{_P}{_REPO}\.git/info/lfs/objects/verify", "h_lfs_verify", ("POST",)),
    (r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "h_lfs_put", ("PUT",)),
    (rf"/{_P}{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "h_resolve", ("GET", "HEAD")),
]


class HubServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, state: HubState):
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = state
        self.thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> "HubServer":
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.state.release_puts.set()
        self.shutdown()
        self.server_close()
        if self.thread:
            self.thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main() -> None:  # `python tests/hubserver.py ROOT` serves until Ctrl-C (for manual poking)
    import sys
    import tempfile

    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    srv = HubServer(HubState(root)).start()
    print(srv.endpoint, flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        srv.stop()


if __name__ == "__main__":
    main()

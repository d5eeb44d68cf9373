#!/usr/bin/env python3
"""A small Hugging Face Hub-compatible HTTP server for offline tests.

Only the Python standard library and the ``git`` executable are used.

Every repository is a bare git repository under ``ROOT/repos/{type}s/{namespace}/{name}.git``;
commits are written with git plumbing (hash-object / update-index on a private index /
write-tree / commit-tree / update-ref), so every commit has a real sha and old revisions stay
readable.  LFS files are stored by sha256 under ``ROOT/lfs/{type}s/{namespace}/{name}/`` and a
real git-lfs pointer file is committed in the tree, as the Hub does.

Usage::

    python tests/hub_server.py --root DIR [--port 0] [--token SECRET] [--user tester] [--verbose]

prints ``http://127.0.0.1:PORT`` as its first line on stdout and serves until SIGTERM/SIGINT.

Or, from Python::

    with HubServer(tmp_path, token="secret") as hub:
        os.environ["HF_ENDPOINT"] = hub.url

Endpoints (``{t}`` is ``models``, ``datasets`` or ``spaces``; ``{pfx}`` is ``""``, ``datasets/``
or ``spaces/``)::

    GET    /api/whoami-v2
    POST   /api/repos/create                       DELETE /api/repos/delete
    POST   /api/validate-yaml
    GET    /api/{t}/{repo}                          GET    /api/{t}/{repo}/revision/{rev}
    GET    /api/{t}/{repo}/tree/{rev}[/{path}]      POST   /api/{t}/{repo}/paths-info/{rev}
    POST   /api/{t}/{repo}/preupload/{rev}          POST   /api/{t}/{repo}/commit/{rev}
    POST   /api/{t}/{repo}/branch/{branch}          DELETE /api/{t}/{repo}/branch/{branch}
    POST   /api/{t}/{repo}/tag/{rev}                DELETE /api/{t}/{repo}/tag/{tag}
    GET    /api/{t}/{repo}/refs                     GET    /api/{t}/{repo}/commits/{rev}
    POST   /api/{t}/{repo}/duplicate                PUT    /api/{t}/{repo}/settings
    POST   /{pfx}{repo}.git/info/lfs/objects/batch  (basic transfer; upload/verify/download)
    HEAD   /{pfx}{repo}/resolve/{rev}/{path}        GET    /{pfx}{repo}/resolve/{rev}/{path}
    GET    /{pfx}{repo}/raw/{rev}/{path}
    PUT    /__lfs__/upload/...  POST /__lfs__/verify/...  GET /__lfs__/download/...  (signed URLs)
"""

from __future__ import annotations

import argparse
import base64
import collections
import datetime as _dt
import fnmatch
import hashlib
import hmac
import json
import mimetypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubServer", "main"]

HOST = "127.0.0.1"
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
ZERO_OID = "0" * 40
LFS_SPEC = "version https://git-lfs.github.com/spec/v1"
LFS_THRESHOLD = 10 * 1024 * 1024  # files larger than this always go through LFS
MAX_API_BODY = 1024 * 1024 * 1024  # 1 GiB: NDJSON commits carry base64 regular files
MAX_LFS_OBJECT = 64 * 1024 * 1024 * 1024
GIT_TIMEOUT = 300
SIGNED_URL_TTL = 3600
TREE_CACHE_SIZE = 512

RE_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
RE_SHA1 = re.compile(r"^[0-9a-f]{40}$")
RE_SHORT_SHA = re.compile(r"^[0-9a-fA-F]{5,40}$")
RE_SHA256 = re.compile(r"^[0-9a-f]{64}$")
RE_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")

DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib",
        "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot",
        "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors",
        "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip",
        "*.zst", "*tfevents*",
    )
)


# --------------------------------------------------------------------------------------------
# Errors and small helpers
# --------------------------------------------------------------------------------------------


class HubError(Exception):
    """An HTTP error answered as JSON ``{"error": message}`` (+ X-Error-Code / X-Error-Message)."""

    def __init__(self, status, message, code=None, headers=None, extra=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


class GitError(RuntimeError):
    pass


def _repo_not_found(repo_id):
    return HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")


def _revision_not_found(repo_id, revision):
    return HubError(404, f"Invalid rev id: {revision} (repository {repo_id})", "RevisionNotFound")


def _entry_not_found(repo_id, path, commit=None):
    headers = {"X-Repo-Commit": commit} if commit else None
    return HubError(404, f"Entry not found: {path} (repository {repo_id})", "EntryNotFound", headers)


def _iso(ts):
    return _dt.datetime.fromtimestamp(int(ts), tz=_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _truthy(value):
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _header_safe(text):
    text = " ".join(str(text).split())
    return text.encode("latin-1", "replace").decode("latin-1")[:1000]


def _validate_repo_name(namespace, name):
    for part in (namespace, name):
        if not isinstance(part, str) or not RE_NAME.match(part) or ".." in part or "--" in part:
            raise HubError(400, f"Invalid repo id: {namespace}/{name}")
        if part.endswith(".git"):
            raise HubError(400, f"Invalid repo id: {namespace}/{name} (cannot end with .git)")


def _validate_path(path):
    if not isinstance(path, str) or not path:
        raise HubError(400, "Invalid path: empty")
    path = path.lstrip("/")
    parts = path.split("/")
    if (
        not path
        or any(p in ("", ".", "..") for p in parts)
        or parts[0] == ".git"
        or any(c in path for c in "\x00\n\r")
    ):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def _lfs_pointer(oid, size):
    return f"{LFS_SPEC}\noid sha256:{oid}\nsize {size}\n".encode()


def _parse_lfs_pointer(data):
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    lines = text.strip("\n").split("\n")
    if len(lines) < 3 or lines[0] != LFS_SPEC:
        return None
    fields = dict(line.split(" ", 1) for line in lines[1:] if " " in line)
    oid = fields.get("oid", "")
    if not oid.startswith("sha256:") or not RE_SHA256.match(oid[7:]):
        return None
    try:
        size = int(fields.get("size", ""))
    except ValueError:
        return None
    return oid[7:], size


def _gitattributes_lfs_matcher(text):
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        pattern, attrs = parts[0], parts[1:]
        value = None
        for attr in attrs:
            if attr == "filter=lfs":
                value = True
            elif attr in ("-filter", "!filter") or (attr.startswith("filter=") and attr != "filter=lfs"):
                value = False
        if value is None:
            continue
        if "/" in pattern.rstrip("/"):
            regex = _glob_to_regex(pattern.lstrip("/"))
            rules.append((lambda p, r=regex: r.match(p) is not None, value))
        else:
            rules.append((lambda p, g=pattern: fnmatch.fnmatchcase(p.rsplit("/", 1)[-1], g), value))

    def is_lfs(path):
        result = False
        for match, value in rules:
            if match(path):
                result = value
        return result

    return is_lfs


def _glob_to_regex(pattern):
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("/**", i) and i + 3 == len(pattern):
            out.append("/.*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("^" + "".join(out) + "$")


class _Entry:
    __slots__ = ("path", "type", "mode", "oid", "size", "lfs")

    def __init__(self, path, type_, mode, oid, size, lfs=None):
        self.path, self.type, self.mode, self.oid, self.size, self.lfs = path, type_, mode, oid, size, lfs

    @property
    def content_size(self):
        return self.lfs[1] if self.lfs else self.size


# --------------------------------------------------------------------------------------------
# Storage: bare git repositories + LFS object stores
# --------------------------------------------------------------------------------------------


class HubStore:
    def __init__(self, root, token=None, user="tester", orgs=()):
        self.root = os.path.abspath(os.fspath(root))
        self.token = token
        self.user = user
        self.orgs = list(orgs)
        self.secret = os.urandom(32)
        self._global_lock = threading.RLock()
        self._repo_locks = {}
        self._tree_cache = collections.OrderedDict()
        self._tree_cache_lock = threading.Lock()
        for sub in ("repos", "lfs", "tmp"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        self.tmp = os.path.join(self.root, "tmp")

    # ---- paths / locks ----------------------------------------------------------------------

    def git_dir(self, repo_type, repo_id):
        namespace, name = repo_id.split("/", 1)
        return os.path.join(self.root, "repos", repo_type + "s", namespace, name + ".git")

    def lfs_dir(self, repo_type, repo_id):
        namespace, name = repo_id.split("/", 1)
        return os.path.join(self.root, "lfs", repo_type + "s", namespace, name)

    def lfs_path(self, repo_type, repo_id, oid):
        return os.path.join(self.lfs_dir(repo_type, repo_id), oid[:2], oid[2:4], oid)

    def repo_lock(self, repo_type, repo_id):
        key = (repo_type, repo_id)
        with self._global_lock:
            lock = self._repo_locks.get(key)
            if lock is None:
                lock = self._repo_locks[key] = threading.RLock()
            return lock

    # ---- git --------------------------------------------------------------------------------

    def _git_env(self, git_dir, extra=None):
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": self.tmp,
            "LANG": "C",
            "LC_ALL": "C",
            "GIT_DIR": git_dir,
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_AUTHOR_NAME": self.user,
            "GIT_AUTHOR_EMAIL": f"{self.user}@users.noreply.localhost",
            "GIT_COMMITTER_NAME": self.user,
            "GIT_COMMITTER_EMAIL": f"{self.user}@users.noreply.localhost",
        }
        if extra:
            env.update(extra)
        return env

    def git(self, git_dir, *args, input=None, env=None, check=True):
        proc = subprocess.run(
            ["git", *args],
            input=input,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self._git_env(git_dir, env),
            cwd=self.tmp,
            timeout=GIT_TIMEOUT,
        )
        if check and proc.returncode != 0:
            raise GitError(f"git {' '.join(args[:3])} failed: {proc.stderr.decode(errors='replace').strip()}")
        return proc if not check else proc.stdout

    # ---- repository metadata ----------------------------------------------------------------

    def _read_meta(self, git_dir):
        try:
            with open(os.path.join(git_dir, "hub-meta.json"), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _write_meta(self, git_dir, meta):
        tmp = os.path.join(git_dir, f"hub-meta.json.{uuid.uuid4().hex}")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f)
        os.replace(tmp, os.path.join(git_dir, "hub-meta.json"))

    def get_repo(self, repo_type, repo_id, authorized):
        """Return (git_dir, meta) for a readable repo, else raise RepoNotFound."""
        git_dir = self.git_dir(repo_type, repo_id)
        if not os.path.isfile(os.path.join(git_dir, "HEAD")):
            raise _repo_not_found(repo_id)
        meta = self._read_meta(git_dir)
        if meta.get("private") and not authorized:
            raise _repo_not_found(repo_id)
        return git_dir, meta

    # ---- refs / revisions -------------------------------------------------------------------

    def refs(self, git_dir):
        out = self.git(git_dir, "for-each-ref", "--format=%(refname)%00%(objectname)%00%(*objectname)")
        refs = {}
        for line in out.decode("utf-8", "replace").splitlines():
            parts = line.split("\x00")
            if len(parts) == 3:
                refs[parts[0]] = parts[2] or parts[1]
        return refs

    def object_type(self, git_dir, oid):
        proc = self.git(git_dir, "cat-file", "-t", oid, check=False)
        return proc.stdout.decode().strip() if proc.returncode == 0 else None

    def resolve(self, git_dir, repo_id, revision):
        """Resolve a branch / tag / refs/... / (short) commit sha to (commit sha, ref name or None)."""
        if not revision or revision.startswith("-") or any(c in revision for c in "\x00\n\r "):
            raise _revision_not_found(repo_id, revision)
        refs = self.refs(git_dir)
        candidates = [revision] if revision.startswith("refs/") else [f"refs/heads/{revision}", f"refs/tags/{revision}"]
        for ref in candidates:
            if ref in refs:
                return refs[ref], ref
        if RE_SHORT_SHA.match(revision):
            rev = revision.lower()
            if RE_SHA1.match(rev):
                if self.object_type(git_dir, rev) == "commit":
                    return rev, None
            else:
                proc = self.git(git_dir, "rev-parse", "--verify", "--quiet", rev + "^{commit}", check=False)
                if proc.returncode == 0:
                    return proc.stdout.decode().strip(), None
        raise _revision_not_found(repo_id, revision)

    def commit_time(self, git_dir, sha):
        return int(self.git(git_dir, "show", "-s", "--format=%ct", sha).decode().strip() or 0)

    # ---- trees ------------------------------------------------------------------------------

    def tree(self, git_dir, commit):
        """{path: _Entry} for every blob and tree of a commit (cached: commits are immutable)."""
        key = (git_dir, commit)
        with self._tree_cache_lock:
            cached = self._tree_cache.get(key)
            if cached is not None:
                self._tree_cache.move_to_end(key)
                return cached
        out = self.git(git_dir, "ls-tree", "-r", "-t", "-l", "-z", "--full-tree", commit)
        entries = {}
        pointer_candidates = []
        for item in out.split(b"\x00"):
            if not item:
                continue
            meta, path = item.split(b"\t", 1)
            mode, typ, oid, size = meta.decode().split()
            path = path.decode("utf-8", "surrogateescape")
            if typ == "blob":
                entry = _Entry(path, "file", mode, oid, int(size))
                if 90 <= entry.size <= 300:
                    pointer_candidates.append(entry)
            elif typ == "tree":
                entry = _Entry(path, "directory", mode, oid, 0)
            else:
                continue  # submodules: not supported
            entries[path] = entry
        if pointer_candidates:
            contents = self.read_blobs(git_dir, [e.oid for e in pointer_candidates])
            for entry in pointer_candidates:
                pointer = _parse_lfs_pointer(contents.get(entry.oid, b""))
                if pointer is not None:
                    entry.lfs = (pointer[0], pointer[1], entry.size)
        with self._tree_cache_lock:
            self._tree_cache[key] = entries
            while len(self._tree_cache) > TREE_CACHE_SIZE:
                self._tree_cache.popitem(last=False)
        return entries

    def read_blobs(self, git_dir, oids):
        oids = list(dict.fromkeys(oids))
        out = self.git(git_dir, "cat-file", "--batch", input="".join(o + "\n" for o in oids).encode())
        result, pos = {}, 0
        for _ in oids:
            nl = out.index(b"\n", pos)
            header = out[pos:nl].decode().split()
            pos = nl + 1
            if len(header) == 3:
                size = int(header[2])
                result[header[0]] = out[pos : pos + size]
                pos += size + 1
        return result

    def read_blob(self, git_dir, oid):
        return self.git(git_dir, "cat-file", "blob", oid)

    # ---- repo creation / deletion / duplication ---------------------------------------------

    def create_repo(self, repo_type, repo_id, private=False, extra_meta=None):
        git_dir = self.git_dir(repo_type, repo_id)
        with self._global_lock:
            if os.path.exists(git_dir):
                raise HubError(409, f"You already created this {repo_type} repo: {repo_id}", extra={"_exists": True})
            parent = os.path.dirname(git_dir)
            os.makedirs(parent, exist_ok=True)
            staging = tempfile.mkdtemp(dir=self.tmp, prefix="create-")
            try:
                self.git(staging, "init", "--bare", "--quiet", "--initial-branch=main", staging)
                self.git(staging, "config", "gc.auto", "0")
                self.git(staging, "config", "core.logAllRefUpdates", "false")
                now = time.time()
                meta = {"private": bool(private), "createdAt": _iso(now), "type": repo_type, **(extra_meta or {})}
                self._write_meta(staging, meta)
                blob = self.git(staging, "hash-object", "-w", "--stdin", input=DEFAULT_GITATTRIBUTES.encode())
                commit = self._build_commit(
                    staging, None, {".gitattributes": ("100644", blob.decode().strip())}, "initial commit"
                )
                self.git(staging, "update-ref", "refs/heads/main", commit, ZERO_OID)
                os.rename(staging, git_dir)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return git_dir

    def delete_repo(self, repo_type, repo_id):
        git_dir = self.git_dir(repo_type, repo_id)
        # lock order everywhere: repo lock first, then the global lock
        with self.repo_lock(repo_type, repo_id), self._global_lock:
            if not os.path.isdir(git_dir):
                raise _repo_not_found(repo_id)
            trash = tempfile.mkdtemp(dir=self.tmp, prefix="trash-")
            os.rename(git_dir, os.path.join(trash, "git"))
            lfs = self.lfs_dir(repo_type, repo_id)
            if os.path.isdir(lfs):
                os.rename(lfs, os.path.join(trash, "lfs"))
        shutil.rmtree(trash, ignore_errors=True)
        with self._tree_cache_lock:
            for key in [k for k in self._tree_cache if k[0] == git_dir]:
                del self._tree_cache[key]

    def duplicate_repo(self, repo_type, src_id, dst_id, private):
        src_git = self.git_dir(repo_type, src_id)
        dst_git = self.git_dir(repo_type, dst_id)
        with self.repo_lock(repo_type, src_id):
            with self._global_lock:
                if os.path.exists(dst_git):
                    raise HubError(409, f"Repository already exists: {dst_id}", extra={"_exists": True})
                staging = tempfile.mkdtemp(dir=self.tmp, prefix="dup-")
                try:
                    shutil.copytree(src_git, os.path.join(staging, "git"), symlinks=True)
                    meta = self._read_meta(src_git)
                    meta["createdAt"] = _iso(time.time())
                    meta["duplicatedFrom"] = src_id
                    if private is not None:
                        meta["private"] = bool(private)
                    self._write_meta(os.path.join(staging, "git"), meta)
                    src_lfs = self.lfs_dir(repo_type, src_id)
                    if os.path.isdir(src_lfs):
                        shutil.copytree(src_lfs, os.path.join(staging, "lfs"), copy_function=_link_or_copy)
                    os.makedirs(os.path.dirname(dst_git), exist_ok=True)
                    dst_lfs = self.lfs_dir(repo_type, dst_id)
                    if os.path.isdir(os.path.join(staging, "lfs")):
                        if os.path.exists(dst_lfs):  # leftover of a deleted repo: replace it
                            shutil.rmtree(dst_lfs)
                        os.makedirs(os.path.dirname(dst_lfs), exist_ok=True)
                        os.rename(os.path.join(staging, "lfs"), dst_lfs)
                    os.rename(os.path.join(staging, "git"), dst_git)
                finally:
                    shutil.rmtree(staging, ignore_errors=True)

    # ---- LFS objects ------------------------------------------------------------------------

    def lfs_object_size(self, repo_type, repo_id, oid):
        try:
            return os.path.getsize(self.lfs_path(repo_type, repo_id, oid))
        except OSError:
            return None

    def sign(self, *parts):
        msg = "\n".join(str(p) for p in parts).encode()
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()

    # ---- commits ----------------------------------------------------------------------------

    def _build_commit(self, git_dir, parent, files, message):
        """Write a commit whose tree holds exactly ``files`` ({path: (mode, blob oid)})."""
        dirs = set()
        for path in files:
            parts = path.split("/")
            for i in range(1, len(parts)):
                dirs.add("/".join(parts[:i]))
        conflicts = sorted(p for p in files if p in dirs)
        if conflicts:
            raise HubError(400, f"Path conflict: '{conflicts[0]}' is both a file and a folder")
        with tempfile.TemporaryDirectory(dir=self.tmp, prefix="index-") as td:
            env = {"GIT_INDEX_FILE": os.path.join(td, "index")}
            info = b"".join(
                f"{mode} {oid}\t".encode() + path.encode("utf-8", "surrogateescape") + b"\x00"
                for path, (mode, oid) in sorted(files.items())
            )
            self.git(git_dir, "read-tree", "--empty", env=env)
            if info:
                self.git(git_dir, "update-index", "-z", "--index-info", input=info, env=env)
            tree = self.git(git_dir, "write-tree", env=env).decode().strip()
        args = ["commit-tree", tree] + (["-p", parent] if parent else []) + ["-F", "-"]
        return self.git(git_dir, *args, input=message.encode()).decode().strip()

    def commit(self, repo_type, repo_id, git_dir, revision, ops, message, parent_commit, create_pr):
        """Apply NDJSON ``ops`` on top of ``revision``; returns (commit sha, PR number or None)."""
        with self.repo_lock(repo_type, repo_id):
            refs = self.refs(git_dir)
            if revision.startswith("refs/pr/") and revision in refs and not create_pr:
                target_ref = revision
            elif f"refs/heads/{revision}" in refs:
                target_ref = f"refs/heads/{revision}"
            else:
                raise HubError(
                    404,
                    f"Invalid rev id: {revision} (commits can only target an existing branch or pull request)",
                    "RevisionNotFound",
                )
            head = refs[target_ref]
            base = head
            if parent_commit:
                try:
                    parent_sha, _ = self.resolve(git_dir, repo_id, parent_commit)
                except HubError:
                    parent_sha = None
                if create_pr:
                    if parent_sha is None:
                        raise HubError(412, f"Parent commit {parent_commit} not found")
                    base = parent_sha
                elif parent_sha != head:
                    raise HubError(
                        412,
                        f"A commit has happened since: {target_ref} is at {head}, not {parent_commit}."
                        " Please refresh and try again.",
                    )
            base_tree = self.tree(git_dir, base)
            files = {p: (e.mode, e.oid) for p, e in base_tree.items() if e.type == "file"}

            # 1. write blobs (regular contents + LFS pointers) in one git call
            blob_inputs = []
            for op in ops:
                if op["kind"] in ("file", "lfsFile"):
                    blob_inputs.append(op)
            with tempfile.TemporaryDirectory(dir=self.tmp, prefix="blobs-") as td:
                paths = []
                for i, op in enumerate(blob_inputs):
                    p = os.path.join(td, str(i))
                    with open(p, "wb") as f:
                        f.write(op["data"])
                    paths.append(p)
                if paths:
                    out = self.git(git_dir, "hash-object", "-w", "--no-filters", "--stdin-paths",
                                   input="".join(p + "\n" for p in paths).encode())
                    oids = out.decode().split()
                    if len(oids) != len(paths):
                        raise GitError("hash-object returned an unexpected number of objects")
                    for op, oid in zip(blob_inputs, oids):
                        op["oid"] = oid

            # 2. apply operations in order
            for op in ops:
                kind, path = op["kind"], op["path"]
                if kind in ("file", "lfsFile"):
                    mode = files.get(path, ("100644", None))[0]
                    files[path] = (mode, op["oid"])
                elif kind == "deletedFile":
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                elif kind == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]

            new_commit = self._build_commit(git_dir, base, files, message)

            # 3. move the ref (compare-and-swap); nothing above is visible before this point
            pr_num = None
            if create_pr:
                nums = [int(r.rsplit("/", 1)[1]) for r in refs if re.match(r"^refs/pr/\d+$", r)]
                meta = self._read_meta(git_dir)
                pr_num = max(nums + [meta.get("lastDiscussion", 0)]) + 1
                self.git(git_dir, "update-ref", "-m", "create pr", f"refs/pr/{pr_num}", new_commit, ZERO_OID)
                meta["lastDiscussion"] = pr_num
                meta.setdefault("pullRequests", {})[str(pr_num)] = {"target": target_ref, "title": message.split("\n")[0]}
                self._write_meta(git_dir, meta)
            else:
                self.git(git_dir, "update-ref", "-m", "commit", target_ref, new_commit, head)
            return new_commit, pr_num


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


# --------------------------------------------------------------------------------------------
# HTTP layer
# --------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "TinyHub/1.0"
    timeout = 60  # socket idle timeout (keep-alive connections included)

    # set by HubServer on a subclass
    store: HubStore = None
    verbose = False

    request_log = None  # a bounded deque shared with HubServer.requests

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        if self.verbose:
            sys.stderr.write("[hub] %s - %s\n" % (self.address_string(), format % args))

    def log_request(self, code="-", size="-"):
        if self.request_log is not None:
            headers = getattr(self, "headers", None)
            self.request_log.append({
                "method": getattr(self, "command", None),
                "path": getattr(self, "path", None),
                "status": getattr(code, "value", code),
                "range": headers.get("Range") if headers is not None else None,
                "chunked": headers is not None and "chunked" in headers.get("Transfer-Encoding", "").lower(),
            })
        if self.verbose:
            super().log_request(code, size)

    # ---- plumbing ---------------------------------------------------------------------------

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _dispatch(self, method):
        self._body_done = False
        self._extra_headers = {}
        try:
            split = urlsplit(self.path)
            self.query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
            self.query_multi = parse_qs(split.query, keep_blank_values=True)
            raw_segments = split.path.split("/")[1:]
            segments = [unquote(s) for s in raw_segments]
            self._route(method, segments)
        except HubError as e:
            self._send_error(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # pragma: no cover - internal error path
            sys.stderr.write(f"[hub] internal error on {method} {self.path}:\n{traceback.format_exc()}")
            self._send_error(HubError(500, f"Internal server error: {type(e).__name__}: {e}"))

    def base_url(self):
        host = self.headers.get("Host", "")
        if not RE_HOST.match(host):
            host = "%s:%d" % self.server.server_address[:2]
        return f"http://{host}"

    def _has_body(self):
        return bool(self.headers.get("Content-Length", "0").strip() not in ("", "0") or self._is_chunked())

    def _is_chunked(self):
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower()

    def _iter_body(self, limit):
        """Yield the request body in chunks (Content-Length or chunked), at most ``limit`` bytes."""
        self._body_done = True
        total = 0
        if self._is_chunked():
            while True:
                line = self.rfile.readline(1024)
                if not line:
                    raise HubError(400, "Truncated chunked body")
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise HubError(400, "Malformed chunked body")
                if size == 0:
                    for _ in range(100):  # trailers
                        trailer = self.rfile.readline(8192)
                        if trailer in (b"\r\n", b"\n", b""):
                            break
                    return
                total += size
                if total > limit:
                    self.close_connection = True
                    raise HubError(413, "Request body too large")
                yield from self._read_exactly(size, "Truncated chunked body")
                self.rfile.readline(16)  # CRLF after each chunk
        else:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                self.close_connection = True
                raise HubError(400, "Invalid Content-Length")
            if length < 0 or length > limit:
                self.close_connection = True
                raise HubError(413, "Request body too large")
            yield from self._read_exactly(length, "Truncated body")

    def _read_exactly(self, size, truncated_message):
        """Yield `size` bytes of the request body in pieces of at most 1 MiB."""
        while size:
            chunk = self.rfile.read(min(size, 1 << 20))
            if not chunk:
                raise HubError(400, truncated_message)
            size -= len(chunk)
            yield chunk

    def read_body(self, limit=MAX_API_BODY):
        return b"".join(self._iter_body(limit))

    def read_json(self, default=None):
        body = self.read_body()
        if not body.strip():
            return {} if default is None else default
        try:
            return json.loads(body)
        except ValueError:
            raise HubError(400, "Request body is not valid JSON")

    def _finish_headers(self):
        if not self._body_done and self.command not in ("GET", "HEAD") and self._has_body():
            # unread request body: cannot keep the connection alive
            self.close_connection = True
            self.send_header("Connection", "close")
        for k, v in self._extra_headers.items():
            self.send_header(k, v)
        self.end_headers()

    def send_bytes(self, status, data, content_type="application/octet-stream", headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self._finish_headers()
        if self.command != "HEAD" and data:
            self.wfile.write(data)

    def send_json(self, obj, status=200, headers=None, content_type="application/json; charset=utf-8"):
        self.send_bytes(status, json.dumps(obj).encode(), content_type, headers)

    def _send_error(self, err):
        headers = dict(err.headers)
        headers["X-Error-Message"] = _header_safe(err.message)
        if err.code:
            headers["X-Error-Code"] = err.code
        body = {"error": err.message, **{k: v for k, v in err.extra.items() if not k.startswith("_")}}
        try:
            self.send_json(body, err.status, headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # ---- auth -------------------------------------------------------------------------------

    def bearer(self):
        auth = self.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip()
        return None

    def is_authorized(self):
        token = self.bearer()
        if self.store.token is None:
            return True
        return token is not None and hmac.compare_digest(token.encode(), self.store.token.encode())

    def require_write(self):
        if self.store.token is None:
            return
        token = self.bearer()
        if token is None:
            raise HubError(401, "Authentication required: this server only accepts writes with "
                                "'Authorization: Bearer <token>'")
        if not self.is_authorized():
            raise HubError(401, "Invalid credentials in Authorization header")

    # ---- routing ----------------------------------------------------------------------------

    def _route(self, method, seg):
        if seg and seg[-1] == "" and len(seg) > 1:
            seg = seg[:-1]
        if len(seg) >= 2 and seg[0] == "api":
            return self._route_api(method, seg[1:])
        if seg and seg[0] == "__lfs__":
            return self._route_signed_lfs(method, seg[1:])
        repo_type = "model"
        if seg and seg[0] in ("datasets", "spaces"):
            repo_type, seg = REPO_TYPES[seg[0]], seg[1:]
        if len(seg) >= 6 and seg[1].endswith(".git") and seg[2:] == ["info", "lfs", "objects", "batch"]:
            if method != "POST":
                raise HubError(405, "Method not allowed")
            return self.lfs_batch(repo_type, seg[0], seg[1][:-4])
        if len(seg) >= 5 and seg[2] in ("resolve", "raw"):
            if method not in ("GET", "HEAD"):
                raise HubError(405, "Method not allowed")
            rest = seg[3:]
            # tolerate a non-encoded "refs/pr/N" / "refs/convert/X" revision
            if len(rest) >= 4 and rest[0] == "refs" and rest[1] in ("pr", "convert"):
                rest = ["/".join(rest[:3])] + rest[3:]
            revision, path = rest[0], "/".join(rest[1:])
            return self.resolve_file(repo_type, seg[0], seg[1], revision, path, raw=seg[2] == "raw")
        raise HubError(404, f"Not found: {self.path}")

    def _route_api(self, method, seg):
        head = seg[0]
        if head == "whoami-v2" and method == "GET":
            return self.whoami()
        if head == "repos" and len(seg) == 2:
            if seg[1] == "create" and method == "POST":
                return self.create_repo()
            if seg[1] == "delete" and method in ("DELETE", "POST"):
                return self.delete_repo()
        if head == "validate-yaml" and method == "POST":
            self.read_body()
            return self.send_json({"errors": [], "warnings": []})
        if head in REPO_TYPES and len(seg) >= 3:
            repo_type = REPO_TYPES[head]
            namespace, name, rest = seg[1], seg[2], seg[3:]
            _validate_repo_name(namespace, name)
            repo_id = f"{namespace}/{name}"
            action = rest[0] if rest else ""
            arg = rest[1] if len(rest) > 1 else None
            if not rest and method == "GET":
                return self.repo_info(repo_type, repo_id, "main", default=True)
            if action == "revision" and arg is not None and method == "GET":
                return self.repo_info(repo_type, repo_id, "/".join(rest[1:]), default=False)
            if action == "tree" and arg is not None and method == "GET":
                return self.list_tree(repo_type, repo_id, arg, "/".join(rest[2:]))
            if action == "paths-info" and arg is not None and method == "POST":
                return self.paths_info(repo_type, repo_id, arg)
            if action == "preupload" and arg is not None and method == "POST":
                return self.preupload(repo_type, repo_id, arg)
            if action == "commit" and arg is not None and method == "POST":
                return self.commit(repo_type, repo_id, "/".join(rest[1:]))
            if action == "branch" and arg is not None and method in ("POST", "DELETE"):
                return self.branch(method, repo_type, repo_id, "/".join(rest[1:]))
            if action == "tag" and arg is not None and method in ("POST", "DELETE"):
                return self.tag(method, repo_type, repo_id, "/".join(rest[1:]))
            if action == "refs" and method == "GET":
                return self.list_refs(repo_type, repo_id)
            if action == "commits" and arg is not None and method == "GET":
                return self.list_commits(repo_type, repo_id, "/".join(rest[1:]))
            if action == "duplicate" and method == "POST":
                return self.duplicate(repo_type, repo_id)
            if action == "settings" and method == "PUT":
                return self.settings(repo_type, repo_id)
        raise HubError(404, f"Not found: {method} {self.path}")

    # ---- endpoints: account / repos ---------------------------------------------------------

    def whoami(self):
        token = self.bearer()
        if token is None or not self.is_authorized():
            raise HubError(401, "Invalid credentials in Authorization header")
        user = self.store.user
        self.send_json({
            "type": "user",
            "id": hashlib.sha1(user.encode()).hexdigest()[:24],
            "name": user,
            "fullname": user.capitalize(),
            "email": f"{user}@users.noreply.localhost",
            "emailVerified": True,
            "canPay": False,
            "isPro": False,
            "periodEnd": None,
            "avatarUrl": "",
            "orgs": [{"type": "org", "name": o, "fullname": o, "roleInOrg": "admin"} for o in self.store.orgs],
            "auth": {
                "type": "access_token",
                "accessToken": {"displayName": "test-token", "role": "write", "createdAt": _iso(0)},
            },
        })

    def _repo_url(self, repo_type, repo_id):
        return f"{self.base_url()}/{URL_PREFIX[repo_type]}{repo_id}"

    def _repo_from_payload(self, payload):
        name = payload.get("name")
        namespace = payload.get("organization") or self.store.user
        if not isinstance(name, str):
            raise HubError(400, "Missing repo name")
        if "/" in name:
            namespace, name = name.split("/", 1)
        _validate_repo_name(namespace, name)
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIX:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        return repo_type, f"{namespace}/{name}"

    def create_repo(self):
        payload = self.read_json()
        self.require_write()
        repo_type, repo_id = self._repo_from_payload(payload)
        private = payload.get("private")
        if payload.get("visibility") is not None:
            private = payload["visibility"] != "public"
        extra = {"sdk": payload["sdk"]} if repo_type == "space" and payload.get("sdk") else None
        url = self._repo_url(repo_type, repo_id)
        try:
            self.store.create_repo(repo_type, repo_id, private=bool(private), extra_meta=extra)
        except HubError as e:
            if e.status == 409:
                e.extra["url"] = url
            raise
        self.send_json({"url": url, "name": repo_id, "id": repo_id})

    def delete_repo(self):
        payload = self.read_json()
        self.require_write()
        repo_type, repo_id = self._repo_from_payload(payload)
        self.store.delete_repo(repo_type, repo_id)
        self.send_json({})

    def settings(self, repo_type, repo_id):
        payload = self.read_json()
        self.require_write()
        git_dir, _ = self.store.get_repo(repo_type, repo_id, True)
        with self.store.repo_lock(repo_type, repo_id):
            meta = self.store._read_meta(git_dir)
            if "private" in payload:
                meta["private"] = bool(payload["private"])
            if payload.get("visibility") is not None:
                meta["private"] = payload["visibility"] != "public"
            if "gated" in payload:
                meta["gated"] = payload["gated"]
            self.store._write_meta(git_dir, meta)
        self.send_json({"private": meta.get("private", False)})

    def duplicate(self, repo_type, repo_id):
        payload = self.read_json()
        self.require_write()
        self.store.get_repo(repo_type, repo_id, self.is_authorized())
        target = payload.get("repository")
        if not isinstance(target, str) or target.count("/") != 1:
            raise HubError(400, "Expected 'repository' as 'namespace/name'")
        namespace, name = target.split("/")
        _validate_repo_name(namespace, name)
        private = payload.get("private")
        if payload.get("visibility") is not None:
            private = payload["visibility"] != "public"
        url = self._repo_url(repo_type, target)
        try:
            self.store.duplicate_repo(repo_type, repo_id, target, private)
        except HubError as e:
            if e.status == 409:
                e.extra["url"] = url
            raise
        self.send_json({"url": url, "filesCopyPending": False})

    # ---- endpoints: read API ----------------------------------------------------------------

    def _readable(self, repo_type, repo_id):
        return self.store.get_repo(repo_type, repo_id, self.is_authorized())

    def repo_info(self, repo_type, repo_id, revision, default):
        git_dir, meta = self._readable(repo_type, repo_id)
        sha, _ = self.store.resolve(git_dir, repo_id, revision)
        tree = self.store.tree(git_dir, sha)
        blobs = _truthy(self.query.get("blobs", ""))
        siblings = []
        for path in sorted(tree):
            entry = tree[path]
            if entry.type != "file":
                continue
            sib = {"rfilename": path}
            if blobs:
                sib["size"] = entry.content_size
                sib["blobId"] = entry.oid
                if entry.lfs:
                    sib["lfs"] = {"sha256": entry.lfs[0], "size": entry.lfs[1], "pointerSize": entry.lfs[2]}
            siblings.append(sib)
        namespace = repo_id.split("/")[0]
        info = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": namespace,
            "sha": sha,
            "lastModified": _iso(self.store.commit_time(git_dir, sha)),
            "createdAt": meta.get("createdAt", _iso(0)),
            "private": bool(meta.get("private", False)),
            "gated": meta.get("gated", False),
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(e.content_size for e in tree.values() if e.type == "file"),
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        if repo_type == "space":
            info["sdk"] = meta.get("sdk")
        self.send_json(info)

    def _entry_json(self, git_dir, commit, entry, expand):
        if entry.type == "directory":
            data = {"type": "directory", "oid": entry.oid, "size": 0, "path": entry.path}
        else:
            data = {"type": "file", "oid": entry.oid, "size": entry.content_size, "path": entry.path}
            if entry.lfs:
                data["lfs"] = {"oid": entry.lfs[0], "size": entry.lfs[1], "pointerSize": entry.lfs[2]}
        if expand:
            out = self.store.git(git_dir, "log", "-1", "--format=%H%x00%s%x00%ct", commit, "--", entry.path)
            parts = out.decode("utf-8", "replace").strip().split("\x00")
            if len(parts) == 3:
                data["lastCommit"] = {"id": parts[0], "title": parts[1], "date": _iso(parts[2])}
        return data

    def list_tree(self, repo_type, repo_id, revision, path):
        git_dir, _ = self._readable(repo_type, repo_id)
        sha, _ = self.store.resolve(git_dir, repo_id, revision)
        tree = self.store.tree(git_dir, sha)
        path = path.strip("/")
        if path and (path not in tree or tree[path].type != "directory"):
            raise _entry_not_found(repo_id, path, sha)
        recursive = _truthy(self.query.get("recursive", ""))
        expand = _truthy(self.query.get("expand", ""))
        prefix = path + "/" if path else ""
        items = []
        for p in sorted(tree):
            if not p.startswith(prefix):
                continue
            if not recursive and "/" in p[len(prefix):]:
                continue
            items.append(self._entry_json(git_dir, sha, tree[p], expand))
        self.send_json(items)

    def paths_info(self, repo_type, repo_id, revision):
        body = self.read_body()
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            try:
                payload = json.loads(body or b"{}")
            except ValueError:
                raise HubError(400, "Invalid JSON body")
            paths = payload.get("paths") or []
            expand = _truthy(payload.get("expand", False))
        else:
            form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = _truthy((form.get("expand") or ["false"])[-1])
        if isinstance(paths, str):
            paths = [paths]
        git_dir, _ = self._readable(repo_type, repo_id)
        sha, _ = self.store.resolve(git_dir, repo_id, revision)
        tree = self.store.tree(git_dir, sha)
        result = []
        for p in dict.fromkeys(str(p).strip("/") for p in paths):
            if p in tree:
                result.append(self._entry_json(git_dir, sha, tree[p], expand))
        self.send_json(result)

    def list_refs(self, repo_type, repo_id):
        git_dir, _ = self._readable(repo_type, repo_id)
        refs = self.store.refs(git_dir)
        out = {"branches": [], "converts": [], "tags": []}
        prs = []
        for ref in sorted(refs):
            item = {"ref": ref, "targetCommit": refs[ref]}
            if ref.startswith("refs/heads/"):
                out["branches"].append({"name": ref[len("refs/heads/"):], **item})
            elif ref.startswith("refs/tags/"):
                out["tags"].append({"name": ref[len("refs/tags/"):], **item})
            elif ref.startswith("refs/convert/"):
                out["converts"].append({"name": ref[len("refs/convert/"):], **item})
            elif ref.startswith("refs/pr/"):
                prs.append({"name": ref[len("refs/pr/"):], **item})
        if _truthy(self.query.get("include_prs", "")):
            out["pullRequests"] = sorted(prs, key=lambda x: int(x["name"]) if x["name"].isdigit() else 0)
        self.send_json(out)

    def list_commits(self, repo_type, repo_id, revision):
        git_dir, _ = self._readable(repo_type, repo_id)
        sha, _ = self.store.resolve(git_dir, repo_id, revision)
        out = self.store.git(git_dir, "log", "--format=%H%x00%an%x00%ct%x00%s%x00%b%x1e", sha)
        commits = []
        formatted = "formatted" in self.query_multi.get("expand[]", []) + self.query_multi.get("expand", [])
        for record in out.decode("utf-8", "replace").split("\x1e"):
            record = record.strip("\n")
            if not record:
                continue
            oid, author, ts, title, body = (record.split("\x00") + [""] * 5)[:5]
            item = {
                "id": oid,
                "title": title,
                "message": body.strip("\n"),
                "authors": [{"user": author, "avatar": None}],
                "date": _iso(ts),
            }
            if formatted:
                item["formatted"] = {"title": title, "message": body.strip("\n")}
            commits.append(item)
        self.send_json(commits)

    # ---- endpoints: write API ---------------------------------------------------------------

    def _writable(self, repo_type, repo_id):
        self.require_write()
        return self.store.get_repo(repo_type, repo_id, True)

    def preupload(self, repo_type, repo_id, revision):
        payload = self.read_json()
        git_dir, _ = self._writable(repo_type, repo_id)
        sha, _ = self.store.resolve(git_dir, repo_id, revision)
        tree = self.store.tree(git_dir, sha)
        attrs = tree.get(".gitattributes")
        attrs_text = self.store.read_blob(git_dir, attrs.oid).decode("utf-8", "replace") if attrs else ""
        is_lfs = _gitattributes_lfs_matcher(attrs_text)
        files = payload.get("files")
        if not isinstance(files, list):
            raise HubError(400, "Expected 'files' list")
        result = []
        for f in files:
            if not isinstance(f, dict):
                raise HubError(400, "Malformed 'files' entry")
            path = _validate_path(f.get("path"))
            size = f.get("size") or 0
            try:
                sample = base64.b64decode(f.get("sample") or "")
            except ValueError:
                sample = b""
            lfs = bool(is_lfs(path) or size > LFS_THRESHOLD or b"\x00" in sample)
            existing = tree.get(path)
            oid = None
            if existing is not None and existing.type == "file":
                oid = existing.lfs[0] if existing.lfs else existing.oid
            result.append({
                "path": path,
                "uploadMode": "lfs" if lfs else "regular",
                "shouldIgnore": False,
                "oid": oid,
            })
        self.send_json({"files": result, "commitOid": sha})

    def commit(self, repo_type, repo_id, revision):
        body = self.read_body()
        git_dir, _ = self._writable(repo_type, repo_id)
        create_pr = _truthy(self.query.get("create_pr", ""))
        header, ops = None, []
        for n, line in enumerate(body.split(b"\n")):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError):
                raise HubError(400, f"Malformed NDJSON line {n + 1}")
            if key == "header":
                header = value
                continue
            if not isinstance(value, dict):
                raise HubError(400, f"Malformed operation on line {n + 1}")
            path = _validate_path(value.get("path"))
            if key == "file":
                content = value.get("content", "")
                if value.get("encoding", "base64") == "base64":
                    try:
                        data = base64.b64decode(content, validate=True)
                    except ValueError:
                        raise HubError(400, f"Invalid base64 content for {path}")
                else:
                    data = content.encode()
                ops.append({"kind": "file", "path": path, "data": data})
            elif key == "lfsFile":
                oid = str(value.get("oid", "")).lower()
                if value.get("algo", "sha256") != "sha256" or not RE_SHA256.match(oid):
                    raise HubError(400, f"Invalid LFS oid for {path}")
                size = self.store.lfs_object_size(repo_type, repo_id, oid)
                if size is None:
                    raise HubError(422, f"LFS object {oid} for {path} was not uploaded to this repository")
                if value.get("size") is not None and int(value["size"]) != size:
                    raise HubError(422, f"LFS object {oid}: size mismatch ({value['size']} != {size})")
                ops.append({"kind": "lfsFile", "path": path, "data": _lfs_pointer(oid, size)})
            elif key in ("deletedFile", "deletedFolder"):
                ops.append({"kind": key, "path": path})
            else:
                raise HubError(400, f"Unsupported commit operation: {key}")
        if not isinstance(header, dict) or not str(header.get("summary", "")).strip():
            raise HubError(400, "Commit header with a non-empty 'summary' is required")
        summary = str(header["summary"]).strip()
        description = str(header.get("description") or "").strip()
        message = summary + ("\n\n" + description if description else "") + "\n"
        parent = header.get("parentCommit")
        sha, pr_num = self.store.commit(repo_type, repo_id, git_dir, revision, ops, message, parent, create_pr)
        repo_url = self._repo_url(repo_type, repo_id)
        self.send_json({
            "success": True,
            "commitOid": sha,
            "commitUrl": f"{repo_url}/commit/{sha}",
            "commitMessage": message.rstrip("\n"),
            "hookOutput": "",
            "pullRequestUrl": f"{repo_url}/discussions/{pr_num}" if pr_num else None,
        })

    def _check_ref_name(self, git_dir, ref):
        proc = self.store.git(git_dir, "check-ref-format", ref, check=False)
        if proc.returncode != 0 or ref.endswith(".lock"):
            raise HubError(400, f"Invalid reference name: {ref}")

    def branch(self, method, repo_type, repo_id, branch):
        payload = self.read_json()
        git_dir, _ = self._writable(repo_type, repo_id)
        ref = f"refs/heads/{branch}"
        self._check_ref_name(git_dir, ref)
        with self.store.repo_lock(repo_type, repo_id):
            refs = self.store.refs(git_dir)
            if method == "DELETE":
                if ref not in refs:
                    raise _revision_not_found(repo_id, branch)
                if branch == "main":
                    raise HubError(403, "Cannot delete the default branch 'main'")
                self.store.git(git_dir, "update-ref", "-d", ref, refs[ref])
                return self.send_json({})
            if ref in refs:
                raise HubError(409, f"Reference already exists: {ref}")
            start = payload.get("startingPoint") or "main"
            sha, _ = self.store.resolve(git_dir, repo_id, start)
            self.store.git(git_dir, "update-ref", "-m", "create branch", ref, sha, ZERO_OID)
        self.send_json({})

    def tag(self, method, repo_type, repo_id, arg):
        payload = self.read_json()
        git_dir, _ = self._writable(repo_type, repo_id)
        with self.store.repo_lock(repo_type, repo_id):
            refs = self.store.refs(git_dir)
            if method == "DELETE":
                ref = f"refs/tags/{arg}"
                if ref not in refs:
                    raise _revision_not_found(repo_id, arg)
                self.store.git(git_dir, "update-ref", "-d", ref)
                return self.send_json({})
            tag = payload.get("tag")
            if not isinstance(tag, str) or not tag:
                raise HubError(400, "Missing 'tag'")
            ref = f"refs/tags/{tag}"
            self._check_ref_name(git_dir, ref)
            if ref in refs:
                raise HubError(409, f"Tag already exists: {tag}")
            sha, _ = self.store.resolve(git_dir, repo_id, arg)
            message = payload.get("message")
            if message:
                self.store.git(git_dir, "tag", "-a", "-F", "-", tag, sha, input=str(message).encode())
            else:
                self.store.git(git_dir, "update-ref", "-m", "create tag", ref, sha, ZERO_OID)
        self.send_json({})

    # ---- LFS --------------------------------------------------------------------------------

    def lfs_batch(self, repo_type, namespace, name):
        _validate_repo_name(namespace, name)
        repo_id = f"{namespace}/{name}"
        payload = self.read_json()
        operation = payload.get("operation")
        if operation == "upload":
            self._writable(repo_type, repo_id)
        elif operation == "download":
            self._readable(repo_type, repo_id)
        else:
            raise HubError(400, f"Unsupported LFS operation: {operation!r}")
        objects = payload.get("objects")
        if not isinstance(objects, list):
            raise HubError(400, "Expected 'objects' list")
        expires = int(time.time()) + SIGNED_URL_TTL
        expires_at = _dt.datetime.fromtimestamp(expires, tz=_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        base = self.base_url()
        result = []
        for obj in objects:
            oid = obj.get("oid") if isinstance(obj, dict) else None
            size = obj.get("size") if isinstance(obj, dict) else None
            if not isinstance(oid, str) or not RE_SHA256.match(oid) or not isinstance(size, int) or size < 0:
                result.append({"oid": str(oid), "size": size if isinstance(size, int) else 0,
                               "error": {"code": 422, "message": "Invalid oid or size"}})
                continue
            stored = self.store.lfs_object_size(repo_type, repo_id, oid)
            route = f"{repo_type}/{repo_id}/{oid}"
            if operation == "upload":
                if stored == size:
                    result.append({"oid": oid, "size": size})
                    continue
                if size > MAX_LFS_OBJECT:
                    result.append({"oid": oid, "size": size, "error": {"code": 422, "message": "Object too large"}})
                    continue
                qs = f"size={size}&expires={expires}"
                up_sig = self.store.sign("PUT", route, size, expires)
                ver_sig = self.store.sign("VERIFY", route, size, expires)
                result.append({
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {
                        "upload": {"href": f"{base}/__lfs__/upload/{route}?{qs}&sig={up_sig}", "expires_at": expires_at},
                        "verify": {"href": f"{base}/__lfs__/verify/{route}?{qs}&sig={ver_sig}", "expires_at": expires_at},
                    },
                })
            else:
                if stored is None:
                    result.append({"oid": oid, "size": size, "error": {"code": 404, "message": "Object does not exist"}})
                    continue
                sig = self.store.sign("GET", route, stored, expires)
                result.append({
                    "oid": oid,
                    "size": stored,
                    "authenticated": True,
                    "actions": {"download": {
                        "href": f"{base}/__lfs__/download/{route}?size={stored}&expires={expires}&sig={sig}",
                        "expires_at": expires_at,
                    }},
                })
        self.send_json({"transfer": "basic", "objects": result, "hash_algo": "sha256"},
                       content_type="application/vnd.git-lfs+json")

    def _route_signed_lfs(self, method, seg):
        # /__lfs__/{upload|verify|download}/{type}/{namespace}/{name}/{oid}?size=&expires=&sig=
        if len(seg) != 5 or seg[1] not in URL_PREFIX:
            raise HubError(404, "Not found")
        action, repo_type, namespace, name, oid = seg
        _validate_repo_name(namespace, name)
        if not RE_SHA256.match(oid):
            raise HubError(400, "Invalid oid")
        repo_id = f"{namespace}/{name}"
        route = f"{repo_type}/{repo_id}/{oid}"
        try:
            size = int(self.query.get("size", ""))
            expires = int(self.query.get("expires", ""))
        except ValueError:
            raise HubError(403, "Invalid signed URL")
        expected_method = {"upload": "PUT", "verify": "VERIFY", "download": "GET"}.get(action)
        allowed = {"upload": ("PUT",), "verify": ("POST",), "download": ("GET", "HEAD")}.get(action, ())
        if method not in allowed:
            raise HubError(405, "Method not allowed")
        sig = self.store.sign(expected_method, route, size, expires)
        if not hmac.compare_digest(sig, self.query.get("sig", "")) or expires < time.time():
            raise HubError(403, "Invalid or expired signed URL")
        git_dir = self.store.git_dir(repo_type, repo_id)
        if not os.path.isdir(git_dir):
            raise _repo_not_found(repo_id)
        if action == "upload":
            return self._lfs_upload(repo_type, repo_id, oid, size)
        if action == "verify":
            self.read_body()
            if self.store.lfs_object_size(repo_type, repo_id, oid) != size:
                raise HubError(404, f"Object {oid} not found or size mismatch")
            return self.send_json({"message": "ok"})
        path = self.store.lfs_path(repo_type, repo_id, oid)
        if not os.path.isfile(path):
            raise HubError(404, "Object does not exist")
        return self._send_file(path, size, {"Content-Type": "application/octet-stream"})

    def _lfs_upload(self, repo_type, repo_id, oid, size):
        final = self.store.lfs_path(repo_type, repo_id, oid)
        fd, tmp = tempfile.mkstemp(dir=self.store.tmp, prefix="lfs-")
        try:
            digest, written = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as f:
                for chunk in self._iter_body(size):
                    digest.update(chunk)
                    written += len(chunk)
                    f.write(chunk)
            if written != size or digest.hexdigest() != oid:
                raise HubError(400, f"Uploaded content does not match oid {oid} / size {size}")
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.send_bytes(200, b"", "text/plain")

    # ---- resolve ----------------------------------------------------------------------------

    def resolve_file(self, repo_type, namespace, name, revision, path, raw=False):
        _validate_repo_name(namespace, name)
        repo_id = f"{namespace}/{name}"
        git_dir, _ = self._readable(repo_type, repo_id)
        sha, _ = self.store.resolve(git_dir, repo_id, revision)
        tree = self.store.tree(git_dir, sha)
        entry = tree.get(path.strip("/"))
        if entry is None or entry.type != "file":
            raise _entry_not_found(repo_id, path, sha)
        ctype = mimetypes.guess_type(entry.path)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/json",):
            ctype += "; charset=utf-8"
        headers = {"X-Repo-Commit": sha, "Content-Type": ctype, "Accept-Ranges": "bytes",
                   "Cache-Control": "no-cache"}
        if entry.lfs and not raw:
            lfs_oid, lfs_size, _ = entry.lfs
            headers["ETag"] = f'"{lfs_oid}"'
            headers["X-Linked-Etag"] = f'"{lfs_oid}"'
            headers["X-Linked-Size"] = str(lfs_size)
            file_path = self.store.lfs_path(repo_type, repo_id, lfs_oid)
            if not os.path.isfile(file_path):
                raise HubError(500, f"LFS object {lfs_oid} is missing from the store")
            return self._send_file(file_path, lfs_size, headers)
        headers["ETag"] = f'"{entry.oid}"'
        data = self.store.read_blob(git_dir, entry.oid) if self.command == "GET" else None
        return self._send_range(entry.size, headers, lambda start, end: data[start:end])

    def _send_file(self, file_path, size, headers):
        if self.command == "HEAD":
            return self._send_range(size, headers, None)
        with open(file_path, "rb") as f:

            def reader(start, end):
                f.seek(start)
                remaining = end - start
                while remaining > 0:
                    chunk = f.read(min(remaining, 1 << 20))
                    if not chunk:
                        raise IOError("short read")
                    remaining -= len(chunk)
                    yield chunk

            return self._send_range(size, headers, reader)

    def _parse_range(self, size):
        header = self.headers.get("Range")
        if not header or self.command != "GET":
            return None
        m = re.match(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", header)
        if not m or (m.group(1) == "" and m.group(2) == ""):
            return None  # unsupported (e.g. multi-range): serve everything
        if m.group(1) == "":
            suffix = int(m.group(2))
            if suffix == 0:
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            return max(size - suffix, 0), size
        start = int(m.group(1))
        end = int(m.group(2)) + 1 if m.group(2) else size
        if start >= size or end <= start:
            raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
        return start, min(end, size)

    def _send_range(self, size, headers, reader):
        rng = self._parse_range(size)
        status, start, end = 200, 0, size
        if rng is not None:
            status, (start, end) = 206, rng
            headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{size}"}
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(end - start))
        self._finish_headers()
        if self.command == "HEAD" or reader is None:
            return
        out = reader(start, end)
        if isinstance(out, (bytes, bytearray)):
            self.wfile.write(out)
        else:
            for chunk in out:
                self.wfile.write(chunk)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


class HubServer:
    """Hub-compatible server on 127.0.0.1 serving ``root`` from a daemon thread.

    ``with HubServer(tmp_path, token="secret") as hub: ...`` -- ``hub.url`` is the endpoint.
    """

    def __init__(self, root, port=0, token=None, user="tester", orgs=(), verbose=False):
        self.store = HubStore(root, token=token, user=user, orgs=orgs)
        self._request_log = collections.deque(maxlen=10000)
        handler = type("HubHandler", (_Handler,), {
            "store": self.store, "verbose": bool(verbose), "request_log": self._request_log,
        })
        self.httpd = _Server((HOST, int(port)), handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://{HOST}:{self.port}"
        self._thread = None

    @property
    def root(self):
        return self.store.root

    @property
    def token(self):
        return self.store.token

    def start(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                            name=f"hub-server-{self.port}", daemon=True)
            self._thread.start()
        return self

    def stop(self):
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # helpers for tests
    @property
    def requests(self):
        """Snapshot of the most recent requests: dicts with method, path, status, range, chunked."""
        return list(self._request_log)

    def git_dir(self, repo_id, repo_type="model"):
        return self.store.git_dir(repo_type, repo_id)

    def git(self, repo_id, *args, repo_type="model"):
        """Run a git command in a repo's bare directory; returns stripped stdout text."""
        return self.store.git(self.git_dir(repo_id, repo_type), *args).decode().strip()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Minimal Hugging Face Hub-compatible server (127.0.0.1 only)")
    parser.add_argument("--root", required=True, help="storage directory")
    parser.add_argument("--port", type=int, default=0, help="port (0 = pick a free one)")
    parser.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' for writes")
    parser.add_argument("--user", default="tester", help="user name returned by whoami")
    parser.add_argument("--org", action="append", default=[], help="organization listed by whoami")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)

    server = HubServer(args.root, port=args.port, token=args.token, user=args.user, orgs=args.org,
                       verbose=args.verbose)
    stop = threading.Event()

    def _on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    server.start()
    print(server.url, flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""A Hugging Face Hub-compatible HTTP server on 127.0.0.1 for offline tests (Python standard library + ``git``).

Storage: every repository is a bare git repository under
``ROOT/repos/{models,datasets,spaces}/{namespace}/{name}.git``, so every commit has a real sha and old revisions stay
readable. Files that ``.gitattributes`` routes to LFS (or that are
binary or over 10 MB) are committed as git-lfs pointers and stored by sha256 under ``ROOT/lfs/...``, as on the Hub.

Uploads: the server speaks neither Xet nor the LFS transfer protocol. Its preupload answer is "regular" for every
file, so every client sends contents inline in the commit: huggingface_hub >= 1 with hf_xet installed has no LFS
fallback (an "lfs" file always goes through Xet), and this way it works with and without ``HF_HUB_DISABLE_XET``.

Auth: one token acts as ``user``, a member of ``orgs``. Writes need the token (401, answered before any body is read)
and a namespace of that user or one of its orgs (403). Reads need no token; private repositories are 404 without it.

Endpoints (``{t}`` is ``models``, ``datasets`` or ``spaces``; ``{p}`` is ``""``, ``datasets/`` or ``spaces/``; a Space
must be created with an ``sdk``, and its files are served like any repository's, not run; errors are JSON
``{"error": ...}`` with the Hub's status codes and ``X-Error-Code`` headers)::

    GET       /api/whoami-v2
    POST      /api/repos/create                   POST  /api/validate-yaml   (a README.md's front matter)
    GET       /api/{t}/{repo}                     GET   /api/{t}/{repo}/revision/{rev}
    GET       /api/{t}/{repo}/tree/{rev}[/{path}] POST  /api/{t}/{repo}/paths-info/{rev}
    POST      /api/{t}/{repo}/preupload/{rev}     POST  /api/{t}/{repo}/commit/{rev}[?create_pr=1]
    POST      /api/{t}/{repo}/branch/{branch}     POST  /api/{t}/{repo}/tag/{rev}
    POST      /api/{t}/{repo}/duplicate
    POST      /api/{t}/{repo}/discussions         GET   /api/{t}/{repo}/discussions/{num}   (pull requests only)
    GET       /api/{t}/{repo}/commits/{rev}       GET   /api/{t}/{repo}/refs[?include_prs=1]
    GET|HEAD  /{p}{repo}/resolve/{rev}/{path}     (single byte ranges)

A commit adds files inline and deletes files and folders; one of more than ``max_commit_files`` operations or a body
over ``max_commit_bytes`` is refused with 413 before the store is locked.

A full 40-hex revision always means that commit: branches and tags may not be named like one.

Usage::

    python tests/hub_server.py --root DIR [--port 0] [--token SECRET] [--user tester] [--org NAME ...] [--verbose]

prints ``http://127.0.0.1:PORT`` on its first line and serves until SIGTERM/SIGINT. From Python::

    with HubServer(tmp_path, token="secret") as hub:
        env["HF_ENDPOINT"] = hub.url
"""

from __future__ import annotations

import argparse
import base64
import collections
import datetime
import fnmatch
import hashlib
import hmac
import json
import mimetypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubServer", "main"]

HOST = "127.0.0.1"
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
SPACE_SDKS = ("gradio", "docker", "static", "streamlit")
# The orgs of the default user: the namespaces this project's tests push to besides "tester".
DEFAULT_ORGS = ("forker", "upstream")
ZERO_OID = "0" * 40
LFS_SPEC = "version https://git-lfs.github.com/spec/v1"
LFS_THRESHOLD = 10 * 1024 * 1024  # larger files are stored in LFS whatever .gitattributes says, as on the Hub
# The Hub bounds what one commit may carry; these are the defaults, settable per server (HubServer's max_commit_bytes
# and max_commit_files, the CLI's --max-commit-bytes/--max-commit-files) so that tests can reach them with small data.
# Commits here carry every file inline, base64-encoded (see "Uploads"), so the body bound leaves room for a vit-base.
MAX_COMMIT_BODY = 1024**3
MAX_COMMIT_FILES = 5000  # a commit of 20,000 files would hold the store lock for over a minute
FAULTS = ("500", "drop", "hang")  # see HubServer.fail_next_commit
MAX_JSON_BODY = 16 * 1024**2
DRAIN_LIMIT = 1024**2  # an unread body up to this size is read before an error reply, to keep the connection usable
GIT_TIMEOUT = 300

RE_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
RE_FULL_SHA = re.compile(r"[0-9a-fA-F]{40}")
RE_SHORT_SHA = re.compile(r"[0-9a-f]{5,39}")
RE_SHA256 = re.compile(r"[0-9a-f]{64}")
RE_PR_REF = re.compile(r"refs/pr/(\d+)")
RE_LOOPBACK_HOST = re.compile(r"(127\.\d{1,3}\.\d{1,3}\.\d{1,3}|localhost|\[::1\]):\d{1,5}")

DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*", "*.mlmodel",
        "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt",
        "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm",
        "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)


class HubError(Exception):
    """An error answered as JSON ``{"error": message}``; ``code`` goes to X-Error-Code, which the clients map to
    RepositoryNotFoundError, RevisionNotFoundError and EntryNotFoundError."""

    def __init__(self, status, message, code=None, headers=None, extra=None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.extra = headers or {}, extra or {}


def repo_not_found(repo_id):
    return HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")


def revision_not_found(repo_id, revision):
    return HubError(404, f"Invalid rev id: {revision} (repository {repo_id})", "RevisionNotFound")


def entry_not_found(repo_id, path, commit):
    return HubError(404, f"Entry not found: {path} (repository {repo_id})", "EntryNotFound", {"X-Repo-Commit": commit})


def iso_time(timestamp):
    return datetime.datetime.fromtimestamp(int(timestamp), tz=datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def check_repo_id(namespace, name):
    for part in (namespace, name):
        if not RE_NAME.fullmatch(part) or ".." in part or "--" in part or part.endswith(".git"):
            raise HubError(400, f"Invalid repo id: {namespace}/{name}")
    return f"{namespace}/{name}"


def check_path(path):
    """A file path inside a repository: relative, no empty, '.' or '..' parts, no control characters, not in .git."""
    parts = path.split("/") if isinstance(path, str) else [""]
    if any(part in ("", ".", "..") for part in parts) or parts[0] == ".git" or re.search(r"[\x00-\x1f\x7f]", path):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def check_ref_name(name):
    """A branch or tag name: git's rules (``git check-ref-format``), no leading '-' (it would read as a git option),
    and not a full commit sha, which always means that commit."""
    parts = name.split("/") if isinstance(name, str) else [""]
    if (
        any(not part or part.startswith(".") or part.endswith(".lock") for part in parts)
        or name.startswith("-") or name.endswith(".") or name == "@" or ".." in name or "@{" in name
        or re.search(r"[\x00-\x20\x7f~^:?*\[\\]", name)
    ):
        raise HubError(400, f"Invalid reference name: {name!r}")
    if RE_FULL_SHA.fullmatch(name):
        raise HubError(400, f"Invalid reference name: {name!r} looks like a commit sha, which always means that commit")
    return name


def requested_private(payload):
    """The visibility a create or duplicate request asks for: True (private), False, or None when it does not say
    (huggingface_hub 0.x sends "private", 1.x+ "visibility")."""
    if payload.get("visibility") is not None:
        return payload["visibility"] != "public"
    return None if payload.get("private") is None else bool(payload["private"])


def parse_lfs_pointer(data):
    """(sha256, size) of a git-lfs pointer file, else None."""
    match = re.fullmatch(rb"version https://git-lfs\.github\.com/spec/v1\noid sha256:([0-9a-f]{64})\nsize (\d+)\n",
                         data)
    return (match.group(1).decode(), int(match.group(2))) if match else None


def lfs_patterns(gitattributes):
    return [line.split()[0] for line in gitattributes.splitlines() if "filter=lfs" in line.split()[1:]]


def goes_to_lfs(path, data, patterns):
    name = path.rsplit("/", 1)[-1]
    return (
        len(data) > LFS_THRESHOLD or b"\x00" in data[:8000]
        or any(fnmatch.fnmatchcase(path if "/" in pattern else name, pattern) for pattern in patterns)
    )


def parse_commit(lines, max_files=None):
    """(message, parent commit or None, {path: content}, [deleted path, folder paths ending in "/"]) of an NDJSON
    commit request, read line by line from ``lines`` (an iterable, e.g. ``Handler.body_lines``: a large body is never
    held whole; bytes are split into lines); over ``max_files`` operations is a 413, as on the Hub."""
    header, additions, deletions = {}, {}, []
    lines = lines.splitlines() if isinstance(lines, bytes) else lines
    for number, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
            key, value = item["key"], dict(item["value"])
        except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: a deeply nested line
            raise HubError(400, f"Malformed NDJSON line {number}") from None
        path = value.get("path")
        if key == "header":
            header = value
        elif key == "file":
            try:
                additions[check_path(path)] = base64.b64decode(value.get("content", ""), validate=True)
            except (ValueError, TypeError):
                raise HubError(400, f"Invalid base64 content for {path!r}") from None
        elif key in ("deletedFile", "deletedFolder"):
            folder = key == "deletedFolder"
            deletions.append(check_path(path.rstrip("/") if folder and isinstance(path, str) else path)
                             + ("/" if folder else ""))
        else:  # "lfsFile": preupload never asks for LFS
            raise HubError(400, f"Unsupported commit operation {key!r}: this server takes files inline")
        if max_files is not None and len(additions) + len(deletions) > max_files:
            raise HubError(413, f"Too many files in one commit: at most {max_files} operations per commit")
    summary, description = (str(header.get(key) or "").strip() for key in ("summary", "description"))
    if not summary:
        raise HubError(400, "The commit header needs a non-empty 'summary'")
    message = summary + (f"\n\n{description}" if description else "") + "\n"
    return message, header.get("parentCommit"), additions, deletions


def apply_deletions(repo_id, files, deletions):
    """Remove deleted files and folders from ``files`` ({path: oid}); deleting what is not there is a 404."""
    for path in deletions:
        if path.endswith("/"):
            inside = [name for name in files if name.startswith(path)]
            if not inside:
                raise HubError(404, f"Folder not found: {path} (repository {repo_id})", "EntryNotFound")
            for name in inside:
                del files[name]
        elif files.pop(path, None) is None:
            raise HubError(404, f"Entry not found: {path} (repository {repo_id})", "EntryNotFound")


class Entry(collections.namedtuple("Entry", "path type oid size lfs")):
    """A file or directory of a commit; ``lfs`` is (sha256, size, pointer size) for LFS files."""

    @property
    def content_size(self):
        return self.lfs[1] if self.lfs else self.size

    def to_json(self):
        data = {"type": self.type, "oid": self.oid, "size": self.content_size, "path": self.path}
        if self.lfs:
            data["lfs"] = {"oid": self.lfs[0], "size": self.lfs[1], "pointerSize": self.lfs[2]}
        return data


class Store:
    """Bare git repositories and LFS objects under ``root``; every write holds ``lock``."""

    def __init__(self, root, user):
        self.root = os.path.abspath(os.fspath(root))
        self.user = user
        self.lock = threading.RLock()
        self.tmp = os.path.join(self.root, "tmp")
        os.makedirs(self.tmp, exist_ok=True)

    def git_dir(self, repo_type, repo_id):
        return os.path.join(self.root, "repos", repo_type + "s", repo_id + ".git")

    def lfs_dir(self, repo_type, repo_id):
        return os.path.join(self.root, "lfs", repo_type + "s", repo_id)

    def lfs_path(self, repo_type, repo_id, oid):
        return os.path.join(self.lfs_dir(repo_type, repo_id), oid[:2], oid[2:4], oid)

    def git(self, git_dir, *args, input=None, env=None, check=True):
        """Run git on one repository. Callers put ``--`` (or ``--end-of-options``) before any value a request chose."""
        identity = {"NAME": self.user, "EMAIL": f"{self.user}@users.noreply.localhost"}
        proc = subprocess.run(
            ["git", *args], input=input, capture_output=True, cwd=self.tmp, timeout=GIT_TIMEOUT,
            env={
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.tmp, "LC_ALL": "C", "GIT_DIR": git_dir,
                "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
                **{f"GIT_{role}_{key}": value for role in ("AUTHOR", "COMMITTER") for key, value in identity.items()},
                **(env or {}),
            },
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"git {args[0]} failed: {proc.stderr.decode(errors='replace').strip()}")
        return proc if not check else proc.stdout

    def meta(self, git_dir):
        with open(os.path.join(git_dir, "hub-meta.json"), encoding="utf-8") as file:
            return json.load(file)

    def write_meta(self, git_dir, meta):
        with open(os.path.join(git_dir, "hub-meta.json"), "w", encoding="utf-8") as file:
            json.dump(meta, file)

    def repo(self, repo_type, repo_id, authenticated):
        """(git dir, metadata) of a repository the caller may read, else RepoNotFound."""
        git_dir = self.git_dir(repo_type, repo_id)
        if not os.path.isfile(os.path.join(git_dir, "hub-meta.json")):
            raise repo_not_found(repo_id)
        meta = self.meta(git_dir)
        if meta["private"] and not authenticated:
            raise repo_not_found(repo_id)
        return git_dir, meta

    def refs(self, git_dir):
        """{ref name: commit sha}; annotated tags resolve to their commit."""
        out = self.git(git_dir, "for-each-ref", "--format=%(refname)%00%(objectname)%00%(*objectname)").decode()
        return {ref: peeled or oid for ref, oid, peeled in (line.split("\0") for line in out.splitlines())}

    def resolve(self, git_dir, repo_id, revision):
        """The commit sha of a revision: a full sha is that commit and nothing else; otherwise a branch, a tag, a
        ``refs/...`` name, or a short sha."""
        if RE_FULL_SHA.fullmatch(revision):
            sha = revision.lower()
            if self.git(git_dir, "cat-file", "-t", "--", sha, check=False).stdout.strip() == b"commit":
                return sha
            raise revision_not_found(repo_id, revision)
        refs = self.refs(git_dir)
        for ref in (revision,) if revision.startswith("refs/") else (f"refs/heads/{revision}", f"refs/tags/{revision}"):
            if ref in refs:
                return refs[ref]
        if RE_SHORT_SHA.fullmatch(revision):
            proc = self.git(git_dir, "rev-parse", "--verify", "--quiet", "--end-of-options", revision + "^{commit}",
                            check=False)
            if proc.returncode == 0:
                return proc.stdout.decode().strip()
        raise revision_not_found(repo_id, revision)

    def tree(self, git_dir, commit):
        """{path: Entry} for every file and directory of a commit."""
        out = self.git(git_dir, "ls-tree", "-r", "-t", "-l", "-z", "--full-tree", "--end-of-options", commit)
        entries = {}
        for item in filter(None, out.split(b"\0")):
            meta, path = item.split(b"\t", 1)
            _, kind, oid, size = meta.decode().split()
            path = path.decode("utf-8", "surrogateescape")
            entries[path] = Entry(path, "file" if kind == "blob" else "directory", oid, 0 if size == "-" else int(size),
                                  None)
        small = [entry for entry in entries.values() if entry.type == "file" and entry.size < 200]  # pointer-sized
        contents = self.read_blobs(git_dir, [entry.oid for entry in small])
        for entry in small:
            pointer = parse_lfs_pointer(contents[entry.oid])
            if pointer:
                entries[entry.path] = entry._replace(lfs=(*pointer, entry.size))
        return entries

    def read_blob(self, git_dir, oid):
        return self.read_blobs(git_dir, [oid])[oid]

    def read_blobs(self, git_dir, oids):
        oids = list(dict.fromkeys(oids))
        out = self.git(git_dir, "cat-file", "--batch", input="".join(oid + "\n" for oid in oids).encode())
        blobs, position = {}, 0
        for oid in oids:
            header_end = out.index(b"\n", position)
            size = int(out[position:header_end].split()[2])
            blobs[oid] = out[header_end + 1 : header_end + 1 + size]
            position = header_end + 2 + size
        return blobs

    def write_commit(self, git_dir, parent, files, message):
        """A commit whose tree holds exactly ``files`` ({path: blob oid}) on top of ``parent``."""
        clash = sorted(set(files) & {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)})
        if clash:
            raise HubError(400, f"Path conflict: '{clash[0]}' is both a file and a folder")
        with tempfile.TemporaryDirectory(dir=self.tmp) as index_dir:
            env = {"GIT_INDEX_FILE": os.path.join(index_dir, "index")}
            index = b"".join(f"100644 {oid}\t{path}\0".encode("utf-8", "surrogateescape")
                             for path, oid in files.items())
            self.git(git_dir, "update-index", "--add", "-z", "--index-info", input=index, env=env)
            tree = self.git(git_dir, "write-tree", env=env).decode().strip()
        parents = ["-p", parent] if parent else []
        return self.git(git_dir, "commit-tree", *parents, "-F", "-", tree, input=message.encode()).decode().strip()

    def hash_blob(self, git_dir, data):
        return self.git(git_dir, "hash-object", "-w", "--stdin", input=data).decode().strip()

    def store_lfs(self, repo_type, repo_id, data):
        """Keep ``data`` in the LFS store; returns the pointer file to commit in its place."""
        oid = hashlib.sha256(data).hexdigest()
        path = self.lfs_path(repo_type, repo_id, oid)
        if not os.path.isfile(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.tmp, delete=False) as file:
                file.write(data)
            os.replace(file.name, path)
        return f"{LFS_SPEC}\noid sha256:{oid}\nsize {len(data)}\n".encode()

    def open_pull_request(self, git_dir, refs, title):
        """The number of a new pull request (its ref ``refs/pr/N`` is the caller's to create), its title recorded."""
        number = 1 + max((int(match.group(1)) for match in map(RE_PR_REF.fullmatch, refs) if match), default=0)
        meta = self.meta(git_dir)
        meta.setdefault("pullRequests", {})[str(number)] = {"title": title, "createdAt": iso_time(time.time())}
        self.write_meta(git_dir, meta)
        return number

    def update_ref(self, git_dir, ref, new, old):
        """Move ``ref`` from ``old`` to ``new`` (ZERO_OID: create), failing if someone moved it in between."""
        self.git(git_dir, "update-ref", "--", ref, new, old)

    def create_repo(self, repo_type, repo_id, private):
        """A new repository holding the Hub's default .gitattributes in an "initial commit"."""
        git_dir = self.git_dir(repo_type, repo_id)
        staging = tempfile.mkdtemp(dir=self.tmp)
        try:
            self.git(staging, "init", "--bare", "--quiet", "--initial-branch=main", staging)
            blob = self.hash_blob(staging, DEFAULT_GITATTRIBUTES.encode())
            self.update_ref(staging, "refs/heads/main", self.write_commit(staging, None, {".gitattributes": blob},
                                                                          "initial commit\n"), ZERO_OID)
            self.write_meta(staging, {"private": bool(private), "createdAt": iso_time(time.time())})
            os.makedirs(os.path.dirname(git_dir), exist_ok=True)
            os.rename(staging, git_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def duplicate_repo(self, repo_type, source_id, target_id, private):
        """Copy a repository with its history and LFS objects (hard links)."""
        target = self.git_dir(repo_type, target_id)
        staging = tempfile.mkdtemp(dir=self.tmp)
        try:
            shutil.copytree(self.git_dir(repo_type, source_id), os.path.join(staging, "git"))
            meta = self.meta(os.path.join(staging, "git"))
            meta.update(createdAt=iso_time(time.time()), private=meta["private"] if private is None else bool(private))
            self.write_meta(os.path.join(staging, "git"), meta)
            source_lfs, target_lfs = self.lfs_dir(repo_type, source_id), self.lfs_dir(repo_type, target_id)
            if os.path.isdir(source_lfs):
                shutil.rmtree(target_lfs, ignore_errors=True)
                shutil.copytree(source_lfs, target_lfs, copy_function=os.link)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(os.path.join(staging, "git"), target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


# An endpoint: (method, path pattern, handler, whether it writes). GET patterns also answer HEAD. Groups are matched on
# the raw path and unquoted afterwards, so an encoded revision like "refs%2Fpr%2F1" stays one group.
REPO = r"/api/(models|datasets|spaces)/([^/]+)/([^/]+)"
ROUTES = [
    ("GET", r"/api/whoami-v2", "whoami", False),
    ("POST", r"/api/repos/create", "create_repo", True),
    ("POST", r"/api/validate-yaml", "validate_yaml", False),
    ("GET", REPO + r"(?:/revision/([^/]+))?", "repo_info", False),
    ("GET", REPO + r"/tree/([^/]+)(?:/(.*))?", "list_tree", False),
    ("POST", REPO + r"/paths-info/([^/]+)", "paths_info", False),
    ("POST", REPO + r"/preupload/([^/]+)", "preupload", True),
    ("POST", REPO + r"/commit/([^/]+)", "commit", True),
    ("GET", REPO + r"/commits/([^/]+)", "commits", False),
    ("GET", REPO + r"/refs", "list_refs", False),
    ("POST", REPO + r"/branch/(.+)", "create_branch", True),
    ("POST", REPO + r"/tag/(.+)", "create_tag", True),
    ("POST", REPO + r"/duplicate", "duplicate", True),
    ("POST", REPO + r"/discussions", "create_pull_request", True),
    ("GET", REPO + r"/discussions/(\d+)", "pull_request", False),
    ("GET", r"/(?:(datasets|spaces)/)?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)", "resolve_file", False),
]
ROUTES = [(method, re.compile(pattern), handler, writes) for method, pattern, handler, writes in ROUTES]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "TinyHub/2.0"
    timeout = 60  # idle keep-alive connections
    # set by HubServer on a subclass
    store: Store = None
    token = None
    orgs = ()
    verbose = False
    request_log = None
    max_commit_bytes = MAX_COMMIT_BODY
    max_commit_files = MAX_COMMIT_FILES
    faults = None  # a list shared with HubServer: what to do after the next commits are applied

    def do_GET(self):
        self.dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def dispatch(self):
        self.body_read = False
        try:
            url = urlsplit(self.path)
            self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
            for method, pattern, handler, writes in ROUTES:
                match = pattern.fullmatch(url.path)
                if match and self.command in (method, "HEAD" if method == "GET" else method):
                    if writes:
                        self.authenticate()  # before the body is read
                    return getattr(self, handler)(*(unquote(group) if group else group for group in match.groups()))
            raise HubError(404, f"Not found: {self.command} {url.path}")
        except HubError as error:
            self.send_error_json(error)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as error:  # a server bug: say so, with the traceback on stderr
            sys.stderr.write(f"[hub] internal error on {self.command} {self.path}:\n{traceback.format_exc()}")
            reason = str(error).replace(self.store.root, "<storage>")  # the storage path is no client's business
            self.send_error_json(HubError(500, f"Internal server error: {type(error).__name__}: {reason}"))

    def log_request(self, code="-", size="-"):
        self.request_log.append({"method": self.command, "path": self.path, "status": int(code),
                                 "range": self.headers.get("Range")})
        if self.verbose:
            super().log_request(code, size)

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        if self.verbose:
            super().log_message(format, *args)

    # ---- requests and replies ------------------------------------------------------------------------------------

    def read_body(self, limit=MAX_JSON_BODY):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise HubError(411, "Send a Content-Length, not a chunked body")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise HubError(400, "Invalid Content-Length") from None
        if not 0 <= length <= limit:
            raise HubError(413, f"Request body over {limit} bytes")
        body = self.rfile.read(length)
        self.body_read = True
        if len(body) != length:
            raise HubError(400, "Truncated request body")
        return body

    def body_lines(self, limit):
        """The request body's lines, read one at a time (a commit body of hundreds of MiB is held once, as the files
        it decodes to, not several times over); the checks of ``read_body``."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise HubError(411, "Send a Content-Length, not a chunked body")
        try:
            left = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise HubError(400, "Invalid Content-Length") from None
        if not 0 <= left <= limit:
            raise HubError(413, f"Request body over {limit} bytes")
        # Until the last line is read the connection holds the rest of the body: an error before then closes it.
        self.body_read, close_connection, self.close_connection = True, self.close_connection, True
        while left > 0:
            line = self.rfile.readline(left)
            if not line:
                raise HubError(400, "Truncated request body")
            left -= len(line)
            if line.strip():
                yield line
        self.close_connection = close_connection

    def read_json(self):
        try:
            payload = json.loads(self.read_body() or b"{}")
        except ValueError:
            raise HubError(400, "Request body is not valid JSON") from None
        if not isinstance(payload, dict):
            raise HubError(400, "Expected a JSON object")
        return payload

    def send(self, status, body, headers):
        if not self.body_read and self.command not in ("GET", "HEAD"):
            chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
            length = "unknown" if chunked else self.headers.get("Content-Length", "0")
            if length.isdigit() and int(length) <= DRAIN_LIMIT:
                self.rfile.read(int(length))
            else:  # a large (or unknown) body is not read just to refuse it: drop the connection instead
                self.close_connection = True
                headers = {**headers, "Connection": "close"}
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def send_json(self, data, status=200, headers=None):
        body = json.dumps(data).encode()
        self.send(status, body, {"Content-Type": "application/json; charset=utf-8", "Content-Length": str(len(body)),
                                 **(headers or {})})

    def send_error_json(self, error):
        message = " ".join(error.message.split())[:500].encode("ascii", "backslashreplace").decode()  # header-safe
        headers = {**error.headers, "X-Error-Message": message}
        if error.code:
            headers["X-Error-Code"] = error.code
        try:
            self.send_json({"error": error.message, **error.extra}, error.status, headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def repo_url(self, repo_type, repo_id):
        """The repository's URL as the client addressed this server (a proxy in front of it included): clients check
        that it starts with their endpoint. Only a loopback Host header is echoed; anything else gets our own
        address."""
        host = self.headers.get("Host", "")
        if not RE_LOOPBACK_HOST.fullmatch(host):
            host = f"{HOST}:{self.server.server_address[1]}"
        return f"http://{host}/{URL_PREFIX[repo_type]}{repo_id}"

    # ---- auth ----------------------------------------------------------------------------------------------------

    def authenticated(self):
        """Whether the request carries the server's token (any request does on a server without one)."""
        if self.token is None:
            return True
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.token.encode())

    def authenticate(self):
        if not self.authenticated():
            raise HubError(401, "Invalid credentials in Authorization header")

    def check_namespace(self, repo_id):
        namespace = repo_id.split("/")[0]
        if namespace != self.store.user and namespace not in self.orgs:
            raise HubError(403, f"You don't have the rights to write to {repo_id}: {self.store.user} may write to "
                                f"{', '.join([self.store.user, *self.orgs])}")

    def readable(self, type_path, namespace, name):
        """(repo type, repo id, git dir, metadata) of a repository the caller may read."""
        repo_type, repo_id = REPO_TYPES[type_path], check_repo_id(namespace, name)
        return (repo_type, repo_id, *self.store.repo(repo_type, repo_id, self.authenticated()))

    def writable(self, type_path, namespace, name):
        repo_type, repo_id = REPO_TYPES[type_path], check_repo_id(namespace, name)
        self.check_namespace(repo_id)
        return (repo_type, repo_id, *self.store.repo(repo_type, repo_id, True))

    # ---- endpoints -----------------------------------------------------------------------------------------------

    def whoami(self):
        if self.headers.get("Authorization") is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        self.authenticate()
        user = self.store.user
        self.send_json({
            "type": "user", "id": hashlib.sha1(user.encode()).hexdigest()[:24], "name": user, "fullname": user,
            "email": f"{user}@users.noreply.localhost", "emailVerified": True, "isPro": False, "canPay": False,
            "orgs": [{"type": "org", "name": org, "fullname": org, "roleInOrg": "admin"} for org in self.orgs],
            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
        })

    def create_repo(self):
        payload = self.read_json()
        name, namespace = payload.get("name"), payload.get("organization") or self.store.user
        if not isinstance(name, str) or not isinstance(namespace, str):
            raise HubError(400, "Expected 'name' (and optionally 'organization') strings")
        if "/" in name:
            namespace, name = name.split("/", 1)
        repo_id = check_repo_id(namespace, name)
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIX:
            raise HubError(400, f"Unsupported repo type: {repo_type!r}")
        if repo_type == "space" and payload.get("sdk") not in SPACE_SDKS:
            raise HubError(400, f"A Space needs an sdk, one of {', '.join(SPACE_SDKS)}")
        self.check_namespace(repo_id)
        url = self.repo_url(repo_type, repo_id)
        with self.store.lock:
            if os.path.exists(self.store.git_dir(repo_type, repo_id)):
                raise HubError(409, f"You already created this {repo_type} repo: {repo_id}", extra={"url": url})
            self.store.create_repo(repo_type, repo_id, bool(requested_private(payload)))
        self.send_json({"url": url, "name": repo_id, "id": repo_id})

    def validate_yaml(self):
        """Clients check a README.md's front matter before committing it; without a YAML parser, all is fine."""
        self.read_json()
        self.send_json({"errors": [], "warnings": []})

    def repo_info(self, type_path, namespace, name, revision=None):
        repo_type, repo_id, git_dir, meta = self.readable(type_path, namespace, name)
        sha = self.store.resolve(git_dir, repo_id, revision or "main")
        files = [entry for entry in self.store.tree(git_dir, sha).values() if entry.type == "file"]
        with_blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = [
            {"rfilename": entry.path, **({"size": entry.content_size, "blobId": entry.oid} if with_blobs else {}),
             **({"lfs": {"sha256": entry.lfs[0], "size": entry.lfs[1], "pointerSize": entry.lfs[2]}}
                if with_blobs and entry.lfs else {})}
            for entry in sorted(files)
        ]
        committed = self.store.git(git_dir, "show", "-s", "--format=%ct", sha).decode().strip()
        self.send_json({
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "author": namespace, "sha": sha,
            "lastModified": iso_time(committed), "createdAt": meta["createdAt"], "private": meta["private"],
            "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
            **({"modelId": repo_id} if repo_type == "model" else {}),
        })

    def list_tree(self, type_path, namespace, name, revision, folder=None):
        _, repo_id, git_dir, _ = self.readable(type_path, namespace, name)
        sha = self.store.resolve(git_dir, repo_id, revision)
        tree = self.store.tree(git_dir, sha)
        folder = (folder or "").strip("/")
        if folder and getattr(tree.get(folder), "type", None) != "directory":
            raise entry_not_found(repo_id, folder, sha)
        prefix = folder + "/" if folder else ""
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        self.send_json([
            tree[path].to_json() for path in sorted(tree)
            if path.startswith(prefix) and (recursive or "/" not in path[len(prefix):])
        ])

    def paths_info(self, type_path, namespace, name, revision):
        if "json" in self.headers.get("Content-Type", ""):
            paths = self.read_json().get("paths", [])
        else:  # huggingface_hub 0.x posts a form
            paths = parse_qs(self.read_body().decode(errors="replace")).get("paths", [])
        _, repo_id, git_dir, _ = self.readable(type_path, namespace, name)
        tree = self.store.tree(git_dir, self.store.resolve(git_dir, repo_id, revision))
        paths = dict.fromkeys(str(path).strip("/") for path in paths)
        self.send_json([tree[path].to_json() for path in paths if path in tree])

    def preupload(self, type_path, namespace, name, revision):
        _, repo_id, git_dir, _ = self.writable(type_path, namespace, name)
        files = self.read_json().get("files")
        if not isinstance(files, list) or not all(isinstance(file, dict) for file in files):
            raise HubError(400, "Expected 'files': a list of objects")
        sha = self.store.resolve(git_dir, repo_id, revision)
        # "oid" is what the client compares with the git sha1 of its file to skip an unchanged one: a file stored in
        # LFS has no such sha here, so it is sent again.
        blobs = {path: entry.oid for path, entry in self.store.tree(git_dir, sha).items() if not entry.lfs}
        self.send_json({"commitOid": sha, "files": [
            {"path": check_path(file.get("path")), "uploadMode": "regular", "shouldIgnore": False,
             "oid": blobs.get(file["path"])}
            for file in files
        ]})

    def commit(self, type_path, namespace, name, revision):
        repo_type, repo_id, git_dir, _ = self.writable(type_path, namespace, name)
        message, parent, additions, deletions = parse_commit(self.body_lines(self.max_commit_bytes),
                                                             self.max_commit_files)
        create_pr = self.query.get("create_pr", "").lower() in ("1", "true")
        with self.store.lock:
            refs = self.store.refs(git_dir)
            ref = revision if RE_PR_REF.fullmatch(revision) and not create_pr else f"refs/heads/{revision}"
            if ref not in refs:
                raise HubError(404, f"Invalid rev id: {revision} (a commit goes to an existing branch or pull "
                                    "request)", "RevisionNotFound")
            base = refs[ref]
            if parent:
                try:
                    parent_sha = self.store.resolve(git_dir, repo_id, str(parent))
                except HubError:
                    parent_sha = None
                if parent_sha != base and not (create_pr and parent_sha):
                    raise HubError(412, f"A commit has happened since {parent}: {ref} is at {base}")
                base = parent_sha
            files = {path: entry.oid for path, entry in self.store.tree(git_dir, base).items() if entry.type == "file"}
            apply_deletions(repo_id, files, deletions)
            attributes = self.store.read_blob(git_dir, files[".gitattributes"]) if ".gitattributes" in files else b""
            for path, data in additions.items():
                attributes = data if path == ".gitattributes" else attributes
                self.check_pointer(repo_type, repo_id, path, data)
                if goes_to_lfs(path, data, lfs_patterns(attributes.decode("utf-8", "replace"))):
                    data = self.store.store_lfs(repo_type, repo_id, data)
                files[path] = self.store.hash_blob(git_dir, data)
            sha = self.store.write_commit(git_dir, base, files, message)
            pr_number = None
            if create_pr:
                pr_number = self.store.open_pull_request(git_dir, refs, message.split("\n")[0])
                self.store.update_ref(git_dir, f"refs/pr/{pr_number}", sha, ZERO_OID)
            else:
                self.store.update_ref(git_dir, ref, sha, refs[ref])
        self.injected_fault()
        url = self.repo_url(repo_type, repo_id)
        self.send_json({
            "success": True, "commitOid": sha, "commitUrl": f"{url}/commit/{sha}", "commitMessage": message.rstrip(),
            "hookOutput": "", "pullRequestUrl": f"{url}/discussions/{pr_number}" if pr_number else None,
        })

    def check_pointer(self, repo_type, repo_id, path, data):
        """A file committed inline that is an LFS pointer must tell the truth about an object this server holds: its
        size is what downloads announce (X-Linked-Size) and clients check, so a pointer whose size lies is a 400."""
        pointer = parse_lfs_pointer(data)
        if pointer is None:
            return
        try:
            size = os.path.getsize(self.store.lfs_path(repo_type, repo_id, pointer[0]))
        except FileNotFoundError:
            return  # no such object here: a download of it is a 404 (resolve_file)
        if size != pointer[1]:
            raise HubError(400, f"LFS pointer {path} says size {pointer[1]}, but its object sha256:{pointer[0]} has "
                                f"{size} bytes")

    def injected_fault(self):
        """After a commit is applied: lose its answer if a test asked for it (HubServer.fail_next_commit)."""
        fault = self.faults.pop(0) if self.faults else None
        if fault == "500":
            raise HubError(500, "Internal server error (injected after the commit was applied)")
        if fault == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            raise ConnectionResetError("injected: connection dropped after the commit was applied")
        if fault is not None and fault.startswith("hang"):
            time.sleep(float(fault.partition(":")[2] or 30))

    def commits(self, type_path, namespace, name, revision):
        """The history of a revision, newest first, as ``list_repo_commits`` reads it (one page)."""
        _, repo_id, git_dir, _ = self.readable(type_path, namespace, name)
        sha = self.store.resolve(git_dir, repo_id, revision)
        out = self.store.git(git_dir, "log", "-z", "--format=%H%x1f%an%x1f%ct%x1f%B", "--end-of-options", sha)
        commits = []
        for record in filter(None, out.decode("utf-8", "replace").split("\0")):
            oid, author, timestamp, body = record.strip("\n").split("\x1f", 3)
            title, _, message = body.strip().partition("\n")
            commits.append({"id": oid, "authors": [{"user": author}], "date": iso_time(timestamp),
                            "title": title, "message": message.strip()})
        self.send_json(commits)

    def list_refs(self, type_path, namespace, name):
        """Branches, tags and (with include_prs) pull requests, as ``list_repo_refs`` reads them."""
        _, _, git_dir, _ = self.readable(type_path, namespace, name)
        refs = self.store.refs(git_dir)
        def listed(prefix):
            return [{"name": ref[len(prefix):], "ref": ref, "targetCommit": sha} for ref, sha in sorted(refs.items())
                    if ref.startswith(prefix)]
        pulls = listed("refs/pr/") if self.query.get("include_prs") in ("1", "true") else []
        self.send_json({"branches": listed("refs/heads/"), "tags": listed("refs/tags/"), "converts": [],
                        "pullRequests": [{**pull, "name": pull["ref"]} for pull in pulls]})

    def create_branch(self, type_path, namespace, name, branch):
        _, repo_id, git_dir, _ = self.writable(type_path, namespace, name)
        start = self.read_json().get("startingPoint") or "main"
        ref = f"refs/heads/{check_ref_name(branch)}"
        with self.store.lock:
            if ref in self.store.refs(git_dir):
                raise HubError(409, f"Reference already exists: {ref}")
            self.store.update_ref(git_dir, ref, self.store.resolve(git_dir, repo_id, str(start)), ZERO_OID)
        self.send_json({})

    def create_tag(self, type_path, namespace, name, revision):
        _, repo_id, git_dir, _ = self.writable(type_path, namespace, name)
        payload = self.read_json()
        tag, message = payload.get("tag"), payload.get("message")
        ref = f"refs/tags/{check_ref_name(tag)}"
        with self.store.lock:
            if ref in self.store.refs(git_dir):
                raise HubError(409, f"Tag already exists: {tag}")
            target = self.store.resolve(git_dir, repo_id, revision)
            if message:  # an annotated tag: a tag object written from stdin, so no request value reaches git's argv
                user = self.store.user
                target = self.store.git(git_dir, "mktag", input=(
                    f"object {target}\ntype commit\ntag {tag}\n"
                    f"tagger {user} <{user}@users.noreply.localhost> {int(time.time())} +0000\n\n{message}\n"
                ).encode()).decode().strip()
            self.store.update_ref(git_dir, ref, target, ZERO_OID)
        self.send_json({})

    def duplicate(self, type_path, namespace, name):
        repo_type, repo_id, _, _ = self.readable(type_path, namespace, name)
        payload = self.read_json()
        target = payload.get("repository")
        if not isinstance(target, str) or target.count("/") != 1:
            raise HubError(400, "Expected 'repository': 'namespace/name'")
        target_id = check_repo_id(*target.split("/"))
        self.check_namespace(target_id)
        url = self.repo_url(repo_type, target_id)
        with self.store.lock:
            if os.path.exists(self.store.git_dir(repo_type, target_id)):
                raise HubError(409, f"Repository already exists: {target_id}", extra={"url": url})
            self.store.duplicate_repo(repo_type, repo_id, target_id, requested_private(payload))
        self.send_json({"url": url})

    def create_pull_request(self, type_path, namespace, name):
        """A pull request starting at main; huggingface_hub >= 1 opens one this way when hf_xet is installed, then
        commits to its ref."""
        _, _, git_dir, _ = self.writable(type_path, namespace, name)
        payload = self.read_json()
        if payload.get("pullRequest") is not True:
            raise HubError(400, "This server only has pull requests, not discussions")
        with self.store.lock:
            refs = self.store.refs(git_dir)
            number = self.store.open_pull_request(git_dir, refs, str(payload.get("title") or "Pull request"))
            self.store.update_ref(git_dir, f"refs/pr/{number}", refs["refs/heads/main"], ZERO_OID)
        self.send_json({"num": number, "pullRequest": True})

    def pull_request(self, type_path, namespace, name, number):
        repo_type, repo_id, _, meta = self.readable(type_path, namespace, name)
        details = meta.get("pullRequests", {}).get(number)
        if details is None:
            raise HubError(404, f"Discussion not found: {repo_id}#{number}")
        self.send_json({
            "num": int(number), "title": details["title"], "status": "open", "isPullRequest": True,
            "createdAt": details["createdAt"], "author": {"name": self.store.user}, "events": [],
            "repo": {"name": repo_id, "type": repo_type}, "changes": {"base": "refs/heads/main"},
            "filesWithConflicts": [],
        })

    def resolve_file(self, type_path, namespace, name, revision, path):
        repo_type, repo_id, git_dir, _ = self.readable(type_path or "models", namespace, name)
        sha = self.store.resolve(git_dir, repo_id, revision)
        entry = self.store.tree(git_dir, sha).get(path)
        if entry is None or entry.type != "file":
            raise entry_not_found(repo_id, path, sha)
        content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
        headers = {"X-Repo-Commit": sha, "Content-Type": content_type, "Accept-Ranges": "bytes",
                   "ETag": f'"{entry.oid}"'}
        if entry.lfs:
            # the Hub's ETag of an LFS file is its sha256, which the clients check the download against
            headers.update({"ETag": f'"{entry.lfs[0]}"', "X-Linked-Etag": f'"{entry.lfs[0]}"',
                            "X-Linked-Size": str(entry.lfs[1])})
            try:
                with open(self.store.lfs_path(repo_type, repo_id, entry.lfs[0]), "rb") as file:
                    data = file.read()
            except FileNotFoundError:  # a pointer committed as a regular file, to an object this server never had
                raise HubError(404, f"LFS object missing for {path} (repository {repo_id})", "EntryNotFound",
                               {"X-Repo-Commit": sha}) from None
            if len(data) != entry.lfs[1]:  # never served under a size that is not its own (commits refuse such)
                raise HubError(500, f"LFS object of {path} has {len(data)} bytes, its pointer says {entry.lfs[1]}")
        else:
            data = self.store.read_blob(git_dir, entry.oid)
        size, status, start, end = len(data), 200, 0, len(data)
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").replace(" ", ""))
        if match and any(match.groups()):  # one range, "first-[last]" or "-suffix"; other forms get the whole file
            first, last = match.groups()
            if first:
                start, end = int(first), min(int(last) + 1 if last else size, size)
            else:
                start = max(size - int(last), 0)
            if start >= size or end <= start:
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            status, headers["Content-Range"] = 206, f"bytes {start}-{end - 1}/{size}"
        self.send(status, data[start:end], {**headers, "Content-Length": str(end - start)})


class _ThreadingServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class HubServer:
    """The server on 127.0.0.1 from a daemon thread: ``with HubServer(tmp_path, token="secret") as hub: hub.url``.

    ``token`` acts as ``user``, who may write to its own namespace and those of ``orgs``; without a token every
    request acts as ``user``.
    """

    def __init__(self, root, port=0, token=None, user="tester", orgs=DEFAULT_ORGS, verbose=False,
                 max_commit_bytes=MAX_COMMIT_BODY, max_commit_files=MAX_COMMIT_FILES):
        self.store = Store(root, user)
        self.token = token
        self._request_log = collections.deque(maxlen=10000)
        self._faults = []
        self.handler = type("HubHandler", (Handler,), {
            "store": self.store, "token": token, "orgs": tuple(orgs), "verbose": verbose,
            "request_log": self._request_log, "max_commit_bytes": max_commit_bytes,
            "max_commit_files": max_commit_files, "faults": self._faults,
        })
        handler = self.handler
        self.httpd = _ThreadingServer((HOST, port), handler)
        self.url = f"http://{HOST}:{self.httpd.server_address[1]}"
        self._thread = None

    def fail_next_commit(self, fault):
        """Lose the answer to the next commit, which is applied all the same: "500" answers an error, "drop" closes
        the connection without an answer, "hang:SECONDS" answers after SECONDS (past a client's timeout)."""
        if fault.partition(":")[0] not in FAULTS:
            raise ValueError(f"fault {fault!r}: expected one of {FAULTS}")
        self._faults.append(fault)

    def set_limits(self, max_commit_bytes=None, max_commit_files=None):
        """Change the commit bounds of a running server (None: leave as is)."""
        if max_commit_bytes is not None:
            self.handler.max_commit_bytes = max_commit_bytes
        if max_commit_files is not None:
            self.handler.max_commit_files = max_commit_files

    @property
    def root(self):
        return self.store.root

    @property
    def requests(self):
        """The most recent requests, oldest first: dicts with method, path, status and range."""
        return list(self._request_log)

    def start(self):
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
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

    def __exit__(self, *exc_info):
        self.stop()

    def git_dir(self, repo_id, repo_type="model"):
        return self.store.git_dir(repo_type, repo_id)

    def git(self, repo_id, *args, repo_type="model"):
        """Run git in a repository's bare directory (for test assertions); returns stripped stdout."""
        return self.store.git(self.git_dir(repo_id, repo_type), *args).decode().strip()


def main(argv=None):
    parser = argparse.ArgumentParser(description="A Hugging Face Hub-compatible server on 127.0.0.1 for offline tests")
    parser.add_argument("--root", required=True, help="storage folder")
    parser.add_argument("--port", type=int, default=0, help="port (0: a free one)")
    parser.add_argument("--token", help="the token writes need ('Authorization: Bearer TOKEN'); none: writes are open")
    parser.add_argument("--user", default="tester", help="the token's user name (its namespace)")
    parser.add_argument("--org", action="append", help=f"an org of the user, whose namespace it may write to "
                                                       f"(repeatable; default: {' '.join(DEFAULT_ORGS)})")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    parser.add_argument("--max-commit-bytes", type=int, default=MAX_COMMIT_BODY,
                        help=f"largest commit request body, else 413 (default {MAX_COMMIT_BODY})")
    parser.add_argument("--max-commit-files", type=int, default=MAX_COMMIT_FILES,
                        help=f"most file operations in one commit, else 413 (default {MAX_COMMIT_FILES})")
    args = parser.parse_args(argv)
    server = HubServer(args.root, port=args.port, token=args.token, user=args.user,
                       orgs=DEFAULT_ORGS if args.org is None else args.org, verbose=args.verbose,
                       max_commit_bytes=args.max_commit_bytes, max_commit_files=args.max_commit_files)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with server:
        print(server.url, flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

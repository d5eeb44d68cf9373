"""The specification of tests/hub_server.py: what the real clients (huggingface_hub 0.x and 1.x+, datasets) can do
against it, and what it refuses.

Client actions run in a fresh interpreter (huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE and
HF_HUB_DISABLE_XET at import time) with a clean environment pointing at the server; what the server refuses is
checked with raw HTTP requests.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pytest
from hub_server import HubServer
from sam_testing import hub_env

TOKEN = "hf_local_test_token_0123456789"
SERVER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hub_server.py")
PUSH_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "push.py")
LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:"
SHA1 = re.compile(r"^[0-9a-f]{40}$")

PRELUDE = textwrap.dedent(
    """
    import hashlib, json, os
    import huggingface_hub
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    api = HfApi()
    out = {"hub_version": huggingface_hub.__version__}

    def sha256_file(path):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    def read_text(path):
        with open(path, encoding="utf-8") as f:
            return f.read()

    def expect_error(fn):
        try:
            fn()
        except Exception as e:  # report what the client raised
            resp = getattr(e, "response", None)
            return {"mro": [c.__name__ for c in type(e).__mro__], "status": getattr(resp, "status_code", None),
                    "message": str(e)[:500]}
        return None

    ARGS = json.loads(os.environ["TEST_ARGS"])
    """
)


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


def run_client(url, hf_home, script, args=None, token=TOKEN, timeout=240, xet=False, **extra_env):
    """Run PRELUDE + script in a fresh interpreter of this venv; return its ``out`` dict. With ``xet``, the client
    does not opt out of Xet (HF_HUB_DISABLE_XET unset)."""
    env = hub_env(url, hf_home, token=token, TEST_ARGS=json.dumps(args or {}), **extra_env)
    if xet:
        del env["HF_HUB_DISABLE_XET"]
    code = PRELUDE + textwrap.dedent(script) + '\nprint("@@RESULT@@" + json.dumps(out))\n'
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"client script failed (rc={proc.returncode}):\n{proc.stderr[-6000:]}\n{proc.stdout[-2000:]}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@"):])
    pytest.fail(f"no result from client script:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def request(hub, method, path, payload=None, token=TOKEN, body=None, content_type="application/json"):
    """One raw request: (status, parsed JSON or raw bytes, headers)."""
    connection = http.client.HTTPConnection(hub.url.split("//")[1], timeout=30)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if payload is not None:
        body = json.dumps(payload).encode()
    if body is not None:
        headers["Content-Type"] = content_type
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        is_json = response.getheader("Content-Type", "").startswith("application/json")
        return response.status, json.loads(data) if is_json else data, response
    finally:
        connection.close()


def raw_commit(hub, repo, files):
    """POST {path: bytes} to the NDJSON commit endpoint of main; returns (status, reply)."""
    lines = [{"key": "header", "value": {"summary": "raw commit"}}] + [
        {"key": "file", "value": {"path": path, "content": base64.b64encode(data).decode(), "encoding": "base64"}}
        for path, data in files.items()
    ]
    status, reply, _ = request(hub, "POST", f"/api/models/{repo}/commit/main",
                               body=b"\n".join(json.dumps(line).encode() for line in lines),
                               content_type="application/x-ndjson")
    return status, reply


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_safetensors(path, seed, n=60000):
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    save_file({"weight": torch.randn(n, generator=gen), "bias": torch.arange(16, dtype=torch.float32)}, str(path))


def lfs_store_path(hub, repo_id, oid, repo_type="model"):
    return os.path.join(hub.root, "lfs", repo_type + "s", *repo_id.split("/"), oid[:2], oid[2:4], oid)


def assert_error(err, type_name, status=None):
    assert err is not None, f"expected {type_name}, nothing was raised"
    assert type_name in err["mro"], err
    if status is not None:
        assert err["status"] == status, err


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with HubServer(tmp_path_factory.mktemp("hub-root"), token=TOKEN) as server:
        yield server


# --------------------------------------------------------------------------------------------------------------------
# What the clients can do
# --------------------------------------------------------------------------------------------------------------------


def test_create_and_upload_folder_single_commit(hub, tmp_path):
    """create_repo + upload_folder: one real git commit on main, a regular blob and an LFS pointer + object."""
    folder = tmp_path / "upload"
    folder.mkdir()
    (folder / "hello.txt").write_text("hello v1\n")
    (folder / "README.md").write_text("---\nlibrary_name: transformers\n---\n# A model\n")  # validated first
    write_safetensors(folder / "model.safetensors", seed=0)
    repo = "tester/first-repo"

    out = run_client(
        hub.url,
        tmp_path / "hf-home",
        """
        repo = ARGS["repo"]
        out["url1"] = str(api.create_repo(repo, exist_ok=True))
        out["url2"] = str(api.create_repo(repo, exist_ok=True))
        out["dup_error"] = expect_error(lambda: api.create_repo(repo))
        info = api.upload_folder(repo_id=repo, folder_path=ARGS["folder"], commit_message="first upload")
        out.update(oid=info.oid, commit_url=info.commit_url, pr_url=info.pr_url)
        out["files"] = sorted(api.list_repo_files(repo))
        out["tree"] = {
            f.path: {"size": f.size, "lfs": f.lfs.sha256 if f.lfs else None, "blob": f.blob_id}
            for f in api.list_repo_tree(repo, recursive=True)
        }
        out["info_sha"] = api.model_info(repo).sha
        out["whoami"] = api.whoami()["name"]
        """,
        args={"repo": repo, "folder": str(folder)},
    )
    oid = out["oid"]
    assert SHA1.match(oid)
    assert out["url1"] == out["url2"] == f"{hub.url}/{repo}"
    assert_error(out["dup_error"], "HfHubHTTPError", 409)
    assert out["commit_url"] == f"{hub.url}/{repo}/commit/{oid}"
    assert out["pr_url"] is None
    assert out["whoami"] == "tester"

    # both files in ONE commit on main, on top of "initial commit"
    assert hub.git(repo, "rev-parse", "refs/heads/main") == oid == out["info_sha"]
    assert hub.git(repo, "log", "--format=%s", oid).split("\n") == ["first upload", "initial commit"]
    changed = hub.git(repo, "diff-tree", "--no-commit-id", "--name-only", "-r", f"{oid}^", oid).split()
    assert sorted(changed) == ["README.md", "hello.txt", "model.safetensors"]
    assert out["files"] == [".gitattributes", "README.md", "hello.txt", "model.safetensors"]

    # regular file stored as a blob, safetensors as a real git-lfs pointer + object in the store
    assert hub.git(repo, "cat-file", "-p", f"{oid}:hello.txt") == "hello v1"
    digest = sha256_of(folder / "model.safetensors")
    size = os.path.getsize(folder / "model.safetensors")
    pointer = hub.git(repo, "cat-file", "-p", f"{oid}:model.safetensors")
    assert pointer == f"version https://git-lfs.github.com/spec/v1\noid sha256:{digest}\nsize {size}"
    assert out["tree"]["model.safetensors"]["lfs"] == digest
    assert out["tree"]["model.safetensors"]["size"] == size
    assert out["tree"]["hello.txt"]["lfs"] is None
    assert out["tree"]["hello.txt"]["blob"] == hub.git(repo, "rev-parse", f"{oid}:hello.txt")
    assert sha256_of(lfs_store_path(hub, repo, digest)) == digest


def test_revisions_snapshot_ranges_and_offline(hub, tmp_path):
    """Downloads by sha and branch, snapshot_download by sha, HTTP ranges, then the same from the cache offline."""
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    for d, seed, text in ((v1, 1, "version one\n"), (v2, 2, "version two\n")):
        d.mkdir()
        (d / "hello.txt").write_text(text)
        write_safetensors(d / "model.safetensors", seed=seed)
    (v2 / "extra.json").write_text('{"added": true}\n')
    repo = "tester/history"
    hf_home = tmp_path / "hf-home"

    out = run_client(
        hub.url,
        hf_home,
        """
        repo = ARGS["repo"]
        api.create_repo(repo)
        sha1 = api.upload_folder(repo_id=repo, folder_path=ARGS["v1"], commit_message="v1").oid
        sha2 = api.upload_folder(repo_id=repo, folder_path=ARGS["v2"], commit_message="v2").oid
        out.update(sha1=sha1, sha2=sha2)
        out["hello_sha1"] = read_text(hf_hub_download(repo, "hello.txt", revision=sha1))
        out["hello_main"] = read_text(hf_hub_download(repo, "hello.txt", revision="main"))
        out["weights_sha1"] = sha256_file(hf_hub_download(repo, "model.safetensors", revision=sha1))
        out["weights_main"] = sha256_file(hf_hub_download(repo, "model.safetensors"))
        snap = snapshot_download(repo, revision=sha1)
        out["snap_dir"] = os.path.basename(snap)
        out["snap_files"] = sorted(os.listdir(snap))
        out["snap_hello"] = read_text(os.path.join(snap, "hello.txt"))
        out["snap_weights"] = sha256_file(os.path.join(snap, "model.safetensors"))
        out["files_sha1"] = sorted(api.list_repo_files(repo, revision=sha1))
        out["files_main"] = sorted(api.list_repo_files(repo))

        # ranged reads through HfFileSystem (HTTP Range on the resolve endpoint)
        from huggingface_hub import HfFileSystem
        fs = HfFileSystem()
        with fs.open(f"{repo}/model.safetensors", "rb", revision=sha1, block_size=4096) as f:
            f.seek(10000)
            out["range_bytes"] = f.read(3000).hex()
        out["fs_size"] = fs.info(f"{repo}/model.safetensors", revision=sha1)["size"]
        """,
        args={"repo": repo, "v1": str(v1), "v2": str(v2)},
    )
    sha1, sha2 = out["sha1"], out["sha2"]
    assert SHA1.match(sha1) and SHA1.match(sha2) and sha1 != sha2
    assert hub.git(repo, "rev-parse", "main") == sha2
    assert hub.git(repo, "rev-parse", "main^") == sha1
    assert out["hello_sha1"] == "version one\n"
    assert out["hello_main"] == "version two\n"
    assert out["weights_sha1"] == sha256_of(v1 / "model.safetensors")
    assert out["weights_main"] == sha256_of(v2 / "model.safetensors")
    assert out["snap_dir"] == sha1
    assert out["snap_files"] == [".gitattributes", "hello.txt", "model.safetensors"]
    assert out["snap_hello"] == "version one\n"
    assert out["snap_weights"] == sha256_of(v1 / "model.safetensors")
    assert out["files_sha1"] == [".gitattributes", "hello.txt", "model.safetensors"]
    assert out["files_main"] == [".gitattributes", "extra.json", "hello.txt", "model.safetensors"]
    local = (v1 / "model.safetensors").read_bytes()
    assert out["fs_size"] == len(local)
    assert bytes.fromhex(out["range_bytes"]) == local[10000:13000]
    ranged = [r for r in hub.requests if r["method"] == "GET" and r["range"] and "/resolve/" in r["path"]]
    assert ranged and all(r["status"] == 206 for r in ranged)

    # offline: same HF_HOME, HF_HUB_OFFLINE=1 -> served from the cache, no request reaches the server
    before = len(hub.requests)
    out = run_client(
        hub.url,
        hf_home,
        """
        repo, sha1 = ARGS["repo"], ARGS["sha1"]
        out["hello"] = read_text(hf_hub_download(repo, "hello.txt", revision=sha1))
        out["weights"] = sha256_file(hf_hub_download(repo, "model.safetensors", revision=sha1))
        out["snap"] = os.path.basename(snapshot_download(repo, revision=sha1))
        """,
        args={"repo": repo, "sha1": sha1},
        HF_HUB_OFFLINE="1",
    )
    assert out["hello"] == "version one\n"
    assert out["weights"] == sha256_of(v1 / "model.safetensors")
    assert out["snap"] == sha1
    assert len(hub.requests) == before


def test_pull_request_branch_and_tag(hub, tmp_path):
    """create_pr leaves main alone; branches and tags (annotated or not); parent_commit is compare-and-swap."""
    repo = "tester/prs"
    out = run_client(
        hub.url,
        tmp_path / "hf-home",
        """
        from huggingface_hub import CommitOperationAdd
        repo = ARGS["repo"]
        api.create_repo(repo)
        initial = api.model_info(repo).sha
        base = api.upload_file(path_or_fileobj=b"main v1", path_in_repo="a.txt", repo_id=repo).oid
        pr = api.upload_file(path_or_fileobj=b"proposed", path_in_repo="a.txt", repo_id=repo,
                             create_pr=True, commit_message="Propose a change")
        out.update(initial=initial, base=base, pr_oid=pr.oid, pr_url=pr.pr_url, pr_revision=pr.pr_revision,
                   pr_num=pr.pr_num)
        out["main_after_pr"] = api.model_info(repo).sha
        out["pr_content"] = read_text(hf_hub_download(repo, "a.txt", revision=pr.pr_revision))
        out["pr_info_sha"] = api.model_info(repo, revision=pr.pr_revision).sha
        out["main_content"] = read_text(hf_hub_download(repo, "a.txt"))
        # a second commit pushed onto the PR ref itself
        out["pr_update"] = api.upload_file(path_or_fileobj=b"more", path_in_repo="b.txt", repo_id=repo,
                                           revision=pr.pr_revision, commit_message="Update PR").oid

        api.create_branch(repo, branch="dev", revision=base)
        api.create_branch(repo, branch="dev", exist_ok=True)
        out["branch_dup"] = expect_error(lambda: api.create_branch(repo, branch="dev"))
        dev = api.upload_file(path_or_fileobj=b"dev only", path_in_repo="dev.txt", repo_id=repo, revision="dev")
        out["dev_oid"] = dev.oid
        out["dev_content"] = read_text(hf_hub_download(repo, "dev.txt", revision="dev"))
        out["dev_on_main"] = expect_error(lambda: hf_hub_download(repo, "dev.txt", revision="main"))

        api.create_tag(repo, tag="v1.0", revision=base, tag_message="first release")
        api.create_tag(repo, tag="light", revision=base)
        out["tag_dup"] = expect_error(lambda: api.create_tag(repo, tag="light"))
        out["tag_content"] = read_text(hf_hub_download(repo, "a.txt", revision="v1.0"))
        out["short_sha_content"] = read_text(hf_hub_download(repo, "a.txt", revision=base[:7]))

        out["no_branch"] = expect_error(lambda: api.upload_file(
            path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo, revision="does-not-exist"))
        out["stale_parent"] = expect_error(lambda: api.create_commit(
            repo, operations=[CommitOperationAdd("c.txt", b"c")], commit_message="stale", parent_commit=initial))
        out["fresh_parent"] = api.create_commit(repo, operations=[CommitOperationAdd("c.txt", b"c")],
                                                commit_message="fresh", parent_commit=base).oid
        """,
        args={"repo": repo},
    )
    base, pr_oid = out["base"], out["pr_oid"]
    assert out["pr_num"] == 1 and out["pr_revision"] == "refs/pr/1"
    assert out["pr_url"] == f"{hub.url}/{repo}/discussions/1"
    assert out["main_after_pr"] == base  # main did not move
    assert out["pr_content"] == "proposed" and out["main_content"] == "main v1"
    assert out["pr_info_sha"] == pr_oid
    assert hub.git(repo, "rev-parse", f"{pr_oid}^") == base
    assert hub.git(repo, "rev-parse", "refs/pr/1") == out["pr_update"]
    assert hub.git(repo, "rev-parse", f"{out['pr_update']}^") == pr_oid

    assert_error(out["branch_dup"], "HfHubHTTPError", 409)
    assert hub.git(repo, "rev-parse", f"{out['dev_oid']}^") == base
    assert out["dev_content"] == "dev only"
    assert_error(out["dev_on_main"], "EntryNotFoundError", 404)
    assert hub.git(repo, "rev-parse", "refs/heads/dev") == out["dev_oid"]
    assert hub.git(repo, "rev-parse", "v1.0^{commit}") == hub.git(repo, "rev-parse", "light") == base
    assert hub.git(repo, "cat-file", "-t", "refs/tags/v1.0") == "tag"  # annotated
    assert hub.git(repo, "cat-file", "-t", "refs/tags/light") == "commit"
    assert_error(out["tag_dup"], "HfHubHTTPError", 409)
    assert out["tag_content"] == out["short_sha_content"] == "main v1"

    assert_error(out["no_branch"], "RevisionNotFoundError", 404)
    assert_error(out["stale_parent"], "HfHubHTTPError", 412)
    assert hub.git(repo, "rev-parse", "main") == out["fresh_parent"]
    assert hub.git(repo, "rev-parse", "main^") == base


def test_duplicate_repo(hub, tmp_path):
    """Server-side duplicate (HfApi.duplicate_repo on huggingface_hub >= 1, the REST call on 0.x) keeps the history
    and the LFS objects; the copy then lives its own life."""
    folder = tmp_path / "dup"
    folder.mkdir()
    (folder / "notes.txt").write_text("source\n")
    write_safetensors(folder / "model.safetensors", seed=5)
    src, dst = "tester/dup-source", "forker/dup-copy"

    out = run_client(
        hub.url,
        tmp_path / "hf-home",
        """
        src, dst = ARGS["src"], ARGS["dst"]
        api.create_repo(src)
        out["src_sha"] = api.upload_folder(repo_id=src, folder_path=ARGS["folder"], commit_message="content").oid
        if hasattr(api, "duplicate_repo"):
            out["method"] = "HfApi.duplicate_repo"
            out["url"] = str(api.duplicate_repo(src, to_id=dst))
            out["again"] = expect_error(lambda: api.duplicate_repo(src, to_id=dst))
        else:
            from huggingface_hub.utils import get_session, hf_raise_for_status
            out["method"] = "REST"
            def duplicate():
                r = get_session().post(f"{api.endpoint}/api/models/{src}/duplicate",
                                       headers=api._build_hf_headers(), json={"repository": dst})
                hf_raise_for_status(r)
                return r.json()["url"]
            out["url"] = duplicate()
            out["again"] = expect_error(duplicate)
        out["dst_weights"] = sha256_file(hf_hub_download(dst, "model.safetensors"))
        out["dst_weights_by_sha"] = sha256_file(hf_hub_download(dst, "model.safetensors", revision=out["src_sha"]))
        out["dst_new"] = api.upload_file(path_or_fileobj=b"copy only", path_in_repo="notes.txt", repo_id=dst).oid
        out["dst_notes"] = read_text(hf_hub_download(dst, "notes.txt"))
        out["src_notes"] = read_text(hf_hub_download(src, "notes.txt"))
        """,
        args={"src": src, "dst": dst, "folder": str(folder)},
    )
    if int(out["hub_version"].split(".")[0]) >= 1:
        assert out["method"] == "HfApi.duplicate_repo"
    assert out["url"] == f"{hub.url}/{dst}"
    assert_error(out["again"], "HfHubHTTPError", 409)
    digest = sha256_of(folder / "model.safetensors")
    assert out["dst_weights"] == digest and out["dst_weights_by_sha"] == digest
    assert sha256_of(lfs_store_path(hub, dst, digest)) == digest
    assert out["dst_notes"] == "copy only" and out["src_notes"] == "source\n"
    assert hub.git(src, "rev-parse", "main") == out["src_sha"]
    assert hub.git(dst, "rev-parse", "main^") == out["src_sha"]
    assert hub.git(dst, "rev-list", "main^") == hub.git(src, "rev-list", "main")  # the whole history


def test_upload_and_download_with_xet_enabled(hub, tmp_path):
    """Without HF_HUB_DISABLE_XET (hf_xet installed or not) the clients still upload and download: the server has no
    Xet, so it asks for every file inline ("regular") and keeps LFS-routed files in its LFS store itself."""
    folder = tmp_path / "upload"
    folder.mkdir()
    (folder / "config.json").write_text('{"a": 1}\n')
    write_safetensors(folder / "model.safetensors", seed=7)
    repo = "tester/xet-not-disabled"
    out = run_client(
        hub.url,
        tmp_path / "hf-home",
        """
        from huggingface_hub.utils._runtime import is_xet_available
        out["xet"] = is_xet_available()
        repo = ARGS["repo"]
        api.create_repo(repo)
        out["sha"] = api.upload_folder(repo_id=repo, folder_path=ARGS["folder"]).oid
        out["weights"] = sha256_file(hf_hub_download(repo, "model.safetensors", revision=out["sha"]))
        out["snapshot"] = sorted(os.listdir(snapshot_download(repo, revision=out["sha"])))
        with open(os.path.join(ARGS["folder"], "config.json"), "w") as f:
            f.write('{"a": 2}')
        pr = api.upload_folder(repo_id=repo, folder_path=ARGS["folder"], create_pr=True, commit_message="proposal")
        out.update(pr_sha=pr.oid, pr_url=pr.pr_url)
        out["pr_config"] = read_text(hf_hub_download(repo, "config.json", revision="refs/pr/1"))
        """,
        args={"repo": repo, "folder": str(folder)},
        xet=True,
    )
    import importlib.util

    assert out["xet"] == (importlib.util.find_spec("hf_xet") is not None)  # the client did not opt out of Xet
    digest = sha256_of(folder / "model.safetensors")
    assert out["weights"] == digest and sha256_of(lfs_store_path(hub, repo, digest)) == digest
    assert hub.git(repo, "cat-file", "-p", f"{out['sha']}:model.safetensors").startswith(LFS_POINTER + digest)
    assert out["snapshot"] == [".gitattributes", "config.json", "model.safetensors"]
    # a pull request too (huggingface_hub >= 1 with hf_xet opens it with the discussions endpoint first)
    assert out["pr_url"] == f"{hub.url}/{repo}/discussions/1" and out["pr_config"] == '{"a": 2}'
    assert hub.git(repo, "rev-parse", "refs/pr/1") == out["pr_sha"] and hub.git(repo, "rev-parse", "main") == out["sha"]
    assert hub.git(repo, "log", "-1", "--format=%s", out["pr_sha"]) == "proposal"
    assert not [r for r in hub.requests if "-token" in r["path"]]  # no Xet token was asked for


@pytest.mark.slow
def test_push_py_with_xet_enabled(hub, tmp_path):
    """push.py, this project's own client, with Xet left on: a push, then a pull request, no traceback."""
    from sam_testing import random_stock_sam

    random_stock_sam().save_pretrained(tmp_path / "sam")
    env = hub_env(hub.url, tmp_path / "home", token=TOKEN)
    del env["HF_HUB_DISABLE_XET"]
    repo, shas = "tester/pushed-with-xet", []
    for extra in ([], ["--create-pr"]):
        result = subprocess.run([sys.executable, PUSH_SCRIPT, "--source", str(tmp_path / "sam"), "--repo-id", repo,
                                 *extra], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        shas.append(re.search(r"Committed ([0-9a-f]{40})", result.stdout).group(1))
    assert hub.git(repo, "rev-parse", "main") == shas[0] and hub.git(repo, "rev-parse", "refs/pr/1") == shas[1]
    assert hub.git(repo, "cat-file", "-p", f"{shas[0]}:model.safetensors").startswith(LFS_POINTER)


def test_datasets_load_dataset_pinned_to_a_sha(hub, tmp_path):
    """A dataset repo: datasets.load_dataset(repo, revision=sha) reads the files of that commit."""
    out = run_client(
        hub.url,
        tmp_path / "hf-home",
        """
        import datasets
        repo = ARGS["repo"]
        api.create_repo(repo, repo_type="dataset")
        shas = [api.upload_file(path_or_fileobj=text.encode(), path_in_repo="data/train.csv", repo_id=repo,
                                repo_type="dataset").oid for text in ("x,y\\n1,2\\n3,4\\n", "x,y\\n5,6\\n")]
        out["files"] = sorted(api.list_repo_files(repo, repo_type="dataset", revision=shas[0]))
        out["rows"] = [datasets.load_dataset(repo, revision=sha, split="train").to_list() for sha in shas]
        """,
        args={"repo": "tester/tiny-ds"},
    )
    assert out["files"] == [".gitattributes", "data/train.csv"]
    assert out["rows"] == [[{"x": 1, "y": 2}, {"x": 3, "y": 4}], [{"x": 5, "y": 6}]]


def test_auth_and_error_mapping(hub, tmp_path):
    """A wrong token writes nothing; errors map to the clients' exception types; private repos hide from anonymous."""
    repo, private = "tester/guarded", "tester/private-repo"
    setup = run_client(
        hub.url,
        tmp_path / "hf-home",
        """
        api.create_repo(ARGS["repo"])
        out["sha"] = api.upload_file(path_or_fileobj=b"safe", path_in_repo="a.txt", repo_id=ARGS["repo"]).oid
        api.create_repo(ARGS["private"], private=True)
        api.upload_file(path_or_fileobj=b"secret", path_in_repo="a.txt", repo_id=ARGS["private"])
        """,
        args={"repo": repo, "private": private},
    )
    lfs_before = sorted(os.listdir(os.path.join(hub.root, "lfs", "models", "tester")))

    out = run_client(
        hub.url,
        tmp_path / "hf-home-2",
        """
        repo, private = ARGS["repo"], ARGS["private"]
        bad = HfApi(token="hf_wrong_token")
        out["whoami_bad"] = expect_error(lambda: bad.whoami())
        out["upload_bad"] = expect_error(lambda: bad.upload_file(
            path_or_fileobj=b"evil", path_in_repo="a.txt", repo_id=repo))
        out["lfs_bad"] = expect_error(lambda: bad.upload_file(
            path_or_fileobj=os.urandom(4096), path_in_repo="w.safetensors", repo_id=repo))
        out["create_bad"] = expect_error(lambda: bad.create_repo("tester/never-created"))
        out["branch_bad"] = expect_error(lambda: bad.create_branch(repo, branch="evil"))
        out["read_bad_token_public"] = read_text(hf_hub_download(repo, "a.txt", token="hf_wrong_token"))

        out["missing_repo"] = expect_error(lambda: hf_hub_download("tester/does-not-exist", "a.txt"))
        out["missing_repo_info"] = expect_error(lambda: api.model_info("tester/does-not-exist"))
        out["missing_file"] = expect_error(lambda: hf_hub_download(repo, "nope.txt"))
        out["missing_revision"] = expect_error(lambda: hf_hub_download(repo, "a.txt", revision="no-such-branch"))
        out["missing_revision_api"] = expect_error(lambda: api.model_info(repo, revision="no-such-branch"))
        out["missing_sha"] = expect_error(lambda: hf_hub_download(repo, "a.txt", revision="0" * 40))
        out["file_exists"] = [api.file_exists(repo, "a.txt"), api.file_exists(repo, "nope.txt")]
        out["private_anon"] = expect_error(lambda: hf_hub_download(private, "a.txt", token=False))
        out["private_info_anon"] = expect_error(lambda: api.model_info(private, token=False))
        out["private_ok"] = read_text(hf_hub_download(private, "a.txt"))
        out["private_flag"] = api.model_info(private).private
        """,
        args={"repo": repo, "private": private},
    )
    # huggingface_hub 0.x re-raises a wrong-token whoami as a plain requests.HTTPError
    assert_error(out["whoami_bad"], "HTTPError", 401)
    for key in ("upload_bad", "lfs_bad", "create_bad", "branch_bad"):
        assert_error(out[key], "HfHubHTTPError", 401)
    # nothing was written by the refused requests
    assert hub.git(repo, "rev-parse", "main") == setup["sha"]
    assert hub.git(repo, "for-each-ref", "--format=%(refname)").split() == ["refs/heads/main"]
    assert not os.path.exists(hub.git_dir("tester/never-created"))
    assert sorted(os.listdir(os.path.join(hub.root, "lfs", "models", "tester"))) == lfs_before
    assert out["read_bad_token_public"] == "safe"

    assert_error(out["missing_repo"], "RepositoryNotFoundError", 404)
    assert_error(out["missing_repo_info"], "RepositoryNotFoundError", 404)
    assert_error(out["missing_file"], "EntryNotFoundError", 404)
    assert_error(out["missing_revision"], "RevisionNotFoundError", 404)
    assert_error(out["missing_revision_api"], "RevisionNotFoundError", 404)
    assert_error(out["missing_sha"], "RevisionNotFoundError", 404)
    assert out["file_exists"] == [True, False]
    assert_error(out["private_anon"], "RepositoryNotFoundError", 404)
    assert_error(out["private_info_anon"], "RepositoryNotFoundError", 404)
    assert out["private_ok"] == "secret" and out["private_flag"] is True


def test_cli_serves_until_sigterm(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, SERVER_SCRIPT, "--root", str(tmp_path / "root"), "--port", "0", "--token", TOKEN,
         "--user", "alice", "--org", "team"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        first = {}
        reader = threading.Thread(target=lambda: first.setdefault("line", proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(30)
        url = first.get("line", "").strip()
        assert re.match(r"^http://127\.0\.0\.1:\d+$", url), (url, proc.poll())
        out = run_client(
            url,
            tmp_path / "hf-home",
            """
            me = api.whoami()
            out["user"], out["orgs"] = me["name"], [org["name"] for org in me["orgs"]]
            api.create_repo("team/cli-repo")
            sha = api.upload_file(path_or_fileobj=b"from cli", path_in_repo="f.txt", repo_id="team/cli-repo").oid
            out["content"] = read_text(hf_hub_download("team/cli-repo", "f.txt", revision=sha))
            out["other"] = expect_error(lambda: api.create_repo("tester/not-mine"))
            """,
        )
        assert (out["user"], out["orgs"], out["content"]) == ("alice", ["team"], "from cli")
        assert_error(out["other"], "HfHubHTTPError", 403)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert proc.stdout.read() == "" and proc.stderr.read() == ""  # quiet without --verbose
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------------------------------------
# What the server refuses
# --------------------------------------------------------------------------------------------------------------------


def test_a_full_sha_always_resolves_to_that_commit(hub):
    """A branch or tag named like a commit sha would take that sha over: such names are refused, and a 40-hex
    revision only ever means the commit."""
    repo = "tester/pinned"
    assert request(hub, "POST", "/api/repos/create", {"name": repo})[0] == 200
    old, new = (raw_commit(hub, repo, {"f.txt": content})[1]["commitOid"] for content in (b"old\n", b"new\n"))
    for kind, payload in (("branch", {"startingPoint": new}), ("tag", {"tag": old})):
        target = old if kind == "branch" else new
        status, reply, _ = request(hub, "POST", f"/api/models/{repo}/{kind}/{target}", payload)
        assert status == 400 and "commit sha" in reply["error"], (kind, reply)
    assert hub.git(repo, "for-each-ref", "--format=%(refname)").split() == ["refs/heads/main"]
    status, content, response = request(hub, "GET", f"/{repo}/resolve/{old}/f.txt")
    assert (status, content, response.getheader("X-Repo-Commit")) == (200, b"old\n", old)
    status, reply, _ = request(hub, "GET", f"/api/models/{repo}/revision/{old.upper()}")
    assert status == 200 and reply["sha"] == old


@pytest.mark.parametrize("name", ["--file=/etc/hostname", "-dev", "a..b", "a b", "x.lock", "a~1", "a:b", ".hidden",
                                  "a//b", "trailing/", "@", "x@{1}", "back\\slash", "ctrl\x01"])
def test_invalid_ref_names_are_refused(hub, name):
    """Branch and tag names follow git's rules and may not start with '-' (git would read an option)."""
    repo = "tester/ref-names"
    request(hub, "POST", "/api/repos/create", {"name": repo})
    refs_before = hub.git(repo, "for-each-ref", "--format=%(refname)")
    status, reply, _ = request(hub, "POST", f"/api/models/{repo}/tag/main", {"tag": name, "message": "m"})
    assert status == 400 and "Invalid reference name" in reply["error"], reply
    quoted = "".join(c if c.isalnum() or c in "-._~" else f"%{ord(c):02X}" for c in name)
    status, reply, _ = request(hub, "POST", f"/api/models/{repo}/branch/{quoted}", {})
    assert status == 400 and "Invalid reference name" in reply["error"], reply
    assert hub.git(repo, "for-each-ref", "--format=%(refname)") == refs_before


@pytest.mark.parametrize("path", ["/api/repos/create", "/api/models/tester/any/commit/main"])
@pytest.mark.parametrize("token", [None, "hf_wrong_token"])
def test_unauthenticated_write_is_refused_before_its_body(hub, path, token):
    """A 1 GiB body announced without the token gets its 401 at once: the server does not wait for (or read) it."""
    authorization = f"Authorization: Bearer {token}\r\n" if token else ""
    with socket.create_connection(("127.0.0.1", int(hub.url.rsplit(":", 1)[1])), timeout=10) as connection:
        connection.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           f"{authorization}Content-Length: {1 << 30}\r\n\r\n".encode())
        status_line = connection.makefile("rb").readline()
    assert status_line.startswith(b"HTTP/1.1 401 "), status_line


def test_writes_are_limited_to_the_users_namespaces(hub):
    """The token acts as 'tester', a member of the orgs 'forker' and 'upstream': other namespaces get 403."""
    status, me, _ = request(hub, "GET", "/api/whoami-v2")
    assert status == 200 and (me["name"], [org["name"] for org in me["orgs"]]) == ("tester", ["forker", "upstream"])
    for payload in ({"name": "upstream/allowed"}, {"name": "allowed", "organization": "forker"}):
        assert request(hub, "POST", "/api/repos/create", payload)[0] == 200
    for payload in ({"name": "stranger/refused"}, {"name": "refused", "organization": "stranger"}):
        status, reply, _ = request(hub, "POST", "/api/repos/create", payload)
        assert status == 403 and "stranger/refused" in reply["error"], reply
    assert not os.path.exists(hub.git_dir("stranger/refused"))

    hub.store.create_repo("model", "stranger/theirs", private=False)  # as if its owner had created it
    head = hub.git("stranger/theirs", "rev-parse", "main")
    for path, payload in (("commit/main", None), ("preupload/main", {"files": []}), ("branch/mine", {}),
                          ("tag/main", {"tag": "mine"})):
        status, reply, _ = request(hub, "POST", f"/api/models/stranger/theirs/{path}", payload, body=b"")
        assert status == 403, (path, reply)
    request(hub, "POST", "/api/repos/create", {"name": "tester/mine"})
    status, reply, _ = request(hub, "POST", "/api/models/tester/mine/duplicate", {"repository": "stranger/copy"})
    assert status == 403 and not os.path.exists(hub.git_dir("stranger/copy"))
    assert hub.git("stranger/theirs", "for-each-ref", "--format=%(refname) %(objectname)") == f"refs/heads/main {head}"
    # reading is open
    assert request(hub, "GET", "/api/models/stranger/theirs")[1]["sha"] == head


@pytest.mark.parametrize("path", ["../escape.txt", "a/../../b", "/abs.txt", ".git/config", "a//b", "ok\nno"])
def test_paths_outside_the_repository_are_refused(hub, path):
    """File paths stay inside the repository: no '..', no absolute path, no .git, no empty parts or control
    characters."""
    repo = "tester/paths"
    request(hub, "POST", "/api/repos/create", {"name": repo})
    head = hub.git(repo, "rev-parse", "main")
    status, reply = raw_commit(hub, repo, {path: b"x"})
    assert status == 400 and "Invalid path" in reply["error"], reply
    assert hub.git(repo, "rev-parse", "main") == head


# --------------------------------------------------------------------------------------------------------------------
# Bounds, malformed requests, deletions, history and lost answers
# --------------------------------------------------------------------------------------------------------------------


def test_commit_bounds_answer_413_and_change_nothing(hub):
    """Too many files in one commit, or too large a body, is a 413 (settable bounds, small here), the branch as it
    was: a huge commit cannot hold the store lock or fill the memory."""
    repo = "tester/bounds"
    request(hub, "POST", "/api/repos/create", {"name": repo})
    head = hub.git(repo, "rev-parse", "main")
    hub.set_limits(max_commit_files=3, max_commit_bytes=4096)
    try:
        status, reply = raw_commit(hub, repo, {f"f{i}.txt": b"x" for i in range(4)})
        assert status == 413 and "at most 3 operations" in reply["error"], reply
        status, _ = raw_commit(hub, repo, {"big.txt": b"x" * 5000})
        assert status == 413
        assert raw_commit(hub, repo, {f"f{i}.txt": b"x" for i in range(3)})[0] == 200
    finally:
        hub.set_limits(max_commit_files=5000, max_commit_bytes=1024**3)
    assert len(hub.git(repo, "log", "--format=%H", "main").split()) == 2 and head in hub.git(repo, "log", "main")


@pytest.mark.parametrize("line", [b'{"key": "file", "value": ' + b"[" * 100000 + b"]" * 100000 + b"}",
                                  b"[" * 100000 + b"]" * 100000])
def test_a_deeply_nested_ndjson_line_is_a_400(hub, line):
    repo = "tester/nested"
    request(hub, "POST", "/api/repos/create", {"name": repo})
    body = json.dumps({"key": "header", "value": {"summary": "nested"}}).encode() + b"\n" + line
    status, reply, _ = request(hub, "POST", f"/api/models/{repo}/commit/main", body=body,
                               content_type="application/x-ndjson")
    assert status == 400 and "Malformed NDJSON line 2" in reply["error"], reply


def test_a_dangling_lfs_pointer_does_not_show_the_storage_path(hub):
    """A file committed as an LFS pointer to an object the server never had: an error, without the server's path."""
    repo = "tester/dangling"
    request(hub, "POST", "/api/repos/create", {"name": repo})
    pointer = f"{LFS_POINTER}{'ab' * 32}\nsize 123\n".encode()
    assert raw_commit(hub, repo, {"weights.txt": pointer})[0] == 200
    status, reply, response = request(hub, "GET", f"/{repo}/resolve/main/weights.txt")
    assert 400 <= status < 600 and "LFS object missing" in reply["error"], reply
    assert hub.root not in json.dumps(reply) and hub.root not in str(response.getheaders())


def test_deletions_history_and_refs(hub, tmp_path):
    """create_commit with CommitOperationDelete (a file and a folder) removes them in the same commit; the history
    and the refs read as the clients read them (list_repo_commits, list_repo_refs)."""
    out = run_client(hub.url, tmp_path / "home", """
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete
        repo = "tester/deletions"
        api.create_repo(repo)
        first = api.create_commit(repo, [CommitOperationAdd(path_in_repo=p, path_or_fileobj=p.encode())
                                         for p in ["a.txt", "b.txt", "sub/c.txt", "sub/d.txt"]],
                                  commit_message="four files").oid
        second = api.create_commit(repo, [CommitOperationDelete(path_in_repo="a.txt"),
                                          CommitOperationDelete(path_in_repo="sub/"),
                                          CommitOperationAdd(path_in_repo="e.txt", path_or_fileobj=b"e")],
                                   commit_message="swap", commit_description="the marker", parent_commit=first).oid
        out["files"] = sorted(api.list_repo_files(repo, revision=second))
        out["missing"] = expect_error(lambda: api.create_commit(
            repo, [CommitOperationDelete(path_in_repo="nothing.txt")], commit_message="x"))
        out["commits"] = [(c.commit_id, c.title, c.message) for c in api.list_repo_commits(repo)]
        out["shas"] = [first, second]
        out["branches"] = [(b.name, b.target_commit) for b in api.list_repo_refs(repo).branches]
    """)
    first, second = out["shas"]
    assert out["files"] == [".gitattributes", "b.txt", "e.txt"]
    assert_error(out["missing"], "EntryNotFoundError" if out["missing"] and "EntryNotFoundError" in out["missing"][
        "mro"] else "HfHubHTTPError", 404)
    assert [commit[:2] for commit in out["commits"]][:2] == [[second, "swap"], [first, "four files"]]
    assert out["commits"][0][2] == "the marker" and out["commits"][-1][1] == "initial commit"
    assert out["branches"] == [["main", second]]


@pytest.mark.parametrize("fault", ["500", "drop"])
def test_injected_faults_apply_the_commit_and_lose_the_answer(hub, fault):
    repo = f"tester/fault-{fault}"
    request(hub, "POST", "/api/repos/create", {"name": repo})
    head = hub.git(repo, "rev-parse", "main")
    hub.fail_next_commit(fault)
    if fault == "500":
        status, reply = raw_commit(hub, repo, {"a.txt": b"a"})
        assert status == 500 and "injected" in reply["error"]
    else:
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            raw_commit(hub, repo, {"a.txt": b"a"})
    assert hub.git(repo, "rev-parse", "main") != head  # applied all the same
    assert raw_commit(hub, repo, {"b.txt": b"b"})[0] == 200  # only the next commit loses its answer


def test_space_repos_need_an_sdk_and_serve_their_files(hub):
    """A Space is created with an sdk (else 400, as on the Hub), committed to and read like a model repository, at
    /api/spaces/... and /spaces/.../resolve/...; it is not a model of the same name."""
    status, reply, _ = request(hub, "POST", "/api/repos/create", {"name": "tester/demo", "type": "space"})
    assert status == 400 and "sdk" in reply["error"], reply
    payload = {"name": "tester/demo", "type": "space", "sdk": "static"}
    status, reply, _ = request(hub, "POST", "/api/repos/create", payload)
    assert status == 200 and reply["url"].endswith("/spaces/tester/demo"), reply
    lines = [{"key": "header", "value": {"summary": "page"}},
             {"key": "file", "value": {"path": "index.html", "content": base64.b64encode(b"<p>hi</p>").decode(),
                                       "encoding": "base64"}}]
    status, reply, _ = request(hub, "POST", "/api/spaces/tester/demo/commit/main",
                               body=b"\n".join(json.dumps(line).encode() for line in lines),
                               content_type="application/x-ndjson")
    assert status == 200, reply
    assert request(hub, "GET", "/api/spaces/tester/demo")[1]["sha"] == reply["commitOid"]
    assert request(hub, "GET", "/api/models/tester/demo")[0] == 404
    status, body, response = request(hub, "GET", "/spaces/tester/demo/resolve/main/index.html")
    assert (status, body, response.getheader("Content-Type")) == (200, b"<p>hi</p>", "text/html")

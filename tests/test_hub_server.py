"""Tests for tests/hub_server.py, driven only through the real huggingface_hub / transformers clients.

Every client action runs in a fresh subprocess (huggingface_hub reads HF_ENDPOINT, HF_HOME,
HF_HUB_OFFLINE... at import time) with a clean environment pointing at the local server.
The module runs unchanged with huggingface_hub 0.x (requests) and 1.x/2.x (httpx), and with
transformers 4.x and 5.x.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hub_server import HubServer  # noqa: E402

TOKEN = "hf_local_test_token_0123456789"
SERVER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hub_server.py")
SHA1 = re.compile(r"^[0-9a-f]{40}$")

PRELUDE = textwrap.dedent(
    """
    import hashlib, io, json, os, sys, traceback
    import huggingface_hub
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    HUB_MAJOR = int(huggingface_hub.__version__.split(".")[0])
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
            return {
                "type": type(e).__name__,
                "mro": [c.__name__ for c in type(e).__mro__],
                "status": getattr(resp, "status_code", None),
                "message": str(e)[:500],
            }
        return None

    ARGS = json.loads(os.environ["TEST_ARGS"])
    """
)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def client_env(url, hf_home, token=TOKEN, **extra):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy")
        and not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))
        and k not in ("PYTEST_CURRENT_TEST", "PYTHONPATH")
    }
    env.update(
        HF_ENDPOINT=url,
        HF_HOME=str(hf_home),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_ETAG_TIMEOUT="30",
        HF_HUB_DOWNLOAD_TIMEOUT="60",
        TRANSFORMERS_VERBOSITY="error",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        NO_PROXY="127.0.0.1,localhost",
    )
    if token is not None:
        env["HF_TOKEN"] = token
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_client(url, hf_home, script, args=None, token=TOKEN, timeout=240, **extra_env):
    """Run PRELUDE + script in a fresh interpreter of this venv; return its ``out`` dict."""
    env = client_env(url, hf_home, token=token, TEST_ARGS=json.dumps(args or {}), **extra_env)
    code = PRELUDE + textwrap.dedent(script) + '\nprint("@@RESULT@@" + json.dumps(out))\n'
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        pytest.fail(f"client script failed (rc={proc.returncode}):\n{proc.stderr[-6000:]}\n{proc.stdout[-2000:]}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@"):])
    pytest.fail(f"no result from client script:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


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


# --------------------------------------------------------------------------------------------
# 1. create_repo + upload_folder in one commit (regular + LFS file), history and refs agree
# --------------------------------------------------------------------------------------------


def test_create_and_upload_folder_single_commit(hub, tmp_path):
    folder = tmp_path / "upload"
    folder.mkdir()
    (folder / "hello.txt").write_text("hello v1\n")
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
        out["oid"] = info.oid
        out["commit_url"] = info.commit_url
        out["pr_url"] = info.pr_url
        out["commits"] = [c.commit_id for c in api.list_repo_commits(repo)]
        out["titles"] = [c.title for c in api.list_repo_commits(repo)]
        refs = api.list_repo_refs(repo)
        out["branches"] = {b.name: b.target_commit for b in refs.branches}
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

    # the commit is a real git commit on main, with both files in ONE commit on top of "initial commit"
    assert hub.git(repo, "rev-parse", "refs/heads/main") == oid
    assert out["info_sha"] == oid
    assert out["branches"] == {"main": oid}
    assert out["commits"] == hub.git(repo, "rev-list", oid).split()
    assert out["commits"][0] == oid and len(out["commits"]) == 2
    assert out["titles"] == ["first upload", "initial commit"]
    changed = hub.git(repo, "diff-tree", "--no-commit-id", "--name-only", "-r", f"{oid}^", oid).split()
    assert sorted(changed) == ["hello.txt", "model.safetensors"]
    assert out["files"] == [".gitattributes", "hello.txt", "model.safetensors"]

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


# --------------------------------------------------------------------------------------------
# 2. revisions, snapshot_download by sha, range reads, offline re-download
# --------------------------------------------------------------------------------------------


def test_revisions_snapshot_ranges_and_offline(hub, tmp_path):
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


# --------------------------------------------------------------------------------------------
# 3. transformers: plain model and custom-code model (trust_remote_code) pinned to a sha
# --------------------------------------------------------------------------------------------

TINY_CONFIG_PY = '''
from transformers import PretrainedConfig


class TinyConfig(PretrainedConfig):
    model_type = "tiny_custom"

    def __init__(self, in_features=4, out_features=3, **kwargs):
        self.in_features = in_features
        self.out_features = out_features
        super().__init__(**kwargs)
'''

TINY_MODELING_PY = '''
import torch
from transformers import PreTrainedModel

from .configuration_tiny import TinyConfig


class TinyModel(PreTrainedModel):
    config_class = TinyConfig
    base_model_prefix = "tiny"

    def __init__(self, config):
        super().__init__(config)
        self.linear = torch.nn.Linear(config.in_features, config.out_features)
        self.post_init()

    def _init_weights(self, module):
        pass

    def forward(self, x):
        return self.linear(x)
'''


def test_transformers_from_pretrained_with_revision(hub, tmp_path):
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    bert_dir = tmp_path / "bert"
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    BertModel(config).save_pretrained(str(bert_dir), safe_serialization=True)
    assert (bert_dir / "model.safetensors").exists()

    tiny_dir = tmp_path / "tiny"
    tiny_dir.mkdir()
    (tiny_dir / "configuration_tiny.py").write_text(TINY_CONFIG_PY)
    (tiny_dir / "modeling_tiny.py").write_text(TINY_MODELING_PY)
    (tiny_dir / "config.json").write_text(json.dumps({
        "model_type": "tiny_custom",
        "architectures": ["TinyModel"],
        "in_features": 4,
        "out_features": 3,
        "auto_map": {"AutoConfig": "configuration_tiny.TinyConfig", "AutoModel": "modeling_tiny.TinyModel"},
    }))
    save_file({"linear.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 10,
               "linear.bias": torch.tensor([1.0, -1.0, 0.5])}, str(tiny_dir / "model.safetensors"))

    up = run_client(
        hub.url,
        tmp_path / "hf-home-upload",
        """
        shas = {}
        for repo, folder in ARGS["uploads"]:
            api.create_repo(repo, exist_ok=True)
            shas[repo] = api.upload_folder(repo_id=repo, folder_path=folder, commit_message="add model").oid
            # a later commit on main: loading by sha must still give the pinned files
            api.upload_file(path_or_fileobj=b"later\\n", path_in_repo="LATER.txt", repo_id=repo)
        out["shas"] = shas
        """,
        args={"uploads": [["tester/tiny-bert", str(bert_dir)], ["tester/tiny-custom", str(tiny_dir)]]},
    )
    bert_sha, tiny_sha = up["shas"]["tester/tiny-bert"], up["shas"]["tester/tiny-custom"]
    assert hub.git("tester/tiny-bert", "rev-parse", "main^") == bert_sha

    out = run_client(
        hub.url,
        tmp_path / "hf-home-load",  # fresh cache: everything, code included, comes from the server
        """
        import torch, transformers
        from safetensors.torch import load_file
        from transformers import AutoModel
        out["transformers"] = transformers.__version__

        def compare(model, path):
            saved = load_file(path)
            state = model.state_dict()
            missing = sorted(set(saved) - set(state))
            diff = sorted(k for k in saved if k in state and not torch.equal(saved[k], state[k]))
            return {"n": len(saved), "missing": missing, "diff": diff}

        bert = AutoModel.from_pretrained("tester/tiny-bert", revision=ARGS["bert_sha"])
        out["bert_class"] = type(bert).__name__
        out["bert_cmp"] = compare(bert, ARGS["bert_weights"])
        out["bert_commit"] = getattr(bert.config, "_commit_hash", None)

        tiny = AutoModel.from_pretrained("tester/tiny-custom", trust_remote_code=True, revision=ARGS["tiny_sha"])
        out["tiny_class"] = type(tiny).__name__
        out["tiny_module"] = type(tiny).__module__
        out["tiny_config_class"] = type(tiny.config).__name__
        out["tiny_cmp"] = compare(tiny, ARGS["tiny_weights"])
        out["tiny_forward"] = tiny(torch.ones(1, 4)).tolist()
        modules = os.path.join(os.environ["HF_HOME"], "modules")
        out["module_files"] = sorted(
            f for _, _, files in os.walk(modules) for f in files if f.endswith(".py") and "tiny" in f
        )
        """,
        args={
            "bert_sha": bert_sha,
            "tiny_sha": tiny_sha,
            "bert_weights": str(bert_dir / "model.safetensors"),
            "tiny_weights": str(tiny_dir / "model.safetensors"),
        },
        timeout=300,
    )
    assert out["bert_class"] == "BertModel"
    assert out["bert_cmp"]["n"] > 10 and out["bert_cmp"]["missing"] == [] and out["bert_cmp"]["diff"] == []
    assert out["bert_commit"] in (None, bert_sha)
    assert out["tiny_class"] == "TinyModel"
    assert out["tiny_config_class"] == "TinyConfig"
    assert "transformers_modules" in out["tiny_module"]
    assert out["tiny_cmp"] == {"n": 2, "missing": [], "diff": []}
    # x = ones(4): W @ x + b with W = arange(12).reshape(3, 4) / 10 and b = [1, -1, .5]
    assert out["tiny_forward"][0] == pytest.approx([0.6 + 1.0, 2.2 - 1.0, 3.8 + 0.5])
    assert "configuration_tiny.py" in out["module_files"] and "modeling_tiny.py" in out["module_files"]


# --------------------------------------------------------------------------------------------
# 4. pull requests, branches, tags, parent_commit, missing branch
# --------------------------------------------------------------------------------------------


def test_pull_request_branch_and_tag(hub, tmp_path):
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
        refs = api.list_repo_refs(repo, include_pull_requests=True)
        out["prs"] = {r.ref: r.target_commit for r in refs.pull_requests}

        # a second commit pushed onto the PR ref itself
        pr2 = api.upload_file(path_or_fileobj=b"more", path_in_repo="b.txt", repo_id=repo,
                              revision=pr.pr_revision, commit_message="Update PR")
        out["pr_update"] = pr2.oid

        api.create_branch(repo, branch="dev", revision=base)
        api.create_branch(repo, branch="dev", exist_ok=True)
        out["branch_dup"] = expect_error(lambda: api.create_branch(repo, branch="dev"))
        dev = api.upload_file(path_or_fileobj=b"dev only", path_in_repo="dev.txt", repo_id=repo, revision="dev")
        out["dev_oid"] = dev.oid
        out["dev_content"] = read_text(hf_hub_download(repo, "dev.txt", revision="dev"))
        out["dev_on_main"] = expect_error(lambda: hf_hub_download(repo, "dev.txt", revision="main"))
        out["branches"] = {b.name: b.target_commit for b in api.list_repo_refs(repo).branches}

        api.create_tag(repo, tag="v1.0", revision=base, tag_message="first release")
        api.create_tag(repo, tag="light", revision=base)
        out["tags"] = {t.name: t.target_commit for t in api.list_repo_refs(repo).tags}
        out["tag_content"] = read_text(hf_hub_download(repo, "a.txt", revision="v1.0"))

        out["no_branch"] = expect_error(lambda: api.upload_file(
            path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo, revision="does-not-exist"))
        out["stale_parent"] = expect_error(lambda: api.create_commit(
            repo, operations=[CommitOperationAdd("c.txt", b"c")], commit_message="stale", parent_commit=initial))
        ok = api.create_commit(repo, operations=[CommitOperationAdd("c.txt", b"c")], commit_message="fresh",
                               parent_commit=base)
        out["fresh_parent"] = ok.oid
        api.delete_branch(repo, branch="dev")
        out["branches_after_delete"] = sorted(b.name for b in api.list_repo_refs(repo).branches)
        """,
        args={"repo": repo},
    )
    base, pr_oid = out["base"], out["pr_oid"]
    assert out["pr_num"] == 1 and out["pr_revision"] == "refs/pr/1"
    assert out["pr_url"] == f"{hub.url}/{repo}/discussions/1"
    assert out["main_after_pr"] == base  # main did not move
    assert out["pr_content"] == "proposed" and out["main_content"] == "main v1"
    assert out["pr_info_sha"] == pr_oid
    assert out["prs"] == {"refs/pr/1": pr_oid}
    assert hub.git(repo, "rev-parse", f"{pr_oid}^") == base
    assert hub.git(repo, "rev-parse", "refs/pr/1") == out["pr_update"]
    assert hub.git(repo, "rev-parse", f"{out['pr_update']}^") == pr_oid

    assert_error(out["branch_dup"], "HfHubHTTPError", 409)
    assert hub.git(repo, "rev-parse", f"{out['dev_oid']}^") == base
    assert out["dev_content"] == "dev only"
    assert_error(out["dev_on_main"], "EntryNotFoundError", 404)
    assert out["branches"] == {"main": base, "dev": out["dev_oid"]}
    assert out["tags"] == {"v1.0": base, "light": base}
    assert out["tag_content"] == "main v1"
    assert hub.git(repo, "cat-file", "-t", "refs/tags/v1.0") == "tag"  # annotated

    assert_error(out["no_branch"], "RevisionNotFoundError", 404)
    assert_error(out["stale_parent"], "HfHubHTTPError", 412)
    assert hub.git(repo, "rev-parse", "main") == out["fresh_parent"]
    assert hub.git(repo, "rev-parse", "main^") == base
    assert out["branches_after_delete"] == ["main"]


# --------------------------------------------------------------------------------------------
# 5. server-side duplicate (HfApi.duplicate_repo on hub >= 1; raw REST call on 0.x)
# --------------------------------------------------------------------------------------------


def test_duplicate_repo(hub, tmp_path):
    folder = tmp_path / "dup"
    folder.mkdir()
    (folder / "notes.txt").write_text("source\n")
    write_safetensors(folder / "model.safetensors", seed=5)
    src, dst = "tester/dup-source", "other-org/dup-copy"

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
            r = get_session().post(f"{api.endpoint}/api/models/{src}/duplicate",
                                   headers=api._build_hf_headers(), json={"repository": dst})
            hf_raise_for_status(r)
            out["url"] = r.json()["url"]
            r = get_session().post(f"{api.endpoint}/api/models/{src}/duplicate",
                                   headers=api._build_hf_headers(), json={"repository": dst})
            out["again"] = expect_error(lambda: hf_raise_for_status(r))
        out["src_commits"] = [c.commit_id for c in api.list_repo_commits(src)]
        out["dst_commits"] = [c.commit_id for c in api.list_repo_commits(dst)]
        out["dst_weights"] = sha256_file(hf_hub_download(dst, "model.safetensors"))
        out["dst_weights_by_sha"] = sha256_file(hf_hub_download(dst, "model.safetensors", revision=out["src_sha"]))
        new = api.upload_file(path_or_fileobj=b"copy only", path_in_repo="notes.txt", repo_id=dst)
        out["dst_new"] = new.oid
        out["dst_notes"] = read_text(hf_hub_download(dst, "notes.txt"))
        out["src_notes"] = read_text(hf_hub_download(src, "notes.txt"))
        out["src_head"] = api.model_info(src).sha
        """,
        args={"src": src, "dst": dst, "folder": str(folder)},
    )
    if int(out["hub_version"].split(".")[0]) >= 1:
        assert out["method"] == "HfApi.duplicate_repo"
    assert out["url"] == f"{hub.url}/{dst}"
    assert_error(out["again"], "HfHubHTTPError", 409)
    assert out["dst_commits"] == out["src_commits"] and out["src_commits"][0] == out["src_sha"]
    digest = sha256_of(folder / "model.safetensors")
    assert out["dst_weights"] == digest and out["dst_weights_by_sha"] == digest
    assert sha256_of(lfs_store_path(hub, dst, digest)) == digest
    assert out["dst_notes"] == "copy only" and out["src_notes"] == "source\n"
    assert out["src_head"] == out["src_sha"] == hub.git(src, "rev-parse", "main")
    assert hub.git(dst, "rev-parse", "main") == out["dst_new"]
    assert hub.git(dst, "rev-parse", "main^") == out["src_sha"]


# --------------------------------------------------------------------------------------------
# 6. auth (wrong token writes nothing) and error mapping to the client's exception types
# --------------------------------------------------------------------------------------------


def test_auth_and_error_mapping(hub, tmp_path):
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
        from huggingface_hub import CommitOperationAdd
        repo, private = ARGS["repo"], ARGS["private"]
        bad = HfApi(token="hf_wrong_token")
        out["whoami_bad"] = expect_error(lambda: bad.whoami())
        out["upload_bad"] = expect_error(lambda: bad.upload_file(
            path_or_fileobj=b"evil", path_in_repo="a.txt", repo_id=repo))
        out["lfs_bad"] = expect_error(lambda: bad.create_commit(
            repo, operations=[CommitOperationAdd("w.safetensors", os.urandom(4096))], commit_message="evil"))
        out["create_bad"] = expect_error(lambda: bad.create_repo("tester/never-created"))
        out["branch_bad"] = expect_error(lambda: bad.create_branch(repo, branch="evil"))
        out["read_bad_token_public"] = read_text(hf_hub_download(repo, "a.txt", token="hf_wrong_token"))

        out["missing_repo"] = expect_error(lambda: hf_hub_download("tester/does-not-exist", "a.txt"))
        out["missing_repo_info"] = expect_error(lambda: api.model_info("tester/does-not-exist"))
        out["missing_file"] = expect_error(lambda: hf_hub_download(repo, "nope.txt"))
        out["missing_revision"] = expect_error(lambda: hf_hub_download(repo, "a.txt", revision="no-such-branch"))
        out["missing_revision_api"] = expect_error(lambda: api.list_repo_commits(repo, revision="no-such-branch"))
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
    assert out["file_exists"] == [True, False]
    assert_error(out["private_anon"], "RepositoryNotFoundError", 404)
    assert_error(out["private_info_anon"], "RepositoryNotFoundError", 404)
    assert out["private_ok"] == "secret" and out["private_flag"] is True


# --------------------------------------------------------------------------------------------
# 7. the command line entry point
# --------------------------------------------------------------------------------------------


def test_cli_serves_until_sigterm(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, SERVER_SCRIPT, "--root", str(tmp_path / "root"), "--port", "0", "--token", TOKEN],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
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
            out["user"] = api.whoami()["name"]
            api.create_repo("tester/cli-repo")
            sha = api.upload_file(path_or_fileobj=b"from cli", path_in_repo="f.txt", repo_id="tester/cli-repo").oid
            out["content"] = read_text(hf_hub_download("tester/cli-repo", "f.txt", revision=sha))
            """,
        )
        assert out == {**out, "user": "tester", "content": "from cli"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert proc.stdout.read() == "" and proc.stderr.read() == ""  # quiet without --verbose
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

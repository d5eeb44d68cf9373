"""push.py end to end against the local Hub-compatible server (tests/hub_server.py), through the real clients.

Every Hub client runs in a child process with its own HF_HOME, so every load starts from an empty download and
remote-code cache, as on a user's machine.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from hub_server import HubServer
from safetensors.torch import load_file
from sam_testing import ATOL, hub_env, max_abs_diff, random_stock_sam, run_python, sample_inputs
from transformers import SamModel

from sam_split import SamSplitModel
from sam_split.push import parse_args
from sam_split.tools.verify import Reloaded, max_differences, reload_and_run, sam_outputs

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_sam_split_test_token"
SHA = re.compile(r"Committed ([0-9a-f]{40})")

def run_push(hub, tmp_path, *args, token=TOKEN):
    return subprocess.run(
        [sys.executable, str(ROOT / "push.py"), *args], env=hub_env(hub.url, tmp_path / "push_home", token=token),
        capture_output=True, text=True, timeout=600,
    )


def load_from_hub(hub, tmp_path, requests: dict, inputs: dict, **env) -> dict:
    """{name: (repo, revision)} -> {name/AutoClass: Reloaded}, loaded in one fresh process with its own HF_HOME."""
    home = env.pop("hf_home", tmp_path / f"home-{len(list(tmp_path.iterdir()))}")
    return reload_and_run(requests, inputs, env=hub_env(hub.url, home, token=TOKEN, **env),
                          auto_classes=("AutoModel", "AutoModelForMaskGeneration"))


def reference_outputs(model: SamModel, inputs: dict) -> dict:
    return sam_outputs(model, inputs)


def code_variant(reloaded: Reloaded) -> str | None:
    """Which copy of the code ran: the (last, so effective) VARIANT appended to its modeling file, if any."""
    found = re.findall(r"^VARIANT = '(\w+)'$", Path(reloaded.code_file).read_text(), re.MULTILINE)
    return found[-1] if found else None


def assert_matches(result: Reloaded, reference: dict, variant=None):
    assert result.model_class == "SamSplitModel"
    assert max(max_differences(result.outputs, reference).values()) <= ATOL
    assert code_variant(result) == variant


def commit_with_client(hub, tmp_path, script: str, **args) -> str:
    """Run a huggingface_hub script in a child process; it prints the sha it committed."""
    code = "import json, sys; from huggingface_hub import HfApi, snapshot_download; api = HfApi()\n"
    code += f"args = {args!r}\n" + textwrap.dedent(script)
    out = run_python(code, env=hub_env(hub.url, tmp_path / "client_home", token=TOKEN), replace_env=True)
    return out.strip().splitlines()[-1]


def with_variant(folder: Path, variant: str) -> None:
    """Change the code file so the loaded module says which copy of the code ran."""
    modeling = folder / "modeling_sam_split.py"
    modeling.write_text(modeling.read_text() + f"\nVARIANT = {variant!r}\n")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with HubServer(tmp_path_factory.mktemp("hub"), token=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two stock SAM checkpoints (folders) with different random weights, and their models."""
    root = tmp_path_factory.mktemp("sources")
    models = {}
    for seed in (0, 1):
        models[seed] = random_stock_sam(seed=seed)
        models[seed].save_pretrained(root / f"sam-{seed}")
    return root, models


@pytest.fixture(scope="module")
def first_push(hub, sources, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("first_push")
    result = run_push(hub, tmp_path, "--source", str(sources[0] / "sam-0"), "--repo-id", "tester/sam-tiny-split")
    assert result.returncode == 0, result.stderr
    return SHA.search(result.stdout).group(1), result


@pytest.mark.slow
def test_push_prints_a_pinnable_sha_that_loads_the_source_exactly(hub, sources, first_push, tmp_path):
    sha, result = first_push
    assert f'revision="{sha}"' in result.stdout
    assert "Verified against the source" in result.stdout
    assert hub.git("tester/sam-tiny-split", "rev-parse", "main") == sha
    files = set(hub.git("tester/sam-tiny-split", "ls-tree", "--name-only", sha).split())
    assert {"config.json", "configuration_sam_split.py", "modeling_sam_split.py", "attention_sam_split.py",
            "compat.py", "model.safetensors",
            "preprocessor_config.json", "README.md"} <= files
    card = hub.git("tester/sam-tiny-split", "show", f"{sha}:README.md")
    assert "library_name: transformers" in card and "pipeline_tag: mask-generation" in card
    assert "base_model" not in card and str(sources[0]) not in card  # a local path is no Hub model (issue 13)
    inputs = sample_inputs(sources[1][0].config)
    results = load_from_hub(hub, tmp_path, {"pinned": ("tester/sam-tiny-split", sha)}, inputs)
    assert len(results) == 2  # AutoModel and AutoModelForMaskGeneration
    for result in results.values():
        assert_matches(result, reference_outputs(sources[1][0], inputs))


@pytest.mark.slow
def test_processor_loads_from_the_pushed_repo(hub, first_push, tmp_path):
    sha, _ = first_push
    out = run_python(
        textwrap.dedent(f"""
            import numpy as np
            from transformers import AutoProcessor
            processor = AutoProcessor.from_pretrained("tester/sam-tiny-split", revision="{sha}")
            inputs = processor(images=np.zeros((40, 60, 3), dtype=np.uint8), input_points=[[[10, 20]]],
                               return_tensors="pt")
            print(type(processor).__name__, tuple(inputs["pixel_values"].shape))
        """),
        env=hub_env(hub.url, tmp_path / "home", token=TOKEN), replace_env=True,
    )
    assert out.split()[:1] == ["SamProcessor"] and "(1, 3, 64, 64)" in out


@pytest.mark.slow
def test_pinned_revision_keeps_first_weights_and_code(hub, sources, first_push, tmp_path):
    first_sha, _ = first_push
    second = tmp_path / "second"
    SamSplitModel.from_sam(sources[1][1]).save_pretrained(second)
    with_variant(second, "second")
    second_sha = commit_with_client(hub, tmp_path, """
        info = api.upload_folder(repo_id="tester/sam-tiny-split", folder_path=args["folder"], commit_message="v2")
        print(info.oid)
    """, folder=str(second))
    assert second_sha != first_sha and hub.git("tester/sam-tiny-split", "rev-parse", "main") == second_sha
    inputs = sample_inputs(sources[1][0].config)
    results = load_from_hub(hub, tmp_path, {"first": ("tester/sam-tiny-split", first_sha),
                                            "main": ("tester/sam-tiny-split", "main")}, inputs)
    first_reference, second_reference = (reference_outputs(sources[1][seed], inputs) for seed in (0, 1))
    assert_matches(results["first/AutoModel"], first_reference, variant=None)
    assert_matches(results["main/AutoModel"], second_reference, variant="second")
    # the two versions do differ
    assert max_abs_diff(first_reference["image embeddings"], second_reference["image embeddings"]) > 1e-2


@pytest.mark.slow
def test_fork_runs_its_own_code(hub, sources, first_push, tmp_path):
    """Server-side duplicate, then a code change in the fork: loading the fork by its sha runs the fork's code
    (auto_map is local); and the download-and-reupload fork path."""
    first_sha, _ = first_push
    upstream_sha = hub.git("tester/sam-tiny-split", "rev-parse", "main")  # what the duplicate copies
    fork_sha = commit_with_client(hub, tmp_path, """
        from huggingface_hub.utils import get_session, hf_raise_for_status
        if hasattr(api, "duplicate_repo"):  # huggingface_hub >= 1.x
            api.duplicate_repo("tester/sam-tiny-split", to_id="forker/sam-tiny-split")
        else:  # 0.x has no client method: the same REST call through the client's session
            response = get_session().post(f"{api.endpoint}/api/models/tester/sam-tiny-split/duplicate",
                                          json={"repository": "forker/sam-tiny-split"}, headers=api._build_hf_headers())
            hf_raise_for_status(response)
        folder = snapshot_download("forker/sam-tiny-split", local_dir=args["folder"])
        open(folder + "/modeling_sam_split.py", "a").write("\\nVARIANT = 'fork'\\n")
        info = api.upload_file(path_or_fileobj=folder + "/modeling_sam_split.py", path_in_repo="modeling_sam_split.py",
                               repo_id="forker/sam-tiny-split", commit_message="fork: own code")
        snapshot_download("tester/sam-tiny-split", revision=args["first_sha"], local_dir=args["reupload"])
        api.create_repo("forker/sam-tiny-split-reupload")
        api.upload_folder(repo_id="forker/sam-tiny-split-reupload", folder_path=args["reupload"],
                          ignore_patterns=[".cache/*"])
        print(info.oid)
    """, folder=str(tmp_path / "fork"), reupload=str(tmp_path / "reupload"), first_sha=first_sha)
    assert fork_sha not in hub.git("tester/sam-tiny-split", "log", "--format=%H", "main").split()
    assert upstream_sha in hub.git("forker/sam-tiny-split", "log", "--format=%H", fork_sha).split()  # history kept
    inputs = sample_inputs(sources[1][0].config)
    results = load_from_hub(hub, tmp_path, {"fork": ("forker/sam-tiny-split", fork_sha),
                                            "upstream": ("tester/sam-tiny-split", upstream_sha),
                                            "reupload": ("forker/sam-tiny-split-reupload", "main")}, inputs)
    assert code_variant(results["upstream/AutoModel"]) != "fork"
    # same weights, the fork's code
    assert_matches(results["fork/AutoModel"], results["upstream/AutoModel"].outputs, variant="fork")
    assert_matches(results["reupload/AutoModelForMaskGeneration"], reference_outputs(sources[1][0], inputs))


@pytest.mark.slow
def test_offline_load_by_sha_from_the_cache(hub, sources, first_push, tmp_path):
    sha, _ = first_push
    inputs = sample_inputs(sources[1][0].config)
    home = tmp_path / "cache-home"
    load_from_hub(hub, tmp_path, {"online": ("tester/sam-tiny-split", sha)}, inputs, hf_home=home)
    requests_before = len(hub.requests)
    results = load_from_hub(hub, tmp_path, {"offline": ("tester/sam-tiny-split", sha)}, inputs, hf_home=home,
                            HF_HUB_OFFLINE="1")
    assert len(hub.requests) == requests_before  # nothing asked of the server
    assert_matches(results["offline/AutoModel"], reference_outputs(sources[1][0], inputs))


@pytest.mark.slow
def test_hub_source_branch_and_pull_request(hub, sources, tmp_path):
    """A stock checkpoint on the Hub as --source (pinned by --source-revision, processor config copied over), pushed to
    a new branch, then as a pull request that leaves main alone."""
    stock_folder = tmp_path / "stock"
    sources[1][1].save_pretrained(stock_folder)
    preprocessor = {"processor_class": "SamProcessor", "image_processor_type": "SamImageProcessor", "do_resize": True,
                    "size": {"longest_edge": 64}, "pad_size": {"height": 64, "width": 64}, "do_pad": True}
    (stock_folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    source_sha = commit_with_client(hub, tmp_path, """
        api.create_repo("upstream/sam-tiny")
        print(api.upload_folder(repo_id="upstream/sam-tiny", folder_path=args["folder"]).oid)
    """, folder=str(stock_folder))
    result = run_push(hub, tmp_path, "--source", "upstream/sam-tiny", "--source-revision", source_sha,
                      "--repo-id", "tester/sam-tiny-branch", "--revision", "dev")
    assert result.returncode == 0, result.stderr
    branch_sha = SHA.search(result.stdout).group(1)
    assert hub.git("tester/sam-tiny-branch", "rev-parse", "dev") == branch_sha
    committed = hub.git("tester/sam-tiny-branch", "show", f"{branch_sha}:preprocessor_config.json")
    assert json.loads(committed) == preprocessor
    assert "base_model: upstream/sam-tiny\n" in hub.git("tester/sam-tiny-branch", "show", f"{branch_sha}:README.md")
    main_sha = hub.git("tester/sam-tiny-branch", "rev-parse", "main")
    result = run_push(hub, tmp_path, "--source", "upstream/sam-tiny", "--repo-id", "tester/sam-tiny-branch",
                      "--create-pr", "--commit-message", "proposal")
    assert result.returncode == 0, result.stderr
    pr_sha = SHA.search(result.stdout).group(1)
    assert "pull request" in result.stdout and hub.git("tester/sam-tiny-branch", "rev-parse", "main") == main_sha
    assert hub.git("tester/sam-tiny-branch", "log", "-1", "--format=%s", pr_sha) == "proposal"


def repo_exists(hub, repo_id) -> bool:
    return Path(hub.git_dir(repo_id)).exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing folder", "not a SAM checkpoint", "pickle only", "split already"])
def test_bad_source_fails_before_anything_is_uploaded(hub, sources, tmp_path, case):
    folder = tmp_path / "source"
    if case == "not a SAM checkpoint":
        from transformers import BertConfig, BertModel

        config = BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
        BertModel(config).save_pretrained(folder)
        expected = "not a stock SAM checkpoint (model_type='bert'"
    elif case == "pickle only":
        sources[1][0].config.save_pretrained(folder)  # transformers 5 no longer writes .bin weights itself
        torch.save(sources[1][0].state_dict(), folder / "pytorch_model.bin")
        expected = "no *.safetensors weights"
    elif case == "split already":
        SamSplitModel.from_sam(sources[1][0]).save_pretrained(folder)
        expected = "already split"
    else:
        expected = "no such folder"
    repo_id = f"tester/bad-{case.replace(' ', '-')}"
    result = run_push(hub, tmp_path, "--source", str(folder), "--repo-id", repo_id)
    assert result.returncode == 1 and expected in result.stderr, result.stderr
    assert not repo_exists(hub, repo_id)


@pytest.mark.slow
def test_wrong_token_is_refused_before_conversion(hub, sources, tmp_path):
    result = run_push(hub, tmp_path, "--source", str(sources[0] / "sam-0"), "--repo-id", "tester/wrong-token",
                      token="hf_wrong")
    assert result.returncode == 1 and "refused the token" in result.stderr, result.stderr
    assert "Loading the source" not in result.stdout
    assert not repo_exists(hub, "tester/wrong-token")


@pytest.mark.slow
def test_verification_mismatch_aborts_with_the_figures(hub, sources, tmp_path):
    """A conversion that swaps k and v in one layer (a corrupted weight) is caught before upload, and neither a
    commit nor an output folder is left behind."""
    corrupt_then_push = textwrap.dedent(f"""
        import runpy, sys
        import sam_split.split_qkv as modeling  # where every twin's conversion splits the state dict
        split = modeling.split_qkv_state_dict
        def corrupted(state_dict):
            result = split(state_dict)
            name = "vision_encoder.layers.0.attn.{{}}.weight"
            result[name.format("k")], result[name.format("v")] = result[name.format("v")], result[name.format("k")]
            return result
        modeling.split_qkv_state_dict = corrupted
        sys.argv = ["push.py", "--source", {str(sources[0] / "sam-0")!r}, "--repo-id", "tester/corrupted",
                    "--output-dir", {str(tmp_path / "out")!r}]
        runpy.run_path({str(ROOT / "push.py")!r}, run_name="__main__")
    """)
    result = subprocess.run([sys.executable, "-c", corrupt_then_push], capture_output=True, text=True, timeout=600,
                            env=hub_env(hub.url, tmp_path / "home", token=TOKEN))
    assert result.returncode == 1, result.stderr
    assert re.search(r"verification failed: max abs differences image embeddings \d\.\d+e[-+]\d+", result.stderr)
    assert "nothing was uploaded" in result.stderr
    assert not repo_exists(hub, "tester/corrupted")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".sam-split-build-*"))


@pytest.mark.slow
def test_no_push_output_dir_and_argument_errors(sources, tmp_path, capsys):
    out = tmp_path / "built"
    result = subprocess.run([sys.executable, str(ROOT / "push.py"), "--source", str(sources[0] / "sam-0"),
                             "--output-dir", str(out), "--no-push", "--max-shard-size", "100KB"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Verified against the source" in result.stdout  # the sharded build was reloaded and compared
    # every long step says what it starts, as it starts
    progress = ["Loading the source", "Splitting qkv", "Writing the repository", "Verifying: reloading",
                "reloaded the build with AutoModel (SamSplitModel) in", "ran the build in",
                "Computing the source's outputs", "Verified against the source in", "Repository written to"]
    positions = [result.stdout.find(text) for text in progress]
    assert -1 not in positions and positions == sorted(positions), result.stdout
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert {"README.md", "config.json", "configuration_sam_split.py", "modeling_sam_split.py",
            "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    keys = [key for shard in shards for key in load_file(shard)]
    assert not [key for key in keys if "qkv" in key] and "vision_encoder.layers.0.attn.q.weight" in keys
    for args, message in [
        (["--source", "x", "--no-push"], "--no-push needs --output-dir"),
        (["--source", "x"], "--repo-id is required"),
        (["--source", "x", "--repo-id", "no-namespace"], "expected 'namespace/name'"),
        (["--source", "x", "--output-dir", str(out), "--no-push"], "exists and is not empty"),
        (["--source", "x", "--repo-id", "a/b", "--revision", "dev", "--create-pr"], "drop --revision"),
        (["--source", "x", "--repo-id", "a/b", "--token", ""], "--token is empty"),
        (["--source", "x", "--output-dir", str(out / "config.json"), "--no-push"], "exists and is not a folder"),
        (["--source", str(out), "--source-revision", "v1", "--repo-id", "a/b"], "--source-revision is for Hub ids"),
        (["--source", "random:vit-tiny", "--output-dir", str(tmp_path / "x"), "--no-push"],
         "expected one of random:vit-base"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            parse_args(args)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, args


@contextlib.contextmanager
def unanswering_hub(upstream: str | None = None, silent_from: bytes = b""):
    """A server on 127.0.0.1 that accepts connections and never answers; with `upstream` (a URL), a proxy to it that
    goes silent on a connection from the moment its client sends `silent_from` (e.g. the commit request). Yields its
    URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    connections = []

    def pipe(source, destination, watch: bool, silenced: threading.Event):
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if watch and silent_from and silent_from in data:
                    silenced.set()
                if not silenced.is_set():
                    destination.sendall(data)

    def serve():
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                connections.append(client)
                if upstream is None:
                    continue  # accepted, never read, never answered
                server = socket.create_connection(("127.0.0.1", int(upstream.rsplit(":", 1)[1])))
                connections.append(server)
                silenced = threading.Event()
                threading.Thread(target=pipe, args=(client, server, True, silenced), daemon=True).start()
                threading.Thread(target=pipe, args=(server, client, False, silenced), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        for open_socket in [listener, *connections]:
            with contextlib.suppress(OSError):
                open_socket.shutdown(socket.SHUT_RDWR)
            open_socket.close()


def assert_clean_failure(result, tmp_path, *expected, status=1):
    """Exit `status` (1; 2 for an argument refused at parse time), one error line naming the reason, no traceback, no
    folder left behind."""
    assert result.returncode == status, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    prefix = "error: " if status == 1 else "push.py: error: "
    errors = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
    assert len(errors) == 1 and all(text in errors[0] for text in expected), result.stderr[-3000:]
    assert not list(tmp_path.rglob(".sam-split-build-*")) and not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("when", ["from the start", "at the commit"])
def test_unanswering_hub_times_out_with_a_clear_message(hub, sources, tmp_path, when):
    upstream = hub.url if when == "at the commit" else None
    with unanswering_hub(upstream, silent_from=b"/commit/") as url:
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, str(ROOT / "push.py"), "--source", str(sources[0] / "sam-0"), "--repo-id",
             "tester/unanswered", "--output-dir", str(tmp_path / "out"), "--timeout", "2"],
            env=hub_env(url, tmp_path / "home", token=TOKEN), capture_output=True, text=True, timeout=300,
        )
        elapsed = time.monotonic() - started
    assert_clean_failure(result, tmp_path)
    assert re.search(r"[Tt]imeout|timed out", result.stderr), result.stderr[-3000:]
    assert elapsed < 120  # a few 2 s timeouts (huggingface_hub retries some requests), not forever
    if when == "at the commit":
        assert "Verified against the source" in result.stdout and "upload to tester/unanswered" in result.stderr
        assert "Split q/k/v" not in hub.git("tester/unanswered", "log", "--all", "--format=%s")
    else:
        assert not repo_exists(hub, "tester/unanswered")


@pytest.mark.parametrize("signal_number, status, message", [(signal.SIGTERM, 143, "terminated"),
                                                       (signal.SIGINT, 130, "interrupted")])
@pytest.mark.slow
def test_a_signal_during_the_build_cleans_up(sources, tmp_path, signal_number, status, message):
    """SIGTERM (or Ctrl-C) while the build is being verified: an exit status and a message, no traceback, no build
    folder, no output folder and no scratch folder (TMPDIR) left. The build is held in the verification (after the
    reload, before the comparison) until the signal comes, so a fast machine cannot finish it first."""
    (tmp_path / "tmp").mkdir()
    argv = ["--source", str(sources[0] / "sam-0"), "--output-dir", str(tmp_path / "out"), "--no-push"]
    hold = ("import sys, time\nfrom sam_split import push\n"
            "def hold(*args):\n    print('holding the verification', flush=True)\n    time.sleep(600)\n"
            f"push.max_differences = hold\nsys.exit(push.main({argv!r}))\n")
    process = subprocess.Popen(
        [sys.executable, "-c", hold], env={**os.environ, "TMPDIR": str(tmp_path / "tmp")}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    for line in process.stdout:  # ends when the process does: then the assertions below fail
        if line.startswith("holding the verification"):
            break
    assert list(tmp_path.glob(".sam-split-build-*"))
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == status and message in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert not list(tmp_path.glob(".sam-split-build-*")) and not (tmp_path / "out").exists()
    assert not list((tmp_path / "tmp").iterdir())


def truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def misshape_weights(folder: Path) -> None:
    from safetensors.torch import save_file

    weights = load_file(folder / "model.safetensors")
    name = "vision_encoder.layers.0.attn.qkv.weight"
    weights[name] = weights[name][:-3]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.slow
@pytest.mark.parametrize("case", ["hub down", "truncated weights", "mis-shaped weights", "read-only output parent"])
def test_failures_exit_with_one_clear_message(hub, sources, tmp_path, case):
    source = tmp_path / "source"
    shutil.copytree(sources[0] / "sam-0", source)
    output_dir = tmp_path / "out"
    url, expected = hub.url, "cannot load it as a stock SAM checkpoint"
    if case == "hub down":
        with socket.create_server(("127.0.0.1", 0)) as closed:
            url = f"http://127.0.0.1:{closed.getsockname()[1]}"  # nothing listens there once closed
        expected = "could not be reached"
    elif case == "truncated weights":
        truncate_weights(source)
    elif case == "mis-shaped weights":
        misshape_weights(source)
    else:
        output_dir = Path("/proc/sam-split-out")  # a folder no one may write in, root included: refused at parse time
        expected = "--output-dir /proc/sam-split-out is not writable: cannot create a file in /proc"
    result = subprocess.run(
        [sys.executable, str(ROOT / "push.py"), "--source", str(source), "--repo-id", "tester/failures",
         "--output-dir", str(output_dir)],
        env=hub_env(url, tmp_path / "home", token=TOKEN), capture_output=True, text=True, timeout=600,
    )
    assert_clean_failure(result, tmp_path, expected, status=2 if case == "read-only output parent" else 1)
    assert not repo_exists(hub, "tester/failures")


@pytest.mark.slow
def test_hub_without_xet_support_is_a_clear_message(hub, sources, tmp_path):
    """huggingface_hub uploads through Xet unless HF_HUB_DISABLE_XET=1; a Hub without Xet (like tests/hub_server.py
    before it answered Xet requests) must give a clear message, never a traceback."""
    env = hub_env(hub.url, tmp_path / "home", token=TOKEN)
    del env["HF_HUB_DISABLE_XET"]
    result = subprocess.run([sys.executable, str(ROOT / "push.py"), "--source", str(sources[0] / "sam-0"),
                             "--repo-id", "tester/xet"], env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        assert_clean_failure(result, tmp_path, "upload to tester/xet", "HF_HUB_DISABLE_XET=1")
    else:
        assert SHA.search(result.stdout)


@pytest.mark.slow
def test_onnx_flag_adds_the_verified_graphs_to_the_same_single_commit(hub, sources, tmp_path):
    """`--onnx`: the onnx/ folder is exported, verified in onnxruntime against the source, and published in the very
    commit that holds the weights and the code, so one pinned sha serves PyTorch, onnxruntime and transformers.js."""
    result = run_push(hub, tmp_path, "--source", str(sources[0] / "sam-1"), "--repo-id", "tester/sam-tiny-onnx",
                      "--onnx")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Verifying the fp32 graphs in onnxruntime against PyTorch" in result.stdout
    sha = SHA.search(result.stdout).group(1)
    files = set(hub.git("tester/sam-tiny-onnx", "ls-tree", "-r", "--name-only", sha).split())
    assert {"onnx/vision_encoder.onnx", "onnx/prompt_encoder_mask_decoder.onnx", "model.safetensors",
            "modeling_sam_split.py", "config.json"} <= files
    changed = set(hub.git("tester/sam-tiny-onnx", "diff-tree", "--root", "--no-commit-id", "--name-only", "-r",
                          sha).split())
    assert {"onnx/vision_encoder.onnx", "onnx/prompt_encoder_mask_decoder.onnx", "model.safetensors"} <= changed


@pytest.mark.parametrize("args, message", [
    (["--repo-id", "a/b..c"], "Cannot have -- or .. in repo_id"),
    (["--repo-id", "a/b.git"], "cannot end by '.git'"),
    (["--repo-id", "a/" + "x" * 118], "is not a valid Hub id"),
    (["--repo-id", "a/b", "--revision", "bad..name"], "is not a valid branch, tag or commit name"),
    (["--repo-id", "a/b", "--max-shard-size", "lots"], "--max-shard-size 'lots': expected a positive size"),
    (["--repo-id", "a/b", "--atol", "nan"], "--atol must be a positive number"),
    (["--repo-id", "a/b", "--timeout", "nan"], "--timeout must be a positive number"),
])
def test_what_the_hub_would_refuse_is_refused_at_parse_time(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--source", "random:vit-base", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_a_changed_shard_layout_loads_each_push_by_its_sha(hub, sources, tmp_path):
    """One file, then shards, then one file again, into one repository: each printed sha loads exactly the weights its
    push verified, and its tree holds no weight file of another push (a stale model.safetensors beside new shards was
    loaded in their place, with the new config)."""
    repo, pushes, shas = "tester/sam-tiny-layouts", [(0, []), (1, ["--max-shard-size", "20KB"]), (0, [])], []
    for seed, extra in pushes:
        result = run_push(hub, tmp_path, "--source", str(sources[0] / f"sam-{seed}"), "--repo-id", repo, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        shas.append(SHA.search(result.stdout).group(1))
        weights = {name for name in hub.git(repo, "ls-tree", "-r", "--name-only", shas[-1]).split()
                   if name.startswith(("model.", "model-"))}
        if extra:
            assert "model.safetensors" not in weights and "model.safetensors.index.json" in weights
            assert len(weights) > 2  # the index and at least two shards
        else:
            assert weights == {"model.safetensors"}
    assert len(set(shas[:2])) == 2
    inputs = sample_inputs(sources[1][0].config)
    results = load_from_hub(hub, tmp_path, {f"push{index}": (repo, sha) for index, sha in enumerate(shas)}, inputs)
    assert len(results) == 2 * len(pushes)
    for key, result in results.items():
        seed = pushes[int(key.split("/")[0].removeprefix("push"))][0]
        assert_matches(result, reference_outputs(sources[1][seed], inputs))


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["500", "drop"])
def test_a_lost_answer_to_the_commit_says_it_landed_and_a_retry_commits_nothing(hub, sources, tmp_path, fault):
    """The Hub applies the commit, then its answer is lost (a 500, a dropped connection): push.py looks at the repo,
    says that the commit landed and prints its sha (not "nothing was committed"); the same push again adds no commit."""
    repo = f"tester/lost-answer-{fault}"
    args = ["--source", str(sources[0] / "sam-0"), "--repo-id", repo]
    hub.fail_next_commit(fault)
    result = run_push(hub, tmp_path, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    sha = SHA.search(result.stdout).group(1)
    assert "the Hub's answer to the commit was lost" in result.stdout
    assert f"but the commit landed: {sha}" in result.stdout and "nothing was committed" not in result.stdout
    assert hub.git(repo, "rev-parse", "main") == sha

    again = run_push(hub, tmp_path, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert SHA.search(again.stdout).group(1) == sha and "already holds exactly this folder" in again.stdout
    assert hub.git(repo, "log", "--format=%s", "main").splitlines() == [
        "Split q/k/v SAM converted from " + str(sources[0] / "sam-0"), "initial commit"]


@pytest.mark.slow
def test_a_killed_parent_takes_its_reload_child_with_it(tmp_path):
    """SIGKILL leaves a process no chance to end its children: the reload child (push.py's verification) must end by
    itself when its parent dies. Here the child blocks in its first Hub request (a loopback server that accepts and
    never answers, with a 10-minute timeout); once it is blocked, its parent is killed, and the child's connection
    must close (the child ended) within seconds."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(120)
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        env = {**hub_env(url, tmp_path / "home", token=TOKEN), "HF_HUB_ETAG_TIMEOUT": "600",
               "HF_HUB_DOWNLOAD_TIMEOUT": "600"}
        parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import torch
            from sam_split.tools.verify import reload_and_run
            reload_and_run({{"model": ("tester/never-answered", None)}}, {{"pixel_values": torch.zeros(1)}},
                           env={env!r})
            """)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            connection, _ = server.accept()  # the child has started, set up its end, and asks the Hub
        finally:
            parent.kill()
            _, stderr = parent.communicate(timeout=60)
        with connection:
            connection.settimeout(30)
            with contextlib.suppress(ConnectionResetError):
                while connection.recv(65536):  # the request, then b"" once the child's socket is closed
                    pass
    assert parent.returncode == -signal.SIGKILL, stderr[-3000:]

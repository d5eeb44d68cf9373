"""push.py end to end against the local Hub-compatible server (tests/hub_server.py), through the real clients.

Every Hub client runs in a child process with its own HF_HOME, so every load starts from an empty download and
remote-code cache, as on a user's machine.
"""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import SamModel

from hub_server import HubServer
from sam_split import SamSplitModel
from sam_split.push import parse_args
from sam_testing import ATOL, hub_env, max_abs_diff, random_stock_sam, run_python, sample_inputs

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_sam_split_test_token"
SHA = re.compile(r"Committed ([0-9a-f]{40})")

# Loads each requested (repo, revision) in this fresh process and saves what it computed on the inputs.
LOAD_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModel, AutoModelForMaskGeneration
    requests, inputs_path, results_path = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    inputs = torch.load(inputs_path)
    results = {}
    for name, (repo, revision) in requests.items():
        for auto_class in (AutoModel, AutoModelForMaskGeneration):
            model = auto_class.from_pretrained(repo, trust_remote_code=True, revision=revision).eval()
            assert type(model).__name__ == "SamSplitModel", type(model)
            with torch.no_grad():
                outputs = model(**inputs)
                embeddings = model.vision_encoder(inputs["pixel_values"])[0]
            variant = getattr(sys.modules[type(model).__module__], "VARIANT", None)
            results[f"{name}/{auto_class.__name__}"] = (embeddings, outputs.pred_masks, outputs.iou_scores, variant)
    torch.save(results, results_path)
""")


def run_push(hub, tmp_path, *args, token=TOKEN):
    return subprocess.run(
        [sys.executable, str(ROOT / "push.py"), *args], env=hub_env(hub.url, tmp_path / "push_home", token=token),
        capture_output=True, text=True, timeout=600,
    )


def load_from_hub(hub, tmp_path, requests: dict, inputs: dict, **env) -> dict:
    """{name: (repo, revision)} -> {name/AutoClass: (embeddings, masks, iou, VARIANT of the code that ran)}"""
    home = env.pop("hf_home", tmp_path / f"home-{len(list(tmp_path.iterdir()))}")
    torch.save(inputs, tmp_path / "inputs.pt")
    code = f"import sys; sys.argv[1:] = {[json.dumps(requests), str(tmp_path / 'inputs.pt'), str(tmp_path / 'out.pt')]!r}\n"
    run_python(code + LOAD_SCRIPT, env=hub_env(hub.url, home, token=TOKEN, **env), replace_env=True)
    return torch.load(tmp_path / "out.pt")


def reference_outputs(model: SamModel, inputs: dict):
    with torch.no_grad():
        outputs = model(**inputs)
        return model.vision_encoder(inputs["pixel_values"])[0], outputs.pred_masks, outputs.iou_scores


def assert_matches(result, reference, variant=None):
    *tensors, loaded_variant = result
    for actual, expected in zip(tensors, reference):
        assert max_abs_diff(actual, expected) <= ATOL
    assert loaded_variant == variant


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
    assert f"base_model: {sources[0] / 'sam-0'}" in card
    inputs = sample_inputs(sources[1][0].config)
    results = load_from_hub(hub, tmp_path, {"pinned": ("tester/sam-tiny-split", sha)}, inputs)
    assert len(results) == 2  # AutoModel and AutoModelForMaskGeneration
    for result in results.values():
        assert_matches(result, reference_outputs(sources[1][0], inputs))


def test_processor_loads_from_the_pushed_repo(hub, first_push, tmp_path):
    sha, _ = first_push
    out = run_python(
        textwrap.dedent(f"""
            import numpy as np
            from transformers import AutoProcessor
            processor = AutoProcessor.from_pretrained("tester/sam-tiny-split", revision="{sha}")
            inputs = processor(images=np.zeros((40, 60, 3), dtype=np.uint8), input_points=[[[10, 20]]], return_tensors="pt")
            print(type(processor).__name__, tuple(inputs["pixel_values"].shape))
        """),
        env=hub_env(hub.url, tmp_path / "home", token=TOKEN), replace_env=True,
    )
    assert out.split()[:1] == ["SamProcessor"] and "(1, 3, 64, 64)" in out


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
    assert max_abs_diff(first_reference[0], second_reference[0]) > 1e-2  # the two versions do differ


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
        api.upload_folder(repo_id="forker/sam-tiny-split-reupload", folder_path=args["reupload"], ignore_patterns=[".cache/*"])
        print(info.oid)
    """, folder=str(tmp_path / "fork"), reupload=str(tmp_path / "reupload"), first_sha=first_sha)
    assert fork_sha not in hub.git("tester/sam-tiny-split", "log", "--format=%H", "main").split()
    assert upstream_sha in hub.git("forker/sam-tiny-split", "log", "--format=%H", fork_sha).split()  # history kept
    inputs = sample_inputs(sources[1][0].config)
    results = load_from_hub(hub, tmp_path, {"fork": ("forker/sam-tiny-split", fork_sha),
                                            "upstream": ("tester/sam-tiny-split", upstream_sha),
                                            "reupload": ("forker/sam-tiny-split-reupload", "main")}, inputs)
    *upstream_tensors, upstream_variant = results["upstream/AutoModel"]
    assert upstream_variant != "fork"
    assert_matches(results["fork/AutoModel"], upstream_tensors, variant="fork")  # same weights, the fork's code
    assert_matches(results["reupload/AutoModelForMaskGeneration"], reference_outputs(sources[1][0], inputs))


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
    assert json.loads(hub.git("tester/sam-tiny-branch", "show", f"{branch_sha}:preprocessor_config.json")) == preprocessor
    main_sha = hub.git("tester/sam-tiny-branch", "rev-parse", "main")
    result = run_push(hub, tmp_path, "--source", "upstream/sam-tiny", "--repo-id", "tester/sam-tiny-branch",
                      "--create-pr", "--commit-message", "proposal")
    assert result.returncode == 0, result.stderr
    pr_sha = SHA.search(result.stdout).group(1)
    assert "pull request" in result.stdout and hub.git("tester/sam-tiny-branch", "rev-parse", "main") == main_sha
    assert hub.git("tester/sam-tiny-branch", "log", "-1", "--format=%s", pr_sha) == "proposal"


def repo_exists(hub, repo_id) -> bool:
    return Path(hub.git_dir(repo_id)).exists()


@pytest.mark.parametrize("case", ["missing folder", "not a SAM checkpoint", "pickle only", "split already"])
def test_bad_source_fails_before_anything_is_uploaded(hub, sources, tmp_path, case):
    folder = tmp_path / "source"
    if case == "not a SAM checkpoint":
        from transformers import BertConfig, BertModel

        BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)).save_pretrained(folder)
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


def test_wrong_token_is_refused_before_conversion(hub, sources, tmp_path):
    result = run_push(hub, tmp_path, "--source", str(sources[0] / "sam-0"), "--repo-id", "tester/wrong-token",
                      token="hf_wrong")
    assert result.returncode == 1 and "refused the token" in result.stderr, result.stderr
    assert "Loading the source" not in result.stdout
    assert not repo_exists(hub, "tester/wrong-token")


def test_verification_mismatch_aborts_with_the_figures(hub, sources, tmp_path):
    """A conversion that swaps k and v in one layer (a corrupted weight) is caught before upload, and neither a
    commit nor an output folder is left behind."""
    corrupt_then_push = textwrap.dedent(f"""
        import runpy, sys
        import sam_split.modeling_sam_split as modeling
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


def test_no_push_output_dir_and_argument_errors(sources, tmp_path, capsys):
    out = tmp_path / "built"
    result = subprocess.run([sys.executable, str(ROOT / "push.py"), "--source", str(sources[0] / "sam-0"),
                             "--output-dir", str(out), "--no-push", "--max-shard-size", "100KB"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Verified against the source" in result.stdout  # the sharded build was reloaded and compared
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert {"README.md", "config.json", "configuration_sam_split.py", "modeling_sam_split.py",
            "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    keys = [key for shard in shards for key in load_file(shard)]
    assert not [key for key in keys if "qkv" in key] and "vision_encoder.layers.0.attn.q.weight" in keys
    for args, message in [
        (["--source", "x", "--no-push"], "--no-push needs --output-dir"),
        (["--source", "x"], "--repo-id is required"),
        (["--source", "x", "--repo-id", "no-namespace"], "must look like 'namespace/name'"),
        (["--source", "x", "--output-dir", str(out), "--no-push"], "exists and is not empty"),
        (["--source", "x", "--repo-id", "a/b", "--revision", "dev", "--create-pr"], "drop --revision"),
        (["--source", "random:vit-tiny", "--output-dir", str(tmp_path / "x"), "--no-push"], "expected one of random:vit-base"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            parse_args(args)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, args

"""Convert a stock SAM checkpoint to a split-q/k/v `SamSplitModel` repo, verify it, and publish it in one commit.

    python push.py --source facebook/sam-vit-base --repo-id my-org/sam-vit-base-split

builds the repository in a temporary folder (code files, config.json with a local `auto_map`, split safetensors
weights, the source's processor config, a model card), reloads it in a fresh process through
`AutoModel.from_pretrained(..., trust_remote_code=True)` and compares image embeddings, masks and IoU scores with the
source `SamModel` on a fixed input, and only then uploads everything in a single commit. It prints the commit sha to
pin with `revision=`.

Offline (no Hub reachable), build and verify only, from a local checkpoint or from random weights:

    python push.py --source random:vit-base --output-dir sam-vit-base-split --no-push

The token comes from `HF_TOKEN` or `huggingface-cli login` (or `--token`), the endpoint from `HF_ENDPOINT`.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from string import Template

import torch
from huggingface_hub import HfApi, ModelCardData, hf_hub_download
from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError
from transformers import SamConfig, SamModel

from sam_split import SamSplitModel
from sam_split.modeling_sam_split import load_stock_sam

HERE = Path(__file__).resolve().parent
RANDOM_PREFIX = "random:"
# Vision-encoder sizes of the three released SAM checkpoints; everything else is SamConfig's default.
SAM_SIZES = {
    "vit-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, global_attn_indexes=[2, 5, 8, 11]),
    "vit-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, global_attn_indexes=[5, 11, 17, 23]),
    "vit-huge": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, global_attn_indexes=[7, 15, 23, 31]),
}
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class PushError(Exception):
    """A failure the user can act on: printed as one message, exit status 1."""


def step(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=textwrap.dedent("""\
            examples:
              python push.py --source facebook/sam-vit-base --repo-id my-org/sam-vit-base-split
              python push.py --source ./sam-vit-huge --repo-id my-org/sam-vit-huge-split --private --create-pr
              python push.py --source random:vit-base --output-dir sam-vit-base-split --no-push
            """),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("source")
    source.add_argument(
        "--source", required=True,
        help="stock SAM checkpoint: a Hub model id, a local folder, or random:vit-base|vit-large|vit-huge for a "
             "randomly initialised model (demonstration only: its masks mean nothing)",
    )
    source.add_argument("--source-revision", help="branch, tag or commit of a Hub --source")
    source.add_argument("--allow-pickle", action="store_true",
                        help="accept a source with only pytorch_model.bin (pickle) weights; safetensors is required otherwise")
    target = parser.add_argument_group("target")
    target.add_argument("--repo-id", help="Hub repository to create or update, e.g. my-org/sam-vit-base-split")
    target.add_argument("--revision", default="main", help="branch to commit to (created from main if missing)")
    target.add_argument("--private", action="store_true", help="create the repository as private")
    target.add_argument("--create-pr", action="store_true",
                        help="open a pull request against the default branch instead of committing")
    target.add_argument("--commit-message", help="commit message (default: what was converted from where)")
    target.add_argument("--token", help="Hub token (default: HF_TOKEN or the token saved by `hf auth login`)")
    target.add_argument("--output-dir", type=Path, help="also keep the built repository in this new folder")
    target.add_argument("--no-push", action="store_true", help="build and verify only; needs --output-dir")
    checks = parser.add_argument_group("checks")
    checks.add_argument("--max-shard-size", default="5GB", help="split weights into shards of at most this size")
    checks.add_argument("--atol", type=float, default=1e-4,
                        help="largest allowed abs difference of embeddings, masks and IoU scores vs the source (fp32)")
    args = parser.parse_args(argv)
    if args.no_push and args.output_dir is None:
        parser.error("--no-push needs --output-dir (otherwise the verified build would be thrown away)")
    if not args.no_push and args.repo_id is None:
        parser.error("--repo-id is required unless --no-push is given")
    if args.repo_id is not None and not REPO_ID_PATTERN.match(args.repo_id):
        parser.error(f"--repo-id must look like 'namespace/name', got {args.repo_id!r}")
    if args.output_dir is not None and args.output_dir.exists() and any(args.output_dir.iterdir()):
        parser.error(f"--output-dir {args.output_dir} exists and is not empty; choose a new folder")
    if args.source.startswith(RANDOM_PREFIX) and args.source[len(RANDOM_PREFIX):] not in SAM_SIZES:
        parser.error(f"--source {args.source!r}: expected one of {', '.join(RANDOM_PREFIX + s for s in SAM_SIZES)}")
    if args.create_pr and args.revision != "main":
        parser.error("--create-pr opens a pull request against the default branch; drop --revision")
    if args.atol <= 0:
        parser.error("--atol must be positive")
    return args


def load_source(args) -> SamModel:
    """The stock SamModel to convert; refuses anything that is not a complete stock SAM checkpoint."""
    if args.source.startswith(RANDOM_PREFIX):
        config = SamConfig(vision_config=SAM_SIZES[args.source[len(RANDOM_PREFIX):]])
        torch.manual_seed(0)
        model = SamModel(config)
        # transformers 5 initialises some weights (rel-pos tables, positional embeddings) to zero; random values
        # everywhere make the verification below meaningful.
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for tensor in model.state_dict().values():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
        return model.eval()
    folder = Path(args.source)
    if folder.exists() or args.source.startswith((".", "/", "~")):
        if not folder.is_dir():
            raise PushError(f"--source {args.source}: no such folder")
        if not (folder / "config.json").is_file():
            raise PushError(f"--source {args.source}: no config.json, so not a transformers checkpoint folder")
        has_safetensors = any(folder.glob("*.safetensors"))
        if not has_safetensors and not args.allow_pickle:
            raise PushError(f"--source {args.source}: no *.safetensors weights (pass --allow-pickle to read "
                            "pytorch_model.bin, which runs pickle code)")
    kwargs = {"revision": args.source_revision} if args.source_revision else {}
    if not args.allow_pickle:
        kwargs["use_safetensors"] = True
    try:
        return load_stock_sam(args.source, **kwargs).eval()
    except (OSError, ValueError) as error:
        raise PushError(f"--source {args.source}: {error}") from error


def source_file(args, name: str) -> Path | None:
    """`name` from the source checkpoint (local folder or Hub), or None where it has none."""
    if args.source.startswith(RANDOM_PREFIX):
        return None
    if Path(args.source).is_dir():
        path = Path(args.source) / name
        return path if path.is_file() else None
    try:
        return Path(hf_hub_download(args.source, name, revision=args.source_revision))
    except EntryNotFoundError:
        return None


def write_processor_files(args, destination: Path, image_size: int) -> None:
    """Copy the source's processor configuration, so `AutoProcessor.from_pretrained(repo)` works on the result."""
    found = {name: path for name in PROCESSOR_FILES if (path := source_file(args, name)) is not None}
    for name, path in found.items():
        shutil.copyfile(path, destination / name)
    if not found:  # SAM's standard preprocessing, in the version-neutral form of the released checkpoints
        (destination / "preprocessor_config.json").write_text(json.dumps({
            "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
            "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
            "image_processor_type": "SamImageProcessor", "processor_class": "SamProcessor",
            "pad_size": {"height": image_size, "width": image_size}, "size": {"longest_edge": image_size},
            "resample": 2, "rescale_factor": 1 / 255,
        }, indent=2) + "\n")


def model_card(args, config) -> str:
    random_weights = args.source.startswith(RANDOM_PREFIX)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="mask-generation",
        license="apache-2.0",
        base_model=None if random_weights else args.source,
        tags=["sam", "segment-anything", "custom_code", "lora", "peft"] + (["random-weights"] if random_weights else []),
    )
    vision = config.vision_config
    body = Template((HERE / "model_card_template.md").read_text()).substitute(
        repo_id=args.repo_id or args.output_dir.name,
        source=f"`{args.source}`" if random_weights else f"`{args.source}` (revision `{args.source_revision or 'main'}`)",
        sizes=f"hidden size {vision.hidden_size}, {vision.num_hidden_layers} layers, {vision.num_attention_heads} "
              f"heads, global attention in layers {list(vision.global_attn_indexes)}",
        warning="> **Randomly initialised weights**: this repository was built from `random:` for demonstration; "
                "its masks mean nothing.\n" if random_weights else "",
    )
    return f"---\n{card_data.to_yaml()}\n---\n\n{body}"


def verification_inputs(config) -> dict:
    """A fixed image with a point and a box prompt, at the model's real input size."""
    size = config.vision_config.image_size
    return {
        "pixel_values": torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)),
        "input_points": torch.tensor([[[[0.3 * size, 0.6 * size]]]]),
        "input_labels": torch.tensor([[[1]]]),
        "input_boxes": torch.tensor([[[0.1 * size, 0.2 * size, 0.8 * size, 0.9 * size]]]),
    }


_VERIFY_CHILD = """
import sys, torch
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).float().eval()
assert type(model).__name__ == "SamSplitModel", type(model)
inputs = torch.load(sys.argv[2])
with torch.no_grad():
    embeddings = model.vision_encoder(inputs["pixel_values"])[0]
    outputs = model(image_embeddings=embeddings, **{k: v for k, v in inputs.items() if k != "pixel_values"})
torch.save({"image embeddings": embeddings, "masks": outputs.pred_masks, "IoU scores": outputs.iou_scores}, sys.argv[3])
"""


def verify(folder: Path, source: SamModel, atol: float) -> dict:
    """Reload `folder` as a user would (fresh process, empty modules cache, remote code) and compare it with `source`.

    Returns the max abs differences; raises PushError if any is above `atol`."""
    inputs = verification_inputs(source.config)
    with tempfile.TemporaryDirectory(prefix="sam-split-verify-") as scratch:
        torch.save(inputs, Path(scratch) / "inputs.pt")
        env = {**os.environ, "HF_HOME": str(Path(scratch) / "hf_home"), "HF_HUB_OFFLINE": "1"}
        child = subprocess.run(
            [sys.executable, "-c", _VERIFY_CHILD, str(folder), str(Path(scratch) / "inputs.pt"), str(Path(scratch) / "out.pt")],
            env=env, capture_output=True, text=True,
        )
        if child.returncode != 0:
            raise PushError(f"verification: the built repository does not load with AutoModel:\n{child.stderr[-3000:]}")
        actual = torch.load(Path(scratch) / "out.pt")
    reference = source.float()
    with torch.no_grad():
        embeddings = reference.vision_encoder(inputs["pixel_values"])[0]
        outputs = reference(image_embeddings=embeddings, **{k: v for k, v in inputs.items() if k != "pixel_values"})
    expected = {"image embeddings": embeddings, "masks": outputs.pred_masks, "IoU scores": outputs.iou_scores}
    diffs = {name: (actual[name] - expected[name]).abs().max().item() for name in expected}
    report = ", ".join(f"{name} {diff:.2e}" for name, diff in diffs.items())
    if not all(diff <= atol for diff in diffs.values()):
        raise PushError(f"verification failed: max abs differences {report} exceed --atol {atol:g}; nothing was uploaded")
    step(f"Verified against the source: max abs differences {report} (tolerance {atol:g})")
    return diffs


def build(args, source: SamModel, folder: Path) -> None:
    model = SamSplitModel.from_sam(source)
    model.save_pretrained(folder, max_shard_size=args.max_shard_size, safe_serialization=True)
    write_processor_files(args, folder, model.config.vision_config.image_size)
    (folder / "README.md").write_text(model_card(args, model.config))


def check_token(api: HfApi) -> None:
    """Fail before the long conversion if the Hub refuses the token."""
    try:
        user = api.whoami()
    except (HfHubHTTPError, OSError) as error:  # 4.x clients raise a plain requests.HTTPError (an OSError) here
        raise PushError(f"the Hub at {api.endpoint} refused the token or could not be reached: {error}. "
                        "Set HF_TOKEN, run `hf auth login`, or pass --token.") from error
    step(f"Pushing as {user.get('name', '?')} to {api.endpoint}")


def upload(api: HfApi, args, folder: Path) -> str:
    try:
        api.create_repo(args.repo_id, private=args.private, exist_ok=True)
        if args.revision != "main":
            api.create_branch(args.repo_id, branch=args.revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=args.repo_id,
            folder_path=folder,
            revision=None if args.create_pr else args.revision,  # pull requests always target the default branch
            create_pr=args.create_pr,
            commit_message=args.commit_message or f"Split q/k/v SAM converted from {args.source}"
            + (f"@{args.source_revision}" if args.source_revision else ""),
        )
    except HfHubHTTPError as error:
        raise PushError(f"upload to {args.repo_id} failed (nothing was committed): {error}") from error
    sha = commit.oid
    print(f"\nCommitted {sha} to {args.repo_id}" + (f" as pull request {commit.pr_url}" if commit.pr_url else
                                                      f" ({commit.commit_url})"))
    print(textwrap.dedent(f"""
        Load exactly this version (pin the commit, so neither the weights nor the code can change under you):

            from transformers import AutoModel
            model = AutoModel.from_pretrained("{args.repo_id}", trust_remote_code=True, revision="{sha}")
        """))
    return sha


def main(argv=None) -> int:
    args = parse_args(argv)
    api = None if args.no_push else HfApi(token=args.token)
    try:
        if api is not None:
            check_token(api)
        step(f"Loading the source SAM checkpoint {args.source}")
        source = load_source(args)
        # Build next to the output folder, so the finished build is moved into place in one rename.
        parent = args.output_dir.resolve().parent if args.output_dir else None
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".sam-split-build-", dir=parent) as scratch:
            folder = Path(scratch) / "repo"
            step("Splitting qkv and writing the repository")
            build(args, source, folder)
            step("Verifying: reloading the built repository with AutoModel(trust_remote_code=True) in a fresh process")
            verify(folder, source, args.atol)
            if api is not None:
                step(f"Uploading to {args.repo_id} in one commit")
                upload(api, args, folder)
            if args.output_dir is not None:
                if args.output_dir.exists():
                    args.output_dir.rmdir()  # empty, checked above
                os.replace(folder, args.output_dir)
                step(f"Repository written to {args.output_dir}")
    except PushError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

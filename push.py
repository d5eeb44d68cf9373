"""Convert a stock SAM, SAM-HQ or SAM 2.1 checkpoint to its split-q/k/v twin's repo, verify it, and publish it in one
commit.

    python push.py --source facebook/sam-vit-base --repo-id my-org/sam-vit-base-split
    python push.py --source facebook/sam2.1-hiera-tiny --repo-id my-org/sam2.1-hiera-tiny-split

builds the repository in a temporary folder (code files, config.json with a local `auto_map`, split safetensors
weights, the source's processor config, a model card), reloads it in a fresh process through
`AutoModel.from_pretrained(..., trust_remote_code=True)` and compares the outputs with the source model's on a fixed
input (image embeddings, masks and IoU scores; SAM-HQ's intermediate embeddings, SAM 2's every feature level and object
scores; the SAM 2 video twin's tracked masks over a short clip), and only then uploads everything in a single commit.
It prints the commit sha to pin with `revision=`.

A SAM 2 video checkpoint (`sam2_video`: facebook/sam2.1-hiera-* are) becomes the video twin, `Sam2VideoSplitModel`,
which tracks and keeps every memory weight; `--image-only` builds its image model instead (`Sam2SplitModel`, the video
memory weights left out and named), which is also what `--onnx` exports.

Offline (no Hub reachable), build and verify only, from a local checkpoint or from random weights:

    python push.py --source random:vit-base --output-dir sam-vit-base-split --no-push

With `--space ORG/NAME` (implies `--onnx`), a static Space follows in a commit of its own: the click-to-segment
page (docs/page.md), loading this model repo at the sha just committed.

The token comes from `HF_TOKEN` or `hf auth login` (or `--token`), the endpoint from `HF_ENDPOINT`. Any failure exits
with status 1 and one `error:` line; nothing is committed and no folder is left half-written.
"""

import argparse
import json
import math
import re
import shutil
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from string import Template

import torch
from huggingface_hub import ModelCardData, constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from transformers.dynamic_module_utils import get_relative_import_files

from sam_split.split_qkv import describe_left_out
from sam_split.tools import onnx_export, page
from sam_split.tools.cli import ToolError, check_repo_id, check_revision, local_path, parse_size, run_tool, step
from sam_split.tools.compat import hub_failure_types, set_hub_timeout, with_shipped_processor
from sam_split.tools.family import (
    RANDOM_PREFIX,
    Member,
    checkpoint_model_type,
    image_member,
    member_for_config,
    member_for_model_type,
    member_for_random,
    random_stock_model,
)
from sam_split.tools.files import atomic_output_dir, check_new_folder
from sam_split.tools.hub import hub_failure, hub_user, publish_folder
from sam_split.tools.verify import max_differences, reload_and_run, sam_outputs, verification_inputs

HERE = Path(__file__).resolve().parent
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
# A Hub id as `from_pretrained` takes it: `name` (legacy, no namespace) or `namespace/name`.
# The longest --timeout taken: the HTTP clients overflow on a time far in the future (1e300 s).
MAX_TIMEOUT_S = 86400
HUB_ID_PATTERN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Source:
    """What `--source` names, decided once: "random" (`name` is a size of `tools.family`, e.g. "sam2.1-hiera-tiny"),
    "folder" (`name` is its path) or
    "hub" (`name` is the repository id, `revision` the optional branch, tag or commit)."""

    kind: str
    name: str
    revision: str | None = None

    def __str__(self) -> str:
        if self.kind == "random":
            return RANDOM_PREFIX + self.name
        return f"{self.name}@{self.revision}" if self.revision else self.name


def nothing_to_convert(member, source) -> str:
    """Why push.py refuses a member without a twin (the SAM 3 tracker): its stock model is what the tools train."""
    return (f"--source {source} is a {member.name} model: its vision attention has separate q/k/v already, so there "
            f"is no twin to convert it to; fine-tune it as it is (python finetune.py --model {source} ...)")


def parse_source(text: str, revision: str | None) -> Source:
    """`--source` and `--source-revision` as a `Source`; a `ValueError` says what was expected."""
    if text.startswith(RANDOM_PREFIX):
        size = text[len(RANDOM_PREFIX):]
        member = member_for_random(size)  # a ValueError lists the names
        if member.twin is None:
            raise ValueError(nothing_to_convert(member, text))
        kind = "random"
    elif (path := local_path(text, flag="--source")).exists() or text.startswith((".", "/", "~")) \
            or not HUB_ID_PATTERN.match(text):
        size, kind = str(path), "folder"
    else:
        size, kind = text, "hub"
    if revision is not None and kind != "hub":
        what = "local folder" if kind == "folder" else "random model"
        raise ValueError(f"--source-revision is for Hub ids; {text!r} is a {what}")
    return Source(kind, size, revision)


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
        help="stock SAM, SAM-HQ or SAM 2/2.1 (image or video) checkpoint: a Hub model id, a local folder, or "
             "random:<size> for a randomly initialised model (demonstration only: its masks mean nothing), "
             "<size> one of sam-vit-base|large|huge, sam-hq-vit-base|large|huge, "
             "sam2.1-hiera-tiny|small|base-plus|large, sam2.1-video-hiera-tiny|small|base-plus|large "
             "(vit-base|large|huge: SAM's), or the small sam-tiny, sam-hq-tiny, sam2.1-tiny (256x256 images: each "
             "fine-tunes in minutes on a CPU), sam2.1-video-tiny (128x128, tracks on a CPU)",
    )
    source.add_argument("--image-only", action="store_true",
                        help="for a SAM 2 video checkpoint (facebook/sam2.1-hiera-* are): publish its image model "
                             "(Sam2SplitModel), leaving the video memory weights out; by default it becomes the video "
                             "twin (Sam2VideoSplitModel), which tracks, with every weight")
    source.add_argument("--source-revision", help="branch, tag or commit of a Hub --source")
    source.add_argument("--allow-pickle", action="store_true",
                        help="accept a source with only pytorch_model.bin (pickle) weights; safetensors is required "
                             "otherwise")
    target = parser.add_argument_group("target")
    target.add_argument("--repo-id", help="Hub repository to create or update, e.g. my-org/sam-vit-base-split")
    target.add_argument("--revision", default="main",
                        help="branch to commit to (created from main if missing), or refs/pr/N to update that pull "
                             "request; a tag is refused")
    target.add_argument("--private", action="store_true", help="create the repository as private")
    target.add_argument("--create-pr", action="store_true",
                        help="open a pull request against the default branch instead of committing")
    target.add_argument("--replace-all", action="store_true",
                        help="let the commit delete files of the branch that no push of ours wrote (a file a user "
                             "added is refused otherwise; see the README's publishing part)")
    target.add_argument("--commit-message", help="commit message (default: what was converted from where)")
    target.add_argument("--token", help="Hub token (default: HF_TOKEN or the token saved by `hf auth login`)")
    target.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for any answer from the Hub before giving up (default 60)")
    target.add_argument("--output-dir", type=Path, help="also keep the built repository in this new folder")
    target.add_argument("--no-push", action="store_true", help="build and verify only; needs --output-dir")
    target.add_argument("--onnx", action="store_true",
                        help="also export onnx/ (onnxruntime, transformers.js; verified in onnxruntime) into the same "
                             "commit; needs the onnx extra: pip install -e \".[onnx]\"")
    target.add_argument("--space", metavar="ORG/NAME",
                        help="also publish the click-to-segment page as a static Space that loads this repo at the "
                             "commit just made (implies --onnx; see docs/page.md)")
    target.add_argument("--transformers-js", type=Path, metavar="NODE_MODULES",
                        help="node_modules folder with @huggingface/transformers for --space (default: "
                             "tests/js/node_modules)")
    checks = parser.add_argument_group("checks")
    checks.add_argument("--max-shard-size", default="5GB", help="split weights into shards of at most this size")
    checks.add_argument("--atol", type=float, default=1e-4,
                        help="largest allowed abs difference of embeddings, masks and IoU scores vs the source (fp32)")
    args = parser.parse_args(argv)
    if args.no_push and args.output_dir is None:
        parser.error("--no-push needs --output-dir (otherwise the verified build would be thrown away)")
    if not args.no_push and args.repo_id is None:
        parser.error("--repo-id is required unless --no-push is given")
    if args.token is not None and not args.token.strip():
        parser.error("--token is empty; pass a token, or leave --token out to use HF_TOKEN or `hf auth login`")
    try:  # everything the Hub would refuse after the long conversion is refused now, with the reason
        if args.repo_id is not None:
            check_repo_id(args.repo_id, flag="--repo-id")
        if args.space is not None:
            check_repo_id(args.space, flag="--space")
        check_revision(args.revision, flag="--revision")
        args.max_shard_size = parse_size(args.max_shard_size, flag="--max-shard-size")
        if args.output_dir is not None:
            check_new_folder(args.output_dir, flag="--output-dir")
    except ToolError as error:
        parser.error(str(error))
    try:
        args.source = parse_source(args.source, args.source_revision)
    except ToolError as error:
        parser.error(str(error))
    except ValueError as error:
        parser.error(f"--source: {error}")
    if args.space and (args.no_push or args.create_pr):
        parser.error("--space loads the model at the commit pushed to a branch; drop --no-push and --create-pr")
    if args.transformers_js and not args.space:
        parser.error("--transformers-js needs --space")
    args.onnx = args.onnx or bool(args.space)
    if args.create_pr and args.revision != "main":
        parser.error("--create-pr opens a pull request against the default branch; drop --revision")
    if not (math.isfinite(args.atol) and args.atol > 0):
        parser.error(f"--atol must be a positive number, got {args.atol}")
    if not (math.isfinite(args.timeout) and 0 < args.timeout <= MAX_TIMEOUT_S):
        parser.error(f"--timeout must be a positive number of seconds up to {MAX_TIMEOUT_S} (a day), got "
                     f"{args.timeout:g}")
    return args


@dataclass(frozen=True)
class Loaded:
    """The source's stock model, its family member, and the weights of the checkpoint left out (SAM 2 video's
    memory, with `--image-only`: the twin is the image model)."""

    member: Member
    model: torch.nn.Module
    left_out: list


def load_source(source: Source, allow_pickle: bool, image_only: bool = False) -> Loaded:
    """The stock model to convert; refuses anything that is not a complete stock checkpoint of the SAM family. With
    `image_only`, a video checkpoint's image model (`tools.family.image_member`)."""
    def chosen(member: Member) -> Member:
        try:
            return image_member(member) if image_only else member
        except ValueError as error:
            raise ToolError(f"--image-only: --source {source} is a {member.name} checkpoint, an image model already "
                            "(--image-only is for SAM 2 video checkpoints)") from error

    if source.kind == "random":
        video_or_image, model = random_stock_model(source.name)
        member = chosen(video_or_image)
        model, left_out = member.twin.stock_part(model)
        return Loaded(member, model, left_out)
    if source.kind == "folder":
        folder = Path(source.name)
        if not folder.is_dir():
            raise ToolError(f"--source {source}: no such folder")
        if not (folder / "config.json").is_file():
            raise ToolError(f"--source {source}: no config.json, so not a transformers checkpoint folder")
        if not allow_pickle and not any(folder.glob("*.safetensors")):
            raise ToolError(f"--source {source}: no *.safetensors weights (pass --allow-pickle to read "
                            "pytorch_model.bin, which runs pickle code)")
    kwargs = {"revision": source.revision} if source.revision else {}
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    try:
        member = member_for_model_type(checkpoint_model_type(source.name, source.revision))
    except Exception as error:  # noqa: BLE001 - as below
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ToolError(f"--source {source}: cannot load it as a stock SAM checkpoint (SAM, SAM-HQ or SAM 2): "
                        f"{reason}") from error
    member = chosen(member)
    if member.twin is None:
        raise ToolError(nothing_to_convert(member, source))
    try:
        model, left_out = member.twin.load_stock(source.name, **kwargs)
    except Exception as error:  # noqa: BLE001 - whatever the loader raises (truncated file, wrong shape, network), the source is at fault
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ToolError(f"--source {source}: cannot load it as a stock SAM checkpoint (SAM, SAM-HQ or SAM 2): "
                        f"{reason}") from error
    return Loaded(member, model.eval(), left_out)


def source_file(source: Source, name: str) -> Path | None:
    """`name` from the source checkpoint (local folder or Hub), or None where it has none."""
    if source.kind == "random":
        return None
    if source.kind == "folder":
        path = Path(source.name) / name
        return path if path.is_file() else None
    try:
        return Path(hf_hub_download(source.name, name, revision=source.revision))
    except EntryNotFoundError:
        return None
    except hub_failure_types() as error:
        raise hub_failure(f"--source {source}: downloading {name} failed", error) from error


def write_processor_files(source: Source, destination: Path, member: Member, config) -> None:
    """Copy the source's processor configuration, so `AutoProcessor.from_pretrained(repo)` works on the result; a
    source without one gets the member's standard preprocessing. A member that ships its own processor (SAM 2: one
    without torchvision) gets its code file and `auto_map` in every processor config, for
    `AutoProcessor.from_pretrained(repo, trust_remote_code=True)`; the stock names stay, for loading without it."""
    found = {name: path for name in PROCESSOR_FILES if (path := source_file(source, name)) is not None}
    auto_map = member.processor_auto_map
    if not found:
        found = {"preprocessor_config.json": member.processor_config(config)}
    for name, path_or_contents in found.items():
        if not auto_map and isinstance(path_or_contents, Path):  # copied as it is
            shutil.copyfile(path_or_contents, destination / name)
            continue
        contents = json.loads(path_or_contents.read_text()) if isinstance(path_or_contents, Path) else path_or_contents
        if auto_map:
            contents = with_shipped_processor(contents, auto_map)
        (destination / name).write_text(json.dumps(contents, indent=2) + "\n")
    for processor in (member.processors or {}).values():
        code = sys.modules[processor.__module__].__file__
        for path in [code, *get_relative_import_files(code)]:
            shutil.copyfile(path, destination / Path(path).name)


def code_files(twin: type) -> list[str]:
    """The code files a twin's repository holds: its modeling file and every file that imports relatively (what
    `save_pretrained` copies), with its configuration file."""
    modeling = sys.modules[twin.__module__].__file__
    configuration = sys.modules[twin.config_class.__module__].__file__
    return sorted({Path(path).name for path in [modeling, configuration, *get_relative_import_files(modeling)]})


# The model card's usage code for an image model (a member's `usage` replaces it).
_IMAGE_USAGE = """\
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("$repo_id", trust_remote_code=True, revision="<commit sha>")
processor = AutoProcessor.from_pretrained("$repo_id", trust_remote_code=True, revision="<commit sha>")
inputs = processor(images=image, input_points=[[[450, 600]]], input_labels=[[1]], return_tensors="pt")
outputs = model(**inputs)
masks = $post_process"""


def model_card(source: Source, repo_name: str, config, files: list[str] | None = None, left_out=()) -> str:
    """The README.md: YAML metadata (`base_model` only for a Hub source: a local path or a random model is no Hub
    model to link to) and the usage text of model_card_template.md, naming the family, the code `files` the
    repository holds (default: those the twin's `save_pretrained` writes) and the source weights `left_out`."""
    member = member_for_config(config)
    random_weights = source.kind == "random"
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="mask-generation",
        license="apache-2.0",
        base_model=source.name if source.kind == "hub" else None,
        tags=[*member.card_tags, "custom_code", "lora", "peft"] + (["random-weights"] if random_weights else []),
    )
    described = {
        "random": f"`{source}`",
        "folder": f"the local checkpoint `{Path(source.name).name}`",
        "hub": f"`{source.name}` (revision `{source.revision or 'main'}`)",
    }[source.kind]
    body = Template((HERE / "model_card_template.md").read_text()).substitute(
        repo_id=repo_name,
        family=member.name,
        family_doc=member.doc_url,
        twin=member.twin.__name__,
        stock=member.stock_class.__name__,
        source=described,
        sizes=member.describe(config),
        code_files=", ".join(f"`{name}`" for name in (files if files is not None else code_files(member.twin))),
        usage=Template(member.usage or _IMAGE_USAGE).safe_substitute(repo_id=repo_name,
                                                                     post_process=member.post_process),
        left_out=f"The source is a video model: {describe_left_out(left_out)} were left out; this is its image "
                 "model.\n" if left_out else "",
        warning="> **Randomly initialised weights**: this repository was built from `random:` for demonstration; "
                "its masks mean nothing.\n" if random_weights else "",
    )
    return f"---\n{card_data.to_yaml()}\n---\n\n{body}"


def verify(folder: Path, source: torch.nn.Module, twin_name: str, atol: float) -> dict:
    """Reload `folder` as a user would (fresh process, empty modules cache, remote code) and compare its image
    embeddings, masks and IoU scores with `source`'s. Returns the max abs differences; a `ToolError` if any is above
    `atol`."""
    inputs = verification_inputs(source.config)
    started = time.monotonic()
    reloaded = reload_and_run({"the build": (str(folder), None)}, inputs, progress=lambda line: step(f"  {line}"))
    reloaded = next(iter(reloaded.values()))
    if reloaded.model_class != twin_name:
        raise ToolError(f"verification: AutoModel built a {reloaded.model_class}, not a {twin_name}")
    step("Computing the source's outputs on the same input")
    diffs = max_differences(reloaded.outputs, sam_outputs(source.float(), inputs))
    report = ", ".join(f"{name} {diff:.2e}" for name, diff in diffs.items())
    if not all(diff <= atol for diff in diffs.values()):
        raise ToolError(f"verification failed: max abs differences {report} exceed --atol {atol:g}; nothing was "
                        "uploaded")
    step(f"Verified against the source in {time.monotonic() - started:.0f} s: max abs differences {report} "
         f"(tolerance {atol:g})")
    return diffs


def build(loaded: Loaded, source: Source, folder: Path, repo_name: str, max_shard_size: str,
          onnx: bool = False) -> None:
    """Write the split repository into `folder`: code, config, weights, processor config, model card, and with `onnx`
    the onnx/ graphs, verified in onnxruntime against the source model."""
    step("Splitting qkv")
    model = loaded.member.twin.from_stock(loaded.model)
    step(f"Writing the repository (weights in shards of at most {max_shard_size})")
    model.save_pretrained(folder, max_shard_size=max_shard_size, safe_serialization=True)
    write_processor_files(source, folder, loaded.member, model.config)
    files = sorted(path.name for path in folder.glob("*.py"))
    (folder / "README.md").write_text(model_card(source, repo_name, model.config, files, loaded.left_out))
    if onnx:
        onnx_export.export_model(model, folder, reference=loaded.model)


def push(args) -> None:
    set_hub_timeout(args.timeout)
    if args.onnx:  # a missing onnx extra fails now, not after the long conversion
        onnx_export.require_onnx()
    assets = page.find_assets(args.transformers_js) if args.space else None  # likewise the page's files
    if not args.no_push:  # a refused token fails now, not after the long conversion
        step(f"Pushing as {hub_user(args.token)} to {constants.ENDPOINT}")
    # The build folder first: an unwritable --output-dir is reported before the long conversion.
    with atomic_output_dir(args.output_dir) as folder:
        step(f"Loading the source checkpoint {args.source}")
        loaded = load_source(args.source, args.allow_pickle, args.image_only)
        if args.onnx and loaded.member.image_stock_type:
            raise ToolError("--onnx exports the image model's two graphs (transformers.js has no memory path); add "
                            "--image-only to publish the image twin with them")
        if args.onnx:  # a member without an ONNX layout fails now, not after conversion and verification
            onnx_export.export_spec(loaded.model.config)
        step(f"Converting a stock {loaded.member.stock_class.__name__} to {loaded.member.twin.__name__}"
             + (f"; left out {describe_left_out(loaded.left_out)}" if loaded.left_out else ""))
        build(loaded, args.source, folder, args.repo_id or args.output_dir.name, args.max_shard_size,
              args.onnx)
        step("Verifying: reloading the built repository with AutoModel(trust_remote_code=True) in a fresh process")
        verify(folder, loaded.model, loaded.member.twin.__name__, args.atol)
        if not args.no_push:
            size_mb = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 1e6
            step(f"Uploading {size_mb:.1f} MB to {args.repo_id} in one commit that makes {args.revision} hold exactly "
                 "this folder (the files it does not hold are deleted, and named)")
            commit = publish_folder(
                folder, args.repo_id, revision=args.revision, create_pr=args.create_pr, private=args.private,
                token=args.token, commit_message=args.commit_message or f"Split q/k/v SAM converted from {args.source}",
                replace_all=args.replace_all,
            )
            if commit.deleted:
                step(f"Deleted {len(commit.deleted)} files the folder does not hold: {', '.join(commit.deleted)}")
            note = f" ({commit.note})" if commit.note else ""
            step(f"Checked: commit {commit.sha} holds exactly the verified files{note}")
    if assets is not None:
        space = publish_space(args, assets, commit.sha)
    if not args.no_push:
        print(f"\nCommitted {commit.sha} to {args.repo_id}"
              + (f" as pull request {commit.url}" if commit.pull_request else f" ({commit.url})"))
        print(textwrap.dedent(f"""
            Load exactly this version (pin the commit, so neither the weights nor the code can change under you):

                from transformers import AutoModel
                model = AutoModel.from_pretrained("{args.repo_id}", trust_remote_code=True, revision="{commit.sha}")
            """))
    if assets is not None:
        print(f"Space: committed {space.sha} to {space.url.rsplit('/commit/', 1)[0]}; it loads {args.repo_id} at "
              f"{commit.sha}")
    if args.output_dir is not None:
        step(f"Repository written to {args.output_dir}")


def publish_space(args, assets, model_sha: str):
    """The click-to-segment page as a static Space (`args.space`) loading `args.repo_id` at `model_sha`, in one
    commit."""
    with atomic_output_dir(None) as folder:
        page.write_page(folder, assets, page.page_config(args.repo_id, model_sha, constants.ENDPOINT))
        (folder / "README.md").write_text(page.space_card(args.space.split("/")[-1], args.repo_id, model_sha))
        step(f"Publishing the page as the static Space {args.space}, loading {args.repo_id} at {model_sha}")
        try:
            return publish_folder(folder, args.space, repo_type="space", space_sdk="static", private=args.private,
                                  token=args.token,
                                  commit_message=f"Click-to-segment page for {args.repo_id}@{model_sha}")
        except ToolError as error:
            raise ToolError(f"the model is committed ({args.repo_id}@{model_sha}), but the Space is not: {error}"
                            ) from error


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_tool(lambda: push(args))


if __name__ == "__main__":
    sys.exit(main())

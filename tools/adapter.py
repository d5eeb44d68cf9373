"""The LoRA adapter finetune.py makes, as files and on the Hub: its trainable weights, saving it into OUT with its card,
pushing it, merging it into a stock `SamModel`, and publishing a finished run again (`--publish-only`). The card's
text is `adapter_card`'s; which base and adapter are loaded, `models`'."""

import copy
import json
import shutil
from pathlib import Path

import torch
from peft import PeftModel

from .adapter_card import adapter_notes, base_license, hub_dataset, model_card
from .cli import Location, ToolError
from .files import atomic_output_dir
from .hub import publish_folder
from .models import BASE_MODEL_TYPE_KEY, adapter_base, load_adapter, load_model, resolve_model
from .processing import model_family, model_processor
from .verify import max_differences, sam_outputs, verification_inputs

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")
RUN_RECORD = "run.json"  # OUT/run.json: the run's settings, whether it finished, the adapter's step
# The base is loaded through transformers' AutoModel (its repo carries the code, `auto_map`), so that
# `AutoPeftModel.from_pretrained(adapter, trust_remote_code=True)` works without this package installed.
AUTO_MAPPING = {"base_model_class": "AutoModel", "parent_library": "transformers"}


def trainable_state(model) -> dict:
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)


def write_card(output_dir: Path, record: dict, base: Location, repo_name: str, log) -> str:
    """The card of the adapter in `output_dir` from its run record and eval_results.json."""
    results_path = output_dir / "eval_results.json"
    results = json.loads(results_path.read_text())["fine_tuned"] if results_path.exists() else None
    hyperparameters = {"steps": record.get("steps"), **record.get("hyperparameters", {})}
    datasets = [hub_dataset(record.get("train_data")), hub_dataset(record.get("val_data"))]
    return model_card(base, repo_name, base_license(base.name, base.revision), datasets, record.get("val_data"),
                      results, hyperparameters, adapter_notes(record), record.get("data"))


def save_adapter(model, output_dir: Path, card: str):
    """Write the adapter files into OUT, moved in from a temporary folder with `adapter_config.json` last (and removed
    first), so OUT never holds a config next to another run's or a half-written weights file."""
    if not all_finite(trainable_state(model).values()):
        raise ToolError("trainable weights are not finite; not saving the adapter")
    with atomic_output_dir(output_dir, existing="update", last="adapter_config.json", prefix=".adapter-") as build:
        model.save_pretrained(str(build))
        config_path = build / "adapter_config.json"
        # auto_mapping also records which twin the adapter was trained on (`models.load_adapter` checks it)
        auto_mapping = {**AUTO_MAPPING, BASE_MODEL_TYPE_KEY: model.get_base_model().config.model_type}
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "auto_mapping": auto_mapping},
                                          indent=2, sort_keys=True))
        (build / "README.md").write_text(card)


def push_adapter(output_dir: Path, repo: str, message: str, replace_all: bool = False) -> str:
    try:
        with atomic_output_dir(None, prefix="sam-split-adapter-") as staged:  # the repo becomes exactly these files
            for name in ADAPTER_FILES:
                if (output_dir / name).is_file():
                    shutil.copyfile(output_dir / name, staged / name)
            commit = publish_folder(staged, repo, commit_message=message, replace_all=replace_all)
    except ToolError as error:
        raise ToolError(f"{error}.\nThe adapter is complete in {output_dir}; publish it again with:\n"
                         f"  python finetune.py --output-dir {output_dir} --publish-only --push-to {repo}") from None
    note = f" ({commit.note})" if commit.note else ""
    print(f"pushed adapter to {repo} at revision {commit.sha}{note}\n  {commit.url}")
    return commit.sha


def merge_to_sam(model: PeftModel, processor, target: Path):
    """Merge the adapter into a copy of the base, convert to a stock `SamModel`, check its outputs, save atomically."""
    model.eval()
    merged = copy.deepcopy(model).merge_and_unload()
    sam = merged.to_sam()
    inputs = {name: tensor.to(model.device) for name, tensor in verification_inputs(model.config).items()}
    expected = sam_outputs(model, inputs)
    differences = max_differences(sam_outputs(sam, inputs), expected)
    difference = max(differences.values())
    tolerance = 1e-4 * max(1.0, max(tensor.abs().max().item() for tensor in expected.values()))
    if difference > tolerance:
        raise ToolError(f"merged SamModel differs from the adapted model: {differences} > {tolerance:.1e}")
    # "refuse", not "replace": DIR was checked new when the run started, and a file a user put there since is kept
    # (refused now, or found at the end and the merged model kept beside it).
    with atomic_output_dir(target, prefix=".merged-", flag="--merge-to-sam") as build:
        sam.save_pretrained(str(build))
        processor.save_pretrained(str(build))
    print(f"merged stock SamModel saved to {target} (max |diff| vs adapter {difference:.1e})")


def check_merge_to_sam(config) -> None:
    if model_family(config) != "sam":
        raise ToolError(f"--merge-to-sam makes a stock SamModel; this model is {model_family(config)}")


def publish(model: PeftModel, output_dir: Path, push_to: str | None, merge_to: str | None, message: str,
            replace_all: bool = False):
    """Merge first (local, checked), then push: a failed push leaves a complete folder to publish again."""
    if merge_to:
        check_merge_to_sam(model.config)
        try:
            merge_to_sam(model, model_processor(model.config), Path(merge_to))
        except ToolError as error:
            raise ToolError(f"{error}. The adapter is complete in {output_dir}; merge it again with:\n"
                            f"  python finetune.py --output-dir {output_dir} --publish-only --merge-to-sam NEW_DIR"
                            ) from None
    if push_to:
        push_adapter(output_dir, push_to, message, replace_all)


def publishable_base(recorded: Location, given: Location | None, push_to: str | None) -> Location:
    """The base the published adapter names: `given` (`--model`/`--base-revision` at publish time) or the recorded
    one. Pushing needs a Hub id at a commit sha: a path of this machine is useless to users (and private)."""
    base = given or recorded
    if push_to and not (base.is_hub and len(base.revision or "") == 40):
        raise ToolError(f"--push-to: the adapter's base is {base.name}, a folder of this machine, not a Hub id at a "
                        "commit sha, and a published adapter must name a base its users can load. Publish the base "
                        "(push.py) and name it: --model ORG/NAME --base-revision SHA (the same weights)")
    return base


def check_same_weights(base, recorded: Location) -> None:
    """When the adapter was trained on a local folder that still exists, the base named for publishing must hold
    exactly its weights."""
    if recorded.is_hub or not Path(recorded.name).is_dir():
        return
    trained_on = load_model(recorded).state_dict()
    named = base.state_dict()
    if named.keys() != trained_on.keys() or any(not torch.equal(named[k], trained_on[k]) for k in named):
        raise ToolError(f"--model does not hold the weights of {recorded.name}, the base the adapter was trained on")


def publish_finished(output_dir: Path, push_to: str | None, merge_to: str | None, allow_unfinished: bool,
                     base_text: str | None, base_revision: str | None, log=print,
                     replace_all: bool = False) -> PeftModel:
    """`--publish-only`: push and/or merge the adapter a finished run left in `output_dir`. An unfinished run (no
    finished run.json: stopped before its end) is refused unless `allow_unfinished`. Before a push, the adapter's
    config and card are written again, naming the Hub base, so no path of this machine is published."""
    record_path = output_dir / RUN_RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if not record.get("finished"):
        if not allow_unfinished:
            raise ToolError(f"{output_dir} holds an unfinished run (its {RUN_RECORD} does not say it finished: it was "
                            "stopped before its last step), so its adapter is an intermediate one. Finish it with "
                            "--resume, or pass --allow-unfinished to publish that adapter anyway")
        log(f"warning: publishing the adapter of an unfinished run (step {record.get('adapter_step', '?')})")
    name, revision = adapter_base(json.loads((output_dir / "adapter_config.json").read_text()))
    recorded = Location("hub", name, revision) if revision else Location("local", name)
    given = resolve_model(base_text, base_revision) if base_text else None
    base_location = publishable_base(recorded, given, push_to)
    base = load_model(base_location)
    if given is not None:
        check_same_weights(base, recorded)
    model = load_adapter(base, Location("local", str(output_dir.absolute())))
    if push_to:
        model.peft_config["default"].base_model_name_or_path = base_location.name
        model.peft_config["default"].revision = base_location.revision
        save_adapter(model, output_dir, write_card(output_dir, record, base_location, push_to, log))
    publish(model, output_dir, push_to, merge_to, f"LoRA adapter from {output_dir.name}", replace_all)
    return model

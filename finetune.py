#!/usr/bin/env python3
"""Fine-tune a split-q/k/v twin of SAM, SAM-HQ or SAM 2 with LoRA on the vision encoder's `q`/`v` (optionally the
whole mask decoder too).

Each step encodes every image once and decodes up to `--objects-per-image` of its objects against that one image
embedding, each prompted by a box (and/or positive and negative points) drawn from its mask, as SAM's own training
does; Dice + BCE (or focal) loss on SAM's low-resolution masks (256x256 at image_size 1024); AdamW. Validation scores
Dice and IoU at each image's original resolution, per object, per image and per class, before training (the base
model) and every `--eval-every` steps. Runs as is under `accelerate launch`.

    python finetune.py --model ORG/sam-split-vit-base --base-revision BASE_SHA \\
        --train-data data/train --val-data data/val --output-dir out/run1 --max-steps 2000 \\
        [--train-decoder] [--save-every 200] [--eval-every 200] [--metric-for-best dice] [--report-to tensorboard] \\
        [--push-to ORG/my-adapter] [--merge-to-sam out/sam]

    accelerate launch --multi_gpu --num_processes 2 finetune.py ...           # DDP on 2 GPUs
    accelerate launch --multi_gpu --num_processes 2 finetune.py --cpu ...     # DDP on CPU (gloo)
    python finetune.py --output-dir out/run1 --publish-only --push-to ORG/my-adapter   # publish a finished run again

Data (`--train-data`, `--val-data`): see `tools/data.py`. Every file is read once before training: an image without
masks, an empty or non-binary mask, a mask whose size differs from its image and an unreadable file are counted,
printed and skipped (`--strict-data` makes them errors), so no bad sample can stop a run half-way.

OUT receives the PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`, a model card), loadable with
`PeftModel.from_pretrained(base, OUT)` or `AutoPeftModel.from_pretrained(OUT, trust_remote_code=True)`; its config
records the base repository and the resolved commit sha of the base. `OUT/checkpoints/step-NNNNNNNN` (8 digits)
hold `accelerator.save_state` checkpoints (trainable weights, optimizer, scheduler, step; the newest 2 are kept);
`--resume` continues the same run: same steps, same data order, same weights. `OUT/metrics.jsonl` logs the training
loss per step and each validation; `OUT/eval_results.json` puts the base model's scores next to the fine-tuned ones;
`OUT/overlays/step-NNNNNNNN/` shows ground truth and prediction on a fixed set of validation images; `OUT/curves.png`
plots loss, learning rate, Dice and IoU; `OUT/run.json` says whether the run finished and which step the adapter is
from (`--publish-only` reads it).

`main` reads top to bottom as transformers' `run_*_no_trainer.py` scripts do: settings (`parse_args`, every flag
checked), base model and data (checked and scanned before the weights load), model, optimizer, resume, the training
loop (`train_step`, `validate`, reports), then the reports and the adapter (`finish`), then publishing.
"""

import argparse
import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file
from tqdm.auto import tqdm

from sam_split.tools.adapter_card import adapter_notes, base_license, data_description, hub_dataset, model_card
from sam_split.tools.arguments import add_loader_arguments, add_model_arguments, add_prompt_arguments, integer, number
from sam_split.tools.cli import Location, ToolError, check_name_lengths, locate, run_tool
from sam_split.tools.compat import set_hub_timeout
from sam_split.tools.data import add_data_arguments, data_options, open_source, scan
from sam_split.tools.files import atomic_output_dir, check_new_folder
from sam_split.tools.hub import publish_folder
from sam_split.tools.models import (
    BASE_MODEL_TYPE_KEY,
    adapter_base,
    load_adapter,
    load_model,
    model_config,
    resolve_model,
)
from sam_split.tools.processing import model_family, model_processor
from sam_split.tools.segmentation import PromptedImages, collate, evaluate, object_losses, summarize
from sam_split.tools.verify import max_differences, sam_outputs, verification_inputs
from sam_split.tools.visualize import overlay, plot_curves

CHECKPOINTS = "checkpoints"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")
RUN_RECORD = "run.json"  # OUT/run.json: the run's settings, whether it finished, the adapter's step
DECODER = "mask_decoder"
HUB_TIMEOUT_S = 60  # an unanswered Hub request fails after this long instead of hanging the run
DEFAULT_MAX_STEPS = 1000  # --max-steps when none is given: the startup lines say how many epochs that is
# Scores `--metric-for-best` can choose from (all from full-resolution validation); lower is better only for loss.
BEST_METRICS = ("dice", "iou", "image_dice", "image_iou", "loss")
# A validation's scores, stored in metrics.jsonl as `val_<name>` (`validation_entry` / `validation_scores`).
VALIDATION_SCORES = (*BEST_METRICS, "classes")
# The base is loaded through transformers' AutoModel (its repo carries the code, `auto_map`), so that
# `AutoPeftModel.from_pretrained(adapter, trust_remote_code=True)` works without this package installed.
AUTO_MAPPING = {"base_model_class": "AutoModel", "parent_library": "transformers"}


# ---------------------------------------------------------------------------------------------------------- model


def build_model(base, lora_r, lora_alpha, lora_dropout, target_modules, train_decoder, gradient_checkpointing,
                base_location: Location) -> PeftModel:
    """LoRA on `target_modules` of the loaded `base` (and the whole mask decoder with `train_decoder`); the adapter
    records `base_location` (a Hub id at its sha, or the local folder) as its base."""
    if gradient_checkpointing:
        # Non-reentrant: the frozen inputs of the checkpointed layers need no `requires_grad` for LoRA to get grads.
        base.activation_checkpointing_enable({"use_reentrant": False})
    config = LoraConfig(
        r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
        modules_to_save=[DECODER] if train_decoder else None,
        task_type=None,  # the task types feed `input_ids`, which SAM does not take
    )
    model = get_peft_model(base, config, revision=base_location.revision)
    model.peft_config["default"].base_model_name_or_path = base_location.name
    for target in target_modules:
        if not any(name.endswith(f".{target}") and hasattr(module, "lora_A") for name, module in model.named_modules()):
            raise ToolError(f"--target-modules entry {target!r} matches no Linear layer of the model")
    return model


def trainable_state(model) -> dict:
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, param in sorted(trainable_state(model).items()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)


# ----------------------------------------------------------------------------------------------------- checkpoints


class TrainState:
    """Step counter and best-score bookkeeping, checkpointed with `accelerator.register_for_checkpointing`."""

    def __init__(self):
        self.step, self.best, self.best_step, self.evals_since_best = 0, None, None, 0

    def state_dict(self):
        return {"step": self.step, "best": self.best, "best_step": self.best_step,
                "evals_since_best": self.evals_since_best}

    def load_state_dict(self, state):
        self.step, self.best = state["step"], state.get("best")
        self.best_step, self.evals_since_best = state.get("best_step"), state.get("evals_since_best", 0)

    def improves(self, value: float, lower_is_better: bool) -> bool:
        """Record `value`; True when it is the best so far."""
        if self.best is None or (value < self.best if lower_is_better else value > self.best):
            self.best, self.best_step, self.evals_since_best = value, self.step, 0
            return True
        self.evals_since_best += 1
        return False


def keep_trainable_weights(models, weights, output_dir):
    """`save_state` pre-hook: checkpoint only the trainable weights (the base is pinned by name and revision)."""
    for i, model in enumerate(models):
        names = {name for name, param in model.named_parameters() if param.requires_grad}
        weights[i] = {name: tensor for name, tensor in weights[i].items() if name in names}


def step_folder(step: int) -> str:
    """The name of a step's checkpoint and overlay folders: `step-00000200` (8 digits, so names sort by step)."""
    return f"step-{step:08d}"


def save_checkpoint(accelerator, model, output_dir: Path, step: int, keep: int, run: dict):
    """Save the run's state as CHECKPOINTS/step-NNNNNNNN through the atomic writer, so a folder with such a name is
    always complete (a full disk is one line and leaves none); the processes of a distributed run write into one build
    folder (each saves its own RNG state), then the oldest checkpoints beyond `keep` go."""
    if not all_finite(trainable_state(model).values()):  # never a checkpoint that --resume would diverge from
        raise ToolError(f"trainable weights are not finite at step {step}; not saving a checkpoint")
    final = output_dir / CHECKPOINTS / step_folder(step)
    shared = accelerator.wait_for_everyone if accelerator.num_processes > 1 else None
    try:
        with atomic_output_dir(final, existing="replace", prefix=f".{final.name}-", flag="checkpoint", shared=shared,
                               main_process=accelerator.is_main_process) as build:
            accelerator.save_state(str(build))
            if accelerator.is_main_process:
                (build / "run.json").write_text(json.dumps(run, indent=1))
    except ToolError as error:  # e.g. a full disk: the run stops; say where it can go on from
        raise ToolError(f"{error}; {resume_hint(output_dir)}") from None
    if accelerator.is_main_process:
        for old in sorted((output_dir / CHECKPOINTS).glob("step-*[0-9]"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, model, path: Path, run: dict):
    """Restore the checkpoint at `path` into the prepared objects, refusing one made with other run settings."""
    from safetensors import safe_open

    saved_run = json.loads((path / "run.json").read_text())
    changed = {k: (saved_run.get(k), v) for k, v in run.items() if saved_run.get(k) != v}
    if changed:
        raise ToolError("--resume with settings that differ from the checkpoint's run: "
                         + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))
    with safe_open(str(path / "model.safetensors"), "pt") as saved:
        saved_names = set(saved.keys())
    expected = {name for name, param in model.named_parameters() if param.requires_grad}
    if saved_names != expected:
        raise ToolError(f"checkpoint {path} does not hold this model's trainable weights (missing "
                         f"{sorted(expected - saved_names)[:4]}, unexpected {sorted(saved_names - expected)[:4]})")
    accelerator.load_state(str(path), strict=False)  # the file holds the trainable weights alone


def resume(accelerator, model, output_dir: Path, which: str, run: dict, log) -> Path:
    """Load `which` (a checkpoint folder) or, for "latest", the newest readable checkpoint of the run: an unreadable
    one (interrupted copy, corrupt file) is named and the next older one is tried."""
    if which != "latest":
        candidates = [Path(which)]
        if not (candidates[0] / "run.json").exists():
            raise ToolError(f"--resume {which} is not a checkpoint folder of finetune.py")
    else:
        candidates = sorted((output_dir / CHECKPOINTS).glob("step-*[0-9]"), reverse=True)
        if not candidates:
            raise ToolError(f"--resume: no checkpoint in {output_dir / CHECKPOINTS}")
    for position, path in enumerate(candidates):
        try:
            load_checkpoint(accelerator, model, path, run)
            return path
        except ToolError:
            raise
        except Exception as error:
            reason = f"checkpoint {path} is unreadable ({type(error).__name__}: {error})"
            if position + 1 == len(candidates):
                older = "; no older checkpoint is kept" if position else ""
                raise ToolError(f"--resume: {reason}{older}") from None
            log(f"warning: {reason}; falling back to {candidates[position + 1]}")




def latest_checkpoint(output_dir: Path) -> Path | None:
    return max((output_dir / CHECKPOINTS).glob("step-*[0-9]"), default=None)


def resume_hint(output_dir: Path) -> str:
    """How to go on after the run stopped: the newest checkpoint and `--resume`, or why there is none."""
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is None:
        return "no checkpoint was saved (--save-every N saves them), so a new run starts from the beginning"
    return f"the last checkpoint is {checkpoint}: run the same command with --resume to continue from it"


# --------------------------------------------------------------------------------------------------------- metrics


def validation_entry(step: int, scores: dict) -> dict:
    """A validation as a metrics.jsonl line: each score `name` stored as `val_<name>`."""
    return {"step": step, **{f"val_{name}": scores[name] for name in VALIDATION_SCORES}}


def validation_scores(entry: dict) -> dict:
    """The scores of a metrics.jsonl validation line (the inverse of `validation_entry`), with the object count."""
    scores = {name: entry[f"val_{name}"] for name in VALIDATION_SCORES}
    return {**scores, "objects": sum(c["objects"] for c in scores["classes"].values())}


def read_metrics(path: Path, log) -> list:
    """The entries of metrics.jsonl. A torn last line (the run was killed while writing it) is dropped with a word;
    a damaged line before it is an error."""
    lines = path.read_text().splitlines() if path.exists() else []
    entries = []
    for number_, line in enumerate(lines, 1):
        try:
            entries.append(json.loads(line))
        except ValueError:
            if number_ < len(lines):
                raise ToolError(f"{path} line {number_} is not JSON: the file was changed by hand or damaged") from None
            log(f"warning: dropped the torn last line of {path} (the run was stopped while writing it)")
    return entries


def keep_metrics_until(path: Path, step: int, log) -> None:
    """On --resume: drop what the interrupted run logged after the checkpoint's step (and a torn last line)."""
    kept = [entry for entry in read_metrics(path, log) if entry["step"] <= step]
    if path.exists():
        path.write_text("".join(json.dumps(entry) + "\n" for entry in kept))


def write_run_record(output_dir: Path, record: dict) -> None:
    """OUT/run.json, replaced whole (written beside, then renamed)."""
    partial = output_dir / f".{RUN_RECORD}.partial"
    partial.write_text(json.dumps(record, indent=1))
    os.replace(partial, output_dir / RUN_RECORD)


# --------------------------------------------------------------------------------------------------------- outputs


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


def side_by_side(base: dict, tuned: dict, tuned_step: int) -> str:
    """A table of the base model's validation scores (step 0) next to the fine-tuned ones, per class."""
    rows = [("all", base, tuned)] + [(name, base["classes"].get(name), scores)
                                     for name, scores in tuned["classes"].items()]
    header = f"{'class':<20} {'base dice':>10} {'dice':>8} {'base iou':>9} {'iou':>8}"
    lines = [f"{header}   (fine-tuned: step {tuned_step})"]
    for name, before, after in rows:
        before = before or {"dice": math.nan, "iou": math.nan}
        lines.append(f"{name:<20} {before['dice']:>10.4f} {after['dice']:>8.4f} {before['iou']:>9.4f} "
                     f"{after['iou']:>8.4f}")
    return "\n".join(lines)


class StreamBatchSampler:
    """Endless per-process batches of `(epoch, index)` (images), starting at micro-batch `start`.

    Epoch e is a permutation of the images seeded by `(seed, e)`, wrapped around to a whole number of global batches
    (`batch_size * num_processes`); global batch g gives process r its slice r. Micro-batch m of every process is thus
    a pure function of m, which is what makes `--resume` continue with exactly the data an uninterrupted run would see.
    """

    def __init__(self, num_samples, batch_size, num_processes, process_index, seed, start=0):
        self.num_samples, self.batch_size, self.seed, self.start = num_samples, batch_size, seed, start
        self.num_processes, self.process_index = num_processes, process_index
        self.batches_per_epoch = math.ceil(num_samples / (batch_size * num_processes))

    def __iter__(self):
        micro, order_epoch = self.start, None
        global_batch = self.batch_size * self.num_processes
        while True:
            epoch, batch = divmod(micro, self.batches_per_epoch)
            if epoch != order_epoch:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
                order, order_epoch = np.resize(order, self.batches_per_epoch * global_batch), epoch  # wraps around
            begin = batch * global_batch + self.process_index * self.batch_size
            yield [(epoch, int(i)) for i in order[begin : begin + self.batch_size]]
            micro += 1


def trackers(report_to: str) -> list:
    """`--report-to` as accelerate's `log_with`; a tracker asked for by name must be installed."""
    import importlib.util

    if report_to == "none":
        return []
    wanted = ["tensorboard", "wandb"] if report_to == "all" else [report_to]
    packages = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
    available = [name for name in wanted if any(importlib.util.find_spec(p) for p in packages[name])]
    if report_to != "all" and not available:
        raise ValueError(f"--report-to {report_to} needs the `{report_to}` package: pip install {report_to}")
    return available


# -------------------------------------------------------------------------------------------------------- settings


def check_output_dir(path: Path, resume: str | None) -> None:
    """A `ToolError` unless `path` can receive this run's outputs: a new folder, or with --resume a run's folder.
    Checked before anything slow, creating nothing (a failed run leaves no empty folder behind)."""
    check_name_lengths(path, flag="--output-dir")
    try:
        check_new_folder(path, empty=not resume)
    except ToolError as error:
        if not resume and path.is_dir() and any(path.iterdir()):  # it may be a run to continue
            raise ToolError(f"{error}, or pass --resume to continue its run") from None
        raise
    if resume == "latest" and latest_checkpoint(path) is None:
        raise ToolError(f"--resume: no checkpoint in {path / CHECKPOINTS}")


def add_lora_arguments(parser) -> None:
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora-r", type=integer(1), default=8)
    lora.add_argument("--lora-alpha", type=number(0, above=True), default=16)
    lora.add_argument("--lora-dropout", type=number(0, 1, below=True), default=0.1, help="in [0, 1)")
    lora.add_argument("--target-modules", default="q,v",
                      help="comma-separated module names (default q,v: only the vision encoder has these)")
    lora.add_argument("--train-decoder", action="store_true",
                      help="also train the whole mask decoder (PEFT modules_to_save)")


def add_training_arguments(parser) -> None:
    train = parser.add_argument_group("training")
    train.add_argument("--max-steps", type=integer(1), default=DEFAULT_MAX_STEPS,
                       help=f"optimizer steps (default {DEFAULT_MAX_STEPS}; the startup lines say how many epochs)")
    train.add_argument("--gradient-accumulation-steps", type=integer(1), default=1)
    train.add_argument("--lr", type=number(0, 1, above=True), default=1e-4,
                       help="AdamW learning rate, in (0, 1] (LoRA usually takes 1e-5 to 1e-2)")
    train.add_argument("--weight-decay", type=number(0), default=0.01)
    train.add_argument("--lr-scheduler", choices=("constant", "linear", "cosine"), default="constant")
    train.add_argument("--warmup-steps", type=integer(0), default=0)
    train.add_argument("--max-grad-norm", type=number(0), default=1.0, help="0 disables clipping")
    train.add_argument("--loss", choices=("bce", "focal"), default="bce", help="pixel loss added to Dice")
    train.add_argument("--iou-loss-weight", type=number(0), default=0.0,
                       help="weight of an MSE loss on the IoU head (useful with --train-decoder)")
    train.add_argument("--gradient-checkpointing", action="store_true", help="recompute vision layers in backward")


def add_run_arguments(parser) -> None:
    run = parser.add_argument_group("evaluation, checkpoints, outputs")
    run.add_argument("--eval-every", type=integer(1),
                     help="validate every N steps (default 200 with --val-data), at step 0 and at the end")
    run.add_argument("--metric-for-best", choices=BEST_METRICS,
                     help="keep the adapter of the best validation score instead of the last one")
    run.add_argument("--early-stopping-patience", type=integer(1), metavar="N",
                     help="stop after N validations in a row without a better --metric-for-best")
    run.add_argument("--report-to", choices=("none", "tensorboard", "wandb", "all"), default="none",
                     help="also log scalars and overlays through accelerate's trackers (TensorBoard: OUT/runs)")
    run.add_argument("--save-every", type=integer(0), default=0,
                     help="checkpoint every N steps and at the end (0: never)")
    run.add_argument("--keep-checkpoints", type=integer(0), default=2, help="newest checkpoints kept (0: all)")
    run.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                     help="continue the run in --output-dir from its newest checkpoint (or from CHECKPOINT)")
    run.add_argument("--push-to", metavar="REPO", help="upload the adapter to this Hub repo and print the commit sha")
    run.add_argument("--replace-all", action="store_true",
                     help="let --push-to delete files of REPO that no push of ours wrote (refused otherwise)")
    run.add_argument("--merge-to-sam", metavar="DIR", help="also save the merged model as a stock SamModel in DIR")
    run.add_argument("--publish-only", action="store_true",
                     help="do not train: push (--push-to) and/or merge (--merge-to-sam) the adapter that a finished "
                          "run left in --output-dir (--model/--base-revision name its base on the Hub)")
    run.add_argument("--allow-unfinished", action="store_true",
                     help="--publish-only: also publish the adapter of a run that was stopped before its end")


def parse_args(argv=None) -> argparse.Namespace:
    """The settings, every flag checked (`check_settings`) before anything slow starts."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, model_help="split-q/k/v twin of SAM, SAM-HQ or SAM 2 (made by push.py): Hub id or "
                                           "local folder (required unless --publish-only)")
    data = parser.add_argument_group("data and outputs")
    data.add_argument("--train-data", help="training data (see tools/data.py; required unless --publish-only)")
    data.add_argument("--val-data", help="same formats; enables validation (Dice and IoU)")
    data.add_argument("--output-dir", required=True, help="adapter, checkpoints/, metrics.jsonl and pictures go here")
    add_data_arguments(parser)
    add_prompt_arguments(parser, training=True)
    add_loader_arguments(parser, overlay_images=4)
    add_lora_arguments(parser)
    add_training_arguments(parser)
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    problem = check_settings(args)
    if problem:
        parser.error(problem)
    return args


def check_settings(args) -> str | None:
    """What is wrong with the settings as a whole (flags that need or exclude each other, names, the output
    folder), or None; fills in `target_modules` (a list), the `eval_every` default and `trackers`."""
    if args.merge_to_sam:
        try:
            check_new_folder(Path(args.merge_to_sam), flag="--merge-to-sam")
        except ToolError as error:
            return str(error)
    if args.push_to:
        from huggingface_hub import get_token

        if not get_token():
            return "--push-to needs a Hub token (HF_TOKEN or `hf auth login`)"
    if args.base_revision and not args.model:
        return "--base-revision needs --model"
    try:
        model = locate(args.model, args.base_revision) if args.model else None
    except ToolError as error:
        return str(error)
    if args.publish_only:
        if not (args.push_to or args.merge_to_sam):
            return "--publish-only needs --push-to and/or --merge-to-sam"
        if not (Path(args.output_dir) / "adapter_config.json").is_file():
            return f"--publish-only: {args.output_dir} holds no adapter (adapter_config.json)"
        return None
    if args.allow_unfinished:
        return "--allow-unfinished is for --publish-only"
    missing = [f"--{name.replace('_', '-')}" for name in ("model", "train_data")
               if getattr(args, name) is None]
    if missing:
        return f"the following arguments are required: {', '.join(missing)}"
    if args.push_to and not model.is_hub:
        return (f"--push-to: --model {args.model} is a local folder, and a published adapter must name a base its "
                "users can load: publish the base first (push.py) and train on its Hub id")
    args.target_modules = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    if not args.target_modules:
        return "--target-modules is empty"
    if args.eval_every is not None and not args.val_data:
        return "--eval-every needs --val-data"
    if args.val_data and args.eval_every is None:
        args.eval_every = 200
    if (args.metric_for_best or args.early_stopping_patience) and not args.val_data:
        return "--metric-for-best and --early-stopping-patience need --val-data"
    if args.early_stopping_patience is not None and not args.metric_for_best:
        return "--early-stopping-patience needs --metric-for-best (the score that must improve)"
    try:
        args.trackers = trackers(args.report_to)
    except ValueError as error:
        return str(error)
    try:
        check_output_dir(Path(args.output_dir), args.resume)
    except ToolError as error:
        return str(error)
    return None


# ----------------------------------------------------------------------------------------------------------- steps


@dataclass
class Recipe:
    """How a training step is computed."""

    loss: str
    iou_loss_weight: float
    accumulation: int
    max_grad_norm: float
    seed: int
    hq_token_only: bool


@dataclass
class Schedule:
    """When validations, checkpoints, early stopping and tracker logs happen."""

    max_steps: int
    eval_every: int | None
    save_every: int
    keep_checkpoints: int
    metric_for_best: str | None
    early_stopping_patience: int | None
    trackers: list


@dataclass
class Validation:
    """The validation data, its loader and how many of its images are drawn."""

    source: object
    dataset: PromptedImages
    loader: object
    processor: object
    pixel_loss: str
    overlay_images: int
    hq_token_only: bool


@dataclass
class Session:
    """What the training loop works on: prepared objects, the step counter, where outputs go, the run record."""

    accelerator: Accelerator
    model: PeftModel
    optimizer: torch.optim.Optimizer
    scheduler: object
    state: TrainState
    output_dir: Path
    run: dict  # the settings a checkpoint must match to be resumed
    record: dict  # OUT/run.json
    log: object

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    def append_metrics(self, entry: dict) -> None:
        if self.accelerator.is_main_process:
            with self.metrics_path.open("a") as file:
                file.write(json.dumps(entry) + "\n")


def make_accelerator(cpu: bool, mixed_precision: str | None, trackers_: list, train_decoder: bool,
                     output_dir: Path) -> Accelerator:
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=mixed_precision, log_with=trackers_ or None, project_dir=str(output_dir / "runs"),
        # With --train-decoder the IoU head gets no gradient unless --iou-loss-weight > 0.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=train_decoder)],
    )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and accelerator.num_processes == 1:
        raise ToolError("launched as several processes, but they do not form one job (no GPU?): pass --cpu")
    return accelerator


def prompted_data(settings, spec: str, split: str, processor, log, training: bool) -> tuple:
    """(source, PromptedImages) for one data argument: opened and every sample read once (`scan`)."""
    source = open_source(spec, data_options(settings, split))
    images = scan(source, processor, settings.strict_data, log)
    return source, PromptedImages(source, images, processor, settings.prompt, settings.num_points,
                                  settings.num_negative_points, settings.box_jitter if training else 0.0,
                                  settings.seed, settings.objects_per_image)


def load_data(accelerator, settings, processor) -> tuple:
    """(training PromptedImages, Validation or None): both scanned before the model's weights are loaded."""
    log = accelerator.print
    _, train_set = prompted_data(settings, settings.train_data, settings.train_split, processor, log, True)
    if not settings.val_data:
        return train_set, None
    source, val_set = prompted_data(settings, settings.val_data, settings.val_split, processor, log, False)
    loader = accelerator.prepare_data_loader(torch.utils.data.DataLoader(
        val_set, batch_size=settings.batch_size, collate_fn=collate, num_workers=settings.num_workers))
    return train_set, Validation(source, val_set, loader, processor, settings.loss, settings.overlay_images,
                                 settings.hq_token_only)


def make_optimizer(model, lr: float, weight_decay: float, lr_scheduler: str, warmup_steps: int, max_steps: int):
    optimizer = torch.optim.AdamW(trainable_state(model).values(), lr=lr, weight_decay=weight_decay)
    scheduler = transformers.get_scheduler(
        "constant_with_warmup" if lr_scheduler == "constant" else lr_scheduler,
        optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps,
    )
    return optimizer, scheduler


def run_settings(settings, base: Location, num_images: int, num_processes: int) -> dict:
    """What fixes the data order and the meaning of the weights: resuming with other values is refused."""
    train_data = settings.train_data if hub_dataset(settings.train_data) else str(Path(settings.train_data).resolve())
    return {
        "model": base.name, "revision": base.revision, "train_data": train_data, "num_images": num_images,
        "num_processes": num_processes, "seed": settings.seed,
        **{k: getattr(settings, k) for k in ("batch_size", "gradient_accumulation_steps", "lora_r", "lora_alpha",
                                              "lora_dropout", "target_modules", "train_decoder", "prompt",
                                              "num_points", "num_negative_points", "objects_per_image", "box_jitter",
                                              "loss", "iou_loss_weight", "lr", "weight_decay",
                                              "hq_token_only")},
    }


def run_record(settings, run: dict, train_set, validation) -> dict:
    """OUT/run.json at the start: not finished, no adapter yet; `finish` completes it."""
    data = {"train": data_description(settings.train_data, settings.data_revision, settings.train_split,
                                      train_set.source)}
    if validation is not None:
        data["val"] = data_description(settings.val_data, settings.data_revision, settings.val_split, validation.source)
    return {"finished": False, "max_steps": settings.max_steps, "steps": None, "adapter_step": None,
            "metric_for_best": settings.metric_for_best, "train_decoder": settings.train_decoder,
            "train_data": settings.train_data, "val_data": settings.val_data, "data": data,
            "hyperparameters": {k: v for k, v in run.items() if k not in ("model", "revision", "train_data")}}


def start(session: Session, resume_from: str | None, metric_for_best: str | None) -> None:
    """Resume (`--resume`: weights, optimizer, scheduler, step, best score) and trim metrics.jsonl to the resumed
    step; then create OUT and record the run as not finished."""
    accelerator, state, log = session.accelerator, session.state, session.log
    if resume_from:
        checkpoint = resume(accelerator, session.model, session.output_dir, resume_from, session.run, log)
        log(f"resumed from {checkpoint} at step {state.step}")
        if accelerator.is_main_process:
            keep_metrics_until(session.metrics_path, state.step, log)
        session.record["adapter_step"] = state.best_step if metric_for_best else None
    if accelerator.is_main_process:
        session.output_dir.mkdir(parents=True, exist_ok=True)
        write_run_record(session.output_dir, session.record)
    accelerator.wait_for_everyone()


def training_batches(accelerator, train_set, batch_size: int, num_workers: int, seed: int, accumulation: int,
                     start_step: int, max_steps: int, log):
    sampler = StreamBatchSampler(len(train_set), batch_size, accelerator.num_processes, accelerator.process_index,
                                 seed, start=start_step * accumulation)
    steps_per_epoch = sampler.batches_per_epoch / accumulation
    log(f"{accelerator.num_processes} process(es) x batch {batch_size} images x {accumulation} accumulation = "
        f"{batch_size * accelerator.num_processes * accumulation} images per step, up to "
        f"{train_set.objects_per_image} objects each; {steps_per_epoch:.1f} steps per epoch")
    log(f"training runs {max_steps} steps (--max-steps) = {max_steps / steps_per_epoch:.1f} epochs"
        + (f", from step {start_step}" if start_step else ""))
    return iter(torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate,
                                            num_workers=num_workers))


def next_batch(batches, device, output_dir: Path) -> dict:
    """The next training batch on `device`; a sample that can no longer be read (an image deleted or overwritten
    since the scan) stops the run with one line naming it and the checkpoint to resume from."""
    try:
        batch = next(batches)
    except (OSError, ToolError) as error:
        text = str(error).strip()
        # A DataLoader worker's error carries the worker's traceback: its last line names the file.
        reason = text.splitlines()[-1] if "Traceback" in text else text
        raise ToolError(f"the training data changed since it was scanned ({reason}); {resume_hint(output_dir)}, "
                        "after restoring the data") from None
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_step(session: Session, batches, recipe: Recipe) -> tuple[float, list]:
    """One optimizer step over `recipe.accumulation` micro-batches: (mean loss, [images, objects] over processes).
    A loss or gradient that is not finite stops the run before the weights change."""
    accelerator, model, step = session.accelerator, session.model, session.state.step
    step_loss = torch.zeros((), device=accelerator.device)
    step_counts = torch.zeros(2, device=accelerator.device)  # images, objects
    for micro in range(recipe.accumulation):
        batch = next_batch(batches, accelerator.device, session.output_dir)
        # Dropout masks as a function of (seed, step, micro-batch, process): identical after --resume.
        torch.manual_seed(int(np.random.SeedSequence(
            [recipe.seed, step, micro, accelerator.process_index]).generate_state(1)[0]))
        sync = contextlib.nullcontext() if micro == recipe.accumulation - 1 else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                losses, _ = object_losses(model, batch, recipe.loss, recipe.iou_loss_weight, recipe.hq_token_only)
                loss = losses.mean() / recipe.accumulation  # mean over this micro-batch's objects
            accelerator.backward(loss)
        step_loss += loss.detach()
        step_counts += torch.tensor([len(batch["pixel_values"]), len(losses)], device=accelerator.device)
    # Checked before stepping: a checkpoint never holds weights made from a non-finite loss or gradient.
    step_loss = accelerator.reduce(step_loss, "mean").item()
    gradients = [p.grad for p in trainable_state(model).values()]
    if not math.isfinite(step_loss) or (accelerator.scaler is None and not all_finite(gradients)):
        what = f"loss is {step_loss}" if not math.isfinite(step_loss) else "gradients are not finite"
        raise ToolError(f"{what} at step {step + 1}; the weights of step {step} are kept unchanged. Lower --lr or "
                        "drop --mixed-precision")
    if recipe.max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
    session.optimizer.step()
    session.scheduler.step()
    session.optimizer.zero_grad(set_to_none=True)
    session.state.step += 1
    return step_loss, accelerator.reduce(step_counts, "sum").tolist()


def draw_overlay(validation: Validation, folder: Path, record: dict, predicted, batch: dict, position: int) -> None:
    """`evaluate`'s per-image hook: ground truth | prediction for the first `overlay_images` images."""
    if record["index"] < validation.overlay_images:
        folder.mkdir(parents=True, exist_ok=True)
        image = validation.source.image(validation.dataset.images[record["index"]].key)
        overlay(image, batch["masks"][position], predicted).save(
            folder / f"{record['index']:04d}-{Path(record['name']).stem}.png")


def validate(session: Session, validation: Validation) -> tuple[dict, Path]:
    """Score the model on the validation data (a progress bar per validation): (metrics entry, overlay folder)."""
    accelerator, step = session.accelerator, session.state.step
    overlay_dir = session.output_dir / "overlays" / step_folder(step)
    names = [ref.name for ref in validation.dataset.images]
    loader = tqdm(validation.loader, desc=f"validation at step {step}", unit="batch", leave=False,
                  disable=not accelerator.is_local_main_process)
    # Unwrapped: DDP's forward would broadcast buffers, a collective the prepared loader's even batches would make
    # safe, but that evaluation does not need.
    records = evaluate(accelerator, accelerator.unwrap_model(session.model), loader, validation.processor, names,
                       validation.pixel_loss, on_image=functools.partial(draw_overlay, validation, overlay_dir),
                       hq_token_only=validation.hq_token_only)
    summary = summarize(records, validation.source.class_names)
    loss = float(np.mean([obj["loss"] for record in records for obj in record["objects"]]))
    session.log(f"step {step}: validation Dice {summary['dice']:.4f}, IoU {summary['iou']:.4f} "
                f"({summary['objects']} objects, {summary['images']} images), loss {loss:.4f}")
    return validation_entry(step, {**summary, "loss": loss}), overlay_dir


def report_validation(session: Session, entry: dict, overlay_dir: Path, trackers_: list) -> None:
    """metrics.jsonl, and the trackers' scalars (overall and per class) and overlay images."""
    accelerator = session.accelerator
    session.append_metrics(entry)
    accelerator.wait_for_everyone()
    if not trackers_:
        return
    scalars = {k: v for k, v in entry.items() if k not in ("step", "val_classes")}
    scalars.update({f"val_dice/{name}": c["dice"] for name, c in entry["val_classes"].items()})
    accelerator.log(scalars, step=entry["step"])
    pictures = sorted(overlay_dir.glob("*.png")) if overlay_dir.is_dir() else []
    images = {f"overlays/{p.stem}": np.asarray(Image.open(p).convert("RGB"))[None] for p in pictures}
    for tracker in accelerator.trackers if accelerator.is_main_process and images else []:
        tracker.log_images(images, step=entry["step"], **({"dataformats": "NHWC"}
                                                           if tracker.name == "tensorboard" else {}))


def keep_if_best(session: Session, entry: dict, metric: str) -> None:
    """`--metric-for-best`: the adapter of the best validation so far replaces OUT's adapter (a tie keeps the
    earlier one, so when nothing beats the base it stays the step-0 adapter)."""
    value = entry[f"val_{metric}"]
    if session.state.improves(value, lower_is_better=metric == "loss"):
        if session.accelerator.is_main_process:
            save_adapter(session.accelerator.unwrap_model(session.model), session.output_dir, "")
            session.record["adapter_step"] = session.state.step
            write_run_record(session.output_dir, session.record)
        session.log(f"step {session.state.step}: best {metric} so far ({value:.4f})")


def validate_and_report(session: Session, validation: Validation, schedule: Schedule) -> None:
    entry, overlay_dir = validate(session, validation)
    report_validation(session, entry, overlay_dir, schedule.trackers)
    if schedule.metric_for_best:
        keep_if_best(session, entry, schedule.metric_for_best)


def train(session: Session, batches, recipe: Recipe, schedule: Schedule, validation: Validation | None) -> None:
    """Validate the base (step 0), then step until `max_steps` or an early stop, validating, logging and
    checkpointing on schedule. Ctrl-C says where to resume from."""
    accelerator, state, log = session.accelerator, session.state, session.log
    session.model.train()
    progress = tqdm(total=schedule.max_steps, initial=state.step, disable=not accelerator.is_local_main_process,
                    desc="finetune", dynamic_ncols=True)
    started, first_step, seen = time.perf_counter(), state.step, np.zeros(2)
    try:
        if validation is not None and state.step == 0:
            validate_and_report(session, validation, schedule)
        while state.step < schedule.max_steps:
            loss, counts = train_step(session, batches, recipe)
            seen += counts
            lr = session.scheduler.get_last_lr()[0]
            session.append_metrics({"step": state.step, "loss": loss, "lr": lr})
            if schedule.trackers:
                accelerator.log({"loss": loss, "lr": lr}, step=state.step)
            progress.set_postfix(loss=f"{loss:.4f}")
            progress.update()
            if validation is not None and (state.step % schedule.eval_every == 0 or state.step == schedule.max_steps):
                validate_and_report(session, validation, schedule)
            patience = schedule.early_stopping_patience
            stop = bool(patience and state.evals_since_best >= patience)
            if schedule.save_every and (state.step % schedule.save_every == 0 or state.step == schedule.max_steps
                                        or stop):
                save_checkpoint(accelerator, session.model, session.output_dir, state.step,
                                schedule.keep_checkpoints, session.run)
            if stop:
                log(f"early stop at step {state.step}: no better {schedule.metric_for_best} in {patience} "
                    f"validations (best {state.best:.4f} at step {state.best_step})")
                break
    except KeyboardInterrupt:
        progress.close()
        log(f"\ninterrupted at step {state.step}; {resume_hint(session.output_dir)}")
        raise
    finally:
        progress.close()  # before any error is printed
    if state.step > first_step:
        elapsed = time.perf_counter() - started
        log(f"{state.step - first_step} steps in {elapsed:.1f} s: {(state.step - first_step) / elapsed:.3f} steps/s, "
            f"{seen[0] / elapsed:.2f} images/s, {seen[1] / elapsed:.2f} objects/s")


def finish(session: Session, base: Location, metric_for_best: str | None, push_to: str | None) -> PeftModel:
    """Check that every process holds the same weights; on the main process, put the best adapter back (with
    `--metric-for-best`), write the reports, the card and the adapter, then mark the run finished in run.json."""
    accelerator, state, log, output_dir = session.accelerator, session.state, session.log, session.output_dir
    digests = gather_object([weights_digest(session.model)])
    if len(set(digests)) != 1:
        raise ToolError(f"processes ended with different trainable weights: {digests}")
    log(f"trainable weights sha256 per process: {digests}")
    unwrapped = accelerator.unwrap_model(session.model, keep_fp32_wrapper=False)  # also drops the autocast wrapper
    if not accelerator.is_main_process:
        return unwrapped
    record = {**session.record, "finished": True, "steps": state.step, "adapter_step": state.step}
    best_step = state.best_step if metric_for_best else None
    if best_step is not None:
        set_peft_model_state_dict(unwrapped, load_file(output_dir / "adapter_model.safetensors"))
        record["adapter_step"] = best_step
        log(f"adapter: the best {metric_for_best} ({state.best:.4f}) at step {best_step}"
            + (": no validation beat the base model, so the adapter is the untrained one" if best_step == 0 else ""))
    finish_reports(output_dir, session.metrics_path, best_step, log)
    save_adapter(unwrapped, output_dir, write_card(output_dir, record, base, push_to or output_dir.name, log))
    write_run_record(output_dir, record)  # after the adapter: "finished" means the adapter in OUT is the final one
    print(f"adapter saved to {output_dir}")
    return unwrapped


def finish_reports(output_dir: Path, metrics_path: Path, best_step: int | None, log) -> dict | None:
    """Training curves PNG; with validation, `eval_results.json` and a printed table of the base model's scores
    (step 0) next to the fine-tuned ones (the best step with --metric-for-best, else the last). Returns the latter."""
    entries = read_metrics(metrics_path, log)
    if entries:
        plot_curves(metrics_path, output_dir / "curves.png")
    evaluations = {e["step"]: e for e in entries if "val_dice" in e}
    if not evaluations:
        return None
    tuned_step = best_step if best_step is not None else max(evaluations)
    base, tuned = validation_scores(evaluations[min(evaluations)]), validation_scores(evaluations[tuned_step])
    (output_dir / "eval_results.json").write_text(json.dumps(
        {"base": {"step": min(evaluations), **base}, "fine_tuned": {"step": tuned_step, **tuned}}, indent=1))
    log(side_by_side(base, tuned, tuned_step))
    first, last = evaluations[min(evaluations)], evaluations[max(evaluations)]
    if last["step"] > first["step"] and all(first[key] == last[key] for key in ("val_dice", "val_iou", "val_loss")):
        log(f"validation has not moved at all: step {last['step']} scores exactly as step {first['step']} (Dice, IoU "
            "and loss equal to every digit), so training has not changed the predicted masks; raise --lr, train "
            "longer (--max-steps) or add --train-decoder")
    return tuned


def main(argv=None) -> PeftModel:
    """Train; return the trained `PeftModel` (unwrapped) for callers that go on using it. Failures the user can act
    on raise `ToolError` (the command line prints them as one line, through `run_tool`)."""
    settings = parse_args(argv)
    set_hub_timeout(HUB_TIMEOUT_S)
    output_dir = Path(settings.output_dir)
    if settings.publish_only:
        return publish_finished(output_dir, settings.push_to, settings.merge_to_sam, settings.allow_unfinished,
                                settings.model, settings.base_revision, replace_all=settings.replace_all)
    base = resolve_model(settings.model, settings.base_revision)
    accelerator = make_accelerator(settings.cpu, settings.mixed_precision, settings.trackers, settings.train_decoder,
                                   output_dir)
    log = accelerator.print
    config = model_config(base)
    if settings.merge_to_sam:
        check_merge_to_sam(config)  # before anything slow
    processor = model_processor(config)
    train_set, validation = load_data(accelerator, settings, processor)

    torch.manual_seed(settings.seed)  # LoRA A init: identical on every process
    model = build_model(load_model(base), settings.lora_r, settings.lora_alpha, settings.lora_dropout,
                        settings.target_modules, settings.train_decoder, settings.gradient_checkpointing, base)
    log(f"base {base}; trainable parameters {sum(p.numel() for p in trainable_state(model).values()):,} of "
        f"{sum(p.numel() for p in model.parameters()):,}")
    optimizer, scheduler = make_optimizer(model, settings.lr, settings.weight_decay, settings.lr_scheduler,
                                          settings.warmup_steps, settings.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is stepped by hand once per optimizer step: `prepare` would step it once per process.
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    accelerator.register_save_state_pre_hook(keep_trainable_weights)
    run = run_settings(settings, base, len(train_set), accelerator.num_processes)
    record = run_record(settings, run, train_set, validation)
    session = Session(accelerator, model, optimizer, scheduler, state, output_dir, run, record, log)
    start(session, settings.resume, settings.metric_for_best)
    if settings.trackers:
        accelerator.init_trackers("finetune", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                      for k, v in run.items()})
    batches = training_batches(accelerator, train_set, settings.batch_size, settings.num_workers, settings.seed,
                               settings.gradient_accumulation_steps, state.step, settings.max_steps, log)
    recipe = Recipe(settings.loss, settings.iou_loss_weight, settings.gradient_accumulation_steps,
                    settings.max_grad_norm, settings.seed, settings.hq_token_only)
    schedule = Schedule(settings.max_steps, settings.eval_every, settings.save_every, settings.keep_checkpoints,
                        settings.metric_for_best, settings.early_stopping_patience, settings.trackers)
    train(session, batches, recipe, schedule, validation)

    model = finish(session, base, settings.metric_for_best, settings.push_to)
    if accelerator.is_main_process:
        publish(model, output_dir, settings.push_to, settings.merge_to_sam, f"LoRA adapter after {state.step} steps",
                settings.replace_all)
    accelerator.wait_for_everyone()
    # The DDP wrapper, its optimizer and data loader go while the process group still exists: destroyed after it (when
    # this frame ends), the wrapper's destructor once blocked the process at exit in a 2-process CPU run.
    del session, optimizer, batches
    accelerator.free_memory()
    accelerator.end_training()
    return model


if __name__ == "__main__":
    sys.exit(run_tool(main))

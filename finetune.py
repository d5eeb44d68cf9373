#!/usr/bin/env python3
"""Fine-tune a `SamSplitModel` with LoRA on the vision encoder's `q`/`v` (optionally the whole mask decoder too).

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

Data (`--train-data`, `--val-data`): see `data.py`. Every file is read once before training: an image without masks,
an empty or non-binary mask, a mask whose size differs from its image and an unreadable file are counted, printed and
skipped (`--strict-data` makes them errors), so no bad sample can stop a run half-way.

OUT receives the PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`, a model card), loadable with
`PeftModel.from_pretrained(base, OUT)` or `AutoPeftModel.from_pretrained(OUT, trust_remote_code=True)`; its config
records the base repository and the resolved commit sha of the base. `OUT/checkpoints/step-N` hold
`accelerator.save_state` checkpoints (trainable weights, optimizer, scheduler, step); `--resume` continues the same run:
same steps, same data order, same weights. `OUT/metrics.jsonl` logs the training loss per step and each validation;
`OUT/eval_results.json` puts the base model's scores next to the fine-tuned ones; `OUT/overlays/step-N/` shows ground
truth and prediction on a fixed set of validation images; `OUT/curves.png` plots loss, learning rate, Dice and IoU.
"""

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
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

from sam_split import SamSplitModel
from sam_split.compat import hub_failure_types, sam_processor, set_hub_timeout
from sam_split.data import add_data_arguments, data_options, open_source, scan
from sam_split.evaluation import (PromptedImages, collate, evaluate, mask_grid_size, object_losses,
                                  summarize)
from sam_split.hub_tools import (ToolError, atomic_output_dir, max_differences, publish_folder, sam_outputs,
                                 verification_inputs)
from sam_split.visualize import overlay, plot_curves

CHECKPOINTS = "checkpoints"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")
DECODER = "mask_decoder"
HUB_TIMEOUT_S = 60  # an unanswered Hub request fails after this long instead of hanging the run
# Scores `--metric-for-best` can choose from (all from full-resolution validation); lower is better only for loss.
BEST_METRICS = ("dice", "iou", "image_dice", "image_iou", "loss")
# The base is loaded through transformers' AutoModel (its repo carries the code, `auto_map`), so that
# `AutoPeftModel.from_pretrained(adapter, trust_remote_code=True)` works without this package installed.
AUTO_MAPPING = {"base_model_class": "AutoModel", "parent_library": "transformers"}


# ---------------------------------------------------------------------------------------------------------- model


def resolve_base(model: str, revision: str | None) -> tuple[str, str | None]:
    """(name or absolute path, commit sha or None): a Hub revision (branch, tag, short sha) is pinned to its sha, so
    the adapter records the exact base it was trained on."""
    if Path(model).is_dir():
        if revision:
            raise SystemExit(f"error: --base-revision is for Hub ids; {model} is a local folder")
        return str(Path(model).resolve()), None
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return model, revision
    from huggingface_hub import HfApi

    try:
        sha = HfApi().model_info(model, revision=revision).sha
    except hub_failure_types() as error:
        raise SystemExit(f"error: cannot resolve {model}@{revision or 'main'} on the Hub: {error}") from error
    return model, sha


def build_model(base_name, base_revision, lora_r, lora_alpha, lora_dropout, target_modules, train_decoder,
                gradient_checkpointing) -> PeftModel:
    base = SamSplitModel.from_pretrained(base_name, revision=base_revision)
    if gradient_checkpointing:
        # Non-reentrant: the frozen inputs of the checkpointed layers need no `requires_grad` for LoRA to get grads.
        base.activation_checkpointing_enable({"use_reentrant": False})
    config = LoraConfig(
        r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
        modules_to_save=[DECODER] if train_decoder else None,
        task_type=None,  # the task types feed `input_ids`, which SAM does not take
    )
    model = get_peft_model(base, config, revision=base_revision)
    model.peft_config["default"].base_model_name_or_path = base_name
    for target in target_modules:
        if not any(name.endswith(f".{target}") and hasattr(module, "lora_A") for name, module in model.named_modules()):
            raise SystemExit(f"error: --target-modules entry {target!r} matches no Linear layer of the model")
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


def save_checkpoint(accelerator, model, output_dir: Path, step: int, keep: int, run: dict):
    if not all_finite(trainable_state(model).values()):  # never a checkpoint that --resume would diverge from
        raise SystemExit(f"error: trainable weights are not finite at step {step}; not saving a checkpoint")
    final = output_dir / CHECKPOINTS / f"step-{step:08d}"
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / "run.json").write_text(json.dumps(run, indent=1))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)  # a folder named step-N is always complete
        for old in sorted((output_dir / CHECKPOINTS).glob("step-*[0-9]"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, model, path: Path, run: dict):
    """Restore the checkpoint at `path` into the prepared objects, refusing one made with other run settings."""
    from safetensors import safe_open

    saved_run = json.loads((path / "run.json").read_text())
    changed = {k: (saved_run.get(k), v) for k, v in run.items() if saved_run.get(k) != v}
    if changed:
        raise SystemExit("error: --resume with settings that differ from the checkpoint's run: "
                         + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))
    with safe_open(str(path / "model.safetensors"), "pt") as saved:
        saved_names = set(saved.keys())
    expected = {name for name, param in model.named_parameters() if param.requires_grad}
    if saved_names != expected:
        raise SystemExit(f"error: checkpoint {path} does not hold this model's trainable weights (missing "
                         f"{sorted(expected - saved_names)[:4]}, unexpected {sorted(saved_names - expected)[:4]})")
    accelerator.load_state(str(path), strict=False)  # the file holds the trainable weights alone


def resume(accelerator, model, output_dir: Path, which: str, run: dict, log) -> Path:
    """Load `which` (a checkpoint folder) or, for "latest", the newest readable checkpoint of the run: an unreadable
    one (interrupted copy, corrupt file) is named and the next older one is tried."""
    if which != "latest":
        candidates = [Path(which)]
        if not (candidates[0] / "run.json").exists():
            raise SystemExit(f"error: --resume {which} is not a checkpoint folder of finetune.py")
    else:
        candidates = sorted((output_dir / CHECKPOINTS).glob("step-*[0-9]"), reverse=True)
        if not candidates:
            raise SystemExit(f"error: --resume: no checkpoint in {output_dir / CHECKPOINTS}")
    for position, path in enumerate(candidates):
        try:
            load_checkpoint(accelerator, model, path, run)
            return path
        except SystemExit:
            raise
        except Exception as error:
            reason = f"checkpoint {path} is unreadable ({type(error).__name__}: {error})"
            if position + 1 == len(candidates):
                raise SystemExit(f"error: --resume: {reason}" + ("; no older checkpoint is kept" if position else ""))
            log(f"warning: {reason}; falling back to {candidates[position + 1]}")


# --------------------------------------------------------------------------------------------------------- outputs


def base_license(base_name: str, base_revision: str | None) -> str | None:
    """The `license` of the base model's card (a Hub repo or a local folder), or None."""
    from huggingface_hub import ModelCard, hf_hub_download

    card = Path(base_name) / "README.md"
    try:
        if not card.is_file():
            card = hf_hub_download(base_name, "README.md", revision=base_revision)
        return ModelCard.load(card).data.license
    except Exception:  # no card, or one without metadata: the adapter card names no license
        return None


def hub_dataset(spec: str | None) -> str | None:
    """`spec` when it names a Hub dataset (not a local path)."""
    return spec if spec and not Path(spec).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", spec) else None


def model_card(base_name: str, base_revision: str | None, repo_name: str, license: str | None, datasets: list,
               val_name: str | None, results: dict | None, hyperparameters: dict) -> str:
    """The adapter's README: `ModelCardData` front matter (base model as a Hub id, the base's license, datasets,
    validation Dice/IoU as `eval_results`), how to load it pinned, the hyper-parameters."""
    from huggingface_hub import EvalResult, ModelCardData

    base_is_hub = base_revision is not None
    eval_results = None
    if results:
        eval_results = [EvalResult(task_type="image-segmentation", dataset_type=hub_dataset(val_name) or "custom",
                                   dataset_name=Path(val_name).name or val_name, metric_type=metric,
                                   metric_name=f"mean {metric} per object (full resolution)",
                                   metric_value=round(results[metric], 4)) for metric in ("dice", "iou")]
    card_data = ModelCardData(
        library_name="peft", pipeline_tag="mask-generation", license=license,
        base_model=base_name if base_is_hub else None, datasets=[d for d in datasets if d] or None,
        tags=["sam", "lora", "image-segmentation", "sam-split"], model_name=repo_name, eval_results=eval_results,
    )
    revision = f', revision="{base_revision}"' if base_is_hub else ""
    lines = ["# SAM LoRA adapter", "",
             f"LoRA on `{base_name}`" + (f" at `{base_revision}`" if base_is_hub else "") + ".", "",
             "```python", "from peft import AutoPeftModel, PeftModel", "from transformers import AutoModel", "",
             f'model = AutoPeftModel.from_pretrained("{repo_name}", revision="ADAPTER_SHA", trust_remote_code=True)',
             "# or, explicitly:",
             f'base = AutoModel.from_pretrained("{base_name}", trust_remote_code=True{revision})',
             f'model = PeftModel.from_pretrained(base, "{repo_name}", revision="ADAPTER_SHA")', "```", ""]
    if results:
        lines += ["## Validation (Dice / IoU per object, original resolution)", "", "| class | Dice | IoU | objects |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {name} | {c['dice']:.4f} | {c['iou']:.4f} | {c['objects']} |"
                  for name, c in results["classes"].items()]
        lines += [f"| **all** | {results['dice']:.4f} | {results['iou']:.4f} | {results['objects']} |", ""]
    lines += ["## Training hyper-parameters", "", "| name | value |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in hyperparameters.items()] + [""]
    return f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines)


def save_adapter(model, output_dir: Path, card: str):
    """Write the adapter files into OUT, moved in from a temporary folder with `adapter_config.json` last (and removed
    first), so OUT never holds a config next to another run's or a half-written weights file."""
    if not all_finite(trainable_state(model).values()):
        raise SystemExit("error: trainable weights are not finite; not saving the adapter")
    with atomic_output_dir(output_dir, existing="update", last="adapter_config.json", prefix=".adapter-") as build:
        model.save_pretrained(str(build))
        config_path = build / "adapter_config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "auto_mapping": AUTO_MAPPING},
                                          indent=2, sort_keys=True))
        (build / "README.md").write_text(card)


def push_adapter(output_dir: Path, repo: str, message: str) -> str:
    try:
        commit = publish_folder(output_dir, repo, commit_message=message, allow_patterns=list(ADAPTER_FILES))
    except ToolError as error:
        raise SystemExit(f"error: {error}.\nThe adapter is complete in {output_dir}; publish it again with:\n"
                         f"  python finetune.py --output-dir {output_dir} --publish-only --push-to {repo}") from None
    print(f"pushed adapter to {repo} at revision {commit.sha}\n  {commit.url}")
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
        raise RuntimeError(f"merged SamModel differs from the adapted model: {differences} > {tolerance:.1e}")
    with atomic_output_dir(target, existing="replace", prefix=".merged-") as build:
        sam.save_pretrained(str(build))
        processor.save_pretrained(str(build))
    print(f"merged stock SamModel saved to {target} (max |diff| vs adapter {difference:.1e})")


def publish(model: PeftModel, output_dir: Path, push_to: str | None, merge_to: str | None, message: str):
    """Merge first (local, checked), then push: a failed push leaves a complete folder to publish again."""
    if merge_to:
        merge_to_sam(model, sam_processor(model.config), Path(merge_to))
    if push_to:
        push_adapter(output_dir, push_to, message)


def publish_finished(output_dir: Path, push_to: str | None, merge_to: str | None):
    """`--publish-only`: push and/or merge the adapter a finished run left in `output_dir`."""
    config = json.loads((output_dir / "adapter_config.json").read_text())
    base = SamSplitModel.from_pretrained(config["base_model_name_or_path"], revision=config.get("revision"))
    model = PeftModel.from_pretrained(base, str(output_dir))
    publish(model, output_dir, push_to, merge_to, f"LoRA adapter from {output_dir.name}")
    return model


def side_by_side(base: dict, tuned: dict, tuned_step: int) -> str:
    """A table of the base model's validation scores (step 0) next to the fine-tuned ones, per class."""
    rows = [("all", base, tuned)] + [(name, base["classes"].get(name), scores)
                                     for name, scores in tuned["classes"].items()]
    lines = [f"{'class':<20} {'base dice':>10} {'dice':>8} {'base iou':>9} {'iou':>8}   (fine-tuned: step {tuned_step})"]
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


def check_output_dir(path: Path, resume: bool) -> str | None:
    """Why `path` cannot receive this run's outputs, or None: checked before anything slow is loaded."""
    if path.exists() and not path.is_dir():
        return f"--output-dir {path} is a file, expected a folder"
    if not resume and path.is_dir() and any(path.iterdir()):
        return f"--output-dir {path} is not empty: pass --resume to continue its run, or use a new folder"
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as error:
        return f"--output-dir {path} is not writable ({error.strerror or error})"
    return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("model and data")
    io.add_argument("--model", help="SamSplitModel Hub id or local folder (required unless --publish-only)")
    io.add_argument("--base-revision", help="base revision on the Hub (branch, tag or sha; recorded as its sha)")
    io.add_argument("--train-data", help="training data (see data.py; required unless --publish-only)")
    io.add_argument("--val-data", help="same formats; enables validation (Dice and IoU)")
    io.add_argument("--output-dir", required=True, help="adapter, checkpoints/, metrics.jsonl and pictures go here")
    add_data_arguments(parser)
    io.add_argument("--strict-data", action="store_true", help="bad samples are an error instead of a counted skip")
    prompts = parser.add_argument_group("prompts")
    prompts.add_argument("--prompt", choices=("box", "point", "box+point"), default="box",
                         help="prompt made from each object's mask")
    prompts.add_argument("--objects-per-image", type=int, default=8,
                         help="objects decoded per image and step, sampled when an image has more (default 8)")
    prompts.add_argument("--num-points", type=int, default=1, help="positive points sampled in the object")
    prompts.add_argument("--num-negative-points", type=int, default=0, help="negative points sampled outside it")
    prompts.add_argument("--box-jitter", type=float, default=0.1,
                         help="training boxes: each edge moved by up to this fraction of the box side (default 0.1)")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora-r", type=int, default=8)
    lora.add_argument("--lora-alpha", type=float, default=16)
    lora.add_argument("--lora-dropout", type=float, default=0.1)
    lora.add_argument("--target-modules", default="q,v",
                      help="comma-separated module names (default q,v: only the vision encoder has these)")
    lora.add_argument("--train-decoder", action="store_true",
                      help="also train the whole mask decoder (PEFT modules_to_save)")
    train = parser.add_argument_group("training")
    train.add_argument("--max-steps", type=int, help="optimizer steps (required unless --publish-only)")
    train.add_argument("--batch-size", type=int, default=2, help="images per process and micro-batch")
    train.add_argument("--gradient-accumulation-steps", type=int, default=1)
    train.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, in (0, 1]")
    train.add_argument("--weight-decay", type=float, default=0.01)
    train.add_argument("--lr-scheduler", choices=("constant", "linear", "cosine"), default="constant")
    train.add_argument("--warmup-steps", type=int, default=0)
    train.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    train.add_argument("--loss", choices=("bce", "focal"), default="bce", help="pixel loss added to Dice")
    train.add_argument("--iou-loss-weight", type=float, default=0.0,
                       help="weight of an MSE loss on the IoU head (useful with --train-decoder)")
    train.add_argument("--gradient-checkpointing", action="store_true", help="recompute vision layers in backward")
    train.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"),
                       help="autocast precision (default: accelerate's config or no)")
    train.add_argument("--cpu", action="store_true", help="train on CPU (also DDP over gloo under accelerate launch)")
    train.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per process")
    train.add_argument("--seed", type=int, default=0)
    run = parser.add_argument_group("evaluation, checkpoints, outputs")
    run.add_argument("--eval-every", type=int,
                     help="validate every N steps (default 200 with --val-data), at step 0 and at the end")
    run.add_argument("--metric-for-best", choices=BEST_METRICS,
                     help="keep the adapter of the best validation score instead of the last one")
    run.add_argument("--early-stopping-patience", type=int, metavar="N",
                     help="stop after N validations in a row without a better --metric-for-best")
    run.add_argument("--overlay-images", type=int, default=4,
                     help="validation images drawn (ground truth | prediction) at each validation (default 4)")
    run.add_argument("--report-to", choices=("none", "tensorboard", "wandb", "all"), default="none",
                     help="also log scalars and overlays through accelerate's trackers (TensorBoard: OUT/runs)")
    run.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps and at the end (0: never)")
    run.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (0: all)")
    run.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                     help="continue the run in --output-dir from its newest checkpoint (or from CHECKPOINT)")
    run.add_argument("--push-to", metavar="REPO", help="upload the adapter to this Hub repo and print the commit sha")
    run.add_argument("--merge-to-sam", metavar="DIR", help="also save the merged model as a stock SamModel in DIR")
    run.add_argument("--publish-only", action="store_true",
                     help="do not train: push (--push-to) and/or merge (--merge-to-sam) the adapter that a finished "
                          "run left in --output-dir")
    args = parser.parse_args(argv)

    output_dir = Path(args.output_dir)
    if args.merge_to_sam and Path(args.merge_to_sam).exists():
        parser.error(f"--merge-to-sam {args.merge_to_sam} already exists")
    if args.push_to:
        from huggingface_hub import get_token

        if not get_token():
            parser.error("--push-to needs a Hub token (HF_TOKEN or `hf auth login`)")
    if args.publish_only:
        if not (args.push_to or args.merge_to_sam):
            parser.error("--publish-only needs --push-to and/or --merge-to-sam")
        if not (output_dir / "adapter_config.json").is_file():
            parser.error(f"--publish-only: {output_dir} holds no finished adapter (adapter_config.json)")
        return args
    missing = [f"--{name.replace('_', '-')}" for name in ("model", "train_data", "max_steps")
               if getattr(args, name) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    args.target_modules = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "lora_r", "num_points",
                 "objects_per_image"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.num_negative_points < 0 or args.overlay_images < 0:
        parser.error("--num-negative-points and --overlay-images cannot be negative")
    if not 0 < args.lr <= 1:  # also rejects nan; Adam moves each weight by ~lr per step
        parser.error(f"--lr {args.lr} is out of range: expected 0 < lr <= 1 (LoRA usually takes 1e-5 to 1e-2)")
    if not args.target_modules:
        parser.error("--target-modules is empty")
    if args.eval_every is not None and not args.val_data:
        parser.error("--eval-every needs --val-data")
    if args.val_data and args.eval_every is None:
        args.eval_every = 200
    if (args.metric_for_best or args.early_stopping_patience) and not args.val_data:
        parser.error("--metric-for-best and --early-stopping-patience need --val-data")
    if args.early_stopping_patience is not None and not args.metric_for_best:
        parser.error("--early-stopping-patience needs --metric-for-best (the score that must improve)")
    try:
        args.trackers = trackers(args.report_to)
    except ValueError as error:
        parser.error(str(error))
    problem = check_output_dir(output_dir, bool(args.resume))
    if problem:
        parser.error(problem)
    return args


def main(argv=None) -> PeftModel:
    """Train; return the trained `PeftModel` (unwrapped) for callers that go on using it."""
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    set_hub_timeout(HUB_TIMEOUT_S)
    if args.publish_only:
        return publish_finished(output_dir, args.push_to, args.merge_to_sam)
    accelerator = Accelerator(
        cpu=args.cpu, mixed_precision=args.mixed_precision, log_with=args.trackers or None,
        project_dir=str(output_dir / "runs"),
        # With --train-decoder the IoU head gets no gradient unless --iou-loss-weight > 0.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.train_decoder)],
    )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and accelerator.num_processes == 1:
        raise SystemExit("error: launched as several processes, but they do not form one job (no GPU?): pass --cpu")
    log = accelerator.print

    base_name, base_revision = resolve_base(args.model, args.base_revision)
    torch.manual_seed(args.seed)  # LoRA A init: identical on every process
    model = build_model(base_name, base_revision, args.lora_r, args.lora_alpha, args.lora_dropout,
                        args.target_modules, args.train_decoder, args.gradient_checkpointing)
    processor, grid = sam_processor(model.config), mask_grid_size(model.config)
    trainable = sum(p.numel() for p in trainable_state(model).values())
    log(f"base {base_name}" + (f" @ {base_revision}" if base_revision else "")
        + f"; trainable parameters {trainable:,} of {sum(p.numel() for p in model.parameters()):,}")

    def dataset(spec, split):
        source = open_source(spec, data_options(args, split))
        images = scan(source, grid, args.strict_data, log)
        return source, PromptedImages(source, images, processor, grid, args.prompt, args.num_points,
                                      args.num_negative_points, args.box_jitter, args.seed, args.objects_per_image)

    _, train_set = dataset(args.train_data, args.train_split)
    val_source, val_set = dataset(args.val_data, args.val_split) if args.val_data else (None, None)

    optimizer = torch.optim.AdamW(trainable_state(model).values(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = transformers.get_scheduler(
        "constant_with_warmup" if args.lr_scheduler == "constant" else args.lr_scheduler,
        optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=args.max_steps,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is stepped by hand once per optimizer step: `prepare` would step it once per process.
    state = TrainState()
    # What fixes the data order and the meaning of the weights: resuming with other values is refused.
    run = {
        "model": base_name, "revision": base_revision, "train_data": args.train_data if hub_dataset(args.train_data)
        else str(Path(args.train_data).resolve()), "num_images": len(train_set),
        "num_processes": accelerator.num_processes, "seed": args.seed,
        **{k: getattr(args, k) for k in ("batch_size", "gradient_accumulation_steps", "lora_r", "lora_alpha",
                                          "lora_dropout", "target_modules", "train_decoder", "prompt", "num_points",
                                          "num_negative_points", "objects_per_image", "box_jitter", "loss",
                                          "iou_loss_weight", "lr", "weight_decay")},
    }
    accelerator.register_for_checkpointing(scheduler, state)
    accelerator.register_save_state_pre_hook(keep_trainable_weights)
    metrics_path = output_dir / "metrics.jsonl"
    if args.resume:
        checkpoint = resume(accelerator, model, output_dir, args.resume, run, log)
        log(f"resumed from {checkpoint} at step {state.step}")
        if accelerator.is_main_process and metrics_path.exists():  # drop what the interrupted run logged later
            kept = [l for l in metrics_path.read_text().splitlines() if json.loads(l)["step"] <= state.step]
            metrics_path.write_text("".join(l + "\n" for l in kept))
    if args.trackers:
        accelerator.init_trackers("finetune", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                      for k, v in run.items()})
    accumulation = args.gradient_accumulation_steps
    sampler = StreamBatchSampler(len(train_set), args.batch_size, accelerator.num_processes,
                                 accelerator.process_index, args.seed, start=state.step * accumulation)
    log(f"{accelerator.num_processes} process(es) x batch {args.batch_size} images x {accumulation} accumulation = "
        f"{args.batch_size * accelerator.num_processes * accumulation} images per step, up to "
        f"{args.objects_per_image} objects each; {sampler.batches_per_epoch / accumulation:.1f} steps per epoch")
    batches = iter(torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate,
                                               num_workers=args.num_workers))
    val_loader = None
    if val_set is not None:
        val_loader = accelerator.prepare_data_loader(torch.utils.data.DataLoader(
            val_set, batch_size=args.batch_size, collate_fn=collate, num_workers=args.num_workers))
    val_names = [ref.name for ref in val_set.images] if val_set is not None else []

    def record(entry):
        if accelerator.is_main_process:
            with metrics_path.open("a") as file:
                file.write(json.dumps(entry) + "\n")

    def validate():
        overlay_dir = output_dir / "overlays" / f"step-{state.step:08d}"

        def draw(record, predicted, batch, position):
            if record["index"] < args.overlay_images:
                overlay_dir.mkdir(parents=True, exist_ok=True)
                image = val_source.image(val_set.images[record["index"]].key)
                overlay(image, batch["masks"][position], predicted).save(
                    overlay_dir / f"{record['index']:04d}-{Path(record['name']).stem}.png")

        # Unwrapped: DDP's forward would broadcast buffers, a collective the prepared loader's even batches would
        # make safe, but that evaluation does not need.
        records = evaluate(accelerator, accelerator.unwrap_model(model), val_loader, processor, val_names, args.loss,
                           on_image=draw)
        summary = summarize(records, val_source.class_names)
        loss = float(np.mean([obj["loss"] for record in records for obj in record["objects"]]))
        entry = {"step": state.step, "val_loss": loss,
                 **{f"val_{k}": summary[k] for k in ("dice", "iou", "image_dice", "image_iou")},
                 "val_classes": summary["classes"]}
        record(entry)
        log(f"step {state.step}: validation Dice {summary['dice']:.4f}, IoU {summary['iou']:.4f} "
            f"({summary['objects']} objects, {summary['images']} images), loss {loss:.4f}")
        accelerator.wait_for_everyone()
        if args.trackers:
            scalars = {k: v for k, v in entry.items() if k not in ("step", "val_classes")}
            scalars.update({f"val_dice/{name}": c["dice"] for name, c in summary["classes"].items()})
            accelerator.log(scalars, step=state.step)
            pictures = sorted(overlay_dir.glob("*.png")) if overlay_dir.is_dir() else []
            images = {f"overlays/{p.stem}": np.asarray(Image.open(p).convert("RGB"))[None] for p in pictures}
            for tracker in accelerator.trackers if accelerator.is_main_process and images else []:
                tracker.log_images(images, step=state.step, **({"dataformats": "NHWC"}
                                                               if tracker.name == "tensorboard" else {}))
        if args.metric_for_best:
            value = loss if args.metric_for_best == "loss" else summary[args.metric_for_best]
            if state.improves(value, lower_is_better=args.metric_for_best == "loss"):
                if accelerator.is_main_process:  # the best adapter so far, in place of the final one
                    save_adapter(accelerator.unwrap_model(model), output_dir, "")
                log(f"step {state.step}: best {args.metric_for_best} so far ({value:.4f})")

    model.train()
    if val_set is not None and state.step == 0:
        validate()
    progress = tqdm(total=args.max_steps, initial=state.step, disable=not accelerator.is_local_main_process,
                    desc="finetune", dynamic_ncols=True)
    started, first_step = time.perf_counter(), state.step
    images_seen = objects_seen = 0
    while state.step < args.max_steps:
        step_loss = torch.zeros((), device=accelerator.device)
        step_counts = torch.zeros(2, device=accelerator.device)  # images, objects
        for micro in range(accumulation):
            batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in next(batches).items()}
            # Dropout masks as a function of (seed, step, micro-batch, process): identical after --resume.
            torch.manual_seed(int(np.random.SeedSequence(
                [args.seed, state.step, micro, accelerator.process_index]).generate_state(1)[0]))
            sync = contextlib.nullcontext() if micro == accumulation - 1 else accelerator.no_sync(model)
            with sync:
                with accelerator.autocast():
                    losses, _ = object_losses(model, batch, args.loss, args.iou_loss_weight)
                    loss = losses.mean() / accumulation  # mean over this micro-batch's objects
                accelerator.backward(loss)
            step_loss += loss.detach()
            step_counts += torch.tensor([len(batch["pixel_values"]), len(losses)], device=accelerator.device)
        # Checked before stepping: a checkpoint never holds weights made from a non-finite loss or gradient.
        step_loss = accelerator.reduce(step_loss, "mean").item()
        gradients = [p.grad for p in trainable_state(model).values()]
        if not math.isfinite(step_loss) or (accelerator.scaler is None and not all_finite(gradients)):
            what = f"loss is {step_loss}" if not math.isfinite(step_loss) else "gradients are not finite"
            raise SystemExit(f"error: {what} at step {state.step + 1}; the weights of step {state.step} are kept "
                             "unchanged. Lower --lr or drop --mixed-precision")
        if args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        counts = accelerator.reduce(step_counts, "sum").tolist()
        images_seen, objects_seen = images_seen + counts[0], objects_seen + counts[1]

        record({"step": state.step, "loss": step_loss, "lr": scheduler.get_last_lr()[0]})
        if args.trackers:
            accelerator.log({"loss": step_loss, "lr": scheduler.get_last_lr()[0]}, step=state.step)
        progress.set_postfix(loss=f"{step_loss:.4f}")
        progress.update()
        if val_set is not None and (state.step % args.eval_every == 0 or state.step == args.max_steps):
            validate()
        stop = bool(args.early_stopping_patience and state.evals_since_best >= args.early_stopping_patience)
        if args.save_every and (state.step % args.save_every == 0 or state.step == args.max_steps or stop):
            save_checkpoint(accelerator, model, output_dir, state.step, args.keep_checkpoints, run)
        if stop:
            log(f"early stop at step {state.step}: no better {args.metric_for_best} in "
                f"{args.early_stopping_patience} validations (best {state.best:.4f} at step {state.best_step})")
            break
    progress.close()
    if state.step > first_step:
        elapsed = time.perf_counter() - started
        log(f"{state.step - first_step} steps in {elapsed:.1f} s: {(state.step - first_step) / elapsed:.3f} steps/s, "
            f"{images_seen / elapsed:.2f} images/s, {objects_seen / elapsed:.2f} objects/s")

    digests = gather_object([weights_digest(model)])
    if len(set(digests)) != 1:
        raise RuntimeError(f"processes ended with different trainable weights: {digests}")
    log(f"trainable weights sha256 per process: {digests}")
    unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # also drops the autocast wrapper
    if accelerator.is_main_process:
        if args.metric_for_best and state.best_step is not None:
            set_peft_model_state_dict(unwrapped, load_file(output_dir / "adapter_model.safetensors"))
            log(f"adapter: the best {args.metric_for_best} ({state.best:.4f}) at step {state.best_step}")
        results = finish_reports(output_dir, metrics_path, state.best_step if args.metric_for_best else None, log)
        hyperparameters = {k: v for k, v in run.items() if k not in ("model", "revision", "train_data")}
        card = model_card(base_name, base_revision, args.push_to or output_dir.name,
                          base_license(base_name, base_revision), [hub_dataset(args.train_data),
                                                                   hub_dataset(args.val_data)],
                          args.val_data, results, {"steps": state.step, **hyperparameters})
        save_adapter(unwrapped, output_dir, card)
        print(f"adapter saved to {output_dir}")
        publish(unwrapped, output_dir, args.push_to, args.merge_to_sam, f"LoRA adapter after {state.step} steps")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return unwrapped


def finish_reports(output_dir: Path, metrics_path: Path, best_step: int | None, log) -> dict | None:
    """Training curves PNG; with validation, `eval_results.json` and a printed table of the base model's scores
    (step 0) next to the fine-tuned ones (the best step with --metric-for-best, else the last). Returns the latter."""
    entries = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    if entries:
        plot_curves(metrics_path, output_dir / "curves.png")
    evaluations = {e["step"]: e for e in entries if "val_dice" in e}
    if not evaluations:
        return None

    def scores(entry):
        return {"dice": entry["val_dice"], "iou": entry["val_iou"], "image_dice": entry["val_image_dice"],
                "image_iou": entry["val_image_iou"], "loss": entry["val_loss"], "classes": entry["val_classes"],
                "objects": sum(c["objects"] for c in entry["val_classes"].values())}

    tuned_step = best_step if best_step is not None else max(evaluations)
    base, tuned = scores(evaluations[min(evaluations)]), scores(evaluations[tuned_step])
    (output_dir / "eval_results.json").write_text(json.dumps(
        {"base": {"step": min(evaluations), **base}, "fine_tuned": {"step": tuned_step, **tuned}}, indent=1))
    log(side_by_side(base, tuned, tuned_step))
    return tuned


if __name__ == "__main__":
    main()

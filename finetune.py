#!/usr/bin/env python3
"""Fine-tune a `SamSplitModel` with LoRA on the vision encoder's `q`/`v` (optionally the whole mask decoder too).

One object per sample, prompted by a box (and/or points) derived from its mask, as MedSAM/SAMed do; Dice + BCE (or
focal) loss on SAM's low-resolution masks (256x256 at image_size 1024); AdamW. Runs as is under `accelerate launch`.

    python finetune.py --model ORG/sam-split-vit-base --revision BASE_SHA \\
        --train-data data/train --val-data data/val --output-dir out/run1 --max-steps 2000 \\
        [--train-decoder] [--save-every 200] [--eval-every 200] [--push-to ORG/my-adapter] [--merge-to-sam out/sam]

    accelerate launch --multi_gpu --num_processes 2 finetune.py ...           # DDP on 2 GPUs
    accelerate launch --multi_gpu --num_processes 2 finetune.py --cpu ...     # DDP on CPU (gloo)

Data (`--train-data`, `--val-data`) is either
  - a folder `DIR/images/<name>.png|jpg|...` with `DIR/masks/<name>*.png`, one binary (0/1 or 0/255) mask per object,
    several per image allowed; or
  - a `datasets` dataset saved with `save_to_disk`, with an image column and a mask column holding one mask or a list
    of masks per row (`--image-column`, `--mask-column`; a DatasetDict uses `--train-split` / `--val-split`).
Every file is read once before training: an image without masks, an empty or non-binary mask, a mask whose size differs
from its image and an unreadable file are counted, printed and skipped (`--strict-data` makes them errors), so no bad
sample can stop a run half-way.

OUT receives the PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`, a model card), loadable with
`PeftModel.from_pretrained(base, OUT)`; its config records the base repository and the resolved commit sha of the base
(`base_model_name_or_path`, `revision`). `OUT/checkpoints/step-N` hold `accelerator.save_state` checkpoints (trainable
weights, optimizer, scheduler, step); `--resume` continues the same run: same steps, same data order, same weights.
`OUT/metrics.jsonl` logs the training loss per step and validation mean IoU (on the low-resolution masks).
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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm.auto import tqdm

from sam_split import SamSplitModel
from sam_split.compat import sam_processor
from sam_split.data import add_data_arguments, data_options, low_res_target, open_source, scan

CHECKPOINTS = "checkpoints"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")
DECODER = "mask_decoder"


# ----------------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Sample:
    image: object  # the source's image key
    mask: object  # the source's mask key
    name: str
    box: tuple  # tight (x0, y0, x1, y1) of the mask, in image pixels


class PromptedSegmentation(torch.utils.data.Dataset):
    """Processor inputs plus a prompt and a low-res target per object.

    Indexed by `(epoch, index)`; prompt noise is drawn from a generator seeded by `(seed, epoch, index)`, so a sample
    is the same whichever process or worker makes it and whenever (exact resume). `epoch < 0` means evaluation: the
    tight box and points fixed per sample.
    """

    def __init__(self, source, samples, processor, mask_grid, prompt, num_points, box_jitter, seed):
        self.source, self.samples, self.processor, self.mask_grid = source, samples, processor, mask_grid
        self.prompt, self.num_points, self.box_jitter, self.seed = prompt, num_points, box_jitter, seed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        epoch, index = key
        sample = self.samples[index]
        image, mask = self.source.image(sample.image), self.source.mask(sample.mask)
        rng = np.random.default_rng([self.seed, int(epoch >= 0), max(epoch, 0), index])
        prompt = {}
        if "box" in self.prompt:
            box = np.array(sample.box, dtype=np.float64)
            if epoch >= 0 and self.box_jitter > 0:
                # SAM's recipe: each edge moved by noise proportional to the box's side (MedSAM: a few pixels).
                side = np.array([box[2] - box[0], box[3] - box[1]] * 2) + 1
                box += rng.uniform(-1, 1, 4) * self.box_jitter * side
                box = np.clip(box, 0, [image.width - 1, image.height - 1] * 2)
                box[2:] = np.maximum(box[2:], box[:2] + 1)
            prompt["input_boxes"] = [[box.tolist()]]
        if "point" in self.prompt:
            rows, cols = np.nonzero(mask)
            chosen = rng.choice(len(rows), self.num_points, replace=len(rows) < self.num_points)
            prompt["input_points"] = [[[[float(cols[i]), float(rows[i])] for i in chosen]]]
            prompt["input_labels"] = [[[1] * self.num_points]]
        encoded = self.processor(images=image, return_tensors="pt", **prompt)
        target = torch.from_numpy(low_res_target(mask, self.mask_grid))
        item = {"pixel_values": encoded["pixel_values"], "labels": target[None]}
        for name in ("input_boxes", "input_points"):
            if name in encoded:
                item[name] = encoded[name].float()
        if "input_labels" in encoded:
            item["input_labels"] = encoded["input_labels"].long()
        return item


def collate(items: list) -> dict:
    return {name: torch.cat([item[name] for item in items]) for name in items[0]}


class StreamBatchSampler:
    """Endless per-process batches of `(epoch, index)`, starting at micro-batch `start`.

    Epoch e is a permutation of the samples seeded by `(seed, e)`, wrapped around to a whole number of global batches
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


# ---------------------------------------------------------------------------------------------------------- model


def mask_grid_size(config) -> int:
    """Side of SAM's low-res masks: 4x the image-embedding grid (256 at image_size 1024, patch 16)."""
    return 4 * (config.vision_config.image_size // config.vision_config.patch_size)


def resolve_base(model: str, revision: str | None) -> tuple[str, str | None]:
    """(name or absolute path, commit sha or None): a Hub revision (branch, tag, short sha) is pinned to its sha, so
    the adapter records the exact base it was trained on."""
    if Path(model).is_dir():
        if revision:
            raise SystemExit(f"error: --revision is for Hub ids; {model} is a local folder")
        return str(Path(model).resolve()), None
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return model, revision
    from huggingface_hub import HfApi

    try:
        sha = HfApi().model_info(model, revision=revision).sha
    except Exception as error:
        raise SystemExit(f"error: cannot resolve {model}@{revision or 'main'} on the Hub: {error}") from error
    return model, sha


def build_model(args, base_name: str, base_revision: str | None) -> PeftModel:
    base = SamSplitModel.from_pretrained(base_name, revision=base_revision)
    if args.gradient_checkpointing:
        # Non-reentrant: the frozen inputs of the checkpointed layers need no `requires_grad` for LoRA to get grads.
        base.activation_checkpointing_enable({"use_reentrant": False})
    config = LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=args.target_modules,
        modules_to_save=[DECODER] if args.train_decoder else None,
        task_type=None,  # the task types feed `input_ids`, which SAM does not take
    )
    model = get_peft_model(base, config, revision=base_revision)
    model.peft_config["default"].base_model_name_or_path = base_name
    for target in args.target_modules:
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


# ------------------------------------------------------------------------------------------------ loss and metrics


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, pixel_loss: str) -> torch.Tensor:
    """Per-sample Dice + BCE (or focal) on (batch_size, height, width) logits and {0, 1} targets."""
    probs = logits.sigmoid()
    intersection = (probs * target).sum((1, 2))
    dice = 1 - (2 * intersection + 1) / (probs.sum((1, 2)) + target.sum((1, 2)) + 1)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if pixel_loss == "focal":  # RetinaNet's sigmoid focal loss, alpha 0.25, gamma 2, as SAM uses
        p_t = probs * target + (1 - probs) * (1 - target)
        bce = (0.25 * target + 0.75 * (1 - target)) * (1 - p_t) ** 2 * bce
    return dice + bce.mean((1, 2))


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    predicted, target = logits > 0, target > 0.5
    intersection = (predicted & target).sum((1, 2)).float()
    union = (predicted | target).sum((1, 2)).float()
    return intersection / union.clamp(min=1)


def forward(model, batch: dict):
    """Low-res mask logits (batch_size, grid, grid) and predicted IoU (batch_size,), one mask per prompt."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    outputs = model(**inputs, multimask_output=False)
    return outputs.pred_masks[:, 0, 0].float(), outputs.iou_scores[:, 0, 0].float()


def batch_loss(model, batch, args):
    logits, iou_prediction = forward(model, batch)
    loss = segmentation_loss(logits, batch["labels"], args.loss)
    if args.iou_loss_weight > 0:
        loss = loss + args.iou_loss_weight * (iou_prediction - mask_iou(logits, batch["labels"]).detach()) ** 2
    return loss.mean()


@torch.no_grad()
def evaluate(accelerator, model, dataset, args) -> dict:
    """Mean IoU and loss over the validation set, each process taking every num_processes-th sample."""
    model.eval()
    mine = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    per_process = math.ceil(len(dataset) / accelerator.num_processes)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=[(-1, i) for i in mine],
                                         collate_fn=collate, num_workers=args.num_workers)
    ious, losses = [], []
    for batch in loader:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            logits, _ = forward(model, batch)
        ious.append(mask_iou(logits, batch["labels"]))
        losses.append(segmentation_loss(logits, batch["labels"], args.loss))
    values = torch.zeros(per_process, 3, device=accelerator.device)  # iou, loss, valid (padding rows stay 0)
    if mine:
        values[: len(mine), 0], values[: len(mine), 1], values[: len(mine), 2] = torch.cat(ious), torch.cat(losses), 1
    values = accelerator.gather(values)
    model.train()
    valid = values[:, 2] > 0
    return {"val_iou": values[valid, 0].mean().item(), "val_loss": values[valid, 1].mean().item()}


# ----------------------------------------------------------------------------------------------------- checkpoints


class TrainState:
    """The optimizer-step counter, checkpointed with `accelerator.register_for_checkpointing`."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


def find_checkpoint(output_dir: Path, resume: str) -> Path:
    if resume != "latest":
        path = Path(resume)
        if not (path / "run.json").exists():
            raise SystemExit(f"error: --resume {path} is not a checkpoint folder of finetune.py")
        return path
    found = sorted((output_dir / CHECKPOINTS).glob("step-*[0-9]"))
    if not found:
        raise SystemExit(f"error: --resume: no checkpoint in {output_dir / CHECKPOINTS}")
    return found[-1]


def keep_trainable_weights(models, weights, output_dir):
    """`save_state` pre-hook: checkpoint only the trainable weights (the base is pinned by name and revision)."""
    for i, model in enumerate(models):
        names = {name for name, param in model.named_parameters() if param.requires_grad}
        weights[i] = {name: tensor for name, tensor in weights[i].items() if name in names}


def save_checkpoint(accelerator, output_dir: Path, step: int, keep: int, run: dict):
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
    accelerator.load_state(str(path), strict=False)  # the file holds the trainable weights alone
    with safe_open(str(path / "model.safetensors"), "pt") as saved:
        saved_names = set(saved.keys())
    expected = {name for name, param in model.named_parameters() if param.requires_grad}
    if saved_names != expected:
        raise SystemExit(f"error: checkpoint {path} does not hold this model's trainable weights (missing "
                         f"{sorted(expected - saved_names)[:4]}, unexpected {sorted(saved_names - expected)[:4]})")


# --------------------------------------------------------------------------------------------------------- outputs


def model_card(base_name: str, base_revision: str | None, args) -> str:
    base_is_hub = base_revision is not None
    front = ["---", "library_name: peft", "pipeline_tag: mask-generation", "tags: [sam, lora, image-segmentation]"]
    if base_is_hub:
        front.append(f"base_model: {base_name}")
    trained = f"LoRA r={args.lora_r}, alpha={args.lora_alpha} on {', '.join(args.target_modules)}"
    trained += " plus the whole mask decoder" if args.train_decoder else ""
    revision = f', revision="{base_revision}"' if base_is_hub else ""
    on_base = f"on base `{base_name}`" + (f" at `{base_revision}`." if base_is_hub else ".")
    return "\n".join(front + ["---", "", "# SAM LoRA adapter", "", f"{trained}, {args.max_steps} steps, {on_base}",
        "", "```python", "from peft import PeftModel", "from transformers import AutoModel", "",
        f'base = AutoModel.from_pretrained("{base_name}", trust_remote_code=True{revision})',
        f'model = PeftModel.from_pretrained(base, "{args.push_to or args.output_dir}"'
        + (', revision="COMMIT_SHA_OF_THIS_ADAPTER")' if args.push_to else ")"),
        "```", ""])


def save_adapter(model, output_dir: Path, card: str):
    """Write the adapter files into OUT: built in a temporary folder, then moved in with `adapter_config.json` last
    (and removed first), so OUT never holds a config next to another run's or a half-written weights file."""
    partial = output_dir / ".adapter.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(str(partial))
    (partial / "README.md").write_text(card)
    (output_dir / "adapter_config.json").unlink(missing_ok=True)
    for name in ("adapter_model.safetensors", "README.md", "adapter_config.json"):
        os.replace(partial / name, output_dir / name)
    shutil.rmtree(partial)


def push_adapter(output_dir: Path, repo: str, step: int) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    info = api.upload_folder(repo_id=repo, folder_path=str(output_dir), allow_patterns=list(ADAPTER_FILES),
                             commit_message=f"LoRA adapter after {step} steps")
    print(f"pushed adapter to {repo} at revision {info.oid}\n  {info.commit_url}")
    return info.oid


def merge_to_sam(model: PeftModel, processor, batch: dict, target: Path):
    """Merge the adapter into a copy of the base, convert to a stock `SamModel`, check its outputs, save atomically."""
    model.eval()
    merged = copy.deepcopy(model).merge_and_unload()
    sam = merged.to_sam()
    with torch.no_grad():
        expected, _ = forward(model, batch)
        got, _ = forward(sam, batch)
    difference = (expected - got).abs().max().item()
    tolerance = 1e-4 * max(1.0, expected.abs().max().item())
    if difference > tolerance:
        raise RuntimeError(f"merged SamModel differs from the adapted model by {difference:.2e} > {tolerance:.1e}")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    sam.save_pretrained(str(partial))
    processor.save_pretrained(str(partial))
    partial.rename(target)
    print(f"merged stock SamModel saved to {target} (max |diff| vs adapter {difference:.1e})")


# ------------------------------------------------------------------------------------------------------------ main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("model and data")
    io.add_argument("--model", required=True, help="SamSplitModel Hub id or local folder")
    io.add_argument("--revision", help="base revision on the Hub (branch, tag or sha; recorded as its commit sha)")
    io.add_argument("--train-data", required=True, help="images/+masks/ folder or `save_to_disk` dataset")
    io.add_argument("--val-data", help="same formats; enables validation (mean IoU)")
    io.add_argument("--output-dir", required=True, help="adapter, checkpoints/ and metrics.jsonl go here")
    io.add_argument("--strict-data", action="store_true", help="bad samples are an error instead of a counted skip")
    io.add_argument("--prompt", choices=("box", "point", "box+point"), default="box", help="prompt made from each mask")
    io.add_argument("--num-points", type=int, default=1, help="positive points sampled in the mask (point prompts)")
    io.add_argument("--box-jitter", type=float, default=0.1,
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
    train.add_argument("--max-steps", type=int, required=True, help="optimizer steps")
    train.add_argument("--batch-size", type=int, default=2, help="per process and micro-batch")
    train.add_argument("--gradient-accumulation-steps", type=int, default=1)
    train.add_argument("--lr", type=float, default=1e-4)
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
    run.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps and at the end (0: never)")
    run.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (0: all)")
    run.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                     help="continue the run in --output-dir from its newest checkpoint (or from CHECKPOINT)")
    run.add_argument("--push-to", metavar="REPO", help="upload the adapter to this Hub repo and print the commit sha")
    run.add_argument("--merge-to-sam", metavar="DIR", help="also save the merged model as a stock SamModel in DIR")
    add_data_arguments(parser)
    args = parser.parse_args(argv)

    args.target_modules = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "lora_r", "num_points"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.target_modules:
        parser.error("--target-modules is empty")
    if args.eval_every is not None and not args.val_data:
        parser.error("--eval-every needs --val-data")
    if args.val_data and args.eval_every is None:
        args.eval_every = 200
    output_dir = Path(args.output_dir)
    if not args.resume and output_dir.exists() and any(output_dir.iterdir()):
        parser.error(f"--output-dir {output_dir} is not empty: pass --resume to continue its run, or use a new folder")
    if args.merge_to_sam and Path(args.merge_to_sam).exists():
        parser.error(f"--merge-to-sam {args.merge_to_sam} already exists")
    if args.push_to:
        from huggingface_hub import get_token

        if not get_token():
            parser.error("--push-to needs a Hub token (HF_TOKEN or `hf auth login`)")
    return args


def main(argv=None) -> PeftModel:
    """Train; return the trained `PeftModel` (unwrapped) for callers that go on using it."""
    args = parse_args(argv)
    accelerator = Accelerator(
        cpu=args.cpu, mixed_precision=args.mixed_precision,
        # With --train-decoder the IoU head gets no gradient unless --iou-loss-weight > 0.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.train_decoder)],
    )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and accelerator.num_processes == 1:
        raise SystemExit("error: launched as several processes, but they do not form one job (no GPU?): pass --cpu")
    log = accelerator.print
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    base_name, base_revision = resolve_base(args.model, args.revision)
    torch.manual_seed(args.seed)  # LoRA A init: identical on every process
    model = build_model(args, base_name, base_revision)
    processor, grid = sam_processor(model.config), mask_grid_size(model.config)
    trainable = sum(p.numel() for p in trainable_state(model).values())
    log(f"base {base_name}" + (f" @ {base_revision}" if base_revision else "")
        + f"; trainable parameters {trainable:,} of {sum(p.numel() for p in model.parameters()):,}")

    def dataset(path, split):
        source = open_source(path, data_options(args, split))
        samples = [Sample(image.key, obj.key, obj.name, obj.box) for image in scan(source, grid, args.strict_data, log)
                   for obj in image.objects]
        return PromptedSegmentation(source, samples, processor, grid, args.prompt, args.num_points, args.box_jitter,
                                    args.seed)

    train_set = dataset(args.train_data, args.train_split)
    val_set = dataset(args.val_data, args.val_split) if args.val_data else None

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
        "model": base_name, "revision": base_revision, "train_data": str(Path(args.train_data).resolve()),
        "num_samples": len(train_set), "num_processes": accelerator.num_processes, "seed": args.seed,
        **{k: getattr(args, k) for k in ("batch_size", "gradient_accumulation_steps", "lora_r", "lora_alpha",
                                          "lora_dropout", "target_modules", "train_decoder", "prompt", "num_points",
                                          "box_jitter", "loss", "iou_loss_weight", "lr", "weight_decay")},
    }
    accelerator.register_for_checkpointing(scheduler, state)
    accelerator.register_save_state_pre_hook(keep_trainable_weights)
    metrics_path = output_dir / "metrics.jsonl"
    if args.resume:
        checkpoint = find_checkpoint(output_dir, args.resume)
        load_checkpoint(accelerator, model, checkpoint, run)
        log(f"resumed from {checkpoint} at step {state.step}")
        if accelerator.is_main_process and metrics_path.exists():  # drop what the interrupted run logged later
            kept = [l for l in metrics_path.read_text().splitlines() if json.loads(l)["step"] <= state.step]
            metrics_path.write_text("".join(l + "\n" for l in kept))
    accumulation = args.gradient_accumulation_steps
    sampler = StreamBatchSampler(len(train_set), args.batch_size, accelerator.num_processes,
                                 accelerator.process_index, args.seed, start=state.step * accumulation)
    log(f"{accelerator.num_processes} process(es) x batch {args.batch_size} x {accumulation} accumulation = "
        f"{args.batch_size * accelerator.num_processes * accumulation} objects per step; "
        f"{sampler.batches_per_epoch / accumulation:.1f} steps per epoch")
    batches = iter(torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate,
                                               num_workers=args.num_workers))

    def record(entry):
        if accelerator.is_main_process:
            with metrics_path.open("a") as file:
                file.write(json.dumps(entry) + "\n")

    def validate():
        # Unwrapped: DDP's forward would broadcast buffers, a collective that processes with unequal shares of the
        # validation set would call unequally often.
        result = evaluate(accelerator, accelerator.unwrap_model(model), val_set, args)
        record({"step": state.step, **result})
        log(f"step {state.step}: validation mean IoU {result['val_iou']:.4f}, loss {result['val_loss']:.4f}")

    model.train()
    if val_set is not None and state.step == 0:
        validate()
    progress = tqdm(total=args.max_steps, initial=state.step, disable=not accelerator.is_local_main_process,
                    desc="finetune", dynamic_ncols=True)
    started, first_step = time.perf_counter(), state.step
    while state.step < args.max_steps:
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(accumulation):
            batch = {k: v.to(accelerator.device) for k, v in next(batches).items()}
            # Dropout masks as a function of (seed, step, micro-batch, process): identical after --resume.
            torch.manual_seed(int(np.random.SeedSequence(
                [args.seed, state.step, micro, accelerator.process_index]).generate_state(1)[0]))
            sync = contextlib.nullcontext() if micro == accumulation - 1 else accelerator.no_sync(model)
            with sync:
                with accelerator.autocast():
                    loss = batch_loss(model, batch, args) / accumulation
                accelerator.backward(loss)
            step_loss += loss.detach()
        if args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1

        step_loss = accelerator.reduce(step_loss, "mean").item()
        if not math.isfinite(step_loss):
            raise SystemExit(f"error: loss is {step_loss} at step {state.step}; lower --lr or drop --mixed-precision")
        record({"step": state.step, "loss": step_loss, "lr": scheduler.get_last_lr()[0]})
        progress.set_postfix(loss=f"{step_loss:.4f}")
        progress.update()
        if val_set is not None and (state.step % args.eval_every == 0 or state.step == args.max_steps):
            validate()
        if args.save_every and (state.step % args.save_every == 0 or state.step == args.max_steps):
            save_checkpoint(accelerator, output_dir, state.step, args.keep_checkpoints, run)
    progress.close()
    if state.step > first_step:
        elapsed = time.perf_counter() - started
        log(f"{state.step - first_step} steps in {elapsed:.1f} s ({(state.step - first_step) / elapsed:.3f} steps/s)")

    digests = gather_object([weights_digest(model)])
    if len(set(digests)) != 1:
        raise RuntimeError(f"processes ended with different trainable weights: {digests}")
    log(f"trainable weights sha256 per process: {digests}")
    unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # also drops the autocast wrapper
    if accelerator.is_main_process:
        save_adapter(unwrapped, output_dir, model_card(base_name, base_revision, args))
        print(f"adapter saved to {output_dir}")
        if args.push_to:
            push_adapter(output_dir, args.push_to, state.step)
        if args.merge_to_sam:
            sample = {k: v.to(accelerator.device) for k, v in collate([train_set[(-1, 0)]]).items()}
            merge_to_sam(unwrapped, processor, sample, Path(args.merge_to_sam))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return unwrapped


if __name__ == "__main__":
    main()

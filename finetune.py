#!/usr/bin/env python3
"""Fine-tune a split-q/k/v twin of SAM, SAM-HQ or SAM 2, or a stock SAM 3 tracker (transformers 5), with LoRA on the
vision encoder's q and v (optionally the whole mask decoder too).

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

`main` reads top to bottom as transformers' `run_*_no_trainer.py` scripts do: settings (`parse_args`: a frozen
`Settings`, every flag checked), base model and data (checked and scanned before the weights load), model, optimizer,
resume, the training loop (`train_step`, `validate`, reports), then the reports and the adapter (`finish`), then
publishing. The machinery is in `tools/training.py`, the adapter's files and publishing in `tools/adapter.py`.
"""

import argparse
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from peft import PeftModel

from sam_split.tools.adapter import check_merge_to_sam, publish, publish_finished, trainable_state
from sam_split.tools.adapter_card import data_description, hub_dataset
from sam_split.tools.arguments import add_loader_arguments, add_model_arguments, add_prompt_arguments, integer, number
from sam_split.tools.cli import Location, ToolError, locate, run_tool
from sam_split.tools.compat import set_hub_timeout
from sam_split.tools.data import add_data_arguments, data_options, open_source, scan
from sam_split.tools.files import check_new_folder
from sam_split.tools.models import load_model, model_config, resolve_model
from sam_split.tools.processing import model_processor
from sam_split.tools.segmentation import PromptedImages, collate
from sam_split.tools.training import (
    BEST_METRICS,
    Recipe,
    Schedule,
    Session,
    TrainState,
    Validation,
    build_model,
    check_output_dir,
    finish,
    keep_trainable_weights,
    lora_targets,
    make_accelerator,
    make_optimizer,
    parse_target_modules,
    start,
    trackers,
    train,
    training_batches,
)

HUB_TIMEOUT_S = 60  # an unanswered Hub request fails after this long instead of hanging the run
DEFAULT_MAX_STEPS = 1000  # --max-steps when none is given: the startup lines say how many epochs that is


# ----------------------------------------------------------------------------------------------------------- flags


def add_lora_arguments(parser) -> None:
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora-r", type=integer(1), default=8)
    lora.add_argument("--lora-alpha", type=number(0, above=True), default=16)
    lora.add_argument("--lora-dropout", type=number(0, 1, below=True), default=0.1, help="in [0, 1)")
    lora.add_argument("--target-modules",
                      help="comma-separated module names, or one regular expression matched against whole module "
                           "names (PEFT's rule); default: the member's vision q and v (q,v for the twins: only their "
                           "vision encoder has these; for the SAM 3 tracker its ViT backbone's q_proj and v_proj, "
                           "not the mask decoder's)")
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


def parse_args(argv=None) -> "Settings":
    """The settings, every flag checked (`Settings.from_args`) before anything slow starts; a problem is a usage
    error (exit status 2)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, model_help="split-q/k/v twin of SAM, SAM-HQ or SAM 2 (made by push.py), or a stock "
                                           "SAM 3 tracker: Hub id, local folder or random:<size> (required unless "
                                           "--publish-only)")
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
    try:
        return Settings.from_args(args)
    except ToolError as error:
        parser.error(str(error))


# -------------------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """Every flag of the command line, checked as a whole once (`from_args`) and never changed after. Beyond the flags
    as given: `target_modules` as a tuple of names, one regular expression (`str`) or None (the member's default,
    `lora_targets`), `eval_every` with its default, and `trackers` (accelerate's `log_with` for `--report-to`)."""

    # model
    model: str | None
    base_revision: str | None
    hq_token_only: bool
    # data and outputs (the data-format flags are read by `data.data_options`)
    train_data: str | None
    val_data: str | None
    output_dir: str
    image_root: str | None
    class_names: str | None
    ignore_index: int | None
    label_mode: str
    image_column: str
    mask_column: str
    class_column: str | None
    label_column: str | None
    train_split: str
    val_split: str
    data_revision: str | None
    max_image_pixels: int
    max_objects_per_image: int
    # prompts
    prompt: str
    num_points: int
    num_negative_points: int
    objects_per_image: int
    box_jitter: float
    # loading and running
    batch_size: int
    num_workers: int
    seed: int
    mixed_precision: str | None
    cpu: bool
    strict_data: bool
    overlay_images: int
    # LoRA
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: tuple[str, ...] | str | None
    train_decoder: bool
    # training
    max_steps: int
    gradient_accumulation_steps: int
    lr: float
    weight_decay: float
    lr_scheduler: str
    warmup_steps: int
    max_grad_norm: float
    loss: str
    iou_loss_weight: float
    gradient_checkpointing: bool
    # evaluation, checkpoints, outputs
    eval_every: int | None
    metric_for_best: str | None
    early_stopping_patience: int | None
    report_to: str
    save_every: int
    keep_checkpoints: int
    resume: str | None
    push_to: str | None
    replace_all: bool
    merge_to_sam: str | None
    publish_only: bool
    allow_unfinished: bool
    trackers: tuple[str, ...]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Settings":
        """The settings of the parsed flags, or a `ToolError` naming the first problem with them as a whole (flags
        that need or exclude each other, names, the output folder), found before anything slow, creating nothing."""
        if args.merge_to_sam:
            check_new_folder(Path(args.merge_to_sam), flag="--merge-to-sam")
        if args.push_to:
            from huggingface_hub import get_token

            if not get_token():
                raise ToolError("--push-to needs a Hub token (HF_TOKEN or `hf auth login`)")
        if args.base_revision and not args.model:
            raise ToolError("--base-revision needs --model")
        model = locate(args.model, args.base_revision, random_ok=True) if args.model else None
        target_modules = parse_target_modules(args.target_modules)
        if args.publish_only:
            if not (args.push_to or args.merge_to_sam):
                raise ToolError("--publish-only needs --push-to and/or --merge-to-sam")
            if not (Path(args.output_dir) / "adapter_config.json").is_file():
                raise ToolError(f"--publish-only: {args.output_dir} holds no adapter (adapter_config.json)")
            return cls._of(args, target_modules=target_modules, trackers=())
        if args.allow_unfinished:
            raise ToolError("--allow-unfinished is for --publish-only")
        missing = [f"--{name.replace('_', '-')}" for name in ("model", "train_data") if getattr(args, name) is None]
        if missing:
            raise ToolError(f"the following arguments are required: {', '.join(missing)}")
        if args.push_to and not model.is_hub:
            what = "a random model" if model.kind == "random" else "a local folder"
            raise ToolError(f"--push-to: --model {args.model} is {what}, and a published adapter must name a "
                            "base its users can load: publish the base first (push.py) and train on its Hub id")
        if target_modules is not None and not target_modules:
            raise ToolError("--target-modules is empty")
        if args.eval_every is not None and not args.val_data:
            raise ToolError("--eval-every needs --val-data")
        eval_every = 200 if args.val_data and args.eval_every is None else args.eval_every
        if (args.metric_for_best or args.early_stopping_patience) and not args.val_data:
            raise ToolError("--metric-for-best and --early-stopping-patience need --val-data")
        if args.early_stopping_patience is not None and not args.metric_for_best:
            raise ToolError("--early-stopping-patience needs --metric-for-best (the score that must improve)")
        report_trackers = tuple(trackers(args.report_to))
        check_output_dir(Path(args.output_dir), args.resume)
        return cls._of(args, target_modules=target_modules, eval_every=eval_every, trackers=report_trackers)

    @classmethod
    def _of(cls, args: argparse.Namespace, **derived) -> "Settings":
        return cls(**{field.name: derived[field.name] if field.name in derived else getattr(args, field.name)
                      for field in fields(cls)})

    @property
    def recipe(self) -> Recipe:
        return Recipe(self.loss, self.iou_loss_weight, self.gradient_accumulation_steps, self.max_grad_norm,
                      self.seed, self.hq_token_only)

    @property
    def schedule(self) -> Schedule:
        return Schedule(self.max_steps, self.eval_every, self.save_every, self.keep_checkpoints, self.metric_for_best,
                        self.early_stopping_patience, list(self.trackers))


# ----------------------------------------------------------------------------------------------------------- steps


def prompted_data(settings: Settings, spec: str, split: str, processor, log, training: bool) -> tuple:
    """(source, PromptedImages) for one data argument: opened and every sample read once (`scan`)."""
    source = open_source(spec, data_options(settings, split))
    images = scan(source, processor, settings.strict_data, log)
    return source, PromptedImages(source, images, processor, settings.prompt, settings.num_points,
                                  settings.num_negative_points, settings.box_jitter if training else 0.0,
                                  settings.seed, settings.objects_per_image)


def load_data(accelerator, settings: Settings, processor) -> tuple:
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


def run_settings(settings: Settings, base: Location, num_images: int, num_processes: int,
                 target_modules: list[str] | str) -> dict:
    """What fixes the data order and the meaning of the weights: resuming with other values is refused."""
    train_data = settings.train_data if hub_dataset(settings.train_data) else str(Path(settings.train_data).resolve())
    return {
        "model": base.name, "revision": base.revision, "train_data": train_data, "num_images": num_images,
        "num_processes": num_processes, "seed": settings.seed,
        **{k: getattr(settings, k) for k in ("batch_size", "gradient_accumulation_steps", "lora_r", "lora_alpha",
                                              "lora_dropout", "train_decoder", "prompt",
                                              "num_points", "num_negative_points", "objects_per_image", "box_jitter",
                                              "loss", "iou_loss_weight", "lr", "weight_decay",
                                              "hq_token_only")},
        "target_modules": target_modules,  # a list (not a tuple) as JSON reads it back, compared on --resume
    }


def run_record(settings: Settings, run: dict, train_set, validation) -> dict:
    """OUT/run.json at the start: not finished, no adapter yet; `finish` completes it."""
    data = {"train": data_description(settings.train_data, settings.data_revision, settings.train_split,
                                      train_set.source)}
    if validation is not None:
        data["val"] = data_description(settings.val_data, settings.data_revision, settings.val_split, validation.source)
    return {"finished": False, "max_steps": settings.max_steps, "steps": None, "adapter_step": None,
            "metric_for_best": settings.metric_for_best, "train_decoder": settings.train_decoder,
            "train_data": settings.train_data, "val_data": settings.val_data, "data": data,
            "hyperparameters": {k: v for k, v in run.items() if k not in ("model", "revision", "train_data")}}


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
    accelerator = make_accelerator(settings.cpu, settings.mixed_precision, list(settings.trackers),
                                   settings.train_decoder, output_dir)
    log = accelerator.print
    config = model_config(base)
    if settings.merge_to_sam:
        check_merge_to_sam(config)  # before anything slow
    processor = model_processor(config)
    train_set, validation = load_data(accelerator, settings, processor)

    torch.manual_seed(settings.seed)  # LoRA A init: identical on every process
    targets = lora_targets(settings.target_modules, config)
    model = build_model(load_model(base), settings.lora_r, settings.lora_alpha, settings.lora_dropout, targets,
                        settings.train_decoder, settings.gradient_checkpointing, base)
    log(f"base {base}; trainable parameters {sum(p.numel() for p in trainable_state(model).values()):,} of "
        f"{sum(p.numel() for p in model.parameters()):,}")
    optimizer, scheduler = make_optimizer(model, settings.lr, settings.weight_decay, settings.lr_scheduler,
                                          settings.warmup_steps, settings.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is stepped by hand once per optimizer step: `prepare` would step it once per process.
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    accelerator.register_save_state_pre_hook(keep_trainable_weights)
    run = run_settings(settings, base, len(train_set), accelerator.num_processes, targets)
    record = run_record(settings, run, train_set, validation)
    session = Session(accelerator, model, optimizer, scheduler, state, output_dir, run, record, log)
    start(session, settings.resume, settings.metric_for_best)
    if settings.trackers:
        accelerator.init_trackers("finetune", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                      for k, v in run.items()})
    batches = training_batches(accelerator, train_set, settings.batch_size, settings.num_workers, settings.seed,
                               settings.gradient_accumulation_steps, state.step, settings.max_steps, log)
    train(session, batches, settings.recipe, settings.schedule, validation)

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

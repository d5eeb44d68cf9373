"""finetune.py's training machinery: the LoRA model, the step counter and best score, checkpoints and `--resume`,
the sampler that makes a resumed run see the data an uninterrupted one would, the train step, validation, metrics.jsonl
and the reports (curves, eval_results.json, the base-versus-fine-tuned table), and `finish`, which leaves the adapter
in OUT. Failures the user can act on raise `ToolError`; only the command line exits."""

import contextlib
import functools
import hashlib
import importlib.util
import json
import math
import os
import shutil
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

from .adapter import RUN_RECORD, all_finite, save_adapter, trainable_state, write_card
from .cli import Location, ToolError, check_name_lengths
from .family import member_for_config
from .files import atomic_output_dir, check_new_folder
from .segmentation import PromptedImages, collate, evaluate, object_losses, summarize
from .visualize import overlay, plot_curves

CHECKPOINTS = "checkpoints"
DECODER = "mask_decoder"
# Scores `--metric-for-best` can choose from (all from full-resolution validation); lower is better only for loss.
BEST_METRICS = ("dice", "iou", "image_dice", "image_iou", "loss")
# A validation's scores, stored in metrics.jsonl as `val_<name>` (`validation_entry` / `validation_scores`).
VALIDATION_SCORES = (*BEST_METRICS, "classes")


# ---------------------------------------------------------------------------------------------------------- model


def parse_target_modules(text: str | None) -> tuple[str, ...] | str | None:
    """`--target-modules`: None (the member's default), one regular expression as a `str` (where the text holds a
    character no module name has), or a tuple of names."""
    if text is None:
        return None
    if any(character in text for character in "\\()[]*+?|^$"):
        return text.strip()
    return tuple(name.strip() for name in text.split(",") if name.strip())


def lora_targets(target_modules: tuple[str, ...] | str | None, config) -> list[str] | str:
    """The LoRA targets of a run: `target_modules` (`--target-modules`), else the member's default
    (`family.Member.lora_targets`), as `build_model` and the run record take them."""
    targets = target_modules or member_for_config(config).lora_targets
    return targets if isinstance(targets, str) else list(targets)


def build_model(base, lora_r, lora_alpha, lora_dropout, target_modules, train_decoder, gradient_checkpointing,
                base_location: Location) -> PeftModel:
    """LoRA on `target_modules` of the loaded `base` (and the whole mask decoder with `train_decoder`); the adapter
    records `base_location` (a Hub id at its sha, or the local folder) as its base. `target_modules`: module names
    (PEFT matches each as the name or its last parts), or one regular expression (a `str`, matched against whole
    module names)."""
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
    adapted = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
    if isinstance(target_modules, str):
        unmatched = [] if adapted else [target_modules]
    else:
        unmatched = [target for target in target_modules if not any(name.endswith(f".{target}") for name in adapted)]
    if unmatched:
        raise ToolError(f"--target-modules entry {unmatched[0]!r} matches no Linear layer of the model")
    return model


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, param in sorted(trainable_state(model).items()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


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


# ------------------------------------------------------------------------------------------------- the run's parts


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
    if report_to == "none":
        return []
    wanted = ["tensorboard", "wandb"] if report_to == "all" else [report_to]
    packages = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
    available = [name for name in wanted if any(importlib.util.find_spec(p) for p in packages[name])]
    if report_to != "all" and not available:
        raise ToolError(f"--report-to {report_to} needs the `{report_to}` package: pip install {report_to}")
    return available


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


def make_optimizer(model, lr: float, weight_decay: float, lr_scheduler: str, warmup_steps: int, max_steps: int):
    optimizer = torch.optim.AdamW(trainable_state(model).values(), lr=lr, weight_decay=weight_decay)
    scheduler = transformers.get_scheduler(
        "constant_with_warmup" if lr_scheduler == "constant" else lr_scheduler,
        optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps,
    )
    return optimizer, scheduler


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


# ---------------------------------------------------------------------------------------------------- the training


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

#!/usr/bin/env python3
"""Score a SAM model on segmentation data without training: the base model alone, or base + a LoRA adapter.

    python evaluate.py --model ORG/sam-split-vit-base --base-revision BASE_SHA --data data/val --output-dir eval/base
    python evaluate.py --model ORG/sam-split-vit-base --base-revision BASE_SHA \\
        --adapter ORG/my-adapter --adapter-revision ADAPTER_SHA --data data/val --output-dir eval/tuned

Each object of each image is prompted as finetune.py validates (its tight box and/or fixed points drawn from its
mask), all objects of an image decoded against one image embedding. OUT receives
  - `metrics.json`: mean Dice and IoU over objects (`dice`, `iou`), over images (`image_dice`, `image_iou`), per class
    name (`classes`), and every image's per-object scores (`per_image`);
  - `masks/<image>/<k>-<object>.png`: each predicted mask (0/255) at the image's original resolution;
  - `overlays/<image>.png`: ground truth | prediction, for the first `--overlay-images` images.
With --automatic (a COCO instances .json as --data), it segments everything from a point grid instead and writes
`masks.json` (COCO results), `metrics.json` (mask AP, AP50, AR; Dice per class) and `overlays/`
(docs/automatic-masks.md).
OUT is written in a temporary folder and renamed when complete; a second run into the same OUT while one is writing
it is refused. The model, the adapter and the data are checked (and the data scanned) before the weights load. Runs
under `accelerate launch` too (each process scores a share of the images).
"""

import argparse
import contextlib
import fcntl
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from tqdm.auto import tqdm

from sam_split.tools import automatic
from sam_split.tools.arguments import add_loader_arguments, add_model_arguments, add_prompt_arguments
from sam_split.tools.cli import Location, ToolError, check_name_lengths, run_tool
from sam_split.tools.compat import set_hub_timeout
from sam_split.tools.data import add_data_arguments, data_options, open_source, scan
from sam_split.tools.files import atomic_output_dir
from sam_split.tools.models import adapter_base, load_adapter, load_model, model_config, resolve_adapter, resolve_model
from sam_split.tools.processing import model_processor
from sam_split.tools.segmentation import PromptedImages, collate, evaluate, summarize
from sam_split.tools.visualize import overlay

HUB_TIMEOUT_S = 60  # an unanswered Hub request fails after this long instead of hanging the run


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, model_help="split-q/k/v twin of SAM, SAM-HQ or SAM 2, or a stock SAM 3 tracker: Hub "
                                           "id, local folder or random:<size> (default: the adapter's base)")
    parser.add_argument("--adapter", help="PEFT adapter (Hub id or folder) made by finetune.py; omit to score the base")
    parser.add_argument("--adapter-revision", help="revision of --adapter on the Hub")
    parser.add_argument("--allow-other-base", action="store_true",
                        help="apply an adapter trained on another family member (e.g. SAM's on the SAM-HQ twin)")
    parser.add_argument("--data", required=True, help="data to score (see tools/data.py; --val-split picks the split)")
    parser.add_argument("--output-dir", required=True, help="new folder for metrics.json, masks/ and overlays/")
    add_data_arguments(parser)
    add_prompt_arguments(parser, training=False)
    add_loader_arguments(parser, overlay_images=16)
    automatic.add_automatic_arguments(parser)
    args = parser.parse_args(argv)
    if not (args.model or args.adapter):
        parser.error("pass --model (the base alone) and/or --adapter")
    if args.base_revision and not args.model:
        parser.error("--base-revision needs --model")
    if args.adapter_revision and not args.adapter:
        parser.error("--adapter-revision needs --adapter")
    problem = output_dir_problem(Path(args.output_dir))
    if problem:
        parser.error(problem)
    return args


def output_dir_problem(output_dir: Path) -> str | None:
    try:
        check_name_lengths(output_dir, flag="--output-dir")
    except ToolError as error:
        return str(error)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        return f"--output-dir {output_dir} exists and is not an empty folder"
    return None


@contextlib.contextmanager
def claim_output_dir(output_dir: Path, main_process: bool):
    """Hold a lock beside OUT while this run writes it, so that a second run into the same OUT is refused at once
    instead of colliding with the first (the lock goes with the process, also when it is killed)."""
    if not main_process:
        yield
        return
    output_dir.absolute().parent.mkdir(parents=True, exist_ok=True)
    lock_path = output_dir.absolute().parent / f".{output_dir.name}.evaluate-lock"
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ToolError(f"another evaluate.py run is writing {output_dir}: choose another --output-dir") from None
        try:
            problem = output_dir_problem(output_dir)  # a run that finished since this one's arguments were checked
            if problem:
                raise ToolError(problem)
            yield
        finally:
            lock_path.unlink(missing_ok=True)


def resolve(model: str | None, base_revision: str | None, adapter: str | None,
            adapter_revision: str | None) -> tuple[Location, Location | None]:
    """The base (by default the adapter's recorded base at its revision) and the adapter, checked and pinned."""
    adapter_location = None
    flag, revision_flag = "--model", "--base-revision"
    if adapter:
        adapter_location, config = resolve_adapter(adapter, adapter_revision)
        if not model:
            model, base_revision = adapter_base(config)
            flag, revision_flag = "the adapter's base model", "the adapter's base revision"
    return resolve_model(model, base_revision, flag=flag, revision_flag=revision_flag), adapter_location


def main(argv=None) -> dict:
    """Score; return the summary written to metrics.json. Failures the user can act on raise `ToolError` (one line
    on the command line, through `run_tool`)."""
    args = parse_args(argv)
    if args.automatic:
        automatic.check_automatic(args.data, automatic.world_size())
    set_hub_timeout(HUB_TIMEOUT_S)
    with claim_output_dir(Path(args.output_dir), main_process=os.environ.get("RANK", "0") == "0"):
        return score(args)


def score(args) -> dict:
    base, adapter = resolve(args.model, args.base_revision, args.adapter, args.adapter_revision)
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    log = accelerator.print
    processor = model_processor(model_config(base))
    source = open_source(args.data, data_options(args, args.val_split))
    images = scan(source, processor, args.strict_data, log)
    model = load_model(base)
    if adapter:
        model = load_adapter(model, adapter, allow_other_base=args.allow_other_base)
    model = model.to(accelerator.device)
    if args.automatic:
        provenance = {"model": args.model, "base_revision": args.base_revision, "adapter": args.adapter,
                      "adapter_revision": args.adapter_revision, "data": args.data}
        return automatic.score_automatic(model, processor, source, images, Path(args.output_dir),
                                         automatic.settings_from_args(args), args.overlay_images, provenance, log)
    dataset = PromptedImages(source, images, processor, args.prompt, args.num_points, args.num_negative_points,
                             seed=args.seed)
    loader = accelerator.prepare_data_loader(torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, collate_fn=collate, num_workers=args.num_workers))

    output_dir = Path(args.output_dir)
    # The one atomic writer; under several processes in its shared mode: every process writes into one build folder,
    # which only this run made and only this run removes (an OUT.partial it did not make is never touched).
    shared = accelerator.wait_for_everyone if accelerator.num_processes > 1 else None
    with atomic_output_dir(output_dir, shared=shared, main_process=accelerator.is_main_process,
                           flag="--output-dir") as partial:
        if accelerator.is_main_process:
            (partial / "masks").mkdir()
            (partial / "overlays").mkdir()
        accelerator.wait_for_everyone()

        def save(record, predicted, batch, position):
            stem = Path(record["name"]).stem
            folder = partial / "masks" / stem
            folder.mkdir(exist_ok=True)
            for k, (mask, obj) in enumerate(zip(predicted, record["objects"])):
                Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{k:03d}-{Path(obj['name']).stem}.png")
            if record["index"] < args.overlay_images:
                image = source.image(images[record["index"]].key)
                overlay(image, batch["masks"][position], predicted).save(partial / "overlays" / f"{stem}.png")

        progress = tqdm(loader, desc="evaluate", unit="batch", disable=not accelerator.is_local_main_process)
        records = evaluate(accelerator, model, progress, processor, [ref.name for ref in images], "bce",
                           on_image=save, hq_token_only=args.hq_token_only)
        summary = summarize(records, source.class_names)
        if accelerator.is_main_process:
            for record in records:
                for obj in record["objects"]:
                    obj["class"] = source.class_names[obj.pop("class_id")]
                    del obj["loss"]  # Dice + BCE on the low-res mask: finetune.py's diagnostic, not a score
            provenance = {"model": args.model, "base_revision": args.base_revision, "adapter": args.adapter,
                          "adapter_revision": args.adapter_revision, "data": args.data, "prompt": args.prompt}
            (partial / "metrics.json").write_text(json.dumps({**provenance, **summary, "per_image": records},
                                                             indent=1))
    if accelerator.is_main_process:
        log(f"Dice {summary['dice']:.4f}, IoU {summary['iou']:.4f} over {summary['objects']} objects in "
            f"{summary['images']} images")
        for name, scores in summary["classes"].items():
            log(f"  {name}: Dice {scores['dice']:.4f}, IoU {scores['iou']:.4f} ({scores['objects']} objects)")
        log(f"written to {output_dir}")
    accelerator.wait_for_everyone()
    return summary



if __name__ == "__main__":
    sys.exit(run_tool(main))

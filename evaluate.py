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
OUT is written in a temporary folder and renamed when complete. Runs under `accelerate launch` too (each process scores
a share of the images).
"""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from sam_split import SamSplitModel
from sam_split.compat import sam_processor
from sam_split.data import add_data_arguments, data_options, open_source, scan
from sam_split.evaluation import PromptedImages, collate, evaluate, mask_grid_size, summarize
from sam_split.visualize import overlay


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="SamSplitModel Hub id or local folder (default: the adapter's base)")
    parser.add_argument("--base-revision", help="revision of --model on the Hub (branch, tag or sha)")
    parser.add_argument("--adapter", help="PEFT adapter (Hub id or folder) made by finetune.py; omit to score the base")
    parser.add_argument("--adapter-revision", help="revision of --adapter on the Hub")
    parser.add_argument("--data", required=True, help="data to score (see data.py; --val-split picks the split)")
    parser.add_argument("--output-dir", required=True, help="new folder for metrics.json, masks/ and overlays/")
    add_data_arguments(parser)
    parser.add_argument("--strict-data", action="store_true", help="bad samples are an error instead of a skip")
    parser.add_argument("--prompt", choices=("box", "point", "box+point"), default="box")
    parser.add_argument("--num-points", type=int, default=1, help="positive points per object (point prompts)")
    parser.add_argument("--num-negative-points", type=int, default=0, help="negative points per object")
    parser.add_argument("--seed", type=int, default=0, help="seeds the point positions")
    parser.add_argument("--batch-size", type=int, default=2, help="images per process and forward")
    parser.add_argument("--overlay-images", type=int, default=16, help="images drawn in overlays/ (default 16)")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"))
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args(argv)
    if not (args.model or args.adapter):
        parser.error("pass --model (the base alone) and/or --adapter")
    if args.base_revision and not args.model:
        parser.error("--base-revision needs --model")
    if args.adapter_revision and not args.adapter:
        parser.error("--adapter-revision needs --adapter")
    if args.batch_size < 1 or args.num_points < 1 or args.num_negative_points < 0 or args.overlay_images < 0:
        parser.error("--batch-size and --num-points must be at least 1, --num-negative-points and "
                     "--overlay-images at least 0")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        parser.error(f"--output-dir {output_dir} exists and is not an empty folder")
    return args


def load_model(model: str | None, base_revision: str | None, adapter: str | None, adapter_revision: str | None):
    """The base at its revision, with the adapter at its revision on top when given (the adapter's recorded base and
    base revision when `model` is None)."""
    from peft import PeftConfig, PeftModel

    try:
        if adapter and not model:
            config = PeftConfig.from_pretrained(adapter, revision=adapter_revision)
            model, base_revision = config.base_model_name_or_path, config.revision
        base = SamSplitModel.from_pretrained(model, revision=base_revision)
        return PeftModel.from_pretrained(base, adapter, revision=adapter_revision) if adapter else base
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: cannot load the model: {error}") from None


def main(argv=None) -> dict:
    """Score; return the summary written to metrics.json."""
    args = parse_args(argv)
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    log = accelerator.print
    model = load_model(args.model, args.base_revision, args.adapter, args.adapter_revision).to(accelerator.device)
    processor, grid = sam_processor(model.config), mask_grid_size(model.config)
    source = open_source(args.data, data_options(args, args.val_split))
    images = scan(source, grid, args.strict_data, log)
    dataset = PromptedImages(source, images, processor, grid, args.prompt, args.num_points, args.num_negative_points,
                             seed=args.seed)
    loader = accelerator.prepare_data_loader(torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, collate_fn=collate, num_workers=args.num_workers))

    output_dir = Path(args.output_dir)
    partial = output_dir.with_name(output_dir.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        (partial / "masks").mkdir(parents=True)
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

    records = evaluate(accelerator, model, loader, processor, [ref.name for ref in images], "bce", on_image=save)
    summary = summarize(records, source.class_names)
    if accelerator.is_main_process:
        for record in records:
            for obj in record["objects"]:
                obj["class"] = source.class_names[obj.pop("class_id")]
                del obj["loss"]  # Dice + BCE on the low-res mask: finetune.py's diagnostic, not a score
        provenance = {"model": args.model, "base_revision": args.base_revision, "adapter": args.adapter,
                      "adapter_revision": args.adapter_revision, "data": args.data, "prompt": args.prompt}
        (partial / "metrics.json").write_text(json.dumps({**provenance, **summary, "per_image": records}, indent=1))
        if output_dir.exists():
            output_dir.rmdir()  # empty, checked in parse_args
        partial.rename(output_dir)
        log(f"Dice {summary['dice']:.4f}, IoU {summary['iou']:.4f} over {summary['objects']} objects in "
            f"{summary['images']} images")
        for name, scores in summary["classes"].items():
            log(f"  {name}: Dice {scores['dice']:.4f}, IoU {scores['iou']:.4f} ({scores['objects']} objects)")
        log(f"written to {output_dir}")
    accelerator.wait_for_everyone()
    return summary


if __name__ == "__main__":
    main()

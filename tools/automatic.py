"""Automatic masks ("segment everything") for every family member (SAM, SAM-HQ, SAM 2; base or base + adapter), scored
as instance segmentation. evaluate.py --automatic runs it.

`generate_masks` runs transformers' own mask-generation steps, as its `mask-generation` pipeline does: a point grid
over the image and over crops of it (`generate_crop_boxes`), three masks per point (multimask output), masks kept above
a predicted-IoU and a stability-score threshold and away from crop edges (`filter_masks`), then one NMS over every
crop's masks by their boxes (`post_process_for_mask_generation`; without torchvision through `compat`'s pure-torch
`batched_nms`). Each crop is encoded once. Unlike the pipeline, SAM 2's grid points are placed right on non-square
crops (see `model_points`), and the model may be any family member, PEFT-wrapped or not.

`score_automatic` writes the masks as COCO results (RLE) and scores them against the COCO file's instances: mask AP,
AP50, AP75 and AR at 1/10/100 masks from pycocotools' COCOeval, class-agnostic (automatic masks carry no class), and
per class the Dice and IoU of each ground-truth object's best-overlapping mask (`segmentation.summarize`).
"""

import contextlib
import io
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .arguments import integer, number
from .cli import ToolError
from .compat import mask_generation_processor, post_process_for_mask_generation
from .family import member_for_model_type
from .files import atomic_output_dir
from .processing import decode_options, model_family
from .segmentation import summarize
from .visualize import overlay

# COCOeval's summary, in its order (iouType "segm", maxDets 1/10/100).
COCO_METRICS = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar1", "ar10", "ar100", "ar_small",
                "ar_medium", "ar_large")


@dataclass(frozen=True)
class AutomaticSettings:
    """The mask generator's settings; the defaults are transformers' pipeline's (SAM's automatic mask generator's)."""

    points_per_side: int = 32
    points_per_batch: int = 64
    crop_layers: int = 0
    crop_overlap_ratio: float = 512 / 1500
    crop_points_downscale: int = 1
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    mask_threshold: float = 0.0
    nms_thresh: float = 0.7
    multimask: bool = True


def add_automatic_arguments(parser) -> None:
    """`--automatic` and the generator's settings (`AutomaticSettings`)."""
    defaults = AutomaticSettings()
    group = parser.add_argument_group(
        "automatic masks", "--automatic: segment everything from a point grid (no prompts from the ground truth) and "
        "score the masks as instance segmentation (COCO mask AP/AR, per-class Dice of each object's best mask). "
        "--data must be a COCO instances .json; the prompt flags do not apply.")
    group.add_argument("--automatic", action="store_true", help="automatic masks instead of prompted ones")
    group.add_argument("--points-per-side", type=integer(1), default=defaults.points_per_side,
                       help=f"point grid per side of the image and of each crop (default {defaults.points_per_side})")
    group.add_argument("--points-per-batch", type=integer(1), default=defaults.points_per_batch,
                       help=f"points decoded per forward (default {defaults.points_per_batch})")
    group.add_argument("--crop-layers", type=integer(0, 4), default=defaults.crop_layers,
                       help="crop layers: layer i adds (2^i)^2 overlapping crops, each gridded again (default 0)")
    group.add_argument("--crop-overlap-ratio", type=number(0, 1, below=True), default=defaults.crop_overlap_ratio,
                       help="overlap of first-layer crops as a fraction of the image's short side (default 512/1500)")
    group.add_argument("--crop-points-downscale", type=integer(1), default=defaults.crop_points_downscale,
                       help="layer i's grid has points-per-side / this^i points per side (default 1)")
    group.add_argument("--pred-iou-thresh", type=number(0, 1), default=defaults.pred_iou_thresh,
                       help=f"keep masks whose predicted IoU is above this (0: all; default "
                            f"{defaults.pred_iou_thresh})")
    group.add_argument("--stability-score-thresh", type=number(0, 1), default=defaults.stability_score_thresh,
                       help="keep masks whose stability score (IoU of the mask at logit thresholds +-offset) is above "
                            f"this (0: all; default {defaults.stability_score_thresh})")
    group.add_argument("--stability-score-offset", type=number(0, above=True), default=defaults.stability_score_offset,
                       help=f"logit offset of the stability score (default {defaults.stability_score_offset})")
    group.add_argument("--single-mask", dest="multimask", action="store_false",
                       help="one mask per point, from the single-mask output token, which is the one finetune.py "
                            "trains (default: SAM's three multimask outputs per point, as SAM's generator)")
    group.add_argument("--nms-thresh", type=number(0, 1), default=defaults.nms_thresh,
                       help=f"box IoU above which the lower-scored of two masks is dropped (default "
                            f"{defaults.nms_thresh})")


def settings_from_args(args) -> AutomaticSettings:
    names = AutomaticSettings.__dataclass_fields__
    return AutomaticSettings(**{name: getattr(args, name) for name in names if hasattr(args, name)})


def check_automatic(data: str, world_size: int) -> None:
    """Refuse, in one line and before anything slow, what --automatic cannot score."""
    path = Path(data)
    if not (path.is_file() and path.suffix.lower() == ".json"):
        kind = "a folder" if path.is_dir() else "not a .json file" if path.exists() else "not a local file"
        raise ToolError(f"--automatic scores against instance annotations: --data must be a COCO instances .json "
                        f"(got {data}: {kind})")
    if world_size > 1:
        raise ToolError("--automatic runs in one process: run it without accelerate launch")


# ------------------------------------------------------------------------------------------------------ generation


def image_inputs(model, pixel_values: torch.Tensor) -> dict:
    """The forward's image arguments from one encoding: SAM its embeddings, SAM-HQ also its intermediate ViT
    embeddings, SAM 2 its list of feature maps (as transformers' pipeline passes them)."""
    embeddings = model.get_image_embeddings(pixel_values)
    if isinstance(embeddings, tuple):  # SAM-HQ
        return {"image_embeddings": embeddings[0], "intermediate_embeddings": embeddings[1]}
    return {"image_embeddings": embeddings}


def model_points(points: torch.Tensor, crop_size: tuple, target_size: int, family: str) -> torch.Tensor:
    """`generate_crop_boxes`' grid points (..., 2) as the model's input points for a crop of `crop_size` (height,
    width). transformers scales them as SAM resizes (longest side to `target_size`, aspect kept), for SAM 2 too; SAM 2
    stretches the crop to a `target_size` square, so there each axis is rescaled to that square, else the grid of a
    non-square crop would cover only part of it (and so does the SAM 3 tracker: `Member.square`)."""
    if not member_for_model_type(family).square:
        return points
    height, width = crop_size
    scale = target_size / max(height, width)
    resized = (int(width * scale + 0.5), int(height * scale + 0.5))  # transformers' _normalize_coordinates
    return points * points.new_tensor([target_size / resized[0], target_size / resized[1]])


@torch.no_grad()
def generate_masks(model, processor, image: Image.Image, settings: AutomaticSettings) -> list[dict]:
    """Automatic masks of `image`, best first: per mask `mask` (bool, height x width), `score` (predicted IoU) and
    `box` (x0, y0, x1, y1).

    Three masks per point (`settings.multimask`), else the single-mask output's one, for every family. SAM-HQ: SAM's
    masks each plus the HQ correction (`hq_token_only` off): in multimask mode its HQ token gives one mask for three
    IoU predictions, so it cannot stand alone there."""
    device = next(model.parameters()).device
    family = model_family(model)
    image_processor = processor.image_processor
    helper = mask_generation_processor(image_processor)
    size = image_processor.size
    target_size = size.get("longest_edge") or size["height"]
    crop_boxes, grid, _, grid_labels = helper.generate_crop_boxes(
        image, target_size, settings.crop_layers, settings.crop_overlap_ratio, settings.points_per_side,
        settings.crop_points_downscale)
    options = {**decode_options(model, hq_token_only=False), "multimask_output": settings.multimask}
    rles, scores, boxes = [], [], []
    for c, crop_box in enumerate(crop_boxes.tolist()):
        # Python ints: 4.57's `filter_masks` pads with the crop box's values, which torch refuses as tensors.
        left, top, right, bottom = (int(v) for v in crop_box)
        encoded = processor(images=image.crop((left, top, right, bottom)), return_tensors="pt")
        sizes = {"original_sizes": encoded["original_sizes"]}
        if "reshaped_input_sizes" in encoded:  # SAM, SAM-HQ: padding to crop away
            sizes["reshaped_input_sizes"] = encoded["reshaped_input_sizes"]
        embedded = image_inputs(model, encoded["pixel_values"].to(device))
        points = model_points(grid[:, :, c : c + 1].float(), (bottom - top, right - left), target_size, family)
        labels = grid_labels[:, :, c : c + 1]
        for start in range(0, points.shape[1], settings.points_per_batch):
            chosen = slice(start, start + settings.points_per_batch)
            outputs = model(input_points=points[:, chosen].to(device), input_labels=labels[:, chosen].to(device),
                            **embedded, **options)
            masks = image_processor.post_process_masks(outputs.pred_masks.float().cpu(), sizes["original_sizes"],
                                                       binarize=False, **{k: v for k, v in sizes.items()
                                                                          if k != "original_sizes"})
            kept, kept_scores, kept_boxes = helper.filter_masks(
                masks[0], outputs.iou_scores[0].float().cpu(), (image.height, image.width),
                [left, top, right, bottom], settings.pred_iou_thresh, settings.stability_score_thresh,
                settings.mask_threshold, settings.stability_score_offset)
            rles += kept
            scores.append(torch.as_tensor(kept_scores))
            boxes.append(torch.as_tensor(kept_boxes))
    masks, scores, _, boxes = post_process_for_mask_generation(helper, rles, torch.cat(scores), torch.cat(boxes),
                                                               settings.nms_thresh)
    return [{"mask": mask, "score": float(score), "box": [int(v) for v in box]}
            for mask, score, box in zip(masks, scores.tolist(), boxes.tolist())]


# --------------------------------------------------------------------------------------------------------- scoring


def _coco_mask():
    from pycocotools import mask as coco_mask

    return coco_mask


def encode(mask: np.ndarray) -> dict:
    """A bool mask as a compressed COCO RLE (counts as text, as in COCO JSON files)."""
    rle = _coco_mask().encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}


def ground_truth(source, images) -> dict:
    """The scanned objects as a COCO instances dataset: the COCO file's image ids, categories numbered 1.. in
    `source.class_names` order, every object an instance (crowd annotations, which the tools do not use, and objects
    the scan skipped are not in it)."""
    coco_mask = _coco_mask()
    dataset = {"images": [], "annotations": [],
               "categories": [{"id": k + 1, "name": name} for k, name in enumerate(source.class_names)]}
    for ref in images:
        dataset["images"].append({"id": ref.key, "file_name": ref.name, "width": ref.size[0], "height": ref.size[1]})
        for obj in ref.objects:
            rle = encode(source.mask(obj.key))
            compressed = {"size": rle["size"], "counts": rle["counts"].encode()}
            dataset["annotations"].append({
                "id": len(dataset["annotations"]) + 1, "image_id": ref.key, "category_id": obj.class_id + 1,
                "segmentation": rle, "area": float(coco_mask.area(compressed)),
                "bbox": [float(v) for v in coco_mask.toBbox(compressed)], "iscrowd": 0})
    return dataset


def coco_scores(truth: dict, results: list) -> dict:
    """Class-agnostic mask AP/AR (`COCO_METRICS`) of `results` (COCO results: image_id, category_id, segmentation,
    score) against `truth` (a COCO instances dataset), from pycocotools' COCOeval. No masks at all: every score 0."""
    if not results:
        return dict.fromkeys(COCO_METRICS, 0.0)
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco = COCO()
        coco.dataset = json.loads(json.dumps(truth))  # COCOeval marks the ground truth (ignore flags): a copy
        coco.createIndex()
        # loadRes adds fields (area, bbox, id) to the results it is given: give it copies.
        evaluation = COCOeval(coco, coco.loadRes([dict(result) for result in results]), iouType="segm")
        evaluation.params.useCats = 0
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    # COCOeval says -1 where no object falls in a size range: no score there.
    return {name: (float(value) if value >= 0 else math.nan) for name, value in zip(COCO_METRICS, evaluation.stats)}


def best_matches(masks: list, truth_rles: list) -> list:
    """Per ground-truth object, (Dice, IoU) of the automatic mask that overlaps it most (0, 0 without masks)."""
    if not masks:
        return [(0.0, 0.0)] * len(truth_rles)
    predicted = [{"size": m["size"], "counts": m["counts"].encode()} for m in masks]
    truth = [{"size": t["size"], "counts": t["counts"].encode()} for t in truth_rles]
    ious = np.asarray(_coco_mask().iou(predicted, truth, [0] * len(truth))).reshape(len(predicted), len(truth))
    best = ious.max(axis=0)
    return [(float(2 * iou / (1 + iou)), float(iou)) for iou in best]  # Dice = 2 IoU / (1 + IoU), per mask pair


def score_automatic(model, processor, source, images, output_dir: Path, settings: AutomaticSettings,
                    overlay_images: int, provenance: dict, log) -> dict:
    """Generate every image's automatic masks and write OUT (atomically): `masks.json` (COCO results, class-agnostic:
    category_id 1), `metrics.json` (the COCO scores, Dice/IoU per object, image and class, per image its mask count)
    and `overlays/<image>.png` (ground truth | automatic masks) for the first `overlay_images` images. Returns the
    summary written to metrics.json."""
    model.eval()
    truth = ground_truth(source, images)
    truth_by_image = {}
    for annotation in truth["annotations"]:
        truth_by_image.setdefault(annotation["image_id"], []).append(annotation["segmentation"])
    results, records = [], []
    with atomic_output_dir(output_dir, flag="--output-dir") as partial:
        (partial / "overlays").mkdir()
        for index, ref in enumerate(images):
            image = source.image(ref.key)
            generated = generate_masks(model, processor, image, settings)
            encoded = [encode(item["mask"]) for item in generated]
            results += [{"image_id": ref.key, "category_id": 1, "segmentation": rle, "score": item["score"]}
                        for rle, item in zip(encoded, generated)]
            matches = best_matches(encoded, truth_by_image[ref.key])
            records.append({"index": index, "name": ref.name, "image_id": ref.key, "masks": len(generated),
                            "objects": [{"name": obj.name, "class_id": obj.class_id, "dice": dice, "iou": iou}
                                        for obj, (dice, iou) in zip(ref.objects, matches)]})
            if index < overlay_images:
                truth_masks = np.stack([source.mask(obj.key) for obj in ref.objects])
                shown = np.stack([item["mask"] for item in generated]) if generated else truth_masks[:0]
                overlay(image, truth_masks, shown).save(partial / "overlays" / f"{Path(ref.name).stem}.png")
        scores = coco_scores(truth, results)
        summary = {**scores, "masks": len(results), **summarize(records, source.class_names)}
        for record in records:
            for obj in record["objects"]:
                obj["class"] = source.class_names[obj.pop("class_id")]
        (partial / "masks.json").write_text(json.dumps(results))
        (partial / "metrics.json").write_text(json.dumps(
            {**provenance, "automatic": asdict(settings), **summary, "per_image": records}, indent=1))
    log(f"automatic masks: AP {scores['ap']:.4f}, AP50 {scores['ap50']:.4f}, AR@100 {scores['ar100']:.4f}; "
        f"{len(results)} masks, {summary['objects']} objects in {summary['images']} images; best-mask Dice "
        f"{summary['dice']:.4f}, IoU {summary['iou']:.4f}")
    for name, class_scores in summary["classes"].items():
        log(f"  {name}: Dice {class_scores['dice']:.4f}, IoU {class_scores['iou']:.4f} ({class_scores['objects']} "
            "objects)")
    log(f"written to {output_dir}")
    return summary


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))

"""Prompts, mask decoding, losses and scores shared by finetune.py and evaluate.py.

An item is one image with up to K objects: the image is encoded once and each object's prompt (a box and/or points
drawn from its mask) is decoded against that one embedding, as SAM's own training does. Scores are Dice and IoU of
the binarised mask at the image's original resolution (the processor's `post_process_masks`), per object, then
averaged per image and per class.

Every family (SAM, SAM-HQ, SAM 2) goes through the same code: the processor (`processing.model_processor`) sets the
geometry, `decode_masks` the family's forward arguments and outputs.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from .processing import HQ_TOKEN_ONLY_DEFAULT, decode_options, low_res_target


def object_prompt(box, mask, rng, prompt: str, num_points: int, num_negative_points: int, box_jitter: float):
    """(box or None, points or None, point labels or None) for one object, in image pixels.

    Boxes: the tight box, each edge moved by up to `box_jitter` of the box side when `rng` is given (SAM's recipe).
    Points: `num_points` inside the mask (label 1) and `num_negative_points` outside it (label 0); where the mask
    fills the whole image, the negative points fall back to the mask (labelled 0 still: no object lies outside)."""
    height, width = mask.shape
    out_box = points = labels = None
    if "box" in prompt:
        out_box = np.array(box, dtype=np.float64)
        if box_jitter > 0:
            side = np.array([out_box[2] - out_box[0], out_box[3] - out_box[1]] * 2) + 1
            out_box += rng.uniform(-1, 1, 4) * box_jitter * side
            out_box = np.clip(out_box, 0, [width - 1, height - 1] * 2)
            out_box[2:] = np.maximum(out_box[2:], out_box[:2] + 1)
        out_box = out_box.tolist()
    if "point" in prompt:
        points, labels = [], []
        for inside, count in ((mask, num_points), (~mask if (~mask).any() else mask, num_negative_points)):
            rows, cols = np.nonzero(inside)
            chosen = rng.choice(len(rows), count, replace=len(rows) < count)
            points += [[float(cols[i]), float(rows[i])] for i in chosen]
        labels = [1] * num_points + [0] * num_negative_points
    return out_box, points, labels


class PromptedImages(torch.utils.data.Dataset):
    """Processor inputs plus one prompt and one low-res target per object, for each `ImageRef`.

    Training items are keyed `(epoch, index)`: up to `objects_per_image` objects are drawn, and prompt noise too, from
    a generator seeded by `(seed, epoch, index)`, so an item is the same whichever process or worker makes it and
    whenever (exact resume). Evaluation items are keyed by `index` alone: every object, tight boxes, fixed points, and
    the full-resolution masks for scoring.
    """

    def __init__(self, source, images, processor, prompt="box", num_points=1, num_negative_points=0,
                 box_jitter=0.0, seed=0, objects_per_image=None):
        self.source, self.images, self.processor = source, images, processor
        self.prompt, self.num_points, self.num_negative_points = prompt, num_points, num_negative_points
        self.box_jitter, self.seed, self.objects_per_image = box_jitter, seed, objects_per_image

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        training = isinstance(key, tuple)
        epoch, index = key if training else (0, key)
        ref = self.images[index]
        rng = np.random.default_rng([self.seed, int(training), epoch, index])
        chosen = range(len(ref.objects))
        if training and self.objects_per_image and len(ref.objects) > self.objects_per_image:
            chosen = sorted(rng.choice(len(ref.objects), self.objects_per_image, replace=False).tolist())
        objects = [ref.objects[i] for i in chosen]
        masks = [self.source.mask(obj.key) for obj in objects]
        boxes, points, labels = [], [], []
        for obj, mask in zip(objects, masks):
            box, obj_points, obj_labels = object_prompt(obj.box, mask, rng, self.prompt, self.num_points,
                                                        self.num_negative_points,
                                                        self.box_jitter if training else 0.0)
            boxes.append(box), points.append(obj_points), labels.append(obj_labels)
        prompt = {}
        if "box" in self.prompt:
            prompt["input_boxes"] = [boxes]
        if "point" in self.prompt:
            prompt["input_points"], prompt["input_labels"] = [points], [labels]
        encoded = self.processor(images=self.source.image(ref.key), return_tensors="pt", **prompt)
        item = {
            "pixel_values": encoded["pixel_values"][0],
            "labels": torch.from_numpy(np.stack([low_res_target(m, self.processor) for m in masks])),
            "original_size": encoded["original_sizes"][0],
            "index": index,
            "class_ids": [obj.class_id for obj in objects],
            "object_names": [obj.name for obj in objects],
        }
        for name in ("input_boxes", "input_points"):
            if name in encoded:
                item[name] = encoded[name][0].float()  # (objects, 4) / (objects, points, 2)
        if "input_labels" in encoded:
            item["input_labels"] = encoded["input_labels"][0].long()
        if "reshaped_input_sizes" in encoded:  # SAM, SAM-HQ: the image's size before padding; SAM 2 does not pad
            item["reshaped_input_size"] = encoded["reshaped_input_sizes"][0]
        if not training:
            item["masks"] = np.stack(masks)  # (objects, height, width) at the original resolution
        return item


PROMPT_KEYS = ("input_boxes", "input_points", "input_labels")


def collate(items: list) -> dict:
    """Stack items, padding every image to the batch's largest object count. A padding object repeats the image's
    first prompt (the decoder needs a valid one), has an all-zero target and `object_valid` False, so losses and
    scores leave it out."""
    most = max(len(item["labels"]) for item in items)

    def padded(tensor):
        extra = most - len(tensor)
        return torch.cat([tensor, tensor[:1].expand(extra, *tensor.shape[1:])]) if extra else tensor

    batch = {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "labels": torch.stack([F.pad(item["labels"], (0, 0, 0, 0, 0, most - len(item["labels"]))) for item in items]),
        "object_valid": torch.tensor([[k < len(item["labels"]) for k in range(most)] for item in items]),
        "original_sizes": torch.stack([item["original_size"] for item in items]),
    }
    if "reshaped_input_size" in items[0]:
        batch["reshaped_input_sizes"] = torch.stack([item["reshaped_input_size"] for item in items])
    for name in PROMPT_KEYS:
        if name in items[0]:
            batch[name] = torch.stack([padded(item[name]) for item in items])
    for name in ("index", "class_ids", "object_names", "masks"):
        if name in items[0]:
            batch[name] = [item[name] for item in items]
    return batch


def decode_masks(model, batch: dict, hq_token_only: bool = HQ_TOKEN_ONLY_DEFAULT):
    """Low-res mask logits (batch, objects, grid, grid), predicted IoU (batch, objects) and SAM 2's object-score
    logits (batch, objects; None for SAM and SAM-HQ): one image embedding per image, one mask per object prompt.

    `multimask_output=False` for every family, as SAM trains single masks. SAM-HQ: the HQ token's mask alone with
    `hq_token_only`, else SAM's plus HQ's logits; its IoU is SAM's token's either way (the HQ token has no IoU head).
    SAM 2: the single-mask token's mask in training mode; in eval mode its `dynamic_multimask_via_stability` (on in
    the released configs) swaps an unstable single mask (stability score < 0.98) for the best-IoU one of the three
    multimask outputs, as SAM 2's own predictor does for one-click prompts; `object_score_logits` says whether the
    object is in the image (> 0)."""
    inputs = {k: batch[k] for k in ("pixel_values", *PROMPT_KEYS) if k in batch}
    outputs = model(**inputs, **decode_options(model, hq_token_only))
    object_scores = getattr(outputs, "object_score_logits", None)
    return (outputs.pred_masks[:, :, 0].float(), outputs.iou_scores[:, :, 0].float(),
            None if object_scores is None else object_scores[:, :, 0].float())


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, pixel_loss: str) -> torch.Tensor:
    """Per-object Dice + BCE (or focal) on (objects, height, width) logits and {0, 1} targets."""
    probs = logits.sigmoid()
    intersection = (probs * target).sum((1, 2))
    dice = 1 - (2 * intersection + 1) / (probs.sum((1, 2)) + target.sum((1, 2)) + 1)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if pixel_loss == "focal":  # RetinaNet's sigmoid focal loss, alpha 0.25, gamma 2, as SAM uses
        p_t = probs * target + (1 - probs) * (1 - target)
        bce = (0.25 * target + 0.75 * (1 - target)) * (1 - p_t) ** 2 * bce
    return dice + bce.mean((1, 2))


def low_res_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of (objects, grid, grid) logits > 0 with their targets: the IoU head's training target."""
    predicted, target = logits > 0, target > 0.5
    intersection = (predicted & target).sum((1, 2)).float()
    union = (predicted | target).sum((1, 2)).float()
    return intersection / union.clamp(min=1)


def object_losses(model, batch: dict, pixel_loss: str, iou_loss_weight: float = 0.0,
                  hq_token_only: bool = HQ_TOKEN_ONLY_DEFAULT):
    """(loss per real object (n,), low-res logits (batch, objects, grid, grid)); padding objects left out.

    SAM 2 adds its object-score loss as SAM 2's training does (`loss_class`: BCE, weight 1), its target "present":
    every object here has a non-empty mask."""
    logits, iou_prediction, object_scores = decode_masks(model, batch, hq_token_only)
    valid = batch["object_valid"]
    real_logits, target = logits[valid], batch["labels"][valid]
    losses = segmentation_loss(real_logits, target, pixel_loss)
    if object_scores is not None:
        present = object_scores[valid]
        losses = losses + F.binary_cross_entropy_with_logits(present, torch.ones_like(present), reduction="none")
    if iou_loss_weight > 0:
        losses = losses + iou_loss_weight * (iou_prediction[valid] - low_res_iou(real_logits, target).detach()) ** 2
    return losses, logits


def dice_iou(predicted: np.ndarray, target: np.ndarray) -> tuple:
    """Dice and IoU of two bool masks (empty both: 1, 1)."""
    intersection = np.logical_and(predicted, target).sum()
    total, union = predicted.sum() + target.sum(), np.logical_or(predicted, target).sum()
    return (2 * intersection / total if total else 1.0), (intersection / union if union else 1.0)


def full_resolution_masks(processor, logits: torch.Tensor, batch: dict) -> list:
    """Per image, bool masks (objects, height, width) at its original size (padding objects dropped): the
    processor's post-processing (SAM: padding cropped with the reshaped input size, then resized; SAM 2: resized)."""
    sizes = [batch[k].cpu() for k in ("original_sizes", "reshaped_input_sizes") if k in batch]
    masks = processor.post_process_masks(logits[:, :, None].float().cpu(), *sizes)
    return [m[:, 0][batch["object_valid"][i].cpu()].numpy() for i, m in enumerate(masks)]


def score_images(predicted: list, batch: dict, names: list) -> list:
    """One record per image: its name and, per object, its class id, Dice and IoU at full resolution."""
    records = []
    for masks, truth, index, class_ids, object_names in zip(predicted, batch["masks"], batch["index"],
                                                            batch["class_ids"], batch["object_names"]):
        objects = []
        for mask, true_mask, class_id, object_name in zip(masks, truth, class_ids, object_names):
            dice, iou = dice_iou(mask, true_mask)
            objects.append({"name": object_name, "class_id": class_id, "dice": float(dice), "iou": float(iou)})
        records.append({"index": index, "name": names[index], "objects": objects})
    return records


def summarize(records: list, class_names: list) -> dict:
    """Mean Dice/IoU over objects (`dice`, `iou`), over images of their objects' means (`image_dice`, `image_iou`)
    and per class name (`classes`: name -> dice, iou, objects)."""
    objects = [obj for record in records for obj in record["objects"]]

    def mean(values):
        return float(np.mean(values)) if values else math.nan

    per_class = {}
    for class_id in sorted({obj["class_id"] for obj in objects}):
        chosen = [obj for obj in objects if obj["class_id"] == class_id]
        per_class[class_names[class_id]] = {"dice": mean([o["dice"] for o in chosen]),
                                            "iou": mean([o["iou"] for o in chosen]), "objects": len(chosen)}
    return {
        "dice": mean([o["dice"] for o in objects]), "iou": mean([o["iou"] for o in objects]),
        "image_dice": mean([mean([o["dice"] for o in r["objects"]]) for r in records]),
        "image_iou": mean([mean([o["iou"] for o in r["objects"]]) for r in records]),
        "images": len(records), "objects": len(objects), "classes": per_class,
    }


@torch.no_grad()
def evaluate(accelerator, model, loader, processor, names: list, pixel_loss: str, on_image=None,
             hq_token_only: bool = HQ_TOKEN_ONLY_DEFAULT) -> list:
    """Score `model` on a loader prepared by `accelerator` (each process a share of the images); return the records
    of every image once, in dataset order, each object also with its low-res `loss`.

    `on_image(record, image masks, batch, position)` is called on the process that scored each image, e.g. to write
    overlays."""
    was_training = model.training
    model.eval()
    records = []
    for batch in loader:
        with accelerator.autocast():
            losses, logits = object_losses(model, batch, pixel_loss, hq_token_only=hq_token_only)
        predicted = full_resolution_masks(processor, logits, batch)
        mine = score_images(predicted, batch, names)
        per_image = losses.float().cpu().split(batch["object_valid"].sum(1).tolist())
        for position, (record, image_losses) in enumerate(zip(mine, per_image)):
            for obj, loss in zip(record["objects"], image_losses.tolist()):
                obj["loss"] = loss
            if on_image is not None:
                on_image(record, predicted[position], batch, position)
        records += accelerator.gather_for_metrics(mine, use_gather_object=True)
    model.train(was_training)
    return sorted(records, key=lambda record: record["index"])

"""The shared training/evaluation pieces on hand-made inputs: several objects of an image decoded against one image
embedding give the loss of those objects one by one; Dice and IoU at full resolution, per object, image and class,
against hand-computed values; objects sampled per image reproducibly."""

import numpy as np
import pytest
import torch
from PIL import Image
from sam_testing import random_stock_sam, tiny_sam_config

from sam_split import SamSplitModel
from sam_split.tools.data import DataOptions, open_source, scan
from sam_split.tools.processing import mask_grid_size, model_processor
from sam_split.tools.segmentation import (
    PromptedImages,
    collate,
    dice_iou,
    full_resolution_masks,
    object_losses,
    score_images,
    summarize,
)


def write_objects(root, objects_per_image: dict, size: int = 64):
    """Images `name` with the given number of disjoint square objects each, masks `name_k.png`."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for name, count in objects_per_image.items():
        image = rng.normal(60, 20, (size, size, 3))
        for k in range(count):
            mask = np.zeros((size, size), bool)
            row, col = divmod(k, 3)
            mask[4 + 20 * row : 16 + 20 * row, 4 + 20 * col : 14 + 20 * col] = True
            image[mask] += 120
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{name}_{k}.png")
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "images" / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = write_objects(tmp_path_factory.mktemp("objects"), {"a": 3, "b": 1, "c": 5})
    model = SamSplitModel.from_sam(random_stock_sam(tiny_sam_config()))
    processor = model_processor(model.config)
    source = open_source(str(root), DataOptions())
    images = scan(source, processor, strict=True, log=print)
    return model, processor, source, images


@pytest.mark.parametrize("prompt", ["box", "box+point"])
def test_several_objects_per_image_give_the_same_loss_as_those_objects_one_by_one(setup, prompt):
    model, processor, source, images = setup
    dataset = PromptedImages(source, images[:2], processor, prompt, num_points=2, num_negative_points=1)
    together = collate([dataset[0], dataset[1]])  # 3 + 1 objects, image b padded to 3
    assert together["input_boxes"].shape == (2, 3, 4) and together["object_valid"].tolist() == [[1, 1, 1],
                                                                                                 [1, 0, 0]]
    if prompt == "box+point":
        assert together["input_labels"][0].tolist() == [[1, 1, 0]] * 3  # 2 positive points, 1 negative

    def loss_and_gradient(batch):
        model.zero_grad()
        losses, _ = object_losses(model, batch, "bce", iou_loss_weight=0.5)
        losses.mean().backward()
        return losses.detach(), model.mask_decoder.iou_token.weight.grad.clone()

    losses, gradient = loss_and_gradient(together)
    one_by_one, gradients = [], []
    for image in range(2):
        for k in range(int(together["object_valid"][image].sum())):
            single = {name: together[name][image : image + 1] for name in ("pixel_values", "original_sizes",
                                                                           "reshaped_input_sizes")}
            single.update({name: together[name][image : image + 1, k : k + 1]
                           for name in ("labels", "object_valid", "input_boxes", "input_points", "input_labels")
                           if name in together})
            loss, grad = loss_and_gradient(single)
            one_by_one.append(loss)
            gradients.append(grad)
    assert len(losses) == 4
    assert torch.allclose(losses, torch.cat(one_by_one), atol=1e-5)
    assert torch.allclose(gradient, torch.stack(gradients).mean(0), atol=1e-6)


def test_objects_are_sampled_per_image_reproducibly(setup):
    model, processor, source, images = setup
    dataset = PromptedImages(source, images, processor, "box", box_jitter=0.1, seed=3, objects_per_image=2)
    names = {epoch: dataset[(epoch, 2)]["object_names"] for epoch in range(6)}  # image c: 5 objects, 2 drawn
    assert all(len(chosen) == 2 for chosen in names.values())
    assert dataset[(4, 2)]["object_names"] == names[4]
    assert torch.equal(dataset[(4, 2)]["input_boxes"], dataset[(4, 2)]["input_boxes"])
    assert len({tuple(chosen) for chosen in names.values()}) > 1  # other epochs, other objects
    assert len(dataset[(0, 1)]["object_names"]) == 1 and len(dataset[2]["object_names"]) == 5  # eval: every object


def test_dice_and_iou_per_object_image_and_class_by_hand():
    """Image 0: a class-0 object of 16 px predicted as 8 of them (Dice 2*8/24, IoU 8/16) and an exact class-1 object
    (1, 1); image 1: a class-0 object of 10 px predicted entirely elsewhere (0, 0)."""
    truth_a = np.zeros((2, 8, 8), bool)
    truth_a[0, :4, :4] = True
    truth_a[1, 6, 6:8] = True
    predicted_a = truth_a.copy()
    predicted_a[0, :2] = False
    truth_b, predicted_b = np.zeros((1, 5, 6), bool), np.zeros((1, 5, 6), bool)
    truth_b[0, 0, :5], truth_b[0, 1, :5], predicted_b[0, 3:5, :5] = True, True, True
    batch = {"masks": [truth_a, truth_b], "index": [0, 1], "class_ids": [[0, 1], [0]],
             "object_names": [["a0", "a1"], ["b0"]]}
    records = score_images([predicted_a, predicted_b], batch, names=["a.png", "b.png"])
    assert [[(o["dice"], o["iou"]) for o in r["objects"]] for r in records] == [
        [(pytest.approx(2 / 3), 0.5), (1.0, 1.0)], [(0.0, 0.0)]]
    summary = summarize(records, ["cell", "nucleus"])
    assert summary["classes"] == {"cell": {"dice": pytest.approx(1 / 3), "iou": 0.25, "objects": 2},
                                  "nucleus": {"dice": 1.0, "iou": 1.0, "objects": 1}}
    assert summary["dice"] == pytest.approx((2 / 3 + 1 + 0) / 3) and summary["iou"] == pytest.approx(0.5)
    assert summary["image_dice"] == pytest.approx((5 / 6 + 0) / 2) and summary["image_iou"] == pytest.approx(0.375)
    assert (summary["images"], summary["objects"]) == (2, 3)


def test_masks_are_scored_at_the_original_resolution():
    """A 64x48 image (padded to 64x64 for the model): low-res logits of +-10 on 4-px blocks come back, through the
    processor's post-processing (bilinear x4, crop, threshold 0), as those blocks at 48x64, padding objects dropped.
    Each edge lands exactly on the block border; only the 4 corner pixels fall off: there both bilinear weights are
    5/8, so the logit is 10 * (2 * (5/8)^2 - 1) < 0."""
    config = tiny_sam_config()
    processor, grid = model_processor(config), mask_grid_size(config)
    encoded = processor(images=Image.new("RGB", (64, 48)), return_tensors="pt")
    low_res = torch.full((1, 2, grid, grid), -10.0)
    low_res[0, 0, 2:5, 3:9] = 10.0  # rows 8..19, columns 12..35 at full resolution
    batch = {"original_sizes": encoded["original_sizes"], "reshaped_input_sizes": encoded["reshaped_input_sizes"],
             "object_valid": torch.tensor([[True, False]])}
    [masks] = full_resolution_masks(processor, low_res, batch)
    expected = np.zeros((1, 48, 64), bool)
    expected[0, 8:20, 12:36] = True
    expected[0, [8, 8, 19, 19], [12, 35, 12, 35]] = False
    assert masks.shape == (1, 48, 64) and np.array_equal(masks, expected)
    block = np.zeros((48, 64), bool)
    block[8:20, 12:36] = True
    assert dice_iou(masks[0], block) == (pytest.approx(2 * 284 / (284 + 288)), pytest.approx(284 / 288))

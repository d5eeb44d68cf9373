"""Automatic masks (evaluate.py --automatic, tools/automatic.py) for SAM, SAM-HQ and SAM 2, with and without
torchvision.

Without torchvision: the pure-torch NMS fallback on hand-checked cases; each generated mask is the model's own mask for
its grid point (decoded alone, through the processor's point normalisation) for every family, SAM 2's points placed
right on non-square images; the COCO scoring gives 1 to the ground truth itself and less to worse masks; evaluate.py
--automatic writes COCO results, metrics and overlays and refuses non-COCO data in one line before loading anything;
a few fine-tuning steps raise automatic-mask AP over the base, for SAM and SAM 2.

With torchvision (`-m torchvision`; they skip without it): the fallback equals `torchvision.ops.batched_nms` on random
and tied cases, transformers' post-processing through torchvision equals the fallback's, SAM 2's own mask-generation
methods equal the SAM ones that stand in for them, and transformers' `mask-generation` pipeline gives our masks.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image
from test_family_training import random_stock
from test_finetune import FAST, trainable_random_sam

from sam_split import evaluate, finetune
from sam_split.tools import automatic, compat
from sam_split.tools.automatic import AutomaticSettings, generate_masks, model_points
from sam_split.tools.cli import ToolError
from sam_split.tools.data import DataOptions, open_source, scan
from sam_split.tools.processing import model_processor

needs_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                                       reason="torchvision is not installed")
ALL_MASKS = AutomaticSettings(points_per_side=4, points_per_batch=5, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                              nms_thresh=1.0)  # every mask of every point kept: NMS drops only IoU > 1


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def models() -> dict:
    return {"sam": trainable_random_sam().eval(), "sam_hq": random_stock("sam_hq", trainable=True),
            "sam2": random_stock("sam2", trainable=True)}


def shapes_image(rng, width: int, height: int, count: int = 2) -> tuple:
    """A noisy grey image with up to `count` disjoint bright objects (discs and rectangles): (image, [(mask, class
    id)])."""
    image = rng.normal(60, 20, (height, width, 3))
    rows, cols = np.mgrid[:height, :width]
    objects, taken = [], np.zeros((height, width), bool)
    for _ in range(40):  # bounded: up to `count` disjoint objects
        if len(objects) == count:
            break
        kind = int(rng.integers(2))
        radius = int(rng.integers(7, 13))
        row, col = int(rng.integers(radius, height - radius)), int(rng.integers(radius, width - radius))
        if kind == 0:
            mask = (rows - row) ** 2 + (cols - col) ** 2 <= radius**2
        else:
            mask = (abs(rows - row) <= radius) & (abs(cols - col) <= radius * 0.7)
        if (mask & np.pad(taken, 2)[2:-2, 2:-2]).any() or (mask & taken).any():
            continue
        taken |= mask
        image[mask] += 100 + 40 * kind
        objects.append((mask, kind))
    return Image.fromarray(image.clip(0, 255).astype(np.uint8)), objects


def write_coco_shapes(root: Path, count: int, seed: int, size=(64, 64), objects: int = 2) -> Path:
    """`count` images of `shapes_image` (up to `objects` each) and their instances (compressed RLE) in
    ROOT/instances.json."""
    from pycocotools import mask as coco_mask

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "disc"}, {"id": 2, "name": "rect"}]}
    for i in range(count):
        image, shapes = shapes_image(rng, *size, objects)
        image.save(root / f"img{i:02d}.png")
        coco["images"].append({"id": i + 1, "file_name": f"img{i:02d}.png", "width": size[0], "height": size[1]})
        for mask, kind in shapes:
            rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1, "category_id": kind + 1,
                                        "iscrowd": 0, "segmentation": {"size": [size[1], size[0]],
                                                                       "counts": rle["counts"].decode()}})
    (root / "instances.json").write_text(json.dumps(coco))
    return root / "instances.json"


# ------------------------------------------------------------------------------------------------- NMS fallback


def test_fallback_nms_on_hand_checked_cases():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 10], [0, 0, 10, 5.0]])
    scores = torch.tensor([0.5, 0.9, 0.4, 0.9, 0.3])
    same = torch.zeros(5, dtype=torch.int64)
    # Box 1 (0.9, first of the tie) keeps; box 3 (0.9, IoU 9/11 with 1) and box 0 go; box 4 has IoU 1/2 with box 3
    # (suppressed itself, so not counted) and 50/110 with box 1: kept at 0.5; box 2 overlaps nothing.
    assert compat.batched_nms(boxes, scores, same, 0.5).tolist() == [1, 2, 4]
    # At exactly the threshold a box stays (suppression needs IoU above it): IoU(4, 0) = 0.5.
    assert compat.batched_nms(boxes[[0, 4]], torch.tensor([0.9, 0.8]), same[:2], 0.5).tolist() == [0, 1]
    assert compat.batched_nms(boxes[[0, 4]], torch.tensor([0.9, 0.8]), same[:2], 0.49).tolist() == [0]
    # Categories never suppress each other (0: boxes 0, 2, 4, where IoU(4, 0) = 0.5 keeps 4); ties keep index order.
    assert compat.batched_nms(boxes, scores, torch.tensor([0, 1, 0, 2, 0]), 0.5).tolist() == [1, 3, 0, 2, 4]
    assert compat.batched_nms(boxes, scores, torch.tensor([0, 1, 0, 2, 0]), 0.4).tolist() == [1, 3, 0, 2]
    assert compat.batched_nms(boxes[:0], scores[:0], same[:0], 0.5).tolist() == []
    # IoU 24/80 is 0.30000001 in float32: above a threshold of 0.3 (a double), as torchvision's kernel compares it.
    pair = torch.tensor([[6, 7, 14, 13], [3, 6, 17, 10.0]])
    assert compat.batched_nms(pair, torch.tensor([1.0, 0.75]), same[:2], 0.3).tolist() == [0]


def nms_cases():
    """Random boxes (floats and small integers, 1 or 3 categories) and ties (equal scores, identical boxes)."""
    generator = torch.Generator().manual_seed(0)
    for count in (1, 2, 7, 60, 400):
        for integral in (False, True):
            corners = torch.rand(count, 2, generator=generator) * 50
            sides = torch.rand(count, 2, generator=generator) * 30
            if integral:
                corners, sides = corners.round(), sides.round()
            boxes = torch.cat([corners, corners + sides], 1)
            scores = torch.rand(count, generator=generator)
            if integral:  # ties: scores from a few levels
                scores = (scores * 4).round() / 4
            categories = torch.randint(0, 3, (count,), generator=generator)
            yield boxes, scores, categories
    boxes = torch.tensor([[0, 0, 10, 10.0]] * 6 + [[2, 2, 12, 12.0]] * 4)
    yield boxes, torch.full((10,), 0.5), torch.zeros(10, dtype=torch.int64)
    yield boxes, torch.tensor([0.5, 0.7] * 5), torch.tensor([0, 1] * 5)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7, 1.0])
@pytest.mark.torchvision
@needs_torchvision
def test_fallback_nms_equals_torchvision(threshold):
    from torchvision.ops import batched_nms

    for boxes, scores, categories in nms_cases():
        for idxs in (torch.zeros_like(categories), categories):
            expected = batched_nms(boxes, scores, idxs, threshold)
            assert torch.equal(compat.batched_nms(boxes, scores, idxs, threshold), expected), (boxes, scores, idxs)


# ------------------------------------------------------------------------------------------------ generation


def decoded_alone(model, processor, image, point, multimask_index: int, family: str) -> np.ndarray:
    """The model's mask for one pixel point, through the processor's own point normalisation, at full size."""
    inputs = processor(images=image, input_points=[[[point]]], input_labels=[[[1]]], return_tensors="pt")
    extra = {"hq_token_only": False} if family == "sam_hq" else {}
    with torch.no_grad():
        outputs = model(pixel_values=inputs["pixel_values"], input_points=inputs["input_points"].float(),
                        input_labels=inputs["input_labels"], multimask_output=True, **extra)
    sizes = {k: inputs[k] for k in ("reshaped_input_sizes",) if k in inputs}
    masks = processor.image_processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"], **sizes)
    return masks[0][0, multimask_index].numpy()


@pytest.mark.parametrize("family", ["sam", "sam_hq", "sam2"])
def test_each_mask_is_the_models_own_for_its_grid_point(family):
    """With nothing filtered, the masks are the 3 multimask outputs of each grid point, each equal (but for pixels
    whose logit is within 1e-4 of the threshold) to the model's mask for that point decoded alone from its pixel
    coordinates, on a non-square image (SAM 2 stretches it: its grid needs `model_points`' correction)."""
    model = models()[family]
    processor = model_processor(model.config)
    image, _ = shapes_image(np.random.default_rng(3), 64, 40)
    generated = generate_masks(model, processor, image, ALL_MASKS)
    assert len(generated) == 4 * 4 * 3
    grid = (np.arange(4) + 0.5) / 4
    expected = [decoded_alone(model, processor, image, [float(x * 64), float(y * 40)], k, family)
                for y in grid for x in grid for k in range(3)]
    unmatched = []
    for mask in expected:
        if not any((item["mask"] != mask).mean() < 0.01 for item in generated):
            unmatched.append(mask.sum())
    assert not unmatched, f"{len(unmatched)} point masks not generated"
    assert all(item["mask"].shape == (40, 64) for item in generated)


def test_sam2_grid_points_are_the_processors_normalisation_of_the_pixel_grid():
    """transformers' SAM 2 `generate_crop_boxes` scales grid points by the longest side as SAM does; SAM 2 stretches
    the image to a square. `model_points` gives what the SAM 2 processor makes of the same pixel points (and leaves
    SAM's, already right, alone)."""
    for family, model in (("sam", trainable_random_sam()), ("sam2", random_stock("sam2"))):
        processor = model_processor(model.config)
        helper = compat.mask_generation_processor(processor.image_processor)
        image = Image.new("RGB", (64, 40))
        _, points, _, _ = helper.generate_crop_boxes(image, 64, 0, 512 / 1500, 4, 1)
        grid = (np.arange(4) + 0.5) / 4
        pixels = [[float(x * 64), float(y * 40)] for y in grid for x in grid]
        normalised = processor(images=image, input_points=[[[p] for p in pixels]], return_tensors="pt")["input_points"]
        ours = model_points(torch.as_tensor(points).float()[:, :, 0], (40, 64), 64, family)
        assert torch.allclose(ours[0], normalised[0, :, 0].float(), atol=1e-4)
        if family == "sam2":
            assert not torch.allclose(torch.as_tensor(points).float()[0, :, 0], normalised[0, :, 0].float(), atol=1)


# ------------------------------------------------------------------------------------------------------ scoring


def test_coco_scores_are_one_for_the_truth_and_lower_for_worse_masks(tmp_path):
    path = write_coco_shapes(tmp_path / "data", 3, seed=0)
    sam = trainable_random_sam()
    source = open_source(str(path), DataOptions())
    images = scan(source, model_processor(sam.config), strict=True, log=print)
    truth = automatic.ground_truth(source, images)
    perfect = [{"image_id": a["image_id"], "category_id": 1, "segmentation": a["segmentation"], "score": 1.0}
               for a in truth["annotations"]]
    scores = automatic.coco_scores(truth, perfect)
    assert scores["ap"] == pytest.approx(1.0) and scores["ar100"] == pytest.approx(1.0)
    # The first object's mask moved 5 pixels right: IoU under 0.5 for these small shapes: a miss, AP drops.
    first = source.mask(images[0].objects[0].key)
    moved = [{**perfect[0], "segmentation": automatic.encode(np.roll(first, 5, axis=1))}] + perfect[1:]
    assert automatic.coco_scores(truth, moved)["ap"] < 0.99
    assert automatic.coco_scores(truth, [])["ap"] == 0.0
    matches = automatic.best_matches([p["segmentation"] for p in moved[:2]],
                                     [a["segmentation"] for a in truth["annotations"][:2]])
    assert matches[1] == (1.0, 1.0) and 0 < matches[0][1] < 1
    assert matches[0][0] == pytest.approx(2 * matches[0][1] / (1 + matches[0][1]))


def test_automatic_refuses_data_that_is_not_coco_before_loading(tmp_path, monkeypatch, capsys):
    from sam_split.tools.cli import run_tool

    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    monkeypatch.setattr(evaluate, "resolve", lambda *a, **k: pytest.fail("resolved a model"))
    (tmp_path / "images").mkdir()
    code = run_tool(lambda: evaluate.main(["--model", "x/y", "--data", str(tmp_path), "--output-dir",
                                           str(tmp_path / "out"), "--automatic"]))
    assert code == 1
    error = capsys.readouterr().err.strip()
    assert error == (f"error: --automatic scores against instance annotations: --data must be a COCO instances .json "
                     f"(got {tmp_path}: a folder)")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ToolError, match="one process"):
        evaluate.main(["--model", "x/y", "--data", str(write_coco_shapes(tmp_path / "d", 1, 0)), "--output-dir",
                       str(tmp_path / "out"), "--automatic"])
    assert not (tmp_path / "out").exists()


def test_evaluate_automatic_writes_coco_results_metrics_and_overlays(tmp_path):
    from pycocotools import mask as coco_mask

    data = write_coco_shapes(tmp_path / "data", 3, seed=1)
    base = tmp_path / "base"
    trainable_random_sam().save_pretrained(base)
    out = tmp_path / "eval"
    summary = evaluate.main(["--model", str(base), "--data", str(data), "--output-dir", str(out), "--automatic",
                             "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
                             "--crop-layers", "1", "--overlay-images", "2"])
    metrics = json.loads((out / "metrics.json").read_text())
    results = json.loads((out / "masks.json").read_text())
    assert metrics["masks"] == len(results) == summary["masks"] > 0
    assert {r["image_id"] for r in results} <= {1, 2, 3}
    assert all(coco_mask.decode({**r["segmentation"], "counts": r["segmentation"]["counts"].encode()}).shape
               == (64, 64) for r in results)
    for name in ("ap", "ap50", "ar100", "dice", "iou", "classes", "per_image", "automatic"):
        assert name in metrics
    assert metrics["automatic"]["crop_layers"] == 1 and set(metrics["classes"]) <= {"disc", "rect"}
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["img00.png", "img01.png"]
    assert sum(r["masks"] for r in metrics["per_image"]) == len(results)


# --------------------------------------------------------------------------------------- fine-tuning raises AP


@pytest.fixture(scope="module")
def coco_shapes(tmp_path_factory):
    """One object per image: enough for a tiny random model to learn from point prompts in 100 steps."""
    root = tmp_path_factory.mktemp("automatic-shapes")
    return {"train": write_coco_shapes(root / "train", 16, seed=0, objects=1),
            "test": write_coco_shapes(root / "test", 6, seed=1, objects=1)}


# --single-mask: finetune.py trains the single-mask output token, and automatic masks take it (SAM's three multimask
# tokens are left untrained, which is why a fine-tuned model's default automatic masks can come out empty).
AUTOMATIC = ["--automatic", "--single-mask", "--points-per-side", "8", "--pred-iou-thresh", "0.5",
             "--stability-score-thresh", "0", "--overlay-images", "0", "--num-workers", "0"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sam", "sam2"])
def test_a_few_fine_tuning_steps_raise_automatic_mask_ap(coco_shapes, family, tmp_path):
    base = tmp_path / "base"
    (trainable_random_sam() if family == "sam" else random_stock("sam2", trainable=True)).save_pretrained(base)
    finetune.main(["--model", str(base), "--train-data", str(coco_shapes["train"]), "--output-dir",
                   str(tmp_path / "run"), "--train-decoder", "--lr", "1e-2", "--max-steps", "100", "--prompt", "point",
                   "--iou-loss-weight", "1", *FAST])
    scores = {}
    for name, model in (("base", ["--model", str(base)]), ("tuned", ["--adapter", str(tmp_path / "run")])):
        AcceleratorState._reset_state(reset_partial_state=True)
        scores[name] = evaluate.main([*model, "--data", str(coco_shapes["test"]), "--output-dir",
                                      str(tmp_path / f"eval-{name}"), *AUTOMATIC])
    print(family, {name: {k: round(s[k], 4) for k in ("ap", "ap50", "ar100", "dice", "masks")}
                   for name, s in scores.items()})
    assert scores["tuned"]["ap"] > scores["base"]["ap"] + 0.1, scores
    assert scores["tuned"]["ap50"] > scores["base"]["ap50"] + 0.5, scores
    assert scores["tuned"]["ar100"] > scores["base"]["ar100"], scores


# ------------------------------------------------------------------------------------------------- torchvision


@pytest.mark.torchvision
@needs_torchvision
def test_transformers_post_processing_with_torchvision_equals_the_fallback(monkeypatch):
    model = trainable_random_sam().eval()
    processor = model_processor(model.config)
    image, _ = shapes_image(np.random.default_rng(0), 64, 48)
    loose = AutomaticSettings(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0, nms_thresh=0.5)
    with_torchvision = generate_masks(model, processor, image, loose)
    monkeypatch.setattr(compat, "torchvision_available", lambda: False)
    fallback = generate_masks(model, processor, image, loose)
    assert 0 < len(fallback) == len(with_torchvision) < 6 * 6 * 3  # NMS dropped some
    for ours, theirs in zip(fallback, with_torchvision):
        assert np.array_equal(ours["mask"], theirs["mask"]) and ours["score"] == theirs["score"]
        assert ours["box"] == theirs["box"]


@pytest.mark.torchvision
@needs_torchvision
def test_sam2_mask_generation_methods_equal_the_sam_ones_that_stand_in_for_them(monkeypatch):
    """Without torchvision the SAM 2 stand-in processor borrows SAM's `generate_crop_boxes` / `filter_masks` /
    `post_process_for_mask_generation`: with torchvision, SAM 2's own give the same crops, points, kept masks and
    NMS, and the same generated masks."""
    model = random_stock("sam2", trainable=True)
    processor = model_processor(model.config)
    own, stand_in = processor.image_processor, compat.sam_image_processor_class()()
    assert hasattr(own, "filter_masks") and type(own).__name__.startswith("Sam2")
    image, _ = shapes_image(np.random.default_rng(1), 64, 40)
    crops = [helper.generate_crop_boxes(image, 64, 1, 512 / 1500, 4, 1) for helper in (own, stand_in)]
    assert torch.equal(torch.as_tensor(crops[0][0]), torch.as_tensor(crops[1][0]))
    assert torch.allclose(torch.as_tensor(crops[0][1]).float(), torch.as_tensor(crops[1][1]).float())
    generator = torch.Generator().manual_seed(0)
    rows, cols = torch.meshgrid(torch.arange(30.0), torch.arange(40.0), indexing="ij")
    centres, radii = torch.rand(6, 3, 2, generator=generator) * 40, 3 + torch.rand(6, 3, generator=generator) * 8
    # Blobs of logit radius - distance: stable masks, some touching the crop's inner edges (dropped there).
    logits = radii[..., None, None] - ((rows - centres[..., 0, None, None]) ** 2
                                       + (cols - centres[..., 1, None, None]) ** 2).sqrt()
    scores = torch.rand(6, 3, generator=generator)
    crop_box = torch.tensor([0.0, 0.0, 40.0, 30.0])
    kept = [helper.filter_masks(logits, scores, (40, 64), crop_box, 0.2, 0.3, 0, 1)
            for helper in (own, stand_in)]
    assert kept[0][0] == kept[1][0] and 0 < len(kept[0][0]) < 12
    nms = [helper.post_process_for_mask_generation(kept[0][0], torch.as_tensor(kept[0][1]),
                                                   torch.as_tensor(kept[0][2]), 0.3) for helper in (own, stand_in)]
    assert [np.asarray(m).tolist() for m in nms[0][0]] == [np.asarray(m).tolist() for m in nms[1][0]]
    assert torch.equal(torch.as_tensor(nms[0][1]), torch.as_tensor(nms[1][1]))
    assert torch.equal(torch.as_tensor(kept[0][1]), torch.as_tensor(kept[1][1]))
    assert torch.equal(torch.as_tensor(kept[0][2]), torch.as_tensor(kept[1][2]))
    theirs = generate_masks(model, processor, image, ALL_MASKS)
    monkeypatch.setattr(automatic, "mask_generation_processor", lambda image_processor: stand_in)
    ours = generate_masks(model, processor, image, ALL_MASKS)
    assert [item["score"] for item in ours] == [item["score"] for item in theirs]
    assert all(np.array_equal(a["mask"], b["mask"]) for a, b in zip(ours, theirs))


@pytest.mark.torchvision
@needs_torchvision
@pytest.mark.parametrize("family", ["sam", "sam2"])
def test_transformers_mask_generation_pipeline_gives_our_masks(family):
    """transformers' `mask-generation` pipeline (it needs torchvision) on the stock model, a square image (where its
    SAM 2 points are right) and crops: the same masks and scores as `generate_masks`."""
    from transformers import pipeline

    model = (trainable_random_sam() if family == "sam" else random_stock("sam2", trainable=True)).eval()
    stock = (model.to_sam() if family == "sam" else model.to_stock()).eval()
    processor = model_processor(model.config)
    image, _ = shapes_image(np.random.default_rng(2), 64, 64)
    settings = AutomaticSettings(points_per_side=4, crop_layers=1, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                 nms_thresh=0.7)
    generator = pipeline("mask-generation", model=stock, image_processor=processor.image_processor, device="cpu")
    theirs = generator(image, points_per_crop=4, crops_n_layers=1, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                       crops_nms_thresh=0.7, points_per_batch=64)
    ours = generate_masks(stock, processor, image, settings)
    assert len(ours) == len(theirs["masks"]) > 0
    assert np.allclose([item["score"] for item in ours], theirs["scores"].float().numpy(), atol=1e-5)
    assert all(np.array_equal(a["mask"], np.asarray(b)) for a, b in zip(ours, theirs["masks"]))

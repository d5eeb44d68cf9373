#!/usr/bin/env python3
"""SAM 2's image processor (transformers', torchvision-only) against the one a SAM 2 twin's repository ships
(`processing_sam2_split.Sam2SplitImageProcessor`, PIL; the tools use it too where torchvision is missing), on the same
images, masks and prompts: pixel values (in grey levels), segmentation-map labels, prompt coordinates, original sizes
and mask post-processing.

Needs torchvision (any build whose Python-level resize imports; only torch's own antialiased bilinear kernel runs).

    python benchmarks/compare_sam2_processors.py
"""

import numpy as np
import torch
import transformers
from PIL import Image

from sam_split.processing_sam2_split import Sam2SplitImageProcessor, Sam2SplitProcessor
from sam_split.tools.compat import sam2_image_processor


def natural_image(rng, height: int, width: int) -> Image.Image:
    """Smooth colour regions (an upscaled 8x coarser random image) plus pixel noise."""
    coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.int16)
    return Image.fromarray(np.clip(smooth + rng.integers(-20, 20, (height, width, 3)), 0, 255).astype(np.uint8))


def main():
    stock = sam2_image_processor(1024, 256)
    if isinstance(stock, Sam2SplitProcessor):
        raise SystemExit("error: torchvision is not installed: there is no stock SAM 2 image processor to compare with")
    stand_in = Sam2SplitProcessor(image_processor=Sam2SplitImageProcessor(1024, 256))
    print(f"transformers {transformers.__version__}: {type(stock.image_processor).__name__} vs Sam2SplitImageProcessor")
    rng, std = np.random.default_rng(0), torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    for height, width in [(480, 640), (1024, 1024), (300, 1700), (2000, 1500), (64, 48)]:
        mask = np.zeros((height, width), np.uint8)
        mask[height // 4 : height // 2, width // 3 : width // 2] = 1
        inputs = {"images": natural_image(rng, height, width), "segmentation_maps": Image.fromarray(mask),
                  "input_boxes": [[[10, 20, width // 2, height // 2]]],
                  "input_points": [[[[width // 3, height // 3]]]], "input_labels": [[[1]]], "return_tensors": "pt"}
        a, b = stock(**inputs), stand_in(**inputs)
        grey = ((a["pixel_values"] - b["pixel_values"]) * std * 255).abs()
        logits = torch.randn(1, 2, 1, 256, 256)
        masks_a = stock.post_process_masks(logits.clone(), a["original_sizes"])
        masks_b = stand_in.post_process_masks(logits.clone(), b["original_sizes"])
        same = [torch.equal(a["labels"], b["labels"]), torch.allclose(a["input_boxes"], b["input_boxes"]),
                torch.allclose(a["input_points"], b["input_points"]),
                torch.equal(a["original_sizes"], b["original_sizes"]),
                all(torch.equal(x, y) for x, y in zip(masks_a, masks_b))]
        print(f"{height}x{width}: pixels max |diff| {grey.max():.3f} grey levels, mean {grey.mean():.4f}; labels, "
              f"boxes, points, sizes, post-processing equal: {same}")


if __name__ == "__main__":
    main()

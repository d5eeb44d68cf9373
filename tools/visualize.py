"""Pictures of what a model learned: ground truth and prediction side by side per image, and training curves."""

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Object colours, repeated when an image has more objects.
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)], dtype=np.float32)


def paint(image: np.ndarray, masks: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """`image` (height, width, 3) uint8 with each bool mask of `masks` (objects, height, width) tinted."""
    out = image.astype(np.float32)
    for k, mask in enumerate(masks):
        out[mask] = (1 - alpha) * out[mask] + alpha * PALETTE[k % len(PALETTE)]
    return out.round().astype(np.uint8)


def overlay(image, truth: np.ndarray, predicted: np.ndarray) -> Image.Image:
    """Two panels, "ground truth" and "prediction", each object in the same colour in both."""
    array = np.asarray(image.convert("RGB"))
    height, width = array.shape[:2]
    band = 14
    canvas = Image.new("RGB", (2 * width + 4, height + band), (255, 255, 255))
    canvas.paste(Image.fromarray(paint(array, truth)), (0, band))
    canvas.paste(Image.fromarray(paint(array, predicted)), (width + 4, band))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), "ground truth", fill=(0, 0, 0))
    draw.text((width + 6, 1), "prediction", fill=(0, 0, 0))
    return canvas


def plot_curves(metrics_path: Path, output: Path) -> None:
    """Training loss, learning rate and validation Dice/IoU against step, from finetune.py's `metrics.jsonl`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [e for e in entries if "loss" in e]
    val = [e for e in entries if "val_dice" in e]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([e["step"] for e in train], [e["loss"] for e in train], label="training")
    axes[0].plot([e["step"] for e in val], [e["val_loss"] for e in val], "o-", label="validation")
    axes[0].set_title("loss")
    axes[1].plot([e["step"] for e in train], [e["lr"] for e in train])
    axes[1].set_title("learning rate")
    for name in ("val_dice", "val_iou"):
        axes[2].plot([e["step"] for e in val], [e[name] for e in val], "o-", label=name.removeprefix("val_"))
    axes[2].set_title("validation (full resolution)")
    for axis in axes:
        axis.set_xlabel("step")
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    figure.tight_layout()
    partial = output.with_name(output.name + ".partial.png")
    figure.savefig(partial, dpi=90)
    plt.close(figure)
    partial.replace(output)

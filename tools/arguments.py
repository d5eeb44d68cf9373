"""Command-line flags that finetune.py and evaluate.py share (model, prompts, loader), and argparse types that refuse
a bad value while the arguments are parsed, before anything slow, saying what was expected.

The data-format flags live beside the formats they describe (`data.add_data_arguments`)."""

import argparse
import math

from .processing import add_decoding_arguments

PROMPTS = ("box", "point", "box+point")


def integer(minimum: int, maximum: int | None = None):
    """An argparse `type`: an integer in [minimum, maximum]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            expected = f"an integer >= {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def number(minimum: float, maximum: float | None = None, *, above: bool = False, below: bool = False):
    """An argparse `type`: a finite float >= `minimum` (> with `above`) and <= `maximum` (< with `below`); NaN and
    infinities are refused."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        low_ok = value > minimum if above else value >= minimum
        high_ok = maximum is None or (value < maximum if below else value <= maximum)
        if not (math.isfinite(value) and low_ok and high_ok):
            low = f"{'>' if above else '>='} {minimum:g}"
            high = "" if maximum is None else f" and {'<' if below else '<='} {maximum:g}"
            raise argparse.ArgumentTypeError(f"expected a finite number {low}{high}, got {text!r}")
        return value

    return parse


# torch.manual_seed and numpy's SeedSequence both take this range.
seed = integer(0, 2**32 - 1)


def add_model_arguments(parser, *, model_help: str) -> None:
    """`--model` and `--base-revision`: the base SamSplitModel (resolved by `tools.models.resolve_model`)."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", help=model_help)
    group.add_argument("--base-revision", metavar="REVISION",
                       help="revision of --model on the Hub (branch, tag or sha; recorded as its sha)")
    add_decoding_arguments(group)


def add_prompt_arguments(parser, *, training: bool) -> None:
    """How each object is prompted from its mask: the same flags for training, validation and evaluation; with
    `training`, also how many objects a step decodes and the box jitter."""
    group = parser.add_argument_group("prompts")
    group.add_argument("--prompt", choices=PROMPTS, default="box", help="prompt made from each object's mask")
    group.add_argument("--num-points", type=integer(1), default=1, help="positive points sampled in the object")
    group.add_argument("--num-negative-points", type=integer(0), default=0,
                       help="negative points sampled outside it")
    if training:
        group.add_argument("--objects-per-image", type=integer(1), default=8,
                           help="objects decoded per image and step, sampled when an image has more (default 8)")
        group.add_argument("--box-jitter", type=number(0, 1), default=0.1,
                           help="training boxes: each edge moved by up to this fraction of the box side, in [0, 1] "
                                "(default 0.1)")


def add_loader_arguments(parser, *, overlay_images: int) -> None:
    """Batching, workers, seed, precision and device, bad-sample policy and how many overlays to draw."""
    group = parser.add_argument_group("loading and running")
    group.add_argument("--batch-size", type=integer(1), default=2, help="images per process and forward (default 2)")
    group.add_argument("--num-workers", type=integer(0), default=2, help="DataLoader workers per process (default 2)")
    group.add_argument("--seed", type=seed, default=0, help="seeds prompts (and training: data order, LoRA init)")
    group.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"),
                       help="autocast precision (default: accelerate's config or no)")
    group.add_argument("--cpu", action="store_true", help="run on CPU (also DDP over gloo under accelerate launch)")
    group.add_argument("--strict-data", action="store_true", help="bad samples are an error instead of a skip")
    group.add_argument("--overlay-images", type=integer(0), default=overlay_images,
                       help=f"images drawn as ground truth | prediction (default {overlay_images})")

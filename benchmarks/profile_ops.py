"""Operator counts of one vision-encoder forward, stock against twin: where a launch-bound GPU call spends its launches.

On a GPU at batch 1 in bf16, SAM-HQ's encoder is launch-bound: its time follows the number of kernels launched, not the
FLOPs. This counts the aten operators of one forward under `torch.profiler` on any device (on a CPU, a proxy for the
launches a GPU would see): all of them, and the top-level ones (called from Python, not from another aten operator),
per operator name, for the stock model, the twin, and the twin with q/k/v projected by three calls (the projection
before `split_qkv.project_qkv`). `--policy-device cuda` makes the twin's attention choose its kernels as it would on a
GPU (`attention_sam_split.choose_kernel`), so a CPU run counts the GPU's operators.

    python benchmarks/profile_ops.py --size sam-hq-vit-base --dtype bf16 --policy-device cuda --image-size 640

The kernel choice depends on the number of tokens per attention (folded above 1024 on a GPU in bf16), not on the image
size otherwise: 640x640 (40x40 tokens in the global layers) counts the same operators as 1024x1024, in a fraction of
the time.
"""

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from sam_split import attention_sam_split, split_qkv
from sam_split.tools.family import member_for_random, randomize_

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def stock_model(size: str, image_size: int | None):
    member = member_for_random(size)
    config = member.stock_config(size)
    if image_size:
        for part in (config.vision_config, config.prompt_encoder_config):
            part.image_size = image_size
        if hasattr(config.prompt_encoder_config, "image_embedding_size"):
            config.prompt_encoder_config.image_embedding_size = image_size // config.prompt_encoder_config.patch_size
    torch.manual_seed(0)
    return member, randomize_(member.stock_class(config)).eval()


def count_ops(encoder, pixels) -> tuple[collections.Counter, collections.Counter]:
    """(every aten operator, top-level aten operators) of one forward, by name."""
    with torch.no_grad():
        encoder(pixels)  # warm-up: caches (the fused weight) are built outside the count
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            encoder(pixels)
    every, top = collections.Counter(), collections.Counter()
    for event in profiler.events():
        if not event.name.startswith("aten::"):
            continue
        every[event.name] += 1
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            top[event.name] += 1
    return every, top


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="sam-hq-vit-base", help="a random: size of tools/family.py")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--image-size", type=int, help="input side (default: the size's own)")
    parser.add_argument("--policy-device", default=None, help="choose the twin's attention kernels as on this device")
    parser.add_argument("--top", type=int, default=12, help="operators listed per model")
    args = parser.parse_args(argv)
    if args.policy_device:
        choose = attention_sam_split.choose_kernel
        attention_sam_split.choose_kernel = lambda device_type, *rest, **kwargs: choose(
            args.policy_device, *rest, **kwargs)
    member, stock = stock_model(args.size, args.image_size)
    twin = member.twin.from_stock(stock)
    dtype = DTYPES[args.dtype]
    side = stock.config.prompt_encoder_config.image_size
    pixels = torch.randn(args.batch_size, 3, side, side, generator=torch.Generator().manual_seed(0)).to(dtype)
    counts = {"stock": count_ops(stock.vision_encoder.to(dtype), pixels),
              "twin": count_ops(twin.vision_encoder.to(dtype), pixels)}
    fusion_plan = split_qkv._fusion_plan
    split_qkv._fusion_plan = lambda layers: (None, "three calls, counted for comparison")
    try:
        counts["twin, three q/k/v calls"] = count_ops(twin.vision_encoder, pixels)
    finally:
        split_qkv._fusion_plan = fusion_plan
    print(f"{args.size}, {args.dtype}, batch {args.batch_size}, {side}x{side}, kernels chosen as on "
          f"{args.policy_device or 'this device'}; torch {torch.__version__}")
    for name, (every, top) in counts.items():
        print(f"{name}: {sum(every.values())} aten operators, {sum(top.values())} top-level; top-level by name: "
              + ", ".join(f"{op.removeprefix('aten::')} {number}" for op, number in top.most_common(args.top)))
    return {name: {"all": dict(every), "top_level": dict(top)} for name, (every, top) in counts.items()}


if __name__ == "__main__":
    main()

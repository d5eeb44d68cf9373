"""GPU latency and memory of SamSplitModel's vision encoder and LoRA training step against stock transformers SAM.

One process, one command, a few minutes on one GPU: CUDA events, median of `--repeats` after two warm-up calls;
peak memory is `torch.cuda.max_memory_allocated()` above what was allocated before the call (the model's weights).
All models hold the same random N(0, 0.05) weights and get the same input.

  encoder, per dtype (bf16, fp32) and batch size: stock SamModel (sdpa), ours; under torch.compile (default: bf16
  at batch 8 only, where compiling pays): stock compiled, ours compiled
  LoRA r=16 training step, batch 4, bf16 autocast, full model with a box prompt: stock SamModel with LoRA on `qkv`
  (the only Linear it has there), ours with LoRA on `q` and `v`
  accuracy at batch 1: image embeddings of each dtype against stock eager in fp32

    python benchmarks/bench_gpu.py --json gpu.json
    python benchmarks/bench_gpu.py --device cpu --config tiny --batch-sizes 1 2 --repeats 1   # smoke run on a CPU

The floor is the encoder's FLOPs (stock's computation, counted analytically) at the bf16 GEMM rate measured in the
same run on the MLP's shape.
"""

import argparse
import copy
import datetime
import json
import statistics
import time
from pathlib import Path

import torch
import transformers
from bench_common import SIZES, add_lora, encoder_gflop, fmt, max_abs_diff, random_stock_sam, sam_config

from sam_split import SamSplitModel

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class Timer:
    """Seconds of a call and the peak memory it allocated on `device` (CUDA: events and the allocator's peak; other
    devices: wall clock, no memory figure)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def measure(self, function, repeats: int) -> dict:
        first = self._seconds(function)
        self._seconds(function)  # second warm-up: allocator and autotuning settle
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        times = [self._seconds(function) for _ in range(repeats)]
        peak_gb = (torch.cuda.max_memory_allocated() - before) / 1e9 if self.cuda else None
        return {"first_s": first, "median_s": statistics.median(times), "times_s": times, "peak_gb": peak_gb}

    def _seconds(self, function) -> float:
        if not self.cuda:
            start = time.perf_counter()
            function()
            return time.perf_counter() - start
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3


def gemm_tflops(device: str, dtype: torch.dtype) -> float:
    """Best rate of (32768 x 768) @ (768 x 3072) products: the encoder's MLP at batch 8 (smaller on a CPU)."""
    tokens = 32768 if device == "cuda" else 2048
    a, b = torch.randn(tokens, 768, device=device, dtype=dtype), torch.randn(768, 3072, device=device, dtype=dtype)
    timer = Timer(device)
    seconds = min(timer._seconds(lambda: a @ b) for _ in range(20))
    return 2 * tokens * 768 * 3072 / seconds / 1e12


def encoder_runner(encoder, pixel_values):
    def run():
        with torch.no_grad():
            return encoder(pixel_values).last_hidden_state
    return run


def training_runner(model, pixel_values, boxes, device: str):
    """One LoRA step: forward under bf16 autocast, a Dice-like loss on the masks, backward, AdamW step."""
    lora = [parameter for name, parameter in model.named_parameters() if "lora_" in name]
    optimizer = torch.optim.AdamW(lora, lr=1e-4)

    def run():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            masks = model(pixel_values=pixel_values, input_boxes=boxes, multimask_output=False).pred_masks
        probabilities = masks.float().sigmoid()
        (1 - 2 * probabilities.mean() / (probabilities.pow(2).mean() + 1)).backward()
        optimizer.step()
    return run


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run of this script")
    parser.add_argument("--config", choices=sorted(SIZES), default="vit-base")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="bf16 encoder batch sizes")
    parser.add_argument("--fp32-batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--compiled-batch-sizes", type=int, nargs="*", default=[8], help="bf16, under torch.compile")
    parser.add_argument("--train-batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --device cpu for a smoke run")
    device, timer = args.device, Timer(args.device)
    config = sam_config(args.config, None)
    size = config.vision_config.image_size
    stock = random_stock_sam(config).to(device)
    ours = SamSplitModel.from_sam(stock)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(max(args.batch_sizes + args.fp32_batch_sizes), 3, size, size, generator=generator).to(device)

    gflop = encoder_gflop(config)
    tflops = gemm_tflops(device, torch.bfloat16)
    meta = {"date": datetime.date.today().isoformat(), "device": device, "config": args.config, "image_size": size,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "torch": torch.__version__,
            "transformers": transformers.__version__, "encoder_gflop_per_image": gflop, "gemm_bf16_tflops": tflops}
    print(f"{meta['gpu'] or device}, torch {torch.__version__}, transformers {transformers.__version__}; {args.config} "
          f"at {size}px: {gflop:.0f} GFLOP/image; "
          f"bf16 GEMM {tflops:.0f} TFLOP/s -> floor {gflop / tflops:.2f} ms/image")

    with torch.no_grad():  # accuracy at batch 1, against stock eager in fp32 (same seed: same weights)
        eager = random_stock_sam(config, attn_implementation="eager").vision_encoder.to(device)
        reference = eager(images[:1]).last_hidden_state
        del eager
    rows = []
    plans = [(dtype_name, batch, False)
             for dtype_name, batches in (("bf16", args.batch_sizes), ("fp32", args.fp32_batch_sizes))
             for batch in batches] + [("bf16", batch, True) for batch in args.compiled_batch_sizes]
    encoders = {}
    for dtype_name, batch, compiled in plans:
        dtype = DTYPES[dtype_name]
        for name, model in (("stock", stock), ("ours", ours)):
            if (name, dtype_name) not in encoders:
                encoders[name, dtype_name] = copy.deepcopy(model.vision_encoder).to(dtype)
            encoder = encoders[name, dtype_name]
            if compiled:
                torch._dynamo.reset()
                encoder = torch.compile(encoder)
            row = {"name": f"{name}{' compiled' if compiled else ''}", "dtype": dtype_name, "batch": batch,
                   **timer.measure(encoder_runner(encoder, images[:batch].to(dtype)), args.repeats)}
            if batch == 1 and not compiled:
                row["max_abs_diff"] = max_abs_diff(encoder_runner(encoder, images[:1].to(dtype))(), reference)
            rows.append(row)
            print(f"  {row['name']:<15} {dtype_name} batch {batch:>2}: {row['median_s'] * 1e3:9.1f} ms "
                  f"(first call {row['first_s']:.1f} s)", flush=True)
        del encoder
    for row in rows:
        base = next(r for r in rows if r["name"] == row["name"].replace("ours", "stock") and r["dtype"] == row["dtype"]
                    and r["batch"] == row["batch"])
        row["time_ratio"] = row["median_s"] / base["median_s"]
        row["memory_ratio"] = row["peak_gb"] / base["peak_gb"] if row["peak_gb"] and base["peak_gb"] else None
        row["x_floor"] = row["median_s"] * 1e3 / (row["batch"] * gflop / tflops) if row["dtype"] == "bf16" else None
    encoders.clear()

    train = []
    batch = args.train_batch_size
    pixel_values = images[:1].expand(batch, -1, -1, -1).contiguous()
    boxes = torch.tensor([[[0.1, 0.15, 0.7, 0.8]]] * batch, device=device) * size
    for name, model, targets in (("stock, LoRA on qkv", stock, ["qkv"]), ("ours, LoRA on q, v", ours, ["q", "v"])):
        peft_model = add_lora(copy.deepcopy(model), seed=1, target_modules=targets).train()
        row = {"name": name, "batch": batch, **timer.measure(training_runner(peft_model, pixel_values, boxes, device),
                                                              args.repeats)}
        train.append(row)
        print(f"  train step: {name:<20} {row['median_s'] * 1e3:9.1f} ms", flush=True)
        del peft_model
    train[1]["time_ratio"] = train[1]["median_s"] / train[0]["median_s"]
    train[1]["memory_ratio"] = train[1]["peak_gb"] / train[0]["peak_gb"] if train[0]["peak_gb"] else None

    print(f"\nVision encoder, {args.config} {size}px, median of {args.repeats} (ratios: ours / stock, same row kind)")
    header = (f"{'configuration':<16} {'dtype':>5} {'batch':>5} {'ms':>9} {'x stock':>8} {'x floor':>8} "
              f"{'peak GB':>8} {'mem x':>6} {'max|diff|':>9}")
    print(header + "\n" + "-" * len(header))
    for row in rows:
        print(f"{row['name']:<16} {row['dtype']:>5} {row['batch']:>5} {row['median_s'] * 1e3:>9.1f} "
              f"{fmt(row['time_ratio'], '.2f'):>8} {fmt(row['x_floor'], '.2f'):>8} {fmt(row['peak_gb'], '.2f'):>8} "
              f"{fmt(row['memory_ratio'], '.2f'):>6} {fmt(row.get('max_abs_diff'), '.1e'):>9}")
    print(f"\nLoRA r=16 training step, batch {batch}, bf16 autocast")
    for row in train:
        print(f"{row['name']:<22} {row['median_s'] * 1e3:9.1f} ms  {fmt(row['peak_gb'], '.2f'):>6} GB  "
              f"time x {fmt(row.get('time_ratio'), '.2f')}  memory x {fmt(row.get('memory_ratio'), '.2f')}")
    results = {"meta": meta, "encoder": rows, "train_step": train}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()

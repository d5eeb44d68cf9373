"""Latency, peak memory and accuracy of SamSplitModel's vision encoder against stock transformers SAM.

Configurations (all on the same random N(0, 0.05) weights and the same input):
  stock-eager, stock-sdpa         transformers' SamModel vision encoder, `attn_implementation` eager / sdpa
  stock-sdpa-compiled             the same under `torch.compile` (first call, i.e. compilation, reported apart)
  ours, ours-compiled             SamSplitModel's vision encoder (attn_implementation sdpa), plain and compiled
  segment-anything                Meta's `ImageEncoderViT`, where `pip install segment-anything` was run
With --train-step, one LoRA (r=16 on q, v) training step (forward and backward of the full model, batch 1), with
and without gradient checkpointing, for
  train-sdpa-math(-ckpt)          split q/k/v computing stock SDPA's way: the full bias as mask, which needs grad with
                                  LoRA on q, so SDPA falls back to its math kernel
  train-ours(-ckpt)               SamSplitModel

Every configuration runs in a fresh worker process, so its peak RSS (VmHWM, whole process life, model included) is
its own; the baseline RSS after loading the model is printed beside it. The workers are driven round-robin (one call
each per repeat) so that load from other processes on the machine hits all of them alike; the load average is
printed with the results. The floor is the encoder's FLOPs (counted analytically) at this machine's fp32 GEMM rate
(measured in the same run).

    python benchmarks/bench_encoder.py                                  # vit-base, 1024x1024, batch 1 and 4
    python benchmarks/bench_encoder.py --train-step --json out.json
    python benchmarks/bench_encoder.py --config tiny --repeats 1        # smoke run, ~3 minutes (mostly compiling)
    python benchmarks/bench_encoder.py --only stock-sdpa ours --batch-sizes 1

Where CUDA is available this command runs `bench_gpu.py` instead (same flags as that script): on a GPU one process
with CUDA events measures everything in minutes, and per-process RSS says nothing about GPU memory.
"""

import argparse
import datetime
import importlib
import importlib.util
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from bench_common import SIZES, add_lora, encoder_gflop, fmt, max_abs_diff, random_stock_sam, sam_config, sample_inputs
from transformers import SamConfig

from sam_split import SamSplitModel, attention_sam_split

ENCODERS = ("stock-eager", "stock-sdpa", "stock-sdpa-compiled", "ours", "ours-compiled", "segment-anything")
TRAIN_STEPS = ("train-sdpa-math", "train-sdpa-math-ckpt", "train-ours", "train-ours-ckpt")


def best_seconds(function, repeats: int = 8) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_gflops(device: str) -> float:
    """Best fp32 GEMM rate of a few (4096 x 768) @ (768 x 3072) products: the shape of the encoder's MLP."""
    a, b = torch.randn(4096, 768, device=device), torch.randn(768, 3072, device=device)
    return 2 * 4096 * 768 * 3072 / best_seconds(lambda: a @ b) / 1e9


def qkv_projection_seconds(device: str, channels: int, tokens: int = 4 * 4096) -> dict:
    """Best time of the q, k, v projections of `tokens` tokens as three GEMMs (what SamSplitModel runs) and as one
    fused GEMM (stock's `qkv`): what a fused-weight inference path could save."""
    hidden = torch.randn(tokens, channels, device=device)
    weight, bias = torch.randn(3 * channels, channels, device=device), torch.randn(3 * channels, device=device)
    weights, biases = weight.chunk(3), bias.chunk(3)
    return {
        "tokens": tokens,
        "three_gemms_s": best_seconds(lambda: [F.linear(hidden, w, b) for w, b in zip(weights, biases)]),
        "fused_gemm_s": best_seconds(lambda: F.linear(hidden, weight, bias)),
    }


def rss_gb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process from /proc/self/status, in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError(f"no {field} in /proc/self/status")


def stock_sdpa_math(query, key, value, rel_h, rel_w, scale, dropout=0.0):
    """Stock `SamVisionSdpaAttention`'s computation on split q/k/v: the full bias as SDPA mask. With LoRA on q the
    mask needs grad, and torch's CPU SDPA then silently takes its math kernel: the training baseline."""
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).flatten(2, 3).flatten(3)  # (batch_size, nHead, HW, HW)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scale, dropout_p=dropout)


def meta_image_encoder_class():
    """Meta's `ImageEncoderViT`, or None where `segment_anything` is not installed. Its package `__init__` imports
    torchvision (for the mask generator and transforms), which the encoder does not need: the package is entered
    without running it, so that the encoder is measured where torchvision is missing too."""
    spec = importlib.util.find_spec("segment_anything")
    if spec is None:
        return None
    if "segment_anything" not in sys.modules:
        package = types.ModuleType("segment_anything")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["segment_anything"] = package
    return importlib.import_module("segment_anything.modeling.image_encoder").ImageEncoderViT


def segment_anything_encoder(config: SamConfig, stock_encoder):
    """Meta's `ImageEncoderViT` with the sizes of `config` and the weights of transformers' `stock_encoder`."""
    from functools import partial

    ImageEncoderViT = meta_image_encoder_class()

    vision = config.vision_config
    encoder = ImageEncoderViT(
        img_size=vision.image_size, patch_size=vision.patch_size, embed_dim=vision.hidden_size,
        depth=vision.num_hidden_layers, num_heads=vision.num_attention_heads,
        mlp_ratio=vision.mlp_dim / vision.hidden_size, out_chans=vision.output_channels, qkv_bias=vision.qkv_bias,
        norm_layer=partial(torch.nn.LayerNorm, eps=vision.layer_norm_eps), use_rel_pos=vision.use_rel_pos,
        window_size=vision.window_size, global_attn_indexes=tuple(vision.global_attn_indexes),
    )
    renames = [("neck.conv1.", "neck.0."), ("neck.layer_norm1.", "neck.1."), ("neck.conv2.", "neck.2."),
               ("neck.layer_norm2.", "neck.3."),  # before the blocks' layer_norm renames, which would also match
               ("patch_embed.projection.", "patch_embed.proj."), ("layers.", "blocks."), (".layer_norm1.", ".norm1."),
               (".layer_norm2.", ".norm2.")]
    state_dict = {}
    for name, tensor in stock_encoder.state_dict().items():
        for old, new in renames:
            name = name.replace(old, new)
        state_dict[name] = tensor
    encoder.load_state_dict(state_dict, strict=True)
    return encoder.eval()


def build(spec: dict):
    """The model of one configuration and a function running it once and returning the tensor to compare."""
    config, name, device = sam_config(spec["size"], spec["image_size"]), spec["name"], spec["device"]
    dtype = torch.bfloat16 if name.endswith("-bf16") else torch.float32
    inputs = sample_inputs(config, spec["batch_size"])
    inputs = {key: value.to(device, dtype if value.is_floating_point() and key == "pixel_values" else value.dtype)
              for key, value in inputs.items()}
    eager = name == "stock-eager"
    stock = random_stock_sam(config, attn_implementation="eager" if eager else "sdpa")

    if name == "full-model":  # masks and IoU of ours against stock eager through the whole model, once
        ours = SamSplitModel.from_sam(stock)
        reference = random_stock_sam(config, attn_implementation="eager")  # same seed, same weights

        def run():
            with torch.no_grad():
                expected, actual = reference(**inputs), ours(**inputs)
            return {key: max_abs_diff(getattr(expected, key), getattr(actual, key))
                    for key in ("pred_masks", "iou_scores")}
        return run

    if name.startswith("train-"):
        model = SamSplitModel.from_sam(stock)
        del stock
        if "sdpa-math" in name:  # this worker process only
            attention_sam_split.attention = stock_sdpa_math  # what the split attention body calls
        if name.endswith("-ckpt"):
            model.activation_checkpointing_enable()
        model = add_lora(model, seed=1).to(device).train()
        lora = [parameter for parameter_name, parameter in model.named_parameters() if "lora_" in parameter_name]

        def run():
            model.zero_grad(set_to_none=True)
            outputs = model(**inputs)
            (outputs.pred_masks.pow(2).mean() + outputs.iou_scores.pow(2).mean()).backward()
            return torch.cat([parameter.grad.flatten() for parameter in lora])
        return run

    if name == "segment-anything":
        encoder = segment_anything_encoder(config, stock.vision_encoder)
    elif name.startswith("ours"):
        encoder = SamSplitModel.from_sam(stock).vision_encoder
    else:
        encoder = stock.vision_encoder
    del stock
    encoder = encoder.to(device, dtype)
    if name.endswith("-compiled"):
        encoder = torch.compile(encoder)

    def run():
        with torch.no_grad():
            output = encoder(inputs["pixel_values"])
        return output if isinstance(output, torch.Tensor) else output.last_hidden_state
    return run


def worker(connection, spec: dict) -> None:
    """Build one configuration, then answer the parent: "run" -> seconds of one call; "finish" -> memory and output."""
    try:
        run = build(spec)
        connection.send({"baseline_rss_gb": rss_gb("VmRSS")})
        while connection.recv() == "run":
            start = time.perf_counter()
            output = run()
            connection.send(time.perf_counter() - start)
        # as numpy: a tensor would be sent as shared memory, which dies with this process
        result = {"peak_rss_gb": rss_gb("VmHWM"),
                  "output": output.float().cpu().numpy() if torch.is_tensor(output) else output}
        connection.send(result)
    except Exception as error:  # reported by the parent, with the configuration's name
        connection.send({"error": f"{type(error).__name__}: {error}"})


def round_robin(specs: list[dict], repeats: int) -> list[dict]:
    """Start one worker per spec, time a first call each, then `repeats` calls each, interleaved."""
    # Workers fork from a server that imported the libraries once but ran nothing, so they start in well under a
    # second yet are as fresh as spawned ones (no OpenMP thread pool or CUDA context inherited).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "peft", "sam_split", "bench_common"])
    workers = []
    for spec in specs:
        parent_end, child_end = context.Pipe()
        process = context.Process(target=worker, args=(child_end, spec), daemon=True)
        process.start()
        workers.append((spec, parent_end, process))
    rows = []
    for spec, connection, _ in workers:
        rows.append({**spec, "times_s": [], **connection.recv()})
    for repeat in range(repeats + 1):
        for row, (_, connection, _) in zip(rows, workers):
            if "error" in row:
                continue
            connection.send("run")
            answer = connection.recv()
            if isinstance(answer, dict):
                row.update(answer)
            elif repeat == 0:
                row["first_call_s"] = answer
            else:
                row["times_s"].append(answer)
            shown = answer if isinstance(answer, dict) else f'{answer:.2f} s'
            print(f"  {row['name']:<22} batch {row['batch_size']}  {shown}", flush=True)
    for row, (_, connection, process) in zip(rows, workers):
        if "error" not in row:
            connection.send("finish")
            row.update(connection.recv())
        process.join(timeout=60)
        if row["times_s"]:
            row["median_s"] = statistics.median(row["times_s"])
    return rows


def ratio(value, reference):
    return None if value is None or not reference else value / reference


def summarise(rows: list[dict], reference: str, diff_reference: str, floor_s_per_image: float | None = None) -> None:
    """Per batch size: time and peak RSS as ratios to `reference`'s, time to the floor, max abs diff of the output
    to `diff_reference`'s (the output tensors are dropped, to keep the JSON small)."""
    for batch_size in sorted({row["batch_size"] for row in rows}):
        same = {row["name"]: row for row in rows if row["batch_size"] == batch_size and "error" not in row}
        base, diff_base = same.get(reference, {}), same.get(diff_reference, {})
        for row in same.values():
            row["time_ratio"] = ratio(row.get("median_s"), base.get("median_s"))
            row["rss_ratio"] = ratio(row.get("peak_rss_gb"), base.get("peak_rss_gb"))
            if floor_s_per_image:
                row["x_floor"] = ratio(row.get("median_s"), floor_s_per_image * batch_size)
            if "output" in diff_base:
                row["max_abs_diff"] = max_abs_diff(torch.from_numpy(row["output"]),
                                                   torch.from_numpy(diff_base["output"]))
    for row in rows:
        row.pop("output", None)


def print_table(title: str, rows: list[dict], reference: str) -> None:
    """max|diff| is against stock eager's output (encoder) or the baseline's LoRA gradients (training step)."""
    print(f"\n{title}")
    header = (f"{'configuration':<22} {'batch':>5} {'first s':>8} {'median s':>9} "
              f"{'x ' + reference:>14} {'x floor':>8} "
              f"{'base GB':>8} {'peak GB':>8} {'RSS x ' + reference:>18} {'max|diff|':>10}")
    print(header)
    print("-" * len(header))
    for row in rows:
        if "error" in row:
            print(f"{row['name']:<22} {row['batch_size']:>5}  skipped: {row['error']}")
            continue
        print(f"{row['name']:<22} {row['batch_size']:>5} "
              f"{fmt(row.get('first_call_s')):>8} {fmt(row.get('median_s')):>9} "
              f"{fmt(row.get('time_ratio')):>14} {fmt(row.get('x_floor')):>8} "
              f"{fmt(row.get('baseline_rss_gb')):>8} "
              f"{fmt(row.get('peak_rss_gb')):>8} {fmt(row.get('rss_ratio')):>18} "
              f"{fmt(row.get('max_abs_diff'), '.1e'):>10}")


def main(argv=None) -> dict:
    if torch.cuda.is_available():  # one GPU process measures it all: bench_gpu.py, run in its place
        gpu_script = str(Path(__file__).with_name("bench_gpu.py"))
        os.execv(sys.executable, [sys.executable, gpu_script, *(sys.argv[1:] if argv is None else argv)])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--config", choices=sorted(SIZES), default="vit-base", help="model size (default vit-base)")
    parser.add_argument("--image-size", type=int,
                        help="input side in pixels (default: the config's, 1024 for vit-base)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4], help="encoder batch sizes (default 1 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per configuration after a first call")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=ENCODERS + TRAIN_STEPS,
                        help="run only these configurations (encoder or train-step names)")
    parser.add_argument("--train-step", action="store_true", help="also time LoRA training steps (batch 1)")
    parser.add_argument("--malloc-mmap-threshold", type=int, metavar="BYTES",
                        help="glibc: give every configuration's worker MALLOC_MMAP_THRESHOLD_=BYTES, so freed blocks "
                             "above it go back to the OS at once instead of staying in a fragmented heap (0 to 32 MiB: "
                             "64-bit glibc ignores larger values)")
    parser.add_argument("--json", type=Path, help="write all results here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.malloc_mmap_threshold is not None and not 0 <= args.malloc_mmap_threshold <= 2**25:
        parser.error(f"--malloc-mmap-threshold must be 0 to {2**25} bytes (32 MiB), got {args.malloc_mmap_threshold}")

    if args.malloc_mmap_threshold is not None:
        # read by glibc when a process starts: the fork server, hence every worker, inherits it
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    device = "cpu"
    config = sam_config(args.config, args.image_size)
    encoders = [name for name in ENCODERS if not args.only or name in args.only]
    if "segment-anything" in encoders and meta_image_encoder_class() is None:
        encoders.remove("segment-anything")
        print("segment_anything is not installed (pip install segment-anything): skipping Meta's encoder")
    train_steps = [name for name in TRAIN_STEPS if args.train_step and (not args.only or name in args.only)]

    gflop = encoder_gflop(config)
    gemm = gemm_gflops(device)
    qkv = qkv_projection_seconds(device, config.vision_config.hidden_size)
    meta = {
        "date": datetime.date.today().isoformat(), "device": device, "cpu_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "transformers": transformers.__version__, "config": args.config, "image_size": config.vision_config.image_size,
        "encoder_gflop_per_image": gflop, "loadavg_start": os.getloadavg(), "qkv_projection": qkv,
        "malloc_mmap_threshold": args.malloc_mmap_threshold,
    }
    print(f"{args.config} encoder at {meta['image_size']}px: {gflop:.0f} GFLOP/image; "
          f"fp32 GEMM now {gemm:.0f} GFLOP/s; "
          f"{meta['cpu_threads']} threads on {device}; load {meta['loadavg_start']}")
    print(f"q, k, v projections of {qkv['tokens']} tokens: "
          f"three GEMMs {qkv['three_gemms_s'] * 1e3:.1f} ms, one fused GEMM "
          f"{qkv['fused_gemm_s'] * 1e3:.1f} ms ({qkv['fused_gemm_s'] / qkv['three_gemms_s']:.2f}x)")

    base = {"size": args.config, "image_size": args.image_size, "device": device}
    rows = []
    for batch_size in args.batch_sizes:
        rows += round_robin([{**base, "name": name, "batch_size": batch_size} for name in encoders], args.repeats)
    # the best GEMM rate seen, before or after the encoder runs: the floor must not move with other processes' load
    gemm = max(gemm, gemm_gflops(device))
    floor_s = gflop / gemm
    meta.update(gemm_fp32_gflops=gemm, floor_s_per_image=floor_s)
    summarise(rows, "stock-sdpa", "stock-eager", floor_s)
    full = round_robin([{**base, "name": "full-model", "batch_size": 1}], 0)[0] if "ours" in encoders else {}
    if "output" in full:
        full["max_abs_diff"] = full.pop("output")  # {"pred_masks": ..., "iou_scores": ...}
    train = round_robin([{**base, "name": name, "batch_size": 1} for name in train_steps], args.repeats)
    summarise(train, "train-sdpa-math", "train-sdpa-math")
    meta["loadavg_end"] = os.getloadavg()

    if rows:
        print_table(f"Vision encoder, {args.config} {meta['image_size']}px, {device}, median of {args.repeats} "
                    f"(floor {floor_s:.2f} s/image at {gemm:.0f} GFLOP/s)", rows, "stock-sdpa")
    if full:
        print(f"\nFull model, batch 1, ours vs stock eager: max|diff| {full.get('max_abs_diff') or full.get('error')}")
    if train:
        print_table("LoRA (r=16 on q, v) training step, forward + backward, batch 1", train, "train-sdpa-math")
    print(f"\nload average: start {meta['loadavg_start']}, end {meta['loadavg_end']} ({os.cpu_count()} cores)")

    results = {"meta": meta, "encoder": rows, "full_model": full, "train_step": train}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()

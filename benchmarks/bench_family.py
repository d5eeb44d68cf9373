"""Speed and peak memory of each family twin's vision encoder against its stock transformers model, in one run.

For each size named (default: SAM-HQ vit-base and SAM 2.1 hiera-tiny at their real 1024x1024 input), the stock model
and its twin (converted from it: the same random N(0, 0.05) weights) each run in a fresh worker process, so that the
peak RSS (VmHWM, model included) is its own. The workers are driven round-robin, one encoder forward (batch 1,
inference) each per repeat, so that load from other processes hits both alike; the best and median seconds, the
twin / stock ratios and the load average are printed.

    python benchmarks/bench_family.py                                  # sam-hq-vit-base, sam2.1-hiera-tiny
    python benchmarks/bench_family.py --sizes sam2.1-hiera-large --repeats 3
    python benchmarks/bench_family.py --sizes sam-tiny sam-hq-vit-base --json out.json
    python benchmarks/bench_family.py --device cuda --json gpu.json    # on one GPU: bf16/fp32, batch 1 and 8, LoRA step

On a GPU (`--device cuda`) everything runs in one process: CUDA events, median of `--repeats` after two warm-up
calls, peak memory `torch.cuda.max_memory_allocated()` above the model's weights; the LoRA step is the vision encoder's
forward and backward in bf16 autocast at batch 4, with LoRA r=16 on stock's `qkv` and on the twin's `q` and `v`.
"""

import argparse
import json
import multiprocessing
import os
import statistics
import time

import torch


def _rss_gb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, in GB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def worker(connection, size: str, variant: str, threads: int) -> None:
    """Build the stock model of `size` (or its twin), then run its vision encoder once per "run" message."""
    torch.set_num_threads(threads)
    from sam_split.tools.family import random_stock_model
    from sam_split.tools.verify import verification_inputs

    member, model = random_stock_model(size)
    if variant == "twin":
        model = member.twin.from_stock(model)
    pixel_values = verification_inputs(model.config)["pixel_values"]
    baseline = _rss_gb("VmRSS")
    connection.send(baseline)
    while connection.recv() == "run":
        with torch.no_grad():
            started = time.perf_counter()
            model.vision_encoder(pixel_values)
            connection.send(time.perf_counter() - started)
    connection.send(_rss_gb("VmHWM"))


def measure(size: str, repeats: int, threads: int) -> dict:
    """{variant: {best_s, median_s, baseline_gb, peak_gb}} for the stock model of `size` and its twin."""
    context = multiprocessing.get_context("spawn")
    workers = {}
    for variant in ("stock", "twin"):
        ours, theirs = context.Pipe()
        process = context.Process(target=worker, args=(theirs, size, variant, threads))
        process.start()
        workers[variant] = (process, ours, ours.recv())
    seconds = {variant: [] for variant in workers}
    for _ in range(repeats + 1):  # the first round warms up
        for variant, (_, connection, _) in workers.items():
            connection.send("run")
            seconds[variant].append(connection.recv())
    results = {}
    for variant, (process, connection, baseline) in workers.items():
        connection.send("stop")
        peak = connection.recv()
        process.join()
        timed = seconds[variant][1:]
        results[variant] = dict(best_s=min(timed), median_s=statistics.median(timed), baseline_gb=baseline,
                                peak_gb=peak)
    return results


def _gpu_time(function, repeats: int) -> tuple[float, float]:
    """(median ms, peak GB above the memory allocated before) of `function()` on the current CUDA device."""
    for _ in range(2):
        function()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - before) / 1e9


def measure_gpu(size: str, repeats: int, device: str) -> dict:
    """{case: {stock: (ms, GB), twin: (ms, GB)}} for encoder inference (bf16 / fp32, batch 1 / 8) and a LoRA step."""
    import copy

    from peft import LoraConfig, get_peft_model

    from sam_split.tools.family import random_stock_model

    member, stock = random_stock_model(size)
    models = {"stock": stock, "twin": member.twin.from_stock(stock)}
    size_hw = stock.config.prompt_encoder_config.image_size  # every member has its input size there
    results = {}
    for dtype, batches in ((torch.bfloat16, (1, 8)), (torch.float32, (1, 8))):
        for batch in batches:
            pixels = torch.randn(batch, 3, size_hw, size_hw, device=device, dtype=dtype)
            case = results[f"encoder {str(dtype).removeprefix('torch.')} batch {batch}"] = {}
            outputs = {}
            for variant, model in models.items():
                encoder = copy.deepcopy(model.vision_encoder).to(device, dtype)
                with torch.no_grad():
                    case[variant] = _gpu_time(lambda: encoder(pixels), repeats)  # noqa: B023 - called at once
                    outputs[variant] = encoder(pixels)[0].float()
                torch.cuda.empty_cache()
            # the twin against stock on this device and dtype: the encoder's last hidden state
            case["max_abs_diff"] = (outputs["twin"] - outputs["stock"]).abs().max().item()
    pixels = torch.randn(4, 3, size_hw, size_hw, device=device)
    case = results["LoRA step bf16 autocast batch 4"] = {}
    for variant, targets in (("stock", ["qkv"]), ("twin", ["q", "v"])):
        model = get_peft_model(copy.deepcopy(models[variant]).to(device), LoraConfig(r=16, target_modules=targets))
        model.train()

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                output = model.base_model.model.vision_encoder(pixels)[0]  # noqa: B023 (timed within this iteration)
            output.float().pow(2).mean().backward()

        case[variant] = _gpu_time(step, repeats)
        torch.cuda.empty_cache()
    return results


def main_gpu(sizes: list, repeats: int, device: str) -> dict:
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print(f"{'size':20} {'case':34} {'stock ms':>9} {'twin ms':>9} {'ratio':>6} {'stock GB':>9} {'twin GB':>8} "
          "max|twin-stock|")
    all_results = {}
    for size in sizes:
        all_results[size] = results = measure_gpu(size, repeats, device)
        for case, row in results.items():
            (stock_ms, stock_gb), (twin_ms, twin_gb) = row["stock"], row["twin"]
            difference = f"{row['max_abs_diff']:.1e}" if "max_abs_diff" in row else ""
            print(f"{size:20} {case:34} {stock_ms:9.2f} {twin_ms:9.2f} {twin_ms / stock_ms:6.2f} {stock_gb:9.2f} "
                  f"{twin_gb:8.2f} {difference}", flush=True)
    return all_results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["sam-hq-vit-base", "sam2.1-hiera-tiny"],
                        help="random: sizes of tools/family.py (default: sam-hq-vit-base sam2.1-hiera-tiny)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per model (after one warm-up)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per worker")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--device", default="cpu", help="cpu (default: a worker process per model) or cuda")
    args = parser.parse_args(argv)
    if args.device != "cpu":
        all_results = main_gpu(args.sizes, args.repeats, args.device)
        if args.json:
            with open(args.json, "w") as file:
                json.dump(all_results, file, indent=2)
        return all_results
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.1f} at start")
    print(f"{'size':20} {'model':6} {'best s':>8} {'median s':>9} {'peak GB':>8} {'base GB':>8}  twin/stock")
    all_results = {}
    for size in args.sizes:
        results = all_results[size] = measure(size, args.repeats, args.threads)
        for variant, row in results.items():
            ratio = ""
            if variant == "twin":
                stock = results["stock"]
                ratio = (f"time {row['median_s'] / stock['median_s']:.2f}x "
                         f"(best {row['best_s'] / stock['best_s']:.2f}x), "
                         f"peak {row['peak_gb'] / stock['peak_gb']:.2f}x")
            print(f"{size:20} {variant:6} {row['best_s']:8.2f} {row['median_s']:9.2f} {row['peak_gb']:8.2f} "
                  f"{row['baseline_gb']:8.2f}  {ratio}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(all_results, file, indent=2)
    return all_results


if __name__ == "__main__":
    main()

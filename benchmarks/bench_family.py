"""Speed and peak memory of each family twin against its stock model, inference and a LoRA step, in one run.

For each size named (default: SAM vit-base, SAM-HQ vit-base and SAM 2.1 hiera-tiny at their real 1024x1024 input) and
each batch size (default 1 and 8), two cases against the stock model of the same random N(0, 0.05) weights (the twin
is converted from it):

- inference: the vision encoder's forward under `no_grad`;
- LoRA step: the vision encoder's forward and backward (mean square of its output) with PEFT LoRA r=16 (alpha 16,
  no dropout, random N(0, 0.05) adapter weights) on stock's fused `qkv` and on the twin's `q` and `v`.

On a CPU (the default) the stock model and its twin each run in a fresh worker process, so that the peak RSS (VmHWM,
model included, over all its cases) is its own; the workers are driven round-robin, one call each per repeat, the order
of the two alternating, so that load from other processes hits both alike; medians and the load average are printed.
On a GPU (`--device cuda`) everything runs in one process: CUDA events, median of `--repeats` after two warm-up calls,
peak memory `torch.cuda.max_memory_allocated()` above the weights, inference in bf16 and fp32, the LoRA step in bf16
autocast. `--one-process` runs that GPU path on any device (a smoke test of it on a CPU).

    python benchmarks/bench_family.py                                  # CPU: the three default sizes, batch 1 and 8
    python benchmarks/bench_family.py --sizes sam2.1-hiera-tiny --batch-sizes 1 --repeats 3 --json out.json
    python benchmarks/bench_family.py --device cuda --json gpu.json    # one GPU: every twin, a few minutes
    python benchmarks/bench_family.py --one-process --sizes sam-tiny --batch-sizes 1 2 --repeats 1   # smoke, CPU

`SAM_SPLIT_FUSE_LORA_A=1` in the environment also fuses the twin's two LoRA A matrices into one GEMM
(`split_qkv.project_qkv`); `--lora-a-option` measures the twin's LoRA step with it off and on, alternately:

    python benchmarks/bench_family.py --lora-a-option --sizes sam2.1-hiera-tiny --batch-sizes 1 8 --device cuda
"""

import argparse
import copy
import json
import multiprocessing
import os
import statistics
import time

import torch
from bench_common import add_lora

DEFAULT_SIZES = ["sam-vit-base", "sam-hq-vit-base", "sam2.1-hiera-tiny"]
LORA_TARGETS = {"stock": ("qkv",), "twin": ("q", "v")}


def _rss_gb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, in GB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def build(size: str, variant: str):
    """The stock model of random size `size`, or its twin converted from it (the same weights), in eval mode."""
    from sam_split.tools.family import random_stock_model

    member, model = random_stock_model(size)
    return member.twin.from_stock(model) if variant == "twin" else model


def case_function(model, variant: str, case: str, batch: int, device: str, dtype=torch.float32, autocast=None):
    """A call that runs one `case` ("inference" or "LoRA step") of `model`'s vision encoder on a random batch."""
    side = model.config.prompt_encoder_config.image_size  # every member has its input size there
    pixels = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(batch)).to(device, dtype)
    if case == "inference":
        encoder = copy.deepcopy(model.vision_encoder).to(device, dtype).eval()

        def run():
            with torch.no_grad():
                return encoder(pixels)[0]

        return run
    peft_model = add_lora(copy.deepcopy(model), seed=0, target_modules=LORA_TARGETS[variant]).to(device).train()

    def step():
        with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
            output = peft_model.vision_encoder(pixels)[0]
        output.float().pow(2).mean().backward()
        peft_model.zero_grad(set_to_none=True)

    return step


def worker(connection, size: str, variant: str, threads: int) -> None:
    """Build the stock model of `size` (or its twin), then run one case per ("run", case, batch) message."""
    torch.set_num_threads(threads)
    model = build(size, variant)
    functions = {}
    connection.send(_rss_gb("VmRSS"))
    while (message := connection.recv())[0] == "run":
        _, case, batch = message
        if (case, batch) not in functions:
            functions[case, batch] = case_function(model, variant, case, batch, "cpu")
        started = time.perf_counter()
        functions[case, batch]()
        connection.send(time.perf_counter() - started)
    connection.send(_rss_gb("VmHWM"))


def measure(size: str, cases: list, repeats: int, threads: int) -> dict:
    """{case name: {stock: median s, twin: median s, stock_all: [...], twin_all: [...]}} and the workers' memory, for
    the stock model of `size` and its twin, each in its own process, driven round-robin."""
    context = multiprocessing.get_context("spawn")
    workers = {}
    for variant in ("stock", "twin"):
        ours, theirs = context.Pipe()
        process = context.Process(target=worker, args=(theirs, size, variant, threads))
        process.start()
        workers[variant] = (process, ours, ours.recv())
    results = {}
    for case, batch in cases:
        seconds = {variant: [] for variant in workers}
        for repeat in range(repeats + 1):  # the first round warms up
            order = list(workers) if repeat % 2 == 0 else list(reversed(workers))
            for variant in order:
                workers[variant][1].send(("run", case, batch))
                seconds[variant].append(workers[variant][1].recv())
        row = results[f"{case} batch {batch}"] = {
            **{variant: statistics.median(timed[1:]) for variant, timed in seconds.items()},
            **{f"{variant}_all": timed[1:] for variant, timed in seconds.items()},
            "load": os.getloadavg()[0],
        }
        _print_row(size, f"{case} batch {batch}", row)
    for variant, (process, connection, baseline) in workers.items():
        connection.send(("stop",))
        results[f"{variant} memory"] = dict(baseline_gb=baseline, peak_gb=connection.recv())
        process.join()
    return results


class Timer:
    """Seconds of a call: CUDA events on a GPU, the wall clock elsewhere; and the peak memory it allocated on a GPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def seconds(self, function) -> float:
        if not self.cuda:
            started = time.perf_counter()
            function()
            return time.perf_counter() - started
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3

    def measure(self, function, repeats: int) -> tuple[float, float | None]:
        """(median seconds of `repeats` calls after two warm-up calls, peak GB above what was allocated before)."""
        for _ in range(2):
            self.seconds(function)
        if self.cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        median = statistics.median(self.seconds(function) for _ in range(repeats))
        return median, (torch.cuda.max_memory_allocated() - before) / 1e9 if self.cuda else None


def measure_one_process(size: str, batches: list, repeats: int, device: str) -> dict:
    """{case: {stock: (s, GB), twin: (s, GB), max_abs_diff}}: inference in bf16 and fp32 and the LoRA step in bf16
    autocast, at each batch size, stock and twin alternately in this process."""
    models = {variant: build(size, variant) for variant in ("stock", "twin")}
    timer = Timer(device)
    results = {}
    for dtype in (torch.bfloat16, torch.float32):
        for batch in batches:
            row = results[f"inference {str(dtype).removeprefix('torch.')} batch {batch}"] = {}
            outputs = {}
            for variant, model in models.items():
                function = case_function(model, variant, "inference", batch, device, dtype)
                row[variant] = timer.measure(function, repeats)
                outputs[variant] = function().float()
                del function
                if timer.cuda:
                    torch.cuda.empty_cache()
            row["max_abs_diff"] = (outputs["twin"] - outputs["stock"]).abs().max().item()
    for batch in batches:
        row = results[f"LoRA step bf16 autocast batch {batch}"] = {}
        for variant, model in models.items():
            function = case_function(model, variant, "LoRA step", batch, device, autocast=torch.bfloat16)
            row[variant] = timer.measure(function, repeats)
            del function
            if timer.cuda:
                torch.cuda.empty_cache()
    return results


def measure_lora_a_option(size: str, batch: int, repeats: int, device: str) -> dict:
    """Median seconds of the twin's LoRA step with its two LoRA A matrices as two GEMMs and as one
    (`split_qkv.FUSE_LORA_A`, the SAM_SPLIT_FUSE_LORA_A option), alternately in this process (bf16 autocast on a GPU,
    fp32 on a CPU)."""
    from sam_split import split_qkv

    autocast = torch.bfloat16 if device.startswith("cuda") else None
    step = case_function(build(size, "twin"), "twin", "LoRA step", batch, device, autocast=autocast)
    timer = Timer(device)
    seconds = {False: [], True: []}
    for repeat in range(repeats + 1):  # the first round warms up
        for fused in (False, True) if repeat % 2 == 0 else (True, False):
            split_qkv.FUSE_LORA_A = fused
            seconds[fused].append(timer.seconds(step))
    return {"two A GEMMs": statistics.median(seconds[False][1:]), "one A GEMM": statistics.median(seconds[True][1:])}


def main_one_process(sizes: list, batches: list, repeats: int, device: str) -> dict:
    name = torch.cuda.get_device_name() if device.startswith("cuda") else device
    print(f"torch {torch.__version__}, {name}, SAM_SPLIT_FUSE_LORA_A={os.environ.get('SAM_SPLIT_FUSE_LORA_A', '0')}")
    print(f"{'size':20} {'case':34} {'stock ms':>9} {'twin ms':>9} {'ratio':>6} {'stock GB':>9} {'twin GB':>8} "
          "max|twin-stock|")
    all_results = {}
    for size in sizes:
        all_results[size] = results = measure_one_process(size, batches, repeats, device)
        for case, row in results.items():
            (stock_s, stock_gb), (twin_s, twin_gb) = row["stock"], row["twin"]
            difference = f"{row['max_abs_diff']:.1e}" if "max_abs_diff" in row else ""
            gb = (f"{stock_gb:9.2f} {twin_gb:8.2f}" if stock_gb is not None else f"{'-':>9} {'-':>8}")
            print(f"{size:20} {case:34} {stock_s * 1e3:9.2f} {twin_s * 1e3:9.2f} {twin_s / stock_s:6.2f} {gb} "
                  f"{difference}", flush=True)
    return all_results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES,
                        help=f"random: sizes of tools/family.py (default: {' '.join(DEFAULT_SIZES)})")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8], help="default: 1 8")
    parser.add_argument("--cases", nargs="+", default=["inference", "LoRA step"], choices=["inference", "LoRA step"],
                        help="CPU: which cases to run (default both)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case and model (after warm-up)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU: torch threads per worker")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--device", default="cpu", help="cpu (default: a worker process per model) or cuda")
    parser.add_argument("--one-process", action="store_true", help="the GPU path (one process) on any device")
    parser.add_argument("--lora-a-option", action="store_true",
                        help="only measure the twin's LoRA step with SAM_SPLIT_FUSE_LORA_A off and on, alternately")
    args = parser.parse_args(argv)
    if args.lora_a_option:
        all_results = {size: {batch: measure_lora_a_option(size, batch, args.repeats, args.device)
                              for batch in args.batch_sizes} for size in args.sizes}
        print(f"twin LoRA step on {args.device}, median of {args.repeats} (s): {json.dumps(all_results)}")
        return all_results
    if args.device != "cpu" or args.one_process:
        all_results = main_one_process(args.sizes, args.batch_sizes, args.repeats, args.device)
    else:
        all_results = main_cpu(args)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(all_results, file, indent=2)
    return all_results


def _print_row(size: str, name: str, row: dict) -> None:
    timed = " ".join(f"{value:.2f}" for value in row["stock_all"]) + " / " + " ".join(
        f"{value:.2f}" for value in row["twin_all"])
    print(f"{size:20} {name:22} {row['stock']:8.2f} {row['twin']:8.2f} {row['twin'] / row['stock']:10.2f} "
          f"{row['load']:5.1f}  {timed}", flush=True)


def main_cpu(args) -> dict:
    fused_a = os.environ.get("SAM_SPLIT_FUSE_LORA_A", "0")
    print(f"torch {torch.__version__}, {args.threads} threads, SAM_SPLIT_FUSE_LORA_A={fused_a}, load average "
          f"{os.getloadavg()[0]:.1f} at start")
    print(f"{'size':20} {'case':22} {'stock s':>8} {'twin s':>8} {'twin/stock':>10} {'load':>5}  all stock / twin")
    cases = [(case, batch) for batch in args.batch_sizes for case in args.cases]
    all_results = {}
    for size in args.sizes:
        results = all_results[size] = measure(size, cases, args.repeats, args.threads)
        stock, twin = results["stock memory"], results["twin memory"]
        print(f"{size:20} peak RSS stock {stock['peak_gb']:.2f} GB, twin {twin['peak_gb']:.2f} GB (models and "
              f"libraries {stock['baseline_gb']:.2f} / {twin['baseline_gb']:.2f} GB)")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return all_results


if __name__ == "__main__":
    main()

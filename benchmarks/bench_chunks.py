"""Time of the chunked attention kernel at several mask-chunk sizes, on the shapes of one vit-base image at 1024x1024:
a global layer (64x64 tokens) and a windowed layer (25 windows of 14x14), 12 heads of 64, no grad. It is what
`attention_sam_split.CPU_MASK_NUMEL` was chosen from; run it on a quiet machine and again beside other jobs
(e.g. `--busy 2` starts that many busy-looping processes for the run).

    python benchmarks/bench_chunks.py                       # 1, 4, 16 and 64 MiB of fp32 mask per SDPA call
    python benchmarks/bench_chunks.py --busy 2 --mib 4 16
"""

import argparse
import multiprocessing
import os
import statistics
import time

import torch

from sam_split.attention_sam_split import chunked_attention


def busy_loop():
    while True:
        pass


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=float, nargs="+", default=[1, 4, 16, 64], help="fp32 mask per SDPA call, MiB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--busy", type=int, default=0, help="busy-looping processes to compete with")
    args = parser.parse_args(argv)
    competitors = [multiprocessing.Process(target=busy_loop, daemon=True) for _ in range(args.busy)]
    for process in competitors:
        process.start()
    generator = torch.Generator().manual_seed(0)
    results = {}
    try:
        for name, (batch, side) in {"global layer": (1, 64), "windowed layer": (25, 14)}.items():
            query, key, value = (torch.randn(batch, 12, side * side, 64, generator=generator) for _ in range(3))
            rel_h, rel_w = (torch.randn(batch, 12, side, side, side, generator=generator) for _ in range(2))
            times = {mib: [] for mib in args.mib}
            with torch.no_grad():
                for repeat in range(args.repeats + 1):  # round-robin, so that load hits every size alike
                    for mib in args.mib:
                        start = time.perf_counter()
                        chunked_attention(query, key, value, rel_h, rel_w, 0.125, int(mib * 2**18))
                        if repeat:  # the first round warms up
                            times[mib].append(time.perf_counter() - start)
            results[name] = {mib: statistics.median(seconds) for mib, seconds in times.items()}
            print(f"{name:<15} load {os.getloadavg()[0]:.1f}: "
                  + ", ".join(f"{mib:g} MiB {seconds * 1e3:.1f} ms" for mib, seconds in results[name].items()))
    finally:
        for process in competitors:
            process.terminate()
    return results


if __name__ == "__main__":
    main()

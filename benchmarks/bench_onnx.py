"""ONNX export of the vision encoder: export time, and onnxruntime CPU latency against our PyTorch model and stock
SamModel in the same run (ratios), fp32 and dynamic int8, with what int8 costs in masks.

On the same random N(0, 0.05) weights and the same image (batch 1):
  torch-stock        transformers' SamModel vision encoder (sdpa)
  torch-ours         SamSplitModel's vision encoder (the default CPU kernel: chunked)
  onnx-fp32          onnxruntime (CPU provider) on export_onnx's vision_encoder.onnx
  onnx-int8          the same after onnxruntime's dynamic int8 quantization (vision_encoder_quantized.onnx)
The configurations run round-robin, one call each per repeat, so load from other processes hits them alike; medians
are printed with the load average. The int8 cost: the image embeddings' max abs difference from fp32 PyTorch, and the
masks of a point prompt decoded from them (fp32 decoder): max abs logit difference and the share of mask pixels whose
sign flips.

    python benchmarks/bench_onnx.py                         # vit-base, 1024x1024 (several minutes on 2 cores)
    python benchmarks/bench_onnx.py --config tiny --repeats 2   # smoke run
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from sam_testing import random_stock_sam, tiny_sam_config, vit_base_config  # noqa: E402

from sam_split import SamSplitModel  # noqa: E402
from sam_split.tools import onnx_export  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=("vit-base", "tiny"), default="vit-base")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per configuration (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads, all engines")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def session(path: Path, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def point_masks(model, embeddings: torch.Tensor) -> torch.Tensor:
    size = model.config.vision_config.image_size
    with torch.no_grad():
        return model(image_embeddings=embeddings, input_points=torch.tensor([[[[0.4 * size, 0.55 * size]]]]),
                     input_labels=torch.tensor([[[1]]])).pred_masks


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = vit_base_config() if args.config == "vit-base" else tiny_sam_config()
    stock = random_stock_sam(config)
    ours = SamSplitModel.from_sam(stock).eval()
    size = config.vision_config.image_size
    pixel_values = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    results = {"date": datetime.date.today().isoformat(), "config": args.config, "threads": args.threads,
               "torch": torch.__version__, "transformers": transformers.__version__, "machine": platform.machine(),
               "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as scratch:
        fp32, int8 = Path(scratch) / "vision_encoder.onnx", Path(scratch) / "vision_encoder_quantized.onnx"
        started = time.monotonic()
        onnx_export.export_graph(ours, onnx_export.SAM_SPEC.graphs[0], fp32)
        results["export_s"] = time.monotonic() - started
        print(f"exported the vision encoder in {results['export_s']:.0f} s", flush=True)
        started = time.monotonic()
        onnx_export.write_quantized(fp32, int8)
        results["quantize_s"] = time.monotonic() - started
        print(f"quantized it in {results['quantize_s']:.0f} s", flush=True)
        results["size_mb"] = {"fp32": sum(p.stat().st_size for p in Path(scratch).glob("vision_encoder.onnx*")) / 1e6,
                              "int8": int8.stat().st_size / 1e6}
        sessions = {"onnx-fp32": session(fp32, args.threads), "onnx-int8": session(int8, args.threads)}
        feed = {"pixel_values": pixel_values.numpy()}
        engines = {
            "torch-stock": lambda: stock.vision_encoder(pixel_values)[0],
            "torch-ours": lambda: ours.vision_encoder(pixel_values)[0],
            **{name: (lambda s=s: torch.from_numpy(s.run(["image_embeddings"], feed)[0]))
               for name, s in sessions.items()},
        }
        outputs, times = {}, {name: [] for name in engines}
        with torch.no_grad():
            for name, run in engines.items():  # warm-up (first-call allocations), outputs kept
                outputs[name] = run()
            for repeat in range(args.repeats):
                for name, run in engines.items():
                    started = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - started)
                print(f"repeat {repeat + 1}: "
                      + ", ".join(f"{name} {values[-1]:.2f} s" for name, values in times.items()),
                      flush=True)
    results["latency_s"] = {name: statistics.median(values) for name, values in times.items()}
    results["vs_stock"] = {name: value / results["latency_s"]["torch-stock"]
                           for name, value in results["latency_s"].items()}
    results["vs_ours"] = {name: value / results["latency_s"]["torch-ours"]
                          for name, value in results["latency_s"].items()}
    reference = outputs["torch-ours"]
    reference_masks = point_masks(ours, reference)
    results["accuracy"] = {}
    for name in ("onnx-fp32", "onnx-int8"):
        masks = point_masks(ours, outputs[name])
        results["accuracy"][name] = {
            "embeddings_max_abs": (outputs[name] - reference).abs().max().item(),
            "mask_logits_max_abs": (masks - reference_masks).abs().max().item(),
            "mask_pixels_flipped": ((masks > 0) != (reference_masks > 0)).float().mean().item(),
        }
    results["load_average"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()

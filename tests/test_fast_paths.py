"""The vision attention kernels (attention_sam_split.py) and the policy that picks them.

Every kernel equals stock SamModel eager (fp32, ATOL), with and without LoRA, forward and LoRA gradients: "chunked"
(the bias as SDPA mask in chunks, with a chunked backward) at CPU and at GPU chunk sizes, "folded" (the bias folded
into q/k: half-precision GPU training and inference, attention dropout), "eager". The GPU policy runs here on CPU
tensors (`cuda_policy`), so CI covers every kernel a GPU would take. With LoRA, the reference is stock SAM eager
holding the merged weights; the LoRA weights are random (PEFT's zero-initialised B would make the adapter a no-op).
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sam_testing import (
    ATOL,
    add_lora,
    max_abs_diff,
    random_stock_sam,
    run_python,
    sample_inputs,
    tiny_sam_config,
)

import sam_split.attention_sam_split as kernels
from sam_split import SamSplitModel

FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"
MATH = "aten::_scaled_dot_product_attention_math"
BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_encoder.py"
GPU_BENCHMARK = BENCHMARK.with_name("bench_gpu.py")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine every op's thread barrier waits for a descheduled
    thread (seconds per test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def config():
    return tiny_sam_config()


@pytest.fixture(scope="module")
def inputs(config):
    return sample_inputs(config, batch_size=3)


def split_model(config, lora: bool):
    """SamSplitModel (sdpa) on random_stock_sam's weights, with random LoRA on q and v if `lora`."""
    model = SamSplitModel.from_sam(random_stock_sam(config))
    return add_lora(model, seed=1).eval() if lora else model


def stock_eager_reference(model) -> torch.nn.Module:
    """Stock SamModel, eager, with `model`'s weights (LoRA merged)."""
    merged = copy.deepcopy(model).merge_and_unload() if hasattr(model, "merge_and_unload") else model
    stock = merged.to_sam()
    stock.set_attn_implementation("eager")
    return stock.eval()


def embeddings_masks_iou(model, inputs) -> tuple[torch.Tensor, ...]:
    """Through `model.vision_encoder` and `model(...)` (not `get_image_embeddings`, which transformers runs without
    grad), so that whatever grad mode the caller set applies."""
    vision_encoder = model.get_base_model().vision_encoder if hasattr(model, "get_base_model") else model.vision_encoder
    outputs = model(**inputs)
    return vision_encoder(inputs["pixel_values"]).last_hidden_state, outputs.pred_masks, outputs.iou_scores


def use_policy(monkeypatch, policy: str) -> list:
    """Make the model's attention choose its kernels as on `policy`'s device ("cpu": as is; "gpu": as on CUDA, here on
    CPU tensors; "folded": forced). Returns the list that records every plan chosen."""
    plans, choose = [], kernels.choose_kernel

    def recording_choose(device_type, *args, **kwargs):
        plans.append(choose("cuda" if policy == "gpu" else device_type, *args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(kernels, "choose_kernel", recording_choose)
    if policy == "gpu":  # the tiny config's attention is small: make its global layer (16 tokens) count as large
        monkeypatch.setattr(kernels, "SMALL_ATTENTION_TOKENS", 10)
    if policy == "folded":
        monkeypatch.setattr(kernels, "FORCED_KERNEL", "folded")
    return plans


@pytest.mark.parametrize(
    "device_type, dtype, needs_grad, dropout, tokens, expected",
    [
        ("cpu", torch.float32, False, 0.0, 4096, ("chunked", kernels.CPU_MASK_NUMEL)),
        ("cpu", torch.float32, True, 0.0, 196, ("chunked", kernels.CPU_MASK_NUMEL)),
        ("cpu", torch.bfloat16, False, 0.0, 4096, ("chunked", kernels.CPU_MASK_NUMEL)),
        ("cpu", torch.float32, True, 0.1, 4096, ("folded", 0)),
        ("cuda", torch.bfloat16, False, 0.0, 4096, ("folded", 0)),
        ("cuda", torch.float16, False, 0.0, 4096, ("folded", 0)),
        ("cuda", torch.bfloat16, False, 0.0, 196, ("chunked", kernels.DEVICE_MASK_NUMEL)),
        ("cuda", torch.bfloat16, True, 0.0, 196, ("folded", 0)),
        ("cuda", torch.float16, True, 0.0, 4096, ("folded", 0)),
        ("cuda", torch.float32, False, 0.0, 4096, ("chunked", kernels.DEVICE_MASK_NUMEL)),
        ("cuda", torch.float32, True, 0.0, 4096, ("chunked", kernels.DEVICE_MASK_NUMEL)),
        ("cuda", torch.float32, True, 0.1, 196, ("folded", 0)),
        ("mps", torch.float32, False, 0.0, 4096, ("chunked", kernels.DEVICE_MASK_NUMEL)),
    ],
)
def test_policy_picks_the_measured_kernel(device_type, dtype, needs_grad, dropout, tokens, expected):
    plan = kernels.choose_kernel(device_type, dtype, needs_grad, dropout, tokens, forced=None)
    assert (plan.kernel, plan.mask_numel) == expected


@pytest.mark.slow
def test_policy_can_be_forced_and_refuses_what_it_cannot_do():
    assert kernels.choose_kernel("cuda", torch.bfloat16, True, 0.0, 4096, forced="chunked").kernel == "chunked"
    assert kernels.choose_kernel("cpu", torch.float32, False, 0.0, 4096, forced="folded").kernel == "folded"
    with pytest.raises(ValueError, match="SAM_SPLIT_ATTENTION='flash': expected one of chunked, folded"):
        kernels.choose_kernel("cpu", torch.float32, False, 0.0, 4096, forced="flash")
    with pytest.raises(ValueError, match="cannot draw attention dropout"):
        kernels.choose_kernel("cpu", torch.float32, True, 0.1, 4096, forced="chunked")
    output = run_python("import sam_split.attention_sam_split as k; print(k.FORCED_KERNEL, k.CPU_MASK_NUMEL)",
                        env={"SAM_SPLIT_ATTENTION": "folded", "SAM_SPLIT_CPU_MASK_MIB": "16"})
    assert output.split() == ["folded", str(2**22)]
    for setting in ("0", "-4", "abc", "nan"):
        with pytest.raises(ValueError, match=f"SAM_SPLIT_CPU_MASK_MIB='{setting}': expected a positive number of MiB"):
            kernels._cpu_mask_numel(setting)


@pytest.mark.parametrize("device_type, dtype, needs_grad, forced", [
    ("cpu", torch.float32, False, None), ("cpu", torch.float32, False, "chunked"), ("cuda", torch.bfloat16, True, None),
    ("cuda", torch.float16, False, "folded"),
])
def test_policy_exports_through_the_dense_kernel(device_type, dtype, needs_grad, forced):
    """While a graph is exported, the dense kernel (standard operators: the chunked custom op has no ONNX translation),
    whatever else holds; `exporting` is an argument, so the policy stays a pure function."""
    plan = kernels.choose_kernel(device_type, dtype, needs_grad, 0.0, 4096, forced=forced, exporting=True)
    assert plan == kernels.AttentionPlan("dense")
    assert kernels.choose_kernel(device_type, dtype, needs_grad, 0.0, 4096, forced=forced).kernel != "dense"


def test_dense_kernel_equals_the_chunked_one():
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 3, 20, 8, generator=generator) for _ in range(3))
    rel_h, rel_w = torch.randn(2, 3, 4, 5, 4, generator=generator), torch.randn(2, 3, 4, 5, 5, generator=generator)
    dense = kernels.dense_attention(query, key, value, rel_h, rel_w, 0.3)
    chunked = kernels.chunked_attention(query, key, value, rel_h, rel_w, 0.3, 100)
    assert max_abs_diff(dense, chunked) <= 1e-6


PATHS = ("sdpa", "sdpa-with-grad", "eager", "checkpointed-training")
CASES = [(policy, path) for policy in ("cpu", "gpu", "folded") for path in PATHS if policy == "cpu" or path != "eager"]


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("policy, path", CASES)
def test_path_matches_stock_eager(config, inputs, policy, path, lora, monkeypatch):
    model = split_model(config, lora)
    with torch.no_grad():
        expected = embeddings_masks_iou(stock_eager_reference(model), inputs)
    plans = use_policy(monkeypatch, policy)
    if path == "eager":
        model.set_attn_implementation("eager")
    if path == "checkpointed-training":
        (model.get_base_model() if lora else model).activation_checkpointing_enable()
        model.train()
    with torch.set_grad_enabled(path != "sdpa"):
        actual = embeddings_masks_iou(model, inputs)
    assert actual[0].requires_grad == (path != "sdpa")  # the grad mode picks the kernel: make sure it did
    chosen = {plan.kernel for plan in plans}
    if policy == "gpu":  # fp32 on a GPU: whole images' bias as mask, whatever the grad mode
        assert chosen == {"chunked"} and {plan.mask_numel for plan in plans} == {kernels.DEVICE_MASK_NUMEL}
    elif path != "eager":
        assert chosen == {"folded" if policy == "folded" else "chunked"}
    for name, want, got in zip(("image embeddings", "masks", "IoU scores"), expected, actual):
        assert max_abs_diff(want, got) <= ATOL, f"{name} differ by {max_abs_diff(want, got):.3g}"
    assert expected[0].abs().max() > 1e3 * ATOL  # embeddings far above the tolerance: the comparison means something


@pytest.mark.parametrize("budget", [1, 100, 200, 300, 600, 2000])
def test_mask_chunks_cover_every_query_head_and_image(config, inputs, budget, monkeypatch):
    """Mask budgets (in values) that split the tiny config's bias into single query rows and heads (1), several rows
    (100, 200: the last chunk shorter), one head at a time (300), several heads or windows (600), whole images
    (2000)."""
    model = split_model(config, lora=False)
    with torch.no_grad():
        expected = embeddings_masks_iou(stock_eager_reference(model), inputs)
        monkeypatch.setattr(kernels, "CPU_MASK_NUMEL", budget)
        actual = embeddings_masks_iou(model, inputs)
    for want, got in zip(expected, actual):
        assert max_abs_diff(want, got) <= ATOL


def lora_gradients(model, inputs) -> dict:
    model.zero_grad(set_to_none=True)
    embeddings, masks, iou = embeddings_masks_iou(model, inputs)
    weights = torch.randn(embeddings.shape, generator=torch.Generator().manual_seed(2))
    ((embeddings * weights).sum() + masks.pow(2).sum() + iou.sum()).backward()
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("policy", ["cpu", "gpu", "folded"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_lora_gradients_match_eager(config, inputs, checkpointing, policy, monkeypatch):
    model = split_model(config, lora=True).train()
    if checkpointing:
        model.get_base_model().activation_checkpointing_enable()
    model.set_attn_implementation("eager")
    expected = lora_gradients(model, inputs)
    model.set_attn_implementation("sdpa")
    use_policy(monkeypatch, policy)
    actual = lora_gradients(model, inputs)
    assert len(actual) == 4 * config.vision_config.num_hidden_layers  # A and B of q and v in every layer
    for name, want in expected.items():
        # relative: q's LoRA gradients are ~1e-6 with these small random weights, v's ~1e-1
        scale = want.abs().max().item()
        assert scale > 0 and max_abs_diff(want, actual[name]) <= 1e-4 * scale, (
            name, max_abs_diff(want, actual[name]), scale)


def bf16_errors(model, inputs, reference: tuple, grad: bool) -> tuple[float, float]:
    """(embedding error, LoRA-gradient error) of `model` in bf16 against the fp32 `reference` (embeddings, grads)."""
    model = copy.deepcopy(model).to(torch.bfloat16)
    inputs = {key: value.to(torch.bfloat16) if value.is_floating_point() else value for key, value in inputs.items()}
    with torch.set_grad_enabled(grad):
        embeddings = embeddings_masks_iou(model, inputs)[0]
    if not grad:
        return max_abs_diff(embeddings, reference[0]), 0.0
    model.zero_grad(set_to_none=True)
    embeddings.float().mul(reference[2]).sum().backward()
    grads = {name: parameter.grad for name, parameter in model.named_parameters() if "lora_" in name}
    return max_abs_diff(embeddings, reference[0]), max(
        max_abs_diff(grads[name], want) / want.abs().max().item() for name, want in reference[1].items()
    )


@pytest.mark.parametrize("policy", ["cpu", "gpu"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_bf16_error_is_no_worse_than_stocks(config, inputs, policy, grad, monkeypatch):
    """In bf16, ours (with the kernels this device's policy picks: on a GPU folded for the global layer and for
    training) is within 1.5x of the error of stock's own computation in bf16 (the full bias as mask), both measured
    against stock eager in fp32: embeddings, and relative LoRA gradients."""
    model = split_model(config, lora=True)
    reference_model = copy.deepcopy(model)
    reference_model.set_attn_implementation("eager")
    weights = torch.randn(inputs["pixel_values"].shape[0], 16, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.set_grad_enabled(grad):
        embeddings = embeddings_masks_iou(reference_model, inputs)[0]
    grads = {}
    if grad:
        (embeddings * weights).sum().backward()
        grads = {name: parameter.grad for name, parameter in reference_model.named_parameters() if "lora_" in name}
    reference = (embeddings.detach(), grads, weights)
    stock_model = copy.deepcopy(model)
    monkeypatch.setattr(kernels, "attention", stock_bias_as_mask)  # what the split attention body calls
    stock_error = bf16_errors(stock_model, inputs, reference, grad)
    monkeypatch.undo()
    plans = use_policy(monkeypatch, policy)
    our_error = bf16_errors(model, inputs, reference, grad)
    if policy == "gpu":
        assert {plan.kernel for plan in plans} == ({"folded"} if grad else {"folded", "chunked"})
    assert stock_error[0] > 0 and our_error[0] <= 1.5 * stock_error[0], (our_error, stock_error)
    assert our_error[1] <= 1.5 * stock_error[1], (our_error, stock_error)


def stock_bias_as_mask(query, key, value, rel_h, rel_w, scale, dropout=0.0):
    """Stock SamModel's sdpa computation: the full `(batch, heads, HW, HW)` bias as SDPA mask."""
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).flatten(2, 3).flatten(3)
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scale)


def test_attention_dropout_in_training_folds_the_bias(config, inputs, monkeypatch):
    """With attention dropout, training takes the folded path (the chunked backward could not redraw SDPA's dropout).
    A probability too small to drop anything checks its values and LoRA gradients against eager; 0.5 must drop."""
    model = split_model(config, lora=True).train()
    model.set_attn_implementation("eager")
    expected = lora_gradients(model, inputs)
    model.set_attn_implementation("sdpa")
    folded_calls = []
    folded_attention = kernels.folded_attention
    monkeypatch.setattr(kernels, "folded_attention", lambda *args: folded_calls.append(1) or folded_attention(*args))
    attentions = [layer.attn for layer in model.get_base_model().vision_encoder.layers]
    for attention in attentions:
        attention.dropout = 1e-12
    actual = lora_gradients(model, inputs)
    assert len(folded_calls) == 2 * len(attentions)  # the model's forward and the encoder's, in every layer
    for name, want in expected.items():
        assert max_abs_diff(want, actual[name]) <= 1e-4 * want.abs().max().item(), name
    for attention in attentions:
        attention.dropout = 0.5
    first, second = (embeddings_masks_iou(model, inputs)[0] for _ in range(2))
    assert max_abs_diff(first, second) > 10 * ATOL  # two draws of dropout


def sdpa_kernels(function) -> set:
    with torch.profiler.profile() as profiler:
        function()
    return {event.name for event in profiler.events() if "attention" in event.name}


def test_sdpa_takes_the_flash_kernel_in_inference_and_training(config, inputs):
    model = split_model(config, lora=True)
    with torch.no_grad():
        inference = sdpa_kernels(lambda: model(**inputs))
    model.train()
    training = sdpa_kernels(lambda: model(**inputs).pred_masks.sum().backward())
    assert FLASH in inference and MATH not in inference, inference
    assert FLASH in training and MATH not in training, training
    # the check itself: a mask that needs grad sends SDPA to its math kernel, and the profiler sees that
    query = torch.randn(1, 2, 16, 8)
    mask = torch.randn(1, 2, 16, 16, requires_grad=True)
    assert MATH in sdpa_kernels(lambda: torch.nn.functional.scaled_dot_product_attention(query, query, query, mask))


def test_set_attn_implementation_switches_our_attention(config, inputs):
    model = split_model(config, lora=False)
    pixel_values = inputs["pixel_values"]
    with torch.no_grad():
        assert not any(model.vision_encoder(pixel_values, output_attentions=True).attentions or ())
        model.set_attn_implementation("eager")  # after construction, on 4.57 and 5.x alike
        ours = model.vision_encoder(pixel_values, output_attentions=True).attentions
        stock = stock_eager_reference(model).vision_encoder(pixel_values, output_attentions=True).attentions
    assert len(ours) == config.vision_config.num_hidden_layers
    for want, got in zip(stock, ours):
        assert max_abs_diff(want, got) <= ATOL


@pytest.mark.parametrize("policy", ["cpu", "gpu"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("layer", [0, 1], ids=["windowed", "global"])
def test_attention_compiles_without_graph_breaks(config, layer, grad, policy, monkeypatch):
    model = split_model(config, lora=False)
    use_policy(monkeypatch, policy)
    attention = model.vision_encoder.layers[layer].attn
    side = model.vision_encoder.layers[layer].window_size or 4
    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        explanation = torch._dynamo.explain(attention)(torch.randn(2, side, side, config.vision_config.hidden_size))
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["cpu", "gpu"])
def test_compiled_encoder_matches_eager_in_inference_and_training(config, inputs, policy, monkeypatch):
    """torch.compile (inductor) through our attention kernels: the custom ops' shape functions must match what they
    compute, and their registered backward (or the folded kernel's autograd) must give eager's LoRA gradients."""
    model = split_model(config, lora=True).train()
    vision_encoder = model.get_base_model().vision_encoder
    pixel_values, weights = inputs["pixel_values"], torch.randn(inputs["pixel_values"].shape[0], 16, 4, 4)
    model.set_attn_implementation("eager")
    expected_embeddings = vision_encoder(pixel_values).last_hidden_state
    (expected_embeddings * weights).sum().backward()
    expected = {name: parameter.grad for name, parameter in model.named_parameters() if "lora_" in name}
    model.set_attn_implementation("sdpa")
    model.zero_grad(set_to_none=True)
    use_policy(monkeypatch, policy)
    torch._dynamo.reset()
    compiled = torch.compile(vision_encoder, fullgraph=True)
    with torch.no_grad():
        assert max_abs_diff(expected_embeddings, compiled(pixel_values).last_hidden_state) <= ATOL
    (compiled(pixel_values).last_hidden_state * weights).sum().backward()
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            assert max_abs_diff(expected[name], parameter.grad) <= 1e-4 * expected[name].abs().max().item(), name


@pytest.mark.slow
def test_attention_ops_survive_a_second_import_of_the_module():
    """Each execution of the model file registers its ops under a free name (torch allows a name once per process)."""
    output = run_python(
        "import importlib, torch\n"
        "import sam_split.attention_sam_split as kernels\n"
        "first = kernels.chunked_attention\n"
        "importlib.reload(kernels)\n"
        "q = torch.randn(1, 2, 4, 8); rel = torch.randn(1, 2, 2, 2, 2)\n"
        "print(first._qualname, kernels.chunked_attention._qualname, bool(torch.equal(\n"
        "    first(q, q, q, rel, rel, 0.5, 8), kernels.chunked_attention(q, q, q, rel, rel, 0.5, 8))))\n"
    )
    first, second, same = output.split()
    assert first != second and same == "True", output


@pytest.mark.slow
def test_benchmark_smoke_run(tmp_path):
    out = tmp_path / "bench.json"
    names = ["stock-eager", "stock-sdpa", "ours", "train-sdpa-math", "train-ours-ckpt"]
    command = [sys.executable, str(BENCHMARK), "--config", "tiny", "--batch-sizes", "2", "--repeats", "1",
               "--train-step", "--only", *names, "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "load average" in result.stdout
    results = json.loads(out.read_text())
    encoder = {row["name"]: row for row in results["encoder"]}
    assert sorted(encoder) == sorted(names[:3])
    for row in encoder.values():
        assert row["batch_size"] == 2 and len(row["times_s"]) == 1 and row["peak_rss_gb"] >= row["baseline_rss_gb"] > 0
        assert row["max_abs_diff"] <= ATOL
    assert encoder["stock-sdpa"]["time_ratio"] == 1.0
    assert max(results["full_model"]["max_abs_diff"].values()) <= ATOL
    train = {row["name"]: row for row in results["train_step"]}
    assert sorted(train) == ["train-ours-ckpt", "train-sdpa-math"] and train["train-ours-ckpt"]["max_abs_diff"] <= ATOL
    assert results["meta"]["encoder_gflop_per_image"] > 0 and results["meta"]["gemm_fp32_gflops"] > 0
    qkv = results["meta"]["qkv_projection"]
    assert qkv["three_gemms_s"] > 0 and qkv["fused_gemm_s"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("threshold", ["-1", str(2**25 + 1)])
def test_benchmark_refuses_an_mmap_threshold_glibc_would_ignore(threshold):
    command = [sys.executable, str(BENCHMARK), "--config", "tiny", "--malloc-mmap-threshold", threshold]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"must be 0 to {2**25} bytes (32 MiB), got {threshold}" in result.stderr


@pytest.mark.slow
def test_gpu_benchmark_smoke_run_on_cpu(tmp_path, monkeypatch):
    """The GPU benchmark's code path (here on CPU tensors, without CUDA events or memory): every row, ratios to the
    stock row of the same kind, bf16 accuracy at batch 1, and the LoRA training step with stock's LoRA on qkv.
    In this process (one thread, see `one_thread`) and without a time limit: a busy machine makes it slower, not
    wrong (a subprocess with a 300 s limit once failed on one)."""
    import importlib

    monkeypatch.syspath_prepend(str(GPU_BENCHMARK.parent))
    bench_gpu = importlib.import_module(GPU_BENCHMARK.stem)
    out = tmp_path / "gpu.json"
    bench_gpu.main(["--device", "cpu", "--config", "tiny", "--batch-sizes", "1", "2", "--fp32-batch-sizes", "1",
                    "--compiled-batch-sizes", "--train-batch-size", "2", "--repeats", "1", "--json", str(out)])
    results = json.loads(out.read_text())
    rows = {(row["name"], row["dtype"], row["batch"]): row for row in results["encoder"]}
    assert sorted(rows) == sorted((name, dtype, batch) for name in ("stock", "ours")
                                  for dtype, batch in (("bf16", 1), ("bf16", 2), ("fp32", 1)))
    assert rows["ours", "fp32", 1]["max_abs_diff"] <= ATOL
    assert rows["ours", "bf16", 1]["max_abs_diff"] <= 1.5 * rows["stock", "bf16", 1]["max_abs_diff"]
    assert all(row["median_s"] > 0 and row["time_ratio"] > 0 for row in rows.values())
    assert [row["name"] for row in results["train_step"]] == ["stock, LoRA on qkv", "ours, LoRA on q, v"]
    assert results["train_step"][1]["time_ratio"] > 0 and results["meta"]["gemm_bf16_tflops"] > 0

"""Every attention path of SamSplitVisionAttention equals stock SamModel eager (fp32, ATOL), with and without LoRA.

Paths: "sdpa" without grad (the bias as SDPA mask, built in chunks), "sdpa" with grad (the same forward, and a
chunked backward into the bias), "eager", training with gradient checkpointing, and training with attention dropout
(the bias folded into q/k). With LoRA, the reference is stock SAM eager holding the merged
weights. The LoRA weights are random: PEFT's zero-initialised B would make the adapter a no-op.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sam_split.modeling_sam_split as modeling
from sam_split import SamSplitModel
from sam_testing import (
    ATOL, add_lora, max_abs_diff, random_stock_sam, run_python, sample_inputs, tiny_sam_config,
)

FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"
MATH = "aten::_scaled_dot_product_attention_math"
BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_encoder.py"


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


PATHS = ("sdpa", "sdpa-with-grad", "eager", "checkpointed-training")


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("path", PATHS)
def test_path_matches_stock_eager(config, inputs, path, lora):
    model = split_model(config, lora)
    with torch.no_grad():
        expected = embeddings_masks_iou(stock_eager_reference(model), inputs)
    if path == "eager":
        model.set_attn_implementation("eager")
    if path == "checkpointed-training":
        (model.get_base_model() if lora else model).activation_checkpointing_enable()
        model.train()
    with torch.set_grad_enabled(path != "sdpa"):
        actual = embeddings_masks_iou(model, inputs)
    assert actual[0].requires_grad == (path != "sdpa")  # the grad mode picks the sdpa path: make sure it did
    for name, want, got in zip(("image embeddings", "masks", "IoU scores"), expected, actual):
        assert max_abs_diff(want, got) <= ATOL, f"{name} differ by {max_abs_diff(want, got):.3g}"
    assert expected[0].abs().max() > 1e3 * ATOL  # embeddings far above the tolerance: the comparison means something


@pytest.mark.parametrize("budget", [1, 100, 200, 300, 600, 2000])
def test_mask_chunks_cover_every_query_head_and_image(config, inputs, budget, monkeypatch):
    """Mask budgets (in values) that split the tiny config's bias into single query rows and heads (1), several rows
    (100, 200: the last chunk shorter), one head at a time (300), several heads or windows (600), whole images (2000)."""
    model = split_model(config, lora=False)
    with torch.no_grad():
        expected = embeddings_masks_iou(stock_eager_reference(model), inputs)
        monkeypatch.setattr(modeling, "_MASK_CHUNK_NUMEL", budget)
        actual = embeddings_masks_iou(model, inputs)
    for want, got in zip(expected, actual):
        assert max_abs_diff(want, got) <= ATOL


def lora_gradients(model, inputs) -> dict:
    model.zero_grad(set_to_none=True)
    embeddings, masks, iou = embeddings_masks_iou(model, inputs)
    weights = torch.randn(embeddings.shape, generator=torch.Generator().manual_seed(2))
    ((embeddings * weights).sum() + masks.pow(2).sum() + iou.sum()).backward()
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_lora_gradients_match_eager(config, inputs, checkpointing):
    model = split_model(config, lora=True).train()
    if checkpointing:
        model.get_base_model().activation_checkpointing_enable()
    model.set_attn_implementation("eager")
    expected = lora_gradients(model, inputs)
    model.set_attn_implementation("sdpa")
    actual = lora_gradients(model, inputs)
    assert len(actual) == 4 * config.vision_config.num_hidden_layers  # A and B of q and v in every layer
    for name, want in expected.items():
        # relative: q's LoRA gradients are ~1e-6 with these small random weights, v's ~1e-1
        scale = want.abs().max().item()
        assert scale > 0 and max_abs_diff(want, actual[name]) <= 1e-4 * scale, (name, max_abs_diff(want, actual[name]), scale)


def test_attention_dropout_in_training_folds_the_bias(config, inputs, monkeypatch):
    """With attention dropout, training takes the folded path (the chunked backward could not redraw SDPA's dropout).
    A probability too small to drop anything checks its values and LoRA gradients against eager; 0.5 must drop."""
    model = split_model(config, lora=True).train()
    model.set_attn_implementation("eager")
    expected = lora_gradients(model, inputs)
    model.set_attn_implementation("sdpa")
    folded_calls = []
    folded_sdpa = modeling.SamSplitVisionAttention._folded_sdpa
    monkeypatch.setattr(
        modeling.SamSplitVisionAttention, "_folded_sdpa", lambda *args: folded_calls.append(1) or folded_sdpa(*args)
    )
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


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("layer", [0, 1], ids=["windowed", "global"])
def test_attention_compiles_without_graph_breaks(config, layer, grad):
    model = split_model(config, lora=False)
    attention = model.vision_encoder.layers[layer].attn
    side = model.vision_encoder.layers[layer].window_size or 4
    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        explanation = torch._dynamo.explain(attention)(torch.randn(2, side, side, config.vision_config.hidden_size))
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons


def test_compiled_encoder_matches_eager_in_inference_and_training(config, inputs):
    """torch.compile (inductor) through our custom attention ops: their shape functions must match what they compute,
    and their registered backward must give eager's LoRA gradients."""
    model = split_model(config, lora=True).train()
    vision_encoder = model.get_base_model().vision_encoder
    pixel_values, weights = inputs["pixel_values"], torch.randn(inputs["pixel_values"].shape[0], 16, 4, 4)
    model.set_attn_implementation("eager")
    expected_embeddings = vision_encoder(pixel_values).last_hidden_state
    (expected_embeddings * weights).sum().backward()
    expected = {name: parameter.grad for name, parameter in model.named_parameters() if "lora_" in name}
    model.set_attn_implementation("sdpa")
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(vision_encoder, fullgraph=True)
    with torch.no_grad():
        assert max_abs_diff(expected_embeddings, compiled(pixel_values).last_hidden_state) <= ATOL
    (compiled(pixel_values).last_hidden_state * weights).sum().backward()
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            assert max_abs_diff(expected[name], parameter.grad) <= 1e-4 * expected[name].abs().max().item(), name


def test_attention_ops_survive_a_second_import_of_the_module():
    """Each execution of the model file registers its ops under a free name (torch allows a name once per process)."""
    output = run_python(
        "import importlib, torch\n"
        "import sam_split.modeling_sam_split as modeling\n"
        "first = modeling.rel_pos_attention\n"
        "importlib.reload(modeling)\n"
        "q = torch.randn(1, 2, 4, 8); rel = torch.randn(1, 2, 2, 2, 2)\n"
        "print(first._qualname, modeling.rel_pos_attention._qualname, bool(torch.equal(\n"
        "    first(q, q, q, rel, rel, 0.5), modeling.rel_pos_attention(q, q, q, rel, rel, 0.5))))\n"
    )
    first, second, same = output.split()
    assert first != second and same == "True", output


def test_benchmark_smoke_run(tmp_path):
    out = tmp_path / "bench.json"
    names = ["stock-eager", "stock-sdpa", "ours", "train-sdpa-math", "train-ours-ckpt"]
    command = [sys.executable, str(BENCHMARK), "--config", "tiny", "--batch-sizes", "2", "--repeats", "1",
               "--train-step", "--only", *names, "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
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
    assert results["meta"]["qkv_projection"]["three_gemms_s"] > 0 and results["meta"]["qkv_projection"]["fused_gemm_s"] > 0


@pytest.mark.parametrize("threshold", ["-1", str(2**25 + 1)])
def test_benchmark_refuses_an_mmap_threshold_glibc_would_ignore(threshold):
    command = [sys.executable, str(BENCHMARK), "--config", "tiny", "--malloc-mmap-threshold", threshold]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"must be 0 to {2**25} bytes (32 MiB), got {threshold}" in result.stderr

"""export_onnx.py: a tiny SamSplitModel with a non-zero LoRA adapter merged, exported once per module; onnxruntime and
transformers.js (Node) run the graphs and must match the merged PyTorch model and the stock SamModel on its weights."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from sam_testing import add_lora, max_abs_diff, random_stock, random_stock_sam, randomize_, tiny_sam2_config

from sam_split import SamSplitModel
from sam_split.modeling_sam_split import SamSplitVisionAttention
from sam_split.tools import onnx_export
from sam_split.tools.cli import ToolError

ROOT = Path(__file__).resolve().parent.parent
# Weights N(0, 0.3) instead of the usual 0.05: at 0.05 this tiny model's masks barely depend on the prompt (point
# against box: 7e-9) or on the image (the adapter: 3e-9), so matching them would prove nothing; at 0.3 a prompt moves
# the masks by ~4e-3, and every comparison below is also checked against what it must tell apart.
STD = 0.3
JS = ROOT / "tests" / "js"
PROMPTS = (("points", 1), ("box", 1), ("points+box", 2), ("points", 2), ("box", 2))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(output folder, merged model, stock SamModel with the merged weights, base model): export_onnx.py's CLI run
    in-process on a base folder and an adapter folder, with the fp16 and quantized variants."""
    from sam_split import export_onnx

    tmp = tmp_path_factory.mktemp("onnx")
    base = SamSplitModel.from_sam(randomize_(random_stock_sam(), std=STD))
    base.save_pretrained(tmp / "base")
    tuned = add_lora(SamSplitModel.from_pretrained(tmp / "base"), rank=4, seed=1)
    tuned.save_pretrained(tmp / "adapter")
    merged = tuned.merge_and_unload().eval()
    rc = export_onnx.main(["--model", str(tmp / "base"), "--adapter", str(tmp / "adapter"), "--output-dir",
                           str(tmp / "out"), "--dtype", "fp16", "--quantize"])
    assert rc == 0
    return tmp / "out", merged, merged.to_sam(), SamSplitModel.from_pretrained(tmp / "base").eval()


def reference(model, pixel_values, prompts) -> dict:
    with torch.no_grad():
        embeddings = model.vision_encoder(pixel_values)[0]
        outputs = model(image_embeddings=embeddings, **prompts)
    return {"image_embeddings": embeddings, "iou_scores": outputs.iou_scores, "pred_masks": outputs.pred_masks}


def run_onnx(folder: Path, pixel_values, prompts, suffix: str = "") -> dict:
    feeds = {"vision_encoder": {"pixel_values": pixel_values},
             "prompt_encoder_mask_decoder": onnx_export.sam_graph_prompts(prompts, pixel_values.shape[0])}
    return onnx_export.run_graphs(folder / "onnx", onnx_export.SAM_SPEC, feeds, suffix)


@pytest.mark.slow
def test_folder_has_the_layout_transformers_js_loads(exported):
    folder, merged, *_ = exported
    files = {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}
    graphs = {f"onnx/{name}{suffix}.onnx" for name in ("vision_encoder", "prompt_encoder_mask_decoder")
              for suffix in ("", "_fp16", "_quantized")}
    assert files == graphs | {"config.json", "preprocessor_config.json", "README.md"}
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "sam" and "auto_map" not in config
    assert json.loads((folder / "preprocessor_config.json").read_text())["pad_size"] == {"height": 64, "width": 64}
    card = (folder / "README.md").read_text()
    assert "Adapter: the local folder `adapter`, merged" in card and "Base model: the local folder `base`" in card
    import onnxruntime

    decoder = onnxruntime.InferenceSession(str(folder / "onnx/prompt_encoder_mask_decoder.onnx"))
    assert [i.name for i in decoder.get_inputs()] == list(onnx_export.SAM_SPEC.graphs[1].input_names)
    assert [o.name for o in decoder.get_outputs()] == ["iou_scores", "pred_masks"]
    # batch, point batch and point count are dynamic (named), not fixed to the traced sizes
    points = next(i for i in decoder.get_inputs() if i.name == "input_points")
    assert all(isinstance(size, str) for size in points.shape[:3]) and points.shape[3] == 2


@pytest.mark.parametrize("kind, batch_size", PROMPTS)
def test_onnxruntime_matches_merged_and_stock_models(exported, kind, batch_size):
    folder, merged, stock, base = exported
    size = merged.config.vision_config.image_size
    pixel_values = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(7))
    prompts = onnx_export.sam_prompts(merged.config, batch_size, kind)
    actual = run_onnx(folder, pixel_values, prompts)
    expected, stock_outputs = reference(merged, pixel_values, prompts), reference(stock, pixel_values, prompts)
    for name in expected:
        assert actual[name].shape == expected[name].shape
        assert max_abs_diff(actual[name], expected[name]) <= 1e-4, name
        assert max_abs_diff(actual[name], stock_outputs[name]) <= 1e-4, name
    # ... and far closer than what it must tell apart: another prompt, and the base without the adapter
    other = other_prompts(merged.config, prompts, batch_size)
    prompt_effect = max_abs_diff(expected["pred_masks"], reference(merged, pixel_values, other)["pred_masks"])
    assert max_abs_diff(actual["pred_masks"], expected["pred_masks"]) * 100 < prompt_effect
    adapter_effect = max_abs_diff(expected["image_embeddings"],
                                  reference(base, pixel_values, prompts)["image_embeddings"])
    assert max_abs_diff(actual["image_embeddings"], expected["image_embeddings"]) * 100 < adapter_effect


def other_prompts(config, prompts: dict, batch_size: int) -> dict:
    """The same prompts without their boxes; a box instead of points alone."""
    if "input_boxes" in prompts and "input_points" in prompts:
        return {name: value for name, value in prompts.items() if name != "input_boxes"}
    return onnx_export.sam_prompts(config, batch_size, "box" if "input_points" in prompts else "points")


def test_fp16_and_quantized_variants_stay_within_their_tolerances(exported):
    folder, merged, *_ = exported
    size = merged.config.vision_config.image_size
    pixel_values = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(8))
    prompts = onnx_export.sam_prompts(merged.config, 2, "points+box")
    expected = reference(merged, pixel_values, prompts)
    for variant, suffix in (("fp16", "_fp16"), ("quantized", "_quantized")):
        actual = run_onnx(folder, pixel_values, prompts, suffix)
        for name in expected:
            assert max_abs_diff(actual[name], expected[name]) <= onnx_export.TOLERANCES[variant], (variant, name)


def test_quantized_graphs_are_smaller_than_fp32(exported):
    """int8 pays for both graphs: weights behind a Transpose are folded first, so every MatMul is quantized (the
    decoder was once larger quantized than in fp32)."""
    import onnx

    folder, *_ = exported
    for graph in ("vision_encoder", "prompt_encoder_mask_decoder"):
        fp32, quantized = (folder / "onnx" / f"{graph}{suffix}.onnx" for suffix in ("", "_quantized"))
        assert quantized.stat().st_size < 0.8 * fp32.stat().st_size, graph
        nodes = onnx.load(str(quantized)).graph.node
        assert not [node.name for node in nodes if node.op_type == "MatMul" and "Transpose" in node.input[1]]
        assert any(node.op_type == "MatMulInteger" for node in nodes)


def test_large_weights_go_to_onnx_data_beside_the_graph(exported, tmp_path):
    """Over the threshold (2 GB by default; 0 here) weights go to `<file>.onnx_data`, transformers.js' name."""
    import onnx

    folder, merged, *_ = exported
    onnx_export.save_onnx(onnx.load(str(folder / "onnx/vision_encoder.onnx")), tmp_path / "vision_encoder.onnx",
                          external_data_bytes=0)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["vision_encoder.onnx", "vision_encoder.onnx_data"]
    graph = onnx.load(str(tmp_path / "vision_encoder.onnx"), load_external_data=False).graph
    weights = [tensor for tensor in graph.initializer if np.prod(tensor.dims) * 4 > 1024]
    assert weights and all(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in weights)
    import onnxruntime

    size = merged.config.vision_config.image_size
    pixel_values = torch.randn(1, 3, size, size).numpy()
    outputs = [onnxruntime.InferenceSession(str(path)).run(None, {"pixel_values": pixel_values})[0]
               for path in (tmp_path / "vision_encoder.onnx", folder / "onnx/vision_encoder.onnx")]
    assert (outputs[0] == outputs[1]).all()


def test_a_mismatch_is_an_error(exported):
    folder, _, _, base = exported
    with pytest.raises(ToolError, match=r"verification of the fp32 ONNX graphs failed \(points, batch 1\): "):
        onnx_export.verify(folder / "onnx", onnx_export.SAM_SPEC, base)


def test_failed_verification_leaves_nothing_and_says_one_line(tmp_path, monkeypatch, capsys):
    from sam_split import export_onnx

    SamSplitModel.from_sam(random_stock_sam()).save_pretrained(tmp_path / "base")
    monkeypatch.setattr(onnx_export, "export_graph", lambda model, graph, path, *a: path.write_bytes(b"graph"))

    def mismatch(*args, **kwargs):
        raise ToolError("verification of the fp32 ONNX graphs failed (points, batch 1): ...")

    monkeypatch.setattr(onnx_export, "verify", mismatch)
    capsys.readouterr()  # saving's progress bars
    assert export_onnx.main(["--model", str(tmp_path / "base"), "--output-dir", str(tmp_path / "out")]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]  # beside progress bars
    assert errors == ["error: verification of the fp32 ONNX graphs failed (points, batch 1): ..."]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["base"]  # no output folder, no build folder left


@pytest.mark.slow
def test_missing_onnx_extra_is_one_install_line_and_other_tools_do_not_need_it(tmp_path):
    SamSplitModel.from_sam(random_stock_sam()).save_pretrained(tmp_path / "base")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["onnxruntime"] = None  # as if not installed
        import sam_split, sam_split.push, sam_split.evaluate, sam_split.tools.onnx_export
        from sam_split import export_onnx
        sys.exit(export_onnx.main(["--model", {str(tmp_path / "base")!r}, "--output-dir", {str(tmp_path / "out")!r}]))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        'error: exporting to ONNX needs the package onnxruntime: pip install -e ".[onnx]" '
        "(or: pip install onnx onnxscript onnxruntime)"]
    assert not (tmp_path / "out").exists()


def test_attention_takes_the_dense_kernel_only_while_exporting():
    """The chunked custom op has no ONNX translation: an export traces the dense kernel (standard operators), while
    eager calls keep the chunked one (the policy itself: test_fast_paths.py)."""
    model = SamSplitModel.from_sam(random_stock_sam())
    attention = next(layer.attn for layer in model.vision_encoder.layers
                     if isinstance(layer.attn, SamSplitVisionAttention) and layer.window_size == 0)
    hidden = torch.randn(1, 4, 4, 32)
    program = torch.export.export(attention, (hidden,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("sam_split" in target for target in targets)
    assert any("scaled_dot_product_attention" in target for target in targets)
    with torch.no_grad():
        assert max_abs_diff(program.module()(hidden)[0], attention(hidden)[0]) <= 1e-6


def test_patched_decoder_prompts_are_exact_for_every_prompt_kind():
    """The decoder graph's prompt assembly (no box: -1s; no points: zero of them), run in PyTorch, equals SamModel."""
    model = SamSplitModel.from_sam(randomize_(random_stock_sam(), std=STD))
    graph = onnx_export.SamPromptMaskDecoderGraph(model).eval()
    size = model.config.vision_config.image_size
    for kind, batch_size in PROMPTS:
        pixel_values = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(3))
        prompts = onnx_export.sam_prompts(model.config, batch_size, kind)
        expected = reference(model, pixel_values, prompts)
        positional = model.get_image_wide_positional_embeddings().repeat(batch_size, 1, 1, 1)
        with torch.no_grad():
            iou_scores, pred_masks = graph(expected["image_embeddings"], positional,
                                           *onnx_export.sam_graph_prompts(prompts, batch_size).values())
        assert max_abs_diff(pred_masks, expected["pred_masks"]) <= 1e-5, kind
        assert max_abs_diff(iou_scores, expected["iou_scores"]) <= 1e-5, kind
        other = reference(model, pixel_values, other_prompts(model.config, prompts, batch_size))
        assert max_abs_diff(pred_masks, expected["pred_masks"]) * 100 < max_abs_diff(pred_masks, other["pred_masks"])


def as_json(tensor) -> dict:
    return {"type": "int64" if tensor.dtype == torch.int64 else "float32", "dims": list(tensor.shape),
            "data": tensor.flatten().tolist()}


def as_tensor(value: dict) -> torch.Tensor:
    return torch.tensor(value["data"]).reshape(value["dims"])


def run_transformers_js(folder: Path, pixel_values, prompts: dict, tmp_path: Path) -> dict:
    """tests/js/segment.mjs on `folder`: {"embeddings": {name: tensor}, prompt name: {output name: tensor}}, after
    checking that transformers.js is installed (CI installs it: there its absence is a failure, not a skip)."""
    if not (JS / "node_modules" / "@huggingface" / "transformers").is_dir() or shutil.which("node") is None:
        message = "transformers.js is not installed: run `npm ci --ignore-scripts` in tests/js (Node 18+)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    inputs = {"pixel_values": as_json(pixel_values),
              "prompts": {name: {key: as_json(value) for key, value in prompt.items()}
                          for name, prompt in prompts.items()}}
    (tmp_path / "inputs.json").write_text(json.dumps(inputs))
    result = subprocess.run(["node", str(JS / "segment.mjs"), str(folder), str(tmp_path / "inputs.json"),
                             str(tmp_path / "outputs.json")], capture_output=True, text=True, timeout=300, cwd=JS)
    assert result.returncode == 0, result.stderr[-3000:]
    return {group: {name: as_tensor(value) for name, value in tensors.items()}
            for group, tensors in json.loads((tmp_path / "outputs.json").read_text()).items()}


def test_transformers_js_loads_the_folder_and_segments(exported, tmp_path):
    """transformers.js (Node, onnxruntime-node) loads the folder from disk with remote models disabled and segments
    with a point prompt and a box prompt; its masks match PyTorch's."""
    folder, merged, *_ = exported
    size = merged.config.vision_config.image_size
    pixel_values = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(9))
    prompts = {"point": onnx_export.sam_prompts(merged.config, 1, "points"),
               "box": onnx_export.sam_prompts(merged.config, 1, "box")}
    outputs = run_transformers_js(folder, pixel_values, {name: onnx_export.sam_graph_prompts(prompt, 1)
                                                         for name, prompt in prompts.items()}, tmp_path)
    point_box_difference = max_abs_diff(outputs["point"]["pred_masks"], outputs["box"]["pred_masks"])
    for name, prompt in prompts.items():
        expected = reference(merged, pixel_values, prompt)
        assert max_abs_diff(outputs[name]["pred_masks"], expected["pred_masks"]) * 100 < point_box_difference
        assert max_abs_diff(outputs["embeddings"]["image_embeddings"], expected["image_embeddings"]) <= 1e-4
        for output in ("iou_scores", "pred_masks"):
            assert list(outputs[name][output].shape) == list(expected[output].shape)
            assert max_abs_diff(outputs[name][output], expected[output]) <= 1e-4, (name, output)


# ----------------------------------------------------------------------------------------------------------- SAM 2


@pytest.fixture(scope="module")
def exported_sam2(tmp_path_factory):
    """(output folder, merged Sam2SplitModel, stock Sam2Model with the merged weights): export_onnx.py's CLI on a tiny
    SAM 2.1 twin (every Hiera block kind) with a non-zero LoRA adapter on q and v, fp32 only."""
    from transformers import Sam2Model

    from sam_split import Sam2SplitModel, export_onnx

    tmp = tmp_path_factory.mktemp("onnx-sam2")
    stock = randomize_(random_stock(Sam2Model, tiny_sam2_config()), std=STD)
    Sam2SplitModel.from_stock(stock).save_pretrained(tmp / "base")
    tuned = add_lora(Sam2SplitModel.from_pretrained(tmp / "base"), rank=4, seed=1)
    tuned.save_pretrained(tmp / "adapter")
    merged = tuned.merge_and_unload().eval()
    assert export_onnx.main(["--model", str(tmp / "base"), "--adapter", str(tmp / "adapter"), "--output-dir",
                             str(tmp / "out")]) == 0
    return tmp / "out", merged, merged.to_stock().eval()


def sam2_reference(model, pixel_values, prompts) -> dict:
    with torch.no_grad():
        embeddings = model.get_image_embeddings(pixel_values)
        outputs = model(image_embeddings=embeddings, **prompts)
    return {**dict(zip(onnx_export.SAM2_LEVELS, embeddings)), "iou_scores": outputs.iou_scores,
            "pred_masks": outputs.pred_masks, "object_score_logits": outputs.object_score_logits}


@pytest.mark.slow
def test_sam2_folder_has_transformers_js_sam2_layout(exported_sam2):
    folder, *_ = exported_sam2
    import onnxruntime

    assert {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()} == {
        "onnx/vision_encoder.onnx", "onnx/prompt_encoder_mask_decoder.onnx", "config.json",
        "preprocessor_config.json", "README.md"}
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "sam2" and config["architectures"] == ["Sam2Model"] and "auto_map" not in config
    assert config["vision_config"]["num_feature_levels"] == 3  # transformers.js reads it to name the embeddings
    encoder = onnxruntime.InferenceSession(str(folder / "onnx/vision_encoder.onnx"))
    assert [o.name for o in encoder.get_outputs()] == ["image_embeddings.0", "image_embeddings.1", "image_embeddings.2"]
    decoder = onnxruntime.InferenceSession(str(folder / "onnx/prompt_encoder_mask_decoder.onnx"))
    assert sorted(i.name for i in decoder.get_inputs()) == sorted(
        ["image_embeddings.0", "image_embeddings.1", "image_embeddings.2", "input_points", "input_labels",
         "input_boxes"])
    assert [o.name for o in decoder.get_outputs()] == ["iou_scores", "pred_masks", "object_score_logits"]


@pytest.mark.slow
@pytest.mark.parametrize("kind, batch_size", PROMPTS)
def test_sam2_onnxruntime_matches_merged_and_stock_models(exported_sam2, kind, batch_size):
    """The graphs fed as transformers.js feeds them (no box: boxes of shape (batch, 0, 4); no points: zero points)
    match the merged twin and stock Sam2Model at 1e-4, far closer than another prompt's masks."""
    folder, merged, stock = exported_sam2
    size = merged.config.prompt_encoder_config.image_size
    pixel_values = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(7))
    prompts = onnx_export.sam_prompts(merged.config, batch_size, kind)
    feeds = {"vision_encoder": {"pixel_values": pixel_values},
             "prompt_encoder_mask_decoder": onnx_export.sam2_graph_prompts(prompts, batch_size)}
    actual = onnx_export.run_graphs(folder / "onnx", onnx_export.SAM2_SPEC, feeds)
    expected = sam2_reference(merged, pixel_values, prompts)
    stock_outputs = sam2_reference(stock, pixel_values, prompts)
    for name in expected:
        assert actual[name].shape == expected[name].shape, name
        assert max_abs_diff(actual[name], expected[name]) <= 1e-4, name
        assert max_abs_diff(actual[name], stock_outputs[name]) <= 1e-4, name
    # A random tiny SAM 2's masks depend little on the prompt (another prompt moves them by ~3e-4 of ~8, whatever the
    # weights' scale), so the graphs must be 10x closer to this prompt's masks than another prompt's are.
    other = sam2_reference(merged, pixel_values, other_prompts(merged.config, prompts, batch_size))
    assert max_abs_diff(actual["pred_masks"], expected["pred_masks"]) * 10 < max_abs_diff(
        expected["pred_masks"], other["pred_masks"])


def test_sam2_transformers_js_loads_the_folder_and_segments(exported_sam2, tmp_path):
    """transformers.js' Sam2Model loads the folder and segments from a point prompt and from a box prompt given alone
    (it fills in the other decoder inputs itself), matching PyTorch."""
    folder, merged, _ = exported_sam2
    size = merged.config.prompt_encoder_config.image_size
    pixel_values = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(9))
    prompts = {"point": onnx_export.sam_prompts(merged.config, 1, "points"),
               "box": onnx_export.sam_prompts(merged.config, 1, "box")}
    outputs = run_transformers_js(folder, pixel_values, prompts, tmp_path)
    point_box_difference = max_abs_diff(outputs["point"]["pred_masks"], outputs["box"]["pred_masks"])
    for name, prompt in prompts.items():
        expected = sam2_reference(merged, pixel_values, prompt)
        for level in onnx_export.SAM2_LEVELS:
            assert max_abs_diff(outputs["embeddings"][level], expected[level]) <= 1e-4, level
        assert max_abs_diff(outputs[name]["pred_masks"], expected["pred_masks"]) * 10 < point_box_difference  # (above)
        for output in ("iou_scores", "pred_masks", "object_score_logits"):
            assert list(outputs[name][output].shape) == list(expected[output].shape), (name, output)
            assert max_abs_diff(outputs[name][output], expected[output]) <= 1e-4, (name, output)

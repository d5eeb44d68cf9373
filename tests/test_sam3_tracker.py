"""The SAM 3 tracker (`Sam3TrackerModel`, transformers 5 only) as a family member without a twin: its ViT has separate
`q_proj`/`k_proj`/`v_proj` already, so the tools train the stock model. One row of `tools/family.py`; it enters
finetune.py and evaluate.py through `tools.models` as a folder saved by `Sam3TrackerModel.save_pretrained`, a Hub id at
a revision, or `random:sam3-tracker-tiny`.

Specified here: the default LoRA targets are exactly the ViT backbone's q and v (2,097,152 parameters at the released
size, r=16; `--target-modules` overrides), `--gradient-checkpointing` gives the gradients of a run without it, the
processor without torchvision is the tracker's preprocessing, and a tiny tracker fine-tunes on COCO data whose
adapter evaluate.py scores per class, in every prompt mode, at the images' original resolution."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not hasattr(transformers, "Sam3TrackerModel"),
                                reason="SAM 3 (Sam3TrackerModel) is in transformers 5 only")

TINY = "sam3-tracker-tiny"
VISION_QV = r".*vision_encoder\.backbone\.layers\.\d+\.attention\.(q|v)_proj"
FAST = ["--num-workers", "0", "--batch-size", "4", "--overlay-images", "0"]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def lora_modules(names) -> set:
    """The module names that LoRA weights (PEFT state-dict or parameter names) belong to."""
    return {name.split(".lora_")[0].removeprefix("base_model.model.") for name in names if ".lora_" in name}


def write_coco(root: Path, count: int, seed: int, height: int = 48) -> str:
    """`count` synthetic 64-wide, `height`-high images (`tools.synthetic` shapes, cropped: not square) as a COCO
    instances file with compressed RLE masks, rectangles as category "rect" and discs as "disc"."""
    from pycocotools import mask as coco_mask

    from sam_split.tools.synthetic import write_shapes

    folder = write_shapes(root, count, seed=seed)
    images, annotations = [], []
    for number, path in enumerate(sorted((folder / "images").glob("*.png")), 1):
        Image.open(path).crop((0, 0, 64, height)).save(path)
        mask = np.asarray(Image.open(folder / "masks" / f"{path.stem}_0.png"))[:height] > 127
        images.append({"id": number, "file_name": f"images/{path.name}", "width": 64, "height": height})
        encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        annotations.append({"id": number, "image_id": number, "category_id": 2 - number % 2, "iscrowd": 0,
                            "segmentation": {"size": [height, 64], "counts": encoded["counts"].decode()}})
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "rect"}, {"id": 2, "name": "disc"}]}))
    return str(path)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("sam3-tracker")
    return {"root": root, "train": write_coco(root / "train", 8, seed=0), "val": write_coco(root / "val", 4, seed=1)}


@pytest.fixture(scope="module")
def tracker_folder(coco):
    """A tiny tracker saved by the stock `Sam3TrackerModel.save_pretrained` (its `random:` weights)."""
    from sam_split.tools.family import random_stock_model

    _, model = random_stock_model(TINY)
    assert type(model) is transformers.Sam3TrackerModel
    model.save_pretrained(coco["root"] / "base")
    return coco["root"] / "base"


# ------------------------------------------------------------------------------------------------- the family row


def test_the_tracker_is_a_family_row_without_a_twin():
    from sam_split.tools.family import member_for_config, member_for_model_type, member_for_random, random_names

    member = member_for_random(TINY)
    assert member.twin is None and member.stock_class is transformers.Sam3TrackerModel
    assert member is member_for_model_type("sam3_tracker") is member_for_config(member.stock_config(TINY))
    assert member.lora_targets == VISION_QV and member.square
    assert {f"random:{size}" for size in ("sam3-tracker", "sam3-tracker-small", TINY)} <= set(random_names())
    config = member.stock_config(TINY)
    assert member.processor_config(config)["mask_size"] == {"height": 32, "width": 32}
    assert "ViT hidden size 32, 2 layers" in member.describe(config)


def test_the_small_size_for_a_cpu_try_runs():
    """`random:sam3-tracker-small`: 224x224 images, 2.4 M parameters, 64x64 masks, every layer kind."""
    from sam_split.tools.family import random_stock_model

    _, model = random_stock_model("sam3-tracker-small")
    assert 2_000_000 < sum(param.numel() for param in model.parameters()) < 3_000_000
    with torch.no_grad():
        outputs = model(pixel_values=torch.randn(1, 3, 224, 224), input_boxes=torch.tensor([[[20.0, 30, 150, 200]]]),
                        multimask_output=False)
    assert outputs.pred_masks.shape == (1, 1, 1, 64, 64) and outputs.object_score_logits.shape == (1, 1, 1)


def test_default_lora_targets_are_the_vit_q_and_v_at_the_released_size():
    """2,097,152 LoRA parameters at r=16 on the released tracker (32 layers, 1024 wide): the ViT backbone's q and v,
    nothing else; plain `["q_proj", "v_proj"]` also reaches the mask decoder."""
    from peft import LoraConfig, get_peft_model

    from sam_split.tools.family import member_for_random

    member = member_for_random("sam3-tracker")
    config = member.stock_config("sam3-tracker")
    with torch.device("meta"):
        model = get_peft_model(member.stock_class(config), LoraConfig(r=16, target_modules=member.lora_targets))
    lora = {name: param.numel() for name, param in model.named_parameters() if ".lora_" in name}
    assert sum(lora.values()) == 2_097_152
    assert lora_modules(lora) == {f"vision_encoder.backbone.layers.{layer}.attention.{projection}_proj"
                                  for layer in range(32) for projection in "qv"}
    with torch.device("meta"):
        broad = get_peft_model(member.stock_class(config), LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    reached = {name.split(".")[0] for name in lora_modules(n for n, _ in broad.named_parameters())}
    assert reached == {"vision_encoder", "mask_decoder"}


def test_push_refuses_the_tracker_there_is_nothing_to_convert():
    from sam_split import push

    with pytest.raises(ValueError, match="separate q/k/v already.*finetune.py --model random:sam3-tracker-tiny"):
        push.parse_source("random:sam3-tracker-tiny", None)


def test_the_resolver_takes_a_tracker_folder_and_random_names(tracker_folder):
    from sam_split.tools.cli import ToolError
    from sam_split.tools.models import load_model, model_config, resolve_model

    location = resolve_model(str(tracker_folder), None)
    assert location.kind == "local" and model_config(location).model_type == "sam3_tracker"
    loaded = load_model(location)
    assert type(loaded) is transformers.Sam3TrackerModel and loaded.supports_gradient_checkpointing
    random = resolve_model("random:sam3-tracker-tiny", None)
    assert random.kind == "random" and str(random) == "random:sam3-tracker-tiny"
    state, saved = load_model(random).state_dict(), loaded.state_dict()
    assert state.keys() == saved.keys() and all(torch.equal(state[key], saved[key]) for key in state)
    with pytest.raises(ToolError, match="expected one of random:vit-base.*random:sam3-tracker-tiny"):
        resolve_model("random:sam3-tracker-huge", None)
    with pytest.raises(ToolError, match="a revision is for Hub ids"):
        resolve_model("random:sam3-tracker-tiny", "main")


# ----------------------------------------------------------------------------------------------------- processing


def test_the_processor_without_torchvision_is_the_trackers_preprocessing():
    """No torchvision here: `Sam3TrackerProcessor` around the SAM 2 PIL image processor with the tracker's
    normalisation (mean and std 0.5, `Sam3ImageProcessor`'s) and its square geometry: pixel values as a direct
    computation, prompts scaled to the square, low-res targets on the grid of `pred_masks`, masks back at the original
    size."""
    from sam_split.tools.family import mask_grid_size, random_stock_model
    from sam_split.tools.processing import low_res_target, model_processor

    member, model = random_stock_model(TINY)
    processor = model_processor(model.config)
    assert type(processor) is transformers.Sam3TrackerProcessor
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    encoded = processor(images=image, input_boxes=[[[8.0, 6.0, 40.0, 30.0]]], return_tensors="pt")
    resized = np.asarray(image.resize((112, 112), Image.BILINEAR), np.float32) / 255
    assert np.abs(encoded["pixel_values"][0].numpy() - ((resized - 0.5) / 0.5).transpose(2, 0, 1)).max() < 1e-6
    assert encoded["original_sizes"].tolist() == [[48, 64]]
    expected_box = torch.tensor([[[8 * 112 / 64, 6 * 112 / 48, 40 * 112 / 64, 30 * 112 / 48]]])
    assert torch.allclose(encoded["input_boxes"].double(), expected_box.double(), atol=1e-4)
    with torch.no_grad():
        outputs = model(**{k: v for k, v in encoded.items() if k != "original_sizes"}, multimask_output=False)
    grid = mask_grid_size(model.config)
    assert outputs.pred_masks.shape[-2:] == (grid, grid) == (32, 32) and outputs.object_score_logits is not None
    mask = np.zeros((48, 64), bool)
    mask[6:30, 8:40] = True
    assert low_res_target(mask, processor).shape == (32, 32)
    back = processor.post_process_masks(torch.from_numpy(low_res_target(mask, processor))[None, None, None] * 2 - 1,
                                        encoded["original_sizes"])[0]
    assert back.shape[-2:] == (48, 64) and (back[0, 0].numpy() != mask).mean() < 0.02
    assert member.processor_config(model.config)["image_mean"] == list(processor.image_processor.image_mean)


@pytest.mark.skipif(__import__("importlib").util.find_spec("torchvision") is None, reason="needs torchvision")
def test_the_pil_stand_in_equals_sam3s_image_processor():
    from sam_split.processing_sam2_split import Sam2SplitImageProcessor
    from sam_split.tools.compat import sam3_tracker_processor

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    ours = Sam2SplitImageProcessor(112, 32, image_mean=[0.5] * 3, image_std=[0.5] * 3)(image, return_tensors="pt")
    theirs = sam3_tracker_processor(112, 32).image_processor(image, return_tensors="pt")
    assert (ours["pixel_values"] - theirs["pixel_values"]).abs().max() < 2 / 255 / 0.5  # one grey level


# ------------------------------------------------------------------------------------------ gradient checkpointing


def test_gradient_checkpointing_gives_the_gradients_without_it(coco):
    """Stock refuses checkpointing; the tools' tracker allows it (its ViT layers and decoder blocks are transformers'
    checkpointing layers) and every LoRA gradient equals the one without it (fp32, 1e-6)."""
    from sam_split.tools.cli import Location
    from sam_split.tools.data import DataOptions, open_source, scan
    from sam_split.tools.family import member_for_random
    from sam_split.tools.models import load_model, model_config
    from sam_split.tools.processing import model_processor
    from sam_split.tools.segmentation import PromptedImages, collate, object_losses
    from sam_split.tools.training import build_model

    member = member_for_random(TINY)
    with pytest.raises(ValueError, match="does not support activation checkpointing"):
        member.stock_class(member.stock_config(TINY)).activation_checkpointing_enable()
    location = Location("random", f"random:{TINY}")
    processor = model_processor(model_config(location))
    source = open_source(coco["train"], DataOptions())
    dataset = PromptedImages(source, scan(source, processor, False, lambda line: None), processor, "box+point",
                             num_points=2, num_negative_points=1)
    batch = collate([dataset[index] for index in range(4)])
    gradients = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(load_model(location), 4, 4, 0.0, VISION_QV, False, checkpointing, location)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():  # a non-zero B, so that A gets a gradient too
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        model.train()
        losses, _ = object_losses(model, batch, "bce")
        losses.mean().backward()
        gradients.append({name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad})
    checkpointed = model.get_base_model().vision_encoder.backbone.layers[0]
    assert checkpointed.gradient_checkpointing
    plain, with_checkpointing = gradients
    assert plain.keys() == with_checkpointing.keys() and len(plain) == 8
    assert all(plain[name].abs().max() > 0 for name in plain)
    assert max((plain[name] - with_checkpointing[name]).abs().max().item() for name in plain) < 1e-6


# ------------------------------------------------------------------------------------ finetune.py and evaluate.py


@pytest.fixture(scope="module")
def tuned(coco, tracker_folder):
    """20 steps of finetune.py on the tracker folder, LoRA on the default targets plus the whole mask decoder,
    validated at 0 and 20."""
    from sam_split import finetune

    AcceleratorState._reset_state(reset_partial_state=True)
    out = coco["root"] / "run"
    model = finetune.main(["--model", str(tracker_folder), "--train-data", coco["train"], "--val-data", coco["val"],
                           "--output-dir", str(out), "--lr", "1e-2", "--max-steps", "20", "--eval-every", "20",
                           "--train-decoder", *FAST])
    AcceleratorState._reset_state(reset_partial_state=True)
    return model, out


@pytest.mark.slow
def test_a_tracker_folder_fine_tunes_on_coco_and_learns(tuned, tracker_folder):
    """Validation Dice and IoU rise by over 0.3 in 20 steps (the random tiny tracker learns through its decoder; LoRA
    on the vision q/v alone hardly moves random features that fast)."""
    model, out = tuned
    saved = load_file(out / "adapter_model.safetensors")
    assert lora_modules(saved) == {f"vision_encoder.backbone.layers.{layer}.attention.{projection}_proj"
                                   for layer in (0, 1) for projection in "qv"}
    assert all(".lora_" in name or name.startswith("base_model.model.mask_decoder.") for name in saved)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == VISION_QV and config["base_model_name_or_path"] == str(tracker_folder)
    assert config["auto_mapping"]["sam_split_base_model_type"] == "sam3_tracker"
    results = json.loads((out / "eval_results.json").read_text())
    base, fine_tuned = results["base"], results["fine_tuned"]
    assert set(fine_tuned["classes"]) == {"rect", "disc"} and fine_tuned["step"] == 20
    assert fine_tuned["dice"] > base["dice"] + 0.3 and fine_tuned["iou"] > base["iou"] + 0.3, results
    assert r"(q\|v)" in (out / "README.md").read_text()  # the card's table cell keeps the regex's `|`


@pytest.mark.slow
def test_evaluate_scores_the_adapter_per_class_as_validation_did(tuned, coco, tmp_path):
    """evaluate.py on the adapter alone (its base found in its config): the per-class Dice of the last validation,
    and masks written at each image's original resolution (64x48)."""
    from sam_split import evaluate

    _, out = tuned
    summary = evaluate.main(["--adapter", str(out), "--data", coco["val"], "--output-dir", str(tmp_path / "ev"),
                             *FAST])
    fine_tuned = json.loads((out / "eval_results.json").read_text())["fine_tuned"]
    assert summary["classes"].keys() == {"rect", "disc"}
    for name, scores in summary["classes"].items():
        assert scores["dice"] == pytest.approx(fine_tuned["classes"][name]["dice"], abs=1e-6)
    masks = sorted((tmp_path / "ev" / "masks").rglob("*.png"))
    assert len(masks) == 4 and all(Image.open(mask).size == (64, 48) for mask in masks)


@pytest.mark.slow
@pytest.mark.parametrize("prompt", ["point", "box+point"])
def test_every_prompt_mode_trains_and_scores(coco, prompt, tmp_path):
    """Point and box+point prompts (with a negative point): 2 steps from `random:sam3-tracker-tiny`, then
    evaluate.py in the same mode."""
    from sam_split import evaluate, finetune

    prompts = ["--prompt", prompt, "--num-points", "2", "--num-negative-points", "1"]
    finetune.main(["--model", f"random:{TINY}", "--train-data", coco["train"], "--output-dir", str(tmp_path / "run"),
                   "--max-steps", "2", *prompts, *FAST])
    AcceleratorState._reset_state(reset_partial_state=True)
    summary = evaluate.main(["--adapter", str(tmp_path / "run"), "--data", coco["val"], "--output-dir",
                             str(tmp_path / "ev"), *prompts, *FAST])
    assert summary["objects"] == 4 and set(summary["classes"]) == {"rect", "disc"}


@pytest.mark.slow
def test_default_targets_and_gradient_checkpointing_on_the_command_line(coco, tmp_path):
    """With the default targets the adapter holds the ViT backbone's q/v LoRA weights alone; `--gradient-checkpointing`
    on the command line trains the same adapter as without it (dropout 0); `--target-modules` overrides the default
    (plain names: the decoder's q_proj and v_proj too)."""
    from sam_split import finetune

    adapters = []
    for name, extra in (("plain", []), ("checkpointed", ["--gradient-checkpointing"])):
        AcceleratorState._reset_state(reset_partial_state=True)
        finetune.main(["--model", f"random:{TINY}", "--train-data", coco["train"], "--output-dir",
                       str(tmp_path / name), "--max-steps", "2", "--lr", "1e-2", "--lora-dropout", "0", *extra, *FAST])
        adapters.append(load_file(tmp_path / name / "adapter_model.safetensors"))
    plain, checkpointed = adapters
    assert plain.keys() == checkpointed.keys() and all(".lora_A." in name or ".lora_B." in name for name in plain)
    assert lora_modules(plain) == {f"vision_encoder.backbone.layers.{layer}.attention.{projection}_proj"
                                   for layer in (0, 1) for projection in "qv"}  # the default targets, nothing else
    assert max((plain[name] - checkpointed[name]).abs().max().item() for name in plain) < 1e-5
    AcceleratorState._reset_state(reset_partial_state=True)
    finetune.main(["--model", f"random:{TINY}", "--train-data", coco["train"], "--output-dir", str(tmp_path / "names"),
                   "--max-steps", "1", "--target-modules", "q_proj,v_proj", *FAST])
    reached = {name.split(".")[0] for name in lora_modules(load_file(tmp_path / "names" / "adapter_model.safetensors"))}
    assert reached == {"vision_encoder", "mask_decoder"}


@pytest.mark.slow
def test_a_tracker_on_the_hub_pinned_to_a_revision(coco, tracker_folder, tmp_path):
    """`--model ORG/NAME --base-revision SHA` (the local test Hub): the adapter records the base at that sha, and
    evaluate.py finds the base in the adapter's config and scores it per class."""
    from hub_server import HubServer
    from sam_testing import hub_env, run_python

    code = f"""
import json
from huggingface_hub import HfApi
from sam_split import evaluate, finetune
from accelerate.state import AcceleratorState
api = HfApi()
api.create_repo("tester/sam3-tracker-tiny")
sha = api.upload_folder(repo_id="tester/sam3-tracker-tiny", folder_path={str(tracker_folder)!r}).oid
finetune.main(["--model", "tester/sam3-tracker-tiny", "--base-revision", sha, "--train-data", {coco["train"]!r},
               "--output-dir", {str(tmp_path / "run")!r}, "--max-steps", "1", *{FAST!r}])
AcceleratorState._reset_state(reset_partial_state=True)
summary = evaluate.main(["--adapter", {str(tmp_path / "run")!r}, "--data", {coco["val"]!r}, "--output-dir",
                         {str(tmp_path / "ev")!r}, *{FAST!r}])
config = json.load(open({str(tmp_path / "run" / "adapter_config.json")!r}))
print("RESULT", config["base_model_name_or_path"], config["revision"] == sha, sorted(summary["classes"]))
"""
    with HubServer(tmp_path / "hub", token="tracker-token") as hub:
        printed = run_python(code, hub_env(hub.url, tmp_path / "hf", token="tracker-token"), replace_env=True)
    assert "RESULT tester/sam3-tracker-tiny True ['disc', 'rect']" in printed, printed


# ---------------------------------------------------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def exported(tuned, tracker_folder, coco):
    """(output folder, merged model): export_onnx.py on the tracker folder with the trained adapter (LoRA on the ViT
    q/v and the whole mask decoder) merged in."""
    from sam_split import export_onnx
    from sam_split.tools.cli import Location
    from sam_split.tools.models import load_adapter, load_model

    _, out = tuned
    folder = coco["root"] / "onnx"
    assert export_onnx.main(["--model", str(tracker_folder), "--adapter", str(out), "--output-dir", str(folder)]) == 0
    merged = load_adapter(load_model(Location("local", str(tracker_folder))), Location("local", str(out)))
    return folder, merged.merge_and_unload().eval()


@pytest.mark.slow
@pytest.mark.parametrize("kind, batch_size", [("points", 1), ("box", 1), ("points+box", 2), ("box", 2)])
def test_onnx_graphs_in_transformers_js_sam3_tracker_layout_match_the_merged_model(exported, kind, batch_size):
    """transformers.js' `sam3_tracker` layout (SAM 2's two graphs, config.json's model_type `sam3_tracker`), run in
    onnxruntime as transformers.js feeds it: every output within 1e-4 of the merged PyTorch model."""
    from sam_split.tools import onnx_export

    folder, merged = exported
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "sam3_tracker" and config["architectures"] == ["Sam3TrackerModel"]
    assert json.loads((folder / "preprocessor_config.json").read_text())["image_processor_type"] == "Sam3ImageProcessor"
    assert sorted(path.name for path in (folder / "onnx").iterdir()) == ["prompt_encoder_mask_decoder.onnx",
                                                                         "vision_encoder.onnx"]
    pixel_values = torch.randn(batch_size, 3, 112, 112, generator=torch.Generator().manual_seed(7))
    prompts = onnx_export.sam_prompts(merged.config, batch_size, kind)
    feeds = {"vision_encoder": {"pixel_values": pixel_values},
             "prompt_encoder_mask_decoder": onnx_export.sam2_graph_prompts(prompts, batch_size)}
    actual = onnx_export.run_graphs(folder / "onnx", onnx_export.SAM3_TRACKER_SPEC, feeds)
    expected = onnx_export.sam2_reference(merged, pixel_values, prompts)
    for name in expected:
        assert actual[name].shape == expected[name].shape, name
        assert (actual[name] - expected[name]).abs().max() <= 1e-4, name


@pytest.mark.slow
def test_transformers_js_loads_the_tracker_folder_and_segments(exported, tmp_path):
    """transformers.js' `Sam3TrackerModel` (Node) loads the folder and segments from a point and from a box, matching
    the merged PyTorch model at 1e-4 and 10x closer than the two prompts' masks are to each other."""
    from test_onnx import run_transformers_js

    from sam_split.tools import onnx_export

    folder, merged = exported
    pixel_values = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(9))
    prompts = {"point": onnx_export.sam_prompts(merged.config, 1, "points"),
               "box": onnx_export.sam_prompts(merged.config, 1, "box")}
    outputs = run_transformers_js(folder, pixel_values, prompts, tmp_path)
    point_box_difference = (outputs["point"]["pred_masks"] - outputs["box"]["pred_masks"]).abs().max()
    for name, prompt in prompts.items():
        expected = onnx_export.sam2_reference(merged, pixel_values, prompt)
        for level in onnx_export.SAM2_LEVELS:
            assert (outputs["embeddings"][level] - expected[level]).abs().max() <= 1e-4, level
        for output in ("iou_scores", "pred_masks", "object_score_logits"):
            assert list(outputs[name][output].shape) == list(expected[output].shape), (name, output)
            assert (outputs[name][output] - expected[output]).abs().max() <= 1e-4, (name, output)
        assert (outputs[name]["pred_masks"] - expected["pred_masks"]).abs().max() * 10 < point_box_difference

"""finetune.py / evaluate.py on the SAM family beyond SAM: SAM-HQ and SAM 2 (tiny configs, re-randomised weights).

The tools' one geometry (`tools.processing`): the low-res target of a mask is what each processor's own
`segmentation_maps` preprocessing makes of it, on the grid of `pred_masks`, and lines up with them (a target pushed
through the processor's mask post-processing comes back as the mask). Several objects of an image decoded against
one embedding give the losses, gradients and full-resolution scores of those objects one by one (SAM-HQ with and
without `hq_token_only`, SAM 2 with its object-score loss). A short fine-tune learns on held-out synthetic shapes for
each family, evaluate.py scores the result as validation did, and the adapter loads with `AutoPeftModel` on its base
pinned to a Hub revision.

The models are the twins (`SamHQSplitModel`, `Sam2SplitModel`, LoRA on `q,v`) converted from stock ones with
re-randomised weights; where this checkout has no twins yet, the stock models themselves (numerically identical,
LoRA on their fused `qkv`).
"""

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from hub_server import HubServer
from PIL import Image
from sam_testing import hub_env, randomize_, run_python, tiny_sam_config
from test_finetune import FAST
from test_segmentation import write_objects
from transformers import Sam2Config, Sam2Model, SamHQConfig, SamHQModel

import sam_split
from sam_split import evaluate, finetune
from sam_split.tools.cli import ToolError
from sam_split.tools.data import DataOptions, open_source, scan
from sam_split.tools.processing import (
    load_model,
    low_res_target,
    mask_grid,
    model_family,
    model_processor,
)
from sam_split.tools.segmentation import (
    PromptedImages,
    collate,
    decode_masks,
    full_resolution_masks,
    object_losses,
    score_images,
    segmentation_loss,
)
from sam_split.tools.synthetic import write_shapes

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("sam_hq", "sam2")
TWINS = {"sam_hq": getattr(sam_split, "SamHQSplitModel", None), "sam2": getattr(sam_split, "Sam2SplitModel", None)}
TARGETS = "q,v" if all(TWINS.values()) else "qkv"  # stock models: fused qkv
# finetune.py and evaluate.py take twins only (tools.models.resolve_model sends stock checkpoints to push.py).
needs_twins = pytest.mark.skipif(not all(TWINS.values()), reason="the SAM-HQ and SAM 2 twins are not in this checkout")


def tiny_sam_hq_config() -> SamHQConfig:
    """tiny_sam_config's sizes as SAM-HQ (its HQ path reads the first ViT block's output: `vit_dim`)."""
    sam = tiny_sam_config()
    decoder = {**sam.mask_decoder_config.to_dict(), "vit_dim": sam.vision_config.hidden_size}
    keep = ("hidden_size", "num_attention_heads", "mlp_dim", "iou_head_hidden_dim", "vit_dim")
    return SamHQConfig(vision_config=sam.vision_config.to_dict(),
                       prompt_encoder_config=sam.prompt_encoder_config.to_dict(),
                       mask_decoder_config={k: decoder[k] for k in keep})


def tiny_sam2_config() -> Sam2Config:
    """A 4-stage Hiera on 64x64 images: 16x16 -> 2x2 tokens (query pooling with dim != dim_out at each stage change),
    windowed and global blocks, FPN levels 16/8/4, masks 16x16."""
    backbone = {
        "model_type": "sam2_hiera_det_model", "hidden_size": 16, "num_attention_heads": 1, "image_size": [64, 64],
        "patch_kernel_size": [7, 7], "patch_stride": [4, 4], "patch_padding": [3, 3], "query_stride": [2, 2],
        "window_positional_embedding_background_size": [4, 4], "num_query_pool_stages": 3,
        "blocks_per_stage": [1, 1, 2, 1], "embed_dim_per_stage": [16, 32, 64, 128],
        "num_attention_heads_per_stage": [1, 1, 2, 2], "window_size_per_stage": [4, 2, 2, 2],
        "global_attention_blocks": [3], "mlp_ratio": 2.0,
    }
    return Sam2Config(
        vision_config={"backbone_config": backbone, "backbone_channel_list": [128, 64, 32, 16],
                       "backbone_feature_sizes": [[16, 16], [8, 8], [4, 4]], "fpn_hidden_size": 32},
        prompt_encoder_config={"hidden_size": 32, "image_size": 64, "patch_size": 16, "mask_input_channels": 4},
        mask_decoder_config={"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2, "iou_head_hidden_dim": 16},
    )


def random_stock(family: str, trainable: bool = False):
    """A stock SamHQModel / Sam2Model with N(0, 0.05) weights, as its twin where there is one, in eval mode.
    `trainable`: layer norms at identity and prompt frequencies of order 1, so that a few dozen steps can learn (as
    test_finetune's SAM)."""
    model_class, config = (SamHQModel, tiny_sam_hq_config()) if family == "sam_hq" else (Sam2Model, tiny_sam2_config())
    torch.manual_seed(0)
    model = randomize_(model_class(config)).eval()
    if TWINS[family] is not None:
        model = TWINS[family].from_stock(model).eval()
    if trainable:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for module in model.modules():
                if "LayerNorm" in type(module).__name__:
                    module.weight.fill_(1.0)
                    module.bias.zero_()
            frequencies = None
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                if name.endswith(("shared_image_embedding.positional_embedding",
                                  "shared_embedding.positional_embedding")):
                    frequencies = torch.randn(tensor.shape, generator=generator) if frequencies is None else frequencies
                    tensor.copy_(frequencies)
    return model


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


# -------------------------------------------------------------------------------------------------------- loading


def test_models_load_as_their_class_strictly_and_other_models_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import Sam2VideoConfig

    for family in FAMILIES:
        folder = tmp_path / family
        random_stock(family).save_pretrained(folder)
        model = load_model(str(folder))
        assert type(model).__name__ == (TWINS[family] or {"sam_hq": SamHQModel, "sam2": Sam2Model}[family]).__name__
        assert model_family(model) == family
        weights = load_file(folder / "model.safetensors")
        dropped = min(weights)
        save_file({k: v for k, v in weights.items() if k != dropped}, folder / "model.safetensors",
                  metadata={"format": "pt"})
        with pytest.raises(ToolError, match=rf"does not match .*missing .*{re.escape(dropped)}"):
            load_model(str(folder))
    with pytest.raises(ToolError, match="SAM 2 video model: .* convert the checkpoint with push.py"):
        model_family(Sam2VideoConfig())
    with pytest.raises(ToolError, match="cannot load the model"):
        load_model(str(tmp_path / "absent"))


# ------------------------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("family", ["sam", "sam_hq", "sam2"])
def test_low_res_targets_are_the_processors_segmentation_maps_and_line_up_with_pred_masks(family):
    config = {"sam": tiny_sam_config, "sam_hq": tiny_sam_hq_config, "sam2": tiny_sam2_config}[family]()
    processor = model_processor(config)
    # SAM 2: transformers' processor where torchvision is installed, else the one a twin's repository ships
    sam2 = "Sam2Processor" if importlib.util.find_spec("torchvision") else "Sam2SplitProcessor"
    assert model_family(config) == family and type(processor).__name__ == (
        {"sam": "SamProcessor", "sam_hq": "SamHQProcessor", "sam2": sam2}[family])
    model = random_stock(family) if family != "sam" else None
    rng = np.random.default_rng(0)
    for height, width in [(48, 64), (64, 40), (64, 64), (37, 91)]:
        mask = np.zeros((height, width), bool)
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        mask[top : top + height // 2, left : left + width // 2] = True
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        encoded = processor.image_processor(images=image, segmentation_maps=Image.fromarray(mask.astype(np.uint8)),
                                            return_tensors="pt")
        target = low_res_target(mask, processor)
        assert target.shape == (mask_grid(processor),) * 2 and target.any()
        assert np.array_equal(target, encoded["labels"][0].numpy().astype(np.float32)), (height, width)
        # Lined up: the target as logits, through the processor's mask post-processing, is the mask again.
        batch = {"original_sizes": encoded["original_sizes"], "object_valid": torch.tensor([[True]])}
        if "reshaped_input_sizes" in encoded:
            batch["reshaped_input_sizes"] = encoded["reshaped_input_sizes"]
        [back] = full_resolution_masks(processor, torch.from_numpy(target)[None, None] * 20 - 10, batch)
        assert (back[0] & mask).sum() / (back[0] | mask).sum() > 0.7, (height, width)  # IoU; a 16x16 grid is coarse
    if model is not None:
        with torch.no_grad():
            outputs = model(pixel_values=encoded["pixel_values"], input_boxes=torch.tensor([[[1.0, 2, 30, 40]]]))
        assert outputs.pred_masks.shape[-2:] == (mask_grid(processor),) * 2


def test_a_misplaced_target_would_fail_the_line_up_check():
    """The round trip above can fail: a SAM target made without the padding (squashed like SAM 2's) does not come
    back as the mask of a non-square image."""
    sam_processor, sam2_processor = model_processor(tiny_sam_config()), model_processor(tiny_sam2_config())
    mask = np.zeros((32, 64), bool)
    mask[20:30, 5:20] = True
    encoded = sam_processor(images=Image.new("RGB", (64, 32)), return_tensors="pt")
    batch = {"original_sizes": encoded["original_sizes"], "reshaped_input_sizes": encoded["reshaped_input_sizes"],
             "object_valid": torch.tensor([[True]])}
    squashed = torch.from_numpy(low_res_target(mask, sam2_processor))
    [back] = full_resolution_masks(sam_processor, squashed[None, None] * 20 - 10, batch)
    assert (back[0] & mask).sum() / (back[0] | mask).sum() < 0.5


# ------------------------------------------------------------------------------- several objects = one by one


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    return write_objects(tmp_path_factory.mktemp("family-objects"), {"a": 3, "b": 1})


@pytest.mark.slow
@pytest.mark.parametrize("family, hq_token_only", [("sam_hq", True), ("sam_hq", False), ("sam2", False)])
def test_losses_gradients_and_scores_of_several_objects_are_those_of_each_alone(objects, family, hq_token_only):
    model = random_stock(family)
    processor = model_processor(model.config)
    source = open_source(str(objects), DataOptions())
    dataset = PromptedImages(source, scan(source, processor, strict=True, log=print), processor, "box+point",
                             num_points=2, num_negative_points=1)
    together = collate([dataset[0], dataset[1]])  # 3 + 1 objects, image b padded to 3

    def run(batch):
        model.zero_grad()
        losses, _ = object_losses(model, batch, "bce", iou_loss_weight=0.5, hq_token_only=hq_token_only)
        losses.mean().backward()
        with torch.no_grad():
            masks = full_resolution_masks(processor, decode_masks(model, batch, hq_token_only)[0], batch)
        return losses.detach(), model.mask_decoder.iou_token.weight.grad.clone(), masks

    losses, gradient, masks = run(together)
    scores = score_images(masks, together, names=["a", "b"])
    one_by_one, gradients, single_scores = [], [], []
    for image in range(2):
        for k in range(int(together["object_valid"][image].sum())):
            single = {name: together[name][image : image + 1] for name in ("pixel_values", "original_sizes",
                                                                           "reshaped_input_sizes") if name in together}
            single.update({name: together[name][image : image + 1, k : k + 1]
                           for name in ("labels", "object_valid", "input_boxes", "input_points", "input_labels")})
            single.update({name: [together[name][image][k : k + 1]] for name in ("masks", "class_ids",
                                                                                 "object_names")})
            single["index"] = [image]
            loss, grad, single_masks = run(single)
            one_by_one.append(loss)
            gradients.append(grad)
            single_scores += score_images(single_masks, single, names=["a", "b"])[0]["objects"]
    assert len(losses) == 4 and ("reshaped_input_sizes" in together) == (family == "sam_hq")  # SAM 2 does not pad
    assert torch.allclose(losses, torch.cat(one_by_one), atol=1e-5)
    assert torch.allclose(gradient, torch.stack(gradients).mean(0), atol=1e-6)
    assert [o for record in scores for o in record["objects"]] == single_scores


def test_sam_hq_token_only_and_sam2_object_scores_change_what_is_decoded(objects):
    """The flags are not no-ops: SAM-HQ's HQ mask alone differs from SAM's + HQ's; SAM 2's loss includes its
    object-score BCE (target: present) on top of Dice + BCE of the mask."""
    hq, sam2 = random_stock("sam_hq"), random_stock("sam2")
    for model in (hq, sam2):
        processor = model_processor(model.config)
        source = open_source(str(objects), DataOptions())
        batch = collate([PromptedImages(source, scan(source, processor, True, print), processor)[0]])
        with torch.no_grad():
            if model is hq:
                only, mixed = decode_masks(model, batch, True)[0], decode_masks(model, batch, False)[0]
                assert (only - mixed).abs().max() > 1e-5  # mixed = HQ mask + SAM's mask: small logits, far above noise
            else:
                logits, _, object_scores = decode_masks(model, batch)
                assert object_scores.shape == (1, 3)
                mask_only = segmentation_loss(logits[0], batch["labels"][0], "bce")
                expected = mask_only + torch.nn.functional.softplus(-object_scores[0])  # BCE with target 1
                assert torch.allclose(object_losses(model, batch, "bce")[0], expected, atol=1e-6)


# ------------------------------------------------------------------------------------------- it learns, per family


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-shapes")
    return {"root": root, "train": write_shapes(root / "train", 12, seed=0),
            "val": write_shapes(root / "val", 4, seed=1)}


@pytest.mark.slow
@needs_twins
@pytest.mark.parametrize("family", FAMILIES)
def test_fine_tuning_learns_and_evaluate_scores_it_as_validation_did(shapes, family, tmp_path):
    base = tmp_path / "base"
    random_stock(family, trainable=True).save_pretrained(base)
    out = tmp_path / "run"
    AcceleratorState._reset_state(reset_partial_state=True)
    finetune.main(["--model", str(base), "--train-data", str(shapes["train"]), "--val-data", str(shapes["val"]),
                   "--output-dir", str(out), "--target-modules", TARGETS, "--train-decoder", "--lr", "1e-2",
                   "--max-steps", "20", "--eval-every", "20", "--overlay-images", "0", *FAST])
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    validations = {e["step"]: e for e in entries if "val_iou" in e}
    assert sorted(validations) == [0, 20]
    assert validations[20]["val_iou"] > validations[0]["val_iou"] + 0.15, validations
    assert validations[20]["val_dice"] > validations[0]["val_dice"] + 0.15, validations
    AcceleratorState._reset_state(reset_partial_state=True)
    summary = evaluate.main(["--adapter", str(out), "--data", str(shapes["val"]), "--output-dir", str(tmp_path / "ev"),
                             "--num-workers", "0", "--overlay-images", "0"])
    assert summary["dice"] == pytest.approx(validations[20]["val_dice"], abs=1e-6)
    assert summary["iou"] == pytest.approx(validations[20]["val_iou"], abs=1e-6)


@pytest.mark.slow
@needs_twins
def test_adapters_load_with_autopeftmodel_on_their_base_pinned_on_the_hub(shapes, tmp_path):
    """For SAM-HQ and SAM 2: fine-tune on a base pinned to a Hub revision (local test Hub), then, in the same fresh
    process, `AutoPeftModel.from_pretrained(adapter, trust_remote_code=True)` loads that base at that revision and
    gives the trained model's masks."""
    with HubServer(tmp_path / "hub", token="family-token") as hub:
        env = hub_env(hub.url, tmp_path / "hf", token="family-token")
        bases = {}
        for family in FAMILIES:
            bases[family] = tmp_path / f"base-{family}"
            random_stock(family).save_pretrained(bases[family])
        code = f"""
import json, sys, torch
from huggingface_hub import HfApi
from peft import AutoPeftModel
sys.path.insert(0, {str(ROOT / "tests")!r})
from sam_split import finetune
api = HfApi()
inputs = {{"pixel_values": torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)),
          "input_boxes": torch.tensor([[[4.0, 6.0, 40.0, 50.0]]] * 2)}}
for family, folder in {json.dumps({k: str(v) for k, v in bases.items()})}.items():
    api.create_repo(f"tester/{{family}}-base")
    sha = api.upload_folder(repo_id=f"tester/{{family}}-base", folder_path=folder).oid
    out = folder + "-adapter"
    trained = finetune.main(["--model", f"tester/{{family}}-base", "--base-revision", sha, "--train-data",
                             {str(shapes["train"])!r}, "--output-dir", out, "--target-modules", {TARGETS!r},
                             "--max-steps", "2", "--lr", "1e-2", *{FAST!r}]).eval()
    loaded = AutoPeftModel.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        diff = (loaded(**inputs, multimask_output=False).pred_masks
                - trained(**inputs, multimask_output=False).pred_masks).abs().max().item()
    recorded = json.load(open(out + "/adapter_config.json"))
    print(family, type(loaded.base_model.model).__name__, recorded["revision"] == sha, diff)
"""
        printed = run_python(code, env, replace_env=True)
    lines = re.findall(r"^(sam_hq|sam2) (\w+) (True|False) (\S+)$", printed, re.MULTILINE)
    found = {line[0]: line[1:] for line in lines}
    names = {family: (twin or stock).__name__ for (family, twin), stock in zip(TWINS.items(), (SamHQModel, Sam2Model))}
    assert found["sam_hq"][:2] == (names["sam_hq"], "True") and found["sam2"][:2] == (names["sam2"], "True"), printed
    assert all(float(diff) < 1e-5 for *_, diff in found.values()), found

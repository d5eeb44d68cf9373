"""The SAM 2 video twin (`Sam2VideoSplitModel`, the tracker): parity with stock `Sam2VideoModel` on re-randomised
weights over a 5-frame propagation prompted by points, a box and a mask (every frame's masks and object scores, and
every frame's vision features), streaming frame by frame, strict conversion both ways, strict loading, gradient
checkpointing, LoRA on exactly the Hiera q/v, and a q/v adapter trained on the image twin running in the tracker.

Sessions are made by `processing_sam2_split.Sam2SplitVideoProcessor`: transformers' `Sam2VideoProcessor` needs
torchvision for its frames (its video processor), which the CPU install has not; the prompts go through
`Sam2VideoProcessor`'s own code either way."""

import numpy as np
import pytest
import torch
from sam_testing import ATOL, max_abs_diff

pytest.importorskip("transformers.models.sam2_video.modeling_sam2_video",
                    reason="transformers has no SAM 2 video model (Sam2VideoModel) here")

from safetensors.torch import load_file, save_file  # noqa: E402 - after the skip
from transformers import Sam2Model, Sam2VideoConfig, Sam2VideoModel  # noqa: E402

from sam_split import Sam2SplitModel, Sam2VideoSplitConfig, Sam2VideoSplitModel  # noqa: E402
from sam_split.configuration_sam2_split import SAM2_SIZES  # noqa: E402
from sam_split.processing_sam2_split import Sam2SplitImageProcessor, Sam2SplitVideoProcessor  # noqa: E402
from sam_split.tools.family import random_stock_model  # noqa: E402

FRAMES = 5
HEIGHT, WIDTH = 96, 128  # not square: the prompts are rescaled to the model's 128x128 input, as in use


@pytest.fixture(scope="module")
def models():
    """Stock `Sam2VideoModel` at `random:sam2.1-video-tiny` (N(0, 0.05) weights, layer norms at identity), and its
    twin."""
    _, stock = random_stock_model("sam2.1-video-tiny")
    return stock, Sam2VideoSplitModel.from_stock(stock)


@pytest.fixture(scope="module")
def processor():
    return Sam2SplitVideoProcessor(Sam2SplitImageProcessor(size=128, mask_size=32))


@pytest.fixture(scope="module")
def frames():
    """A square that moves right on a noisy background, as HxWx3 uint8 frames."""
    generator = np.random.default_rng(0)
    clip = []
    for frame in range(FRAMES):
        image = generator.integers(0, 80, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        image[30:70, 20 + 8 * frame:60 + 8 * frame] = 220
        clip.append(image)
    return clip


PROMPTS = {
    "points": dict(input_points=[[[[40, 50], [100, 20]]]], input_labels=[[[1, 0]]]),
    "box": dict(input_boxes=[[[18, 28, 62, 72]]]),
}


def add_prompt(processor, session, kind: str) -> None:
    if kind == "mask":
        mask = np.zeros((HEIGHT, WIDTH), bool)
        mask[30:70, 20:60] = True
        processor.add_inputs_to_inference_session(session, frame_idx=0, obj_ids=1, input_masks=mask)
    else:
        processor.add_inputs_to_inference_session(session, frame_idx=0, obj_ids=1,
                                                  original_size=(HEIGHT, WIDTH), **PROMPTS[kind])


def track(model, processor, frames, kind: str) -> dict:
    """Masks and object scores of every frame, from `kind` on frame 0 propagated through the clip, as a user runs it."""
    session = processor.init_video_session(video=frames)
    add_prompt(processor, session, kind)
    model(inference_session=session, frame_idx=0)
    outputs = list(model.propagate_in_video_iterator(session))
    assert [output.frame_idx for output in outputs] == list(range(FRAMES))
    result = {"masks": torch.stack([output.pred_masks for output in outputs])}
    if getattr(outputs[0], "object_score_logits", None) is not None:  # transformers 5 outputs the object scores
        result["object scores"] = torch.stack([output.object_score_logits for output in outputs])
    return result


def vision_features(model, processor, frames) -> dict:
    """Every frame's vision features as the tracker uses them (`get_image_features`: the FPN levels, the two high-res
    ones projected for the mask decoder, and their position encodings) and the Hiera trunk's last hidden state."""
    pixels = processor(images=frames, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = model.get_image_features(pixels)
        trunk = model.vision_encoder(pixels).last_hidden_state
    # transformers 5 returns an output object, 4.57 a tuple (levels, position encodings, ...)
    levels, encodings = ((features.fpn_hidden_states, features.fpn_position_encoding)
                         if hasattr(features, "fpn_hidden_states") else features[:2])
    result = {f"level {n}": level for n, level in enumerate(levels)}
    result |= {f"position {n}": encoding for n, encoding in enumerate(encodings)}
    return result | {"trunk": trunk}


def differences(actual: dict, expected: dict) -> dict:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert expected[name].float().abs().max() > 1e-3, name  # parity on zeros would prove nothing
    return {name: max_abs_diff(actual[name], expected[name]) for name in expected}


# ------------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("kind", ["points", "box", "mask"])
def test_tracking_equals_stock(models, processor, frames, kind):
    stock, twin = models
    expected = track(stock, processor, frames, kind)
    diffs = differences(track(twin, processor, frames, kind), expected)
    assert max(diffs.values()) <= ATOL, diffs
    assert expected["masks"].shape == (FRAMES, 1, 1, 32, 32)
    # the object moves: the tracked masks are not one mask repeated
    assert (expected["masks"][-1] - expected["masks"][0]).abs().max() > 1e-3


def test_vision_features_equal_stock(models, processor, frames):
    stock, twin = models
    diffs = differences(vision_features(twin, processor, frames), vision_features(stock, processor, frames))
    assert max(diffs.values()) <= ATOL, diffs


def test_streaming_frame_by_frame_equals_stock(models, processor, frames):
    """No video up front: each frame is processed and given to `model(inference_session=..., frame=...)`."""

    def stream(model):
        session = processor.init_video_session()
        masks = []
        for index, frame in enumerate(frames):
            pixels = processor(images=frame, return_tensors="pt")["pixel_values"][0]
            if index == 0:
                add_prompt(processor, session, "points")
            masks.append(model(inference_session=session, frame=pixels).pred_masks)
        return torch.stack(masks)

    expected = stream(stock := models[0])
    assert expected.shape == (FRAMES, 1, 1, 32, 32) and expected.abs().max() > 1e-3
    assert max_abs_diff(stream(models[1]), expected) <= ATOL
    del stock


def test_the_comparison_fails_when_q_and_v_are_swapped(models, processor, frames):
    stock, twin = models
    broken = Sam2VideoSplitModel.from_stock(stock)
    attention = broken.vision_encoder.backbone.blocks[0].attn
    with torch.no_grad():
        attention.q.weight.copy_(twin.vision_encoder.backbone.blocks[0].attn.v.weight)
        attention.v.weight.copy_(twin.vision_encoder.backbone.blocks[0].attn.q.weight)
    diffs = differences(track(broken, processor, frames, "points"), track(stock, processor, frames, "points"))
    assert diffs["masks"] > 100 * ATOL


# ----------------------------------------------------------------------------------------------- conversion


def test_conversion_both_ways_is_exact_and_keeps_every_memory_weight(models):
    stock, twin = models
    assert not [key for key in twin.state_dict() if ".qkv." in key]
    assert {key.split(".")[0] for key in twin.state_dict()} >= {"memory_attention", "memory_encoder",
                                                                "object_pointer_proj", "mask_downsample"}
    back = twin.to_stock()
    assert type(back) is Sam2VideoModel
    assert sorted(back.state_dict()) == sorted(stock.state_dict())
    for key, value in stock.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    with pytest.raises(TypeError, match="already split"):
        Sam2VideoSplitModel.from_stock(twin)


def test_image_twin_refuses_to_stand_for_the_video_twin(models):
    stock, _ = models
    with pytest.raises(TypeError, match="expects a Sam2Model, a folder or a Hub id, got Sam2VideoModel"):
        Sam2SplitModel.from_stock(stock)
    image, left_out = Sam2SplitModel.stock_part(stock)  # the image model it holds, explicitly
    assert type(image) is Sam2Model and {key.split(".")[0] for key in left_out} >= {"memory_attention"}


@pytest.fixture(scope="module")
def folders(models, tmp_path_factory):
    stock, twin = models
    root = tmp_path_factory.mktemp("video_twin")
    stock.save_pretrained(root / "stock")
    twin.save_pretrained(root / "twin")
    return root / "stock", root / "twin"


def test_save_pretrained_ships_the_code_with_a_local_auto_map(folders):
    import json

    _, folder = folders
    assert sorted(path.name for path in folder.iterdir()) == sorted([
        "compat.py", "config.json", "configuration_sam2_split.py", "configuration_sam2_video_split.py",
        "model.safetensors", "modeling_sam2_split.py", "modeling_sam2_video_split.py", "split_qkv.py"])
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "sam2_video_split"
    assert config["auto_map"]["AutoModel"] == "modeling_sam2_video_split.Sam2VideoSplitModel"


def test_from_pretrained_is_strict(folders, models, tmp_path):
    stock_folder, folder = folders
    with pytest.raises(ValueError, match=r"fused `qkv`.*Sam2VideoSplitModel\.from_stock"):
        Sam2VideoSplitModel.from_pretrained(stock_folder)
    for item in folder.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    weights = load_file(folder / "model.safetensors")
    del weights["memory_attention.layers.0.cross_attn_image.v_proj.weight"]  # a memory weight counts as much
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing weights.*Refusing to keep randomly initialised weights"):
        Sam2VideoSplitModel.from_pretrained(tmp_path)
    from transformers import AutoModel

    reloaded = AutoModel.from_pretrained(folder)  # the package registered the class: no remote code needed here
    assert type(reloaded) is Sam2VideoSplitModel
    for key, value in models[1].state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_conversion_from_a_folder_and_a_config_of_another_member_refused(folders):
    stock_folder, _ = folders
    twin = Sam2VideoSplitModel.from_stock(stock_folder)
    assert type(twin) is Sam2VideoSplitModel and isinstance(twin.config, Sam2VideoSplitConfig)
    with pytest.raises(ValueError, match="not a stock SAM 2 video checkpoint"):
        Sam2VideoSplitModel.load_stock(folders[1])


# ------------------------------------------------------------------------------------ training and LoRA


def test_gradient_checkpointing_gives_the_same_gradients(models, processor, frames):
    """Through the per-frame path the tracker runs (`_single_frame_forward`: vision encoder, prompt encoder, mask
    decoder), every weight's gradient with checkpointing equals the one without."""
    twin = Sam2VideoSplitModel.from_stock(models[0]).train()
    pixels = processor(images=frames[:1], return_tensors="pt")["pixel_values"]
    points = torch.tensor([[[[40.0, 60.0]]]])

    def gradients():
        twin.zero_grad()
        outputs = twin._single_frame_forward(pixel_values=pixels, input_points=points,
                                             input_labels=torch.tensor([[[1]]]))
        (outputs.pred_masks.square().mean() + outputs.object_score_logits.sum()).backward()
        return {name: param.grad.clone() for name, param in twin.named_parameters() if param.grad is not None}

    plain = gradients()
    twin.activation_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in twin.vision_encoder.backbone.blocks)
    checkpointed = gradients()
    assert sorted(plain) == sorted(checkpointed)
    assert any(".attn.q." in name for name in plain) and all(plain[name].abs().max() > 0 for name in plain
                                                             if ".attn.q.weight" in name)
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def test_lora_q_v_hits_exactly_the_hiera_q_and_v_at_hiera_tiny():
    """As the image twin: 279,552 LoRA weights at r=16 on hiera-tiny, none in the memory attention or the decoder."""
    from peft import LoraConfig, get_peft_model

    with torch.device("meta"):
        twin = Sam2VideoSplitModel(Sam2VideoSplitConfig(**SAM2_SIZES["hiera-tiny"]))
        stock = Sam2VideoModel(Sam2VideoConfig(**SAM2_SIZES["hiera-tiny"]))
    from sam_split.split_qkv import split_qkv_state_dict

    assert {key: tuple(value.shape) for key, value in twin.state_dict().items()} == {
        key: tuple(value.shape) for key, value in split_qkv_state_dict(stock.state_dict()).items()}
    peft_model = get_peft_model(twin, LoraConfig(r=16, target_modules=["q", "v"]))
    assert peft_model.get_nb_trainable_parameters()[0] == 279_552
    adapted = {name.split(".lora_A")[0] for name, _ in peft_model.named_parameters() if ".lora_A" in name}
    assert adapted and all(".vision_encoder.backbone.blocks." in name for name in adapted)


def test_an_adapter_trained_on_the_image_twin_runs_in_the_tracker(models, processor, frames, tmp_path):
    """A q/v LoRA adapter saved from the image twin loads onto the video twin with no missing or unexpected adapter
    weight; with non-zero B it changes the tracking, which equals the tracking of the merged model."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    stock, _ = models
    image_twin = Sam2SplitModel.from_stock(Sam2SplitModel.stock_part(stock)[0])
    adapted_image = get_peft_model(image_twin, LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as after training: B no longer zero
        for name, parameter in adapted_image.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    adapted_image.save_pretrained(tmp_path / "adapter")

    base = track(Sam2VideoSplitModel.from_stock(stock), processor, frames, "points")
    tracker = PeftModel.from_pretrained(Sam2VideoSplitModel.from_stock(stock), tmp_path / "adapter").eval()
    saved = load_peft_weights(str(tmp_path / "adapter"))
    loaded = get_peft_model_state_dict(tracker)
    assert sorted(loaded) == sorted(saved) and len(saved) == 4 * len(stock.vision_encoder.backbone.blocks)
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key

    adapted = track(tracker, processor, frames, "points")
    assert max_abs_diff(adapted["masks"], base["masks"]) > 100 * ATOL  # the adapter changes the tracking
    merged = track(tracker.merge_and_unload(), processor, frames, "points")
    diffs = differences(merged, adapted)
    assert max(diffs.values()) <= 1e-4, diffs  # merging changes the rounding of W + BA only


@pytest.mark.slow
def test_the_docs_tracking_example_runs_as_written(frames, tmp_path, monkeypatch):
    """docs/family.md's tracking block, on `random:sam2.1-video-tiny` built by push.py into the folder it names, with
    an image-twin adapter where it loads one and the clip as JPEG files."""
    import re
    from pathlib import Path

    from peft import LoraConfig, get_peft_model
    from PIL import Image

    from sam_split import push

    source = push.parse_source("random:sam2.1-video-tiny", None)
    loaded = push.load_source(source, allow_pickle=False)
    push.build(loaded, source, tmp_path / "sam2.1-video-split", "sam2.1-video-split", "5GB")
    image_twin = Sam2SplitModel.from_stock(Sam2SplitModel.stock_part(loaded.model)[0])
    get_peft_model(image_twin, LoraConfig(r=4, target_modules=["q", "v"])).save_pretrained(tmp_path / "sam2-lora")
    (tmp_path / "frames").mkdir()
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / "frames" / f"{index:05d}.jpg")
    docs = (Path(__file__).resolve().parent.parent / "docs" / "family.md").read_text()
    [block] = [code for code in re.findall(r"```python\n(.*?)```", docs, flags=re.S) if "sam2-lora" in code]
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block, "docs/family.md", "exec"), scope)
    assert type(scope["model"]).__name__ == "Sam2VideoSplitModel"
    assert type(scope["processor"]).__name__ == "Sam2SplitVideoProcessor"
    assert sorted(scope["masks"]) == list(range(FRAMES))
    assert all(mask.shape == (1, 1, HEIGHT, WIDTH) and mask.dtype == torch.bool for mask in scope["masks"].values())
